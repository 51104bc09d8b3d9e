"""Feedback providers: scorers (toxicity, sentiment, reward models, Perspective, any callable) and the ALT-RM
quantile provider built on them; `build_scorer` maps the config's `scorer` key to one."""

from __future__ import annotations

from ..errors import AltlmError
from .base import Feedback, FeedbackProvider, Scorer
from .quantile import QuantileFeedback, grouped_buckets, quantile_buckets

__all__ = [
    "Feedback",
    "FeedbackProvider",
    "Scorer",
    "QuantileFeedback",
    "quantile_buckets",
    "grouped_buckets",
    "build_scorer",
    "build_feedback",
]


def build_feedback(cfg, cache_root) -> tuple[FeedbackProvider, Scorer]:
    """(feedback provider, evaluation scorer) for a run config. ALT-RM: quantiles over the scorer, evaluated by
    the same scorer; ALT-LMC/LMU: the LLM judge is both."""
    if cfg.feedback_type == "rm":
        scorer = build_scorer(cfg.scorer, cfg)
        return QuantileFeedback(scorer, cfg.feedback_words, cfg.quantiles, cfg.quantile_ties), scorer
    from pathlib import Path

    from .judge import JudgeSettings
    from .llm import LLMFeedback

    settings = JudgeSettings(
        cfg.judge_backend,
        cfg.judge_model,
        cfg.judge_base_url,
        cfg.judge_api_key_env,
        cfg.judge_concurrency,
        cfg.judge_timeout,
        cfg.judge_max_retries,
        cfg.judge_requests_per_second,
        cfg.judge_temperature,
        cfg.judge_max_tokens,
        cfg.judge_samples,
        cfg.judge_price_per_1k_prompt,
        cfg.judge_price_per_1k_completion,
        choices=list(cfg.feedback_words) if cfg.judge_choice else None,
    )
    template = cfg.judge_template or ("lmc_hh" if cfg.feedback_type == "lmc" else "lmu_tldr")
    cache = Path(cfg.judge_cache) if cfg.judge_cache else Path(cache_root) / "judge-cache.sqlite"
    provider = LLMFeedback(
        cfg.feedback_type,
        settings,
        template,
        cfg.feedback_words if cfg.feedback_type == "lmc" else None,
        cache,
        cfg.judge_min_agreement,
    )
    return provider, provider


SCORERS = ["jigsaw", "profanity", "vader", "hf", "value_head", "perspective", "callable"]


def build_scorer(name: str, cfg=None) -> Scorer:
    """The scorer named `name`; the reward adapters (hf, value_head, perspective, callable) read their settings
    from `cfg` (an ALTConfig)."""
    if name == "jigsaw":
        from .jigsaw import JigsawToxicity

        return JigsawToxicity()
    if name == "profanity":
        from .scorers import ProfanityCheck

        return ProfanityCheck()
    if name == "vader":
        from .scorers import VaderSentiment

        return VaderSentiment()
    if name in ("hf", "value_head", "perspective", "callable"):
        if cfg is None:
            raise AltlmError(
                f"scorer '{name}' needs its config keys (reward_model, reward_callable, perspective_*); pass the run's config"
            )
        from . import reward_models as R

        common = dict(name=cfg.reward_name, higher_is_better=cfg.reward_higher_is_better)
        if name == "callable":
            return R.CallableScorer(cfg.reward_callable, **common)
        if name == "perspective":
            return R.PerspectiveScorer(
                cfg.perspective_base_url,
                cfg.perspective_api_key_env,
                cfg.perspective_attribute,
                cfg.perspective_requests_per_second,
                cfg.perspective_max_retries,
                cfg.perspective_timeout,
            )
        sizes = dict(
            text_format=cfg.reward_text_format,
            batch_size=cfg.reward_batch_size,
            max_tokens=cfg.reward_max_tokens,
            trust_remote_code=cfg.trust_remote_code,
            **common,
        )
        if name == "hf":
            return R.HFClassifierScorer(
                cfg.reward_model, cfg.reward_label, cfg.reward_index, cfg.reward_activation, **sizes
            )
        if not cfg.reward_head:
            raise AltlmError(
                "scorer=value_head needs reward_head: the state-dict file holding v_head.weight (see `altlm train --help-config`)"
            )
        return R.ValueHeadScorer(cfg.reward_model, cfg.reward_head, **sizes)
    raise AltlmError(f"unknown scorer '{name}'; use one of: {', '.join(SCORERS)}")
