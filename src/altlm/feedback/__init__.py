"""Feedback providers: scorers (toxicity, sentiment) and the ALT-RM quantile provider built on them."""
from __future__ import annotations

from ..errors import AltlmError
from .base import Feedback, FeedbackProvider, Scorer
from .quantile import QuantileFeedback, grouped_buckets, quantile_buckets

__all__ = ["Feedback", "FeedbackProvider", "Scorer", "QuantileFeedback", "quantile_buckets", "grouped_buckets", "build_scorer",
           "build_feedback"]


def build_feedback(cfg, cache_root) -> tuple[FeedbackProvider, Scorer]:
    """(feedback provider, evaluation scorer) for a run config. ALT-RM: quantiles over the scorer, evaluated by
    the same scorer; ALT-LMC/LMU: the LLM judge is both."""
    if cfg.feedback_type == "rm":
        scorer = build_scorer(cfg.scorer)
        return QuantileFeedback(scorer, cfg.feedback_words, cfg.quantiles), scorer
    from pathlib import Path

    from .judge import JudgeSettings
    from .llm import LLMFeedback

    settings = JudgeSettings(cfg.judge_backend, cfg.judge_model, cfg.judge_base_url, cfg.judge_api_key_env,
                             cfg.judge_concurrency, cfg.judge_timeout, cfg.judge_max_retries, cfg.judge_requests_per_second,
                             cfg.judge_temperature, cfg.judge_max_tokens, cfg.judge_samples,
                             cfg.judge_price_per_1k_prompt, cfg.judge_price_per_1k_completion,
                             choices=list(cfg.feedback_words) if cfg.judge_choice else None)
    template = cfg.judge_template or ("lmc_hh" if cfg.feedback_type == "lmc" else "lmu_tldr")
    cache = Path(cfg.judge_cache) if cfg.judge_cache else Path(cache_root) / "judge-cache.sqlite"
    provider = LLMFeedback(cfg.feedback_type, settings, template, cfg.feedback_words if cfg.feedback_type == "lmc" else None,
                           cache, cfg.judge_min_agreement)
    return provider, provider


def build_scorer(name: str) -> Scorer:
    if name == "jigsaw":
        from .jigsaw import JigsawToxicity

        return JigsawToxicity()
    if name == "profanity":
        from .scorers import ProfanityCheck

        return ProfanityCheck()
    if name == "vader":
        from .scorers import VaderSentiment

        return VaderSentiment()
    raise AltlmError(f"unknown scorer '{name}'; use jigsaw, profanity or vader")
