"""Baselines under one harness, for `benchmarks/sample_efficiency.py`: same policy model, LoRA settings, prompts,
scorer, sampling settings and held-out evaluation for every method; budgets counted in samples generated.

This module owns
- `Harness`: what every method shares (the task's ALTConfig, prompt split, scorer, tokenizer, evaluation settings,
  fluency LM) and `Harness.evaluate` → one curve point `{"samples": N, "<metric>_mean", "<metric>_gt_0_5",
  "perplexity", "dist_2", ...}`;
- `run_alt`: ALT-RM and Quark, i.e. the real `ALTTrainer` (template tag_separator / quark), one point per iteration;
- `run_self_training`: SFT on the reference model's own samples (no feedback, no filtering) and best-of-n filtered
  SFT (RAFT/ReST: n samples per prompt from the current policy, the best one kept), with ALT's loss (NLL + β·KL −
  α·entropy) and the same optimiser schedule per round;
- `run_ppo`, `run_rloo`: TRL's PPOTrainer (`trl.experimental.ppo`, trl ≤ 1.12) and RLOOTrainer with the same scorer
  as reward (toxicity t → reward −t; VADER compound as is). PPO needs an nn.Module reward model: `ScorerRewardModel`
  decodes the token ids back to (prompt, completion) text and returns the scorer's value at every position, which is
  exactly what TRL's `get_reward` reads at the last response token. PPO's value model is the policy's base model
  with a scalar head, LoRA-adapted like the policy (head trained in full): a CPU-sized critic.

What a method "consumed" is the number of completions it generated for training (not evaluation samples).
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path

import torch

from . import evaluation, models
from .config import ALTConfig
from .data import load_prompts
from .errors import AltlmError
from .feedback import build_scorer
from .loss import alt_loss, target_logits
from .sampler import SampleSettings, inference_model, sample
from .template import Template

POINT_KEYS = ("mean", "gt_0_5", "avg_max", "prob")


@dataclasses.dataclass
class Harness:
    cfg: ALTConfig
    prompts: object  # data.PromptSplit
    scorer: object
    tokenizer: object
    fluency: evaluation.Fluency | None
    amp: torch.dtype | None

    @classmethod
    def build(cls, cfg: ALTConfig) -> "Harness":
        amp = models.autocast_dtype(cfg.precision, torch.device("cpu"))
        fluency = None
        if cfg.perplexity_model:
            fluency = evaluation.Fluency(
                cfg.perplexity_model, amp, samples_per_prompt=cfg.perplexity_samples_per_prompt or None
            )
        return cls(
            cfg, load_prompts(cfg), build_scorer(cfg.scorer, cfg), models.load_tokenizer(cfg.model), fluency, amp
        )

    @property
    def metric(self) -> str:
        return self.scorer.name

    def reward(self, scores: list[float]) -> list[float]:
        """The scorer as an RL reward: higher is better (toxicity t → −t; sentiment as is)."""
        return [s if self.scorer.higher_is_better else -s for s in scores]

    def train_settings(self) -> SampleSettings:
        c = self.cfg
        return SampleSettings(
            c.temperature, c.top_p, c.min_new_tokens, c.max_new_tokens, c.sample_batch_size, c.max_prompt_tokens
        )

    def eval_settings(self) -> SampleSettings:
        c = self.cfg
        return SampleSettings(
            c.eval_temperature,
            c.eval_top_p,
            c.min_new_tokens,
            c.max_new_tokens,
            c.sample_batch_size,
            c.max_prompt_tokens,
        )

    def evaluate(self, model, samples: int, label: str) -> dict:
        """A plain (unconditioned) model on the held-out prompts, exactly as the trainer evaluates (same seed)."""
        blocks, records = evaluation.evaluate(
            inference_model(model, self.amp),
            self.tokenizer,
            Template(),
            self.prompts.eval,
            [evaluation.Condition(None, self.cfg.eval_samples_per_prompt)],
            self.eval_settings(),
            self.scorer,
            [],
            self.cfg.seed + 7,
            label,
            self.fluency,
        )
        out = point(samples, blocks["<none>"], self.metric)
        out["by_prompt"] = prompt_means(records, self.prompts.eval)
        return out

    def policy(self, seed: int | None = None):
        """The base model with the task's LoRA settings (a peft model; the adapter off = the reference)."""
        c = self.cfg
        base = models.load_model(c.model, seed=c.seed if seed is None else seed)
        lora = dict(
            r=c.lora_r,
            alpha=c.lora_alpha,
            dropout=c.lora_dropout,
            target_modules=c.lora_target_modules,
            layers=c.lora_layers,
        )
        model = models.prepare_for_training(base, "lora", c.top_fraction, lora, [])
        models.contiguous_lm_head(model)
        return model


def point(samples: int, block: dict, metric: str) -> dict:
    out = {"samples": samples}
    for k in POINT_KEYS:
        key = f"{metric}_{k}" if k in ("mean", "gt_0_5") else f"{k}_{metric}"
        out[key] = block.get(key)
    for k in ("perplexity", "perplexity_geomean", "dist_1", "dist_2", "dist_3", "reward_mean", "length_mean"):
        out[k] = block.get(k)
    return out


def prompt_means(records: list[dict], prompts: list[str]) -> list[float | None]:
    """Each held-out prompt's mean score, in the order of `prompts` (None: nothing scored): what a bootstrap over
    prompts resamples, and what pairs two methods evaluated on the same prompts."""
    by: dict[str, list[float]] = {}
    for r in records:
        if r["score"] is not None and r["score"] == r["score"]:
            by.setdefault(r["prompt"], []).append(float(r["score"]))
    return [sum(by[p]) / len(by[p]) if by.get(p) else None for p in prompts]


def check_budgets(budgets: list[int], round_size: int) -> list[int]:
    budgets = sorted(set(budgets))
    if not budgets or budgets[0] < 1:
        raise AltlmError(f"sample budgets must be positive integers, got {budgets}")
    bad = [b for b in budgets if b % round_size]
    if bad:
        raise AltlmError(
            f"sample budgets {bad} are not multiples of the round size {round_size} (samples per round); "
            f"pick budgets like {round_size}, {2 * round_size}, ..."
        )
    return budgets


# ---------------------------------------------------------------------------------------------- ALT and Quark
QUARK_TOKENS = [f"_TREE_TOKEN_{i:05d}" for i in range(5)]


def run_alt(
    h: Harness,
    budgets: list[int],
    round_size: int,
    samples_per_prompt: int,
    steps_per_round: int,
    out_dir: Path,
    quark: bool = False,
    feedback_words: list[str] | None = None,
) -> tuple[list[dict], dict, float]:
    """ALT-RM (or Quark with `quark=True`) through the real ALTTrainer, one iteration per round; evaluated under the
    exemplar after every iteration. Returns (points, reference point, seconds)."""
    budgets = check_budgets(budgets, round_size)
    words = QUARK_TOKENS if quark else (feedback_words or h.cfg.feedback_words)
    cfg = dataclasses.replace(
        h.cfg,
        output_dir=str(out_dir),
        iterations=budgets[-1] // round_size,
        prompts_per_iteration=round_size // samples_per_prompt,
        samples_per_prompt=samples_per_prompt,
        train_steps=steps_per_round,
        eval_every=1,
        eval_all_feedback=False,
        report=False,
        template="quark" if quark else h.cfg.template,
        feedback_words=list(words),
        exemplar=words[0],
        eval_feedback=None,
    )
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    from .trainer import ALTTrainer

    t0 = time.time()
    ALTTrainer(cfg).train()
    seconds = time.time() - t0
    evals = [json.loads(line) for line in open(out_dir / "metrics.jsonl") if '"kind": "eval"' in line]
    ref = next(e for e in evals if e["model"] == "reference")["by_feedback"]["<none>"]
    pts = [
        point(e["iteration"] * round_size, e["by_feedback"][words[0]], h.metric)
        for e in evals
        if e["model"] == "policy"
    ]
    return pts, point(0, ref, h.metric), seconds


# ---------------------------------------------------------------------------------------------- SFT, best-of-n
def _train_round(h: Harness, model, rows: list[tuple[str, str, bool]], steps: int, rng: random.Random) -> None:
    """`steps` optimiser steps of ALT's loss on (prompt, completion, truncated) rows drawn uniformly, no feedback."""
    c, tok, tpl = h.cfg, h.tokenizer, Template(eos_rule=h.cfg.eos_rule)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=c.learning_rate, weight_decay=c.weight_decay)
    warm = max(1, round(steps * c.warmup_ratio))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm)))
    )
    model.train()
    for _ in range(steps):
        batch = [rows[rng.randrange(len(rows))] for _ in range(c.batch_size)]
        inputs = [tpl.input_ids(tok, None, p, c.max_prompt_tokens) for p, _, _ in batch]
        targets = [tpl.target_ids(tok, comp, trunc) for _, comp, trunc in batch]
        with torch.autocast("cpu", dtype=h.amp or torch.float32, enabled=h.amp is not None):
            logits, tgt, mask = target_logits(model, inputs, targets, tok.pad_token_id)
            ref = None
            if c.kl_coef:
                with torch.no_grad(), model.disable_adapter():
                    ref = target_logits(model, inputs, targets, tok.pad_token_id)[0]
        loss, _ = alt_loss(logits, tgt, mask, ref, c.kl_coef, c.entropy_coef, c.kl_direction, len(tok))
        if not torch.isfinite(loss):
            continue
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


def run_self_training(
    h: Harness, kind: str, budgets: list[int], round_size: int, n: int, steps_per_round: int
) -> tuple[list[dict], float]:
    """kind="sft": every round samples the *reference* model (n per prompt) and trains on all of them;
    kind="best_of_n": every round samples the current policy n times per prompt and trains on the best of each
    prompt's n (RAFT/ReST). The training set accumulates over rounds, as ALT's pool does."""
    if kind not in ("sft", "best_of_n"):
        raise AltlmError(f"unknown self-training baseline '{kind}' (sft, best_of_n)")
    budgets = check_budgets(budgets, round_size)
    c, t0 = h.cfg, time.time()
    torch.manual_seed(c.seed)
    model = h.policy()
    reference = inference_model(model, h.amp) if kind == "sft" else None  # the untrained policy, for every round
    rng = random.Random(f"{c.seed}/{kind}")
    rows: list[tuple[str, str, bool]] = []
    points, consumed, r = [], 0, 0
    while consumed < budgets[-1]:
        r += 1
        prompts = rng.sample(h.prompts.train, min(round_size // n, len(h.prompts.train)))
        requests = [(None, p) for p in prompts for _ in range(n)]
        sampler = reference if kind == "sft" else inference_model(model, h.amp)
        got = sample(
            sampler,
            h.tokenizer,
            Template(),
            requests,
            h.train_settings(),
            [],
            seed=c.seed * 100_003 + r,
            desc=f"{kind} round {r}",
        )
        consumed += len(got)
        if kind == "sft":
            rows += [(p, s.completion, s.truncated) for (_, p), s in zip(requests, got)]
        else:
            rewards = h.reward(h.scorer.score([p for _, p in requests], [s.completion for s in got]))
            for i, p in enumerate(prompts):
                best = max(range(i * n, (i + 1) * n), key=lambda j: rewards[j])
                rows.append((p, got[best].completion, got[best].truncated))
        _train_round(h, model, rows, steps_per_round, rng)
        if consumed in budgets:
            points.append(h.evaluate(model, consumed, kind))
    return points, time.time() - t0


# ---------------------------------------------------------------------------------------------- TRL: PPO, RLOO
def _require_trl(what: str):
    try:
        import trl  # noqa: F401
    except ImportError:
        raise AltlmError(f"the {what} baseline needs TRL; pip install 'altlm[baselines]' (trl==1.12.0)") from None
    if what == "PPO":
        try:
            from trl.experimental.ppo import PPOConfig, PPOTrainer  # noqa: F401
        except ImportError:
            import trl

            raise AltlmError(
                f"TRL {trl.__version__} has no PPOTrainer (removed after 1.12); pip install trl==1.12.0"
            ) from None


class _ScoreBackbone(torch.nn.Module):
    """Stands where TRL's get_reward expects the reward model's LM backbone: decodes each row back into
    (prompt, completion) — the prompt is the first `context_length` tokens, fixed because every query is padded
    to that length — and returns the scorer's reward at every position as the 'last hidden state'."""

    def __init__(self, harness: Harness, context_length: int):
        super().__init__()
        self.h, self.context_length, self.calls, self.samples = harness, context_length, 0, 0
        self.anchor = torch.nn.Parameter(torch.zeros(()), requires_grad=False)  # gives the module a device

    def forward(self, input_ids, attention_mask, **_):
        tok, L = self.h.tokenizer, self.context_length
        prompts = [
            tok.decode(ids[m.bool()], skip_special_tokens=True)
            for ids, m in zip(input_ids[:, :L], attention_mask[:, :L])
        ]
        comps = [
            tok.decode(ids[m.bool()], skip_special_tokens=True)
            for ids, m in zip(input_ids[:, L:], attention_mask[:, L:])
        ]
        rewards = torch.tensor(self.h.reward(self.h.scorer.score(prompts, comps)), dtype=torch.float32)
        self.calls += 1
        self.samples += len(comps)
        hidden = rewards[:, None, None].expand(-1, input_ids.shape[1], 1).contiguous()
        from types import SimpleNamespace

        return SimpleNamespace(hidden_states=(hidden,))


class ScorerRewardModel(torch.nn.Module):
    """The scorer as the nn.Module reward model TRL's PPOTrainer requires (see _ScoreBackbone); `score` is the
    identity, so the 'reward logit' at the last response token is the scorer's reward for the whole completion."""

    base_model_prefix = "backbone"

    def __init__(self, harness: Harness, context_length: int):
        super().__init__()
        self.backbone = _ScoreBackbone(harness, context_length)
        self.score = torch.nn.Identity()


def _padded_queries(h: Harness) -> tuple[list[list[int]], int]:
    """Every training prompt as token ids, left-padded to one fixed length (so PPO's context length is constant)."""
    tpl, tok = Template(), h.tokenizer
    ids = [tpl.input_ids(tok, None, p, h.cfg.max_prompt_tokens) for p in h.prompts.train]
    # The longest 1% of prompts are left out of PPO's dataset: one 49-token outlier among ~8-token fortune prefixes
    # would otherwise pad every PPO sequence to it (2.5× the compute).
    width = sorted(len(i) for i in ids)[int(0.99 * (len(ids) - 1))]
    return [[tok.pad_token_id] * (width - len(i)) + i for i in ids if len(i) <= width], width


class _BudgetCallback:
    """Evaluates the policy when the samples generated so far reach a budget (checked after each optimiser step)."""

    def __new__(cls, *a, **k):
        from transformers import TrainerCallback

        class Impl(TrainerCallback):
            def __init__(self, h, model, budgets, label, consumed):
                self.h, self.model, self.budgets, self.label, self.consumed, self.points = (
                    h,
                    model,
                    list(budgets),
                    label,
                    consumed,
                    [],
                )

            def on_step_end(self, args, state, control, **kw):
                n = self.consumed(state)
                while self.budgets and n >= self.budgets[0]:
                    b = self.budgets.pop(0)
                    if n == b:
                        self.points.append(self.h.evaluate(self.model, b, self.label))
                if not self.budgets:
                    control.should_training_stop = True
                return control

        return Impl(*a, **k)


def _value_model(h: Harness):
    """PPO's critic: the policy's base model with a scalar head, LoRA-adapted with the policy's settings (the head
    is trained in full). Returned unwrapped (LoRA layers injected in place), as PolicyAndValueWrapper expects."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForSequenceClassification

    c = h.cfg
    src = models.resolve(c.model)
    config = AutoConfig.from_pretrained(src, num_labels=1)
    if c.model in models.TINY:
        for k, v in models.TINY[c.model][1].items():
            setattr(config, k, v)
        torch.manual_seed(c.seed)
        value = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    else:
        value = AutoModelForSequenceClassification.from_pretrained(src, config=config, dtype=torch.float32)
    value.config.pad_token_id = h.tokenizer.pad_token_id
    n_layers = value.config.num_hidden_layers
    k = max(1, round(n_layers * c.lora_layers))
    extra = {"layers_to_transform": list(range(n_layers - k, n_layers))} if k < n_layers else {}
    peft = get_peft_model(
        value,
        LoraConfig(
            r=c.lora_r,
            lora_alpha=c.lora_alpha,
            lora_dropout=c.lora_dropout,
            target_modules=c.lora_target_modules,
            **extra,
        ),
    )
    inner = peft.base_model.model
    inner.score.requires_grad_(True)
    return inner


def _trl_common(h: Harness, out_dir: Path, lr: float) -> dict:
    c = h.cfg
    return dict(
        output_dir=str(out_dir),
        learning_rate=lr,
        seed=c.seed,
        report_to=[],
        logging_steps=1000,
        save_strategy="no",
        use_cpu=True,
        bf16=h.amp is not None,
        disable_tqdm=True,
        max_grad_norm=c.max_grad_norm,
        gradient_checkpointing=False,
    )


def run_ppo(
    h: Harness, budgets: list[int], rollout: int, minibatch: int, lr: float, ppo_epochs: int, out_dir: Path
) -> tuple[list[dict], float]:
    """TRL's PPOTrainer: `rollout` completions per update (one per prompt), `rollout // minibatch` optimiser steps per
    PPO epoch; β = the task's kl_coef; sampling T = the task's temperature, top-p 1 (TRL's PPO fixes top-p at 1)."""
    _require_trl("PPO")
    from datasets import Dataset
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    budgets = check_budgets(budgets, rollout)
    c, t0 = h.cfg, time.time()
    torch.manual_seed(c.seed)
    policy = h.policy()
    queries, width = _padded_queries(h)
    reward = ScorerRewardModel(h, width)
    args = PPOConfig(
        **_trl_common(h, out_dir, lr),
        per_device_train_batch_size=minibatch,
        gradient_accumulation_steps=rollout // minibatch,
        num_mini_batches=rollout // minibatch,
        num_ppo_epochs=ppo_epochs,
        total_episodes=budgets[-1],
        response_length=c.max_new_tokens,
        temperature=c.temperature,
        kl_coef=c.kl_coef,
        stop_token="eos",
        local_rollout_forward_batch_size=rollout,
        num_sample_generations=0,
        missing_eos_penalty=None,
    )
    cb = _BudgetCallback(h, policy, budgets, "ppo", lambda s: s.episode)
    trainer = PPOTrainer(
        args=args,
        processing_class=h.tokenizer,
        model=policy,
        ref_model=None,
        reward_model=reward,
        train_dataset=Dataset.from_dict({"input_ids": queries}),
        value_model=_value_model(h),
        eval_dataset=Dataset.from_dict({"input_ids": queries[:rollout]}),
        callbacks=[cb],
    )
    trainer.train()
    if reward.backbone.samples != budgets[-1]:
        print(f"warning: PPO scored {reward.backbone.samples} samples, expected {budgets[-1]}")
    return cb.points, time.time() - t0


def _train_on_reward(h: Harness, name: str, trainer_cls, args, budgets: list[int], per_step: int) -> list[dict]:
    """TRL's online trainer `trainer_cls` (GRPO, RLOO) on the training prompts, rewarded by the task's scorer as a
    plain function; evaluated at each budget (`per_step` completions scored per optimiser step)."""
    from datasets import Dataset

    torch.manual_seed(h.cfg.seed)
    policy = h.policy()
    generated = [0]

    def reward_fn(prompts, completions, **_):
        generated[0] += len(completions)
        return h.reward(h.scorer.score(list(prompts), list(completions)))

    reward_fn.__name__ = f"{h.metric}_reward"
    cb = _BudgetCallback(h, policy, budgets, name, lambda s: s.global_step * per_step)
    trainer = trainer_cls(
        model=policy,
        reward_funcs=reward_fn,
        args=args,
        processing_class=h.tokenizer,
        train_dataset=Dataset.from_dict({"prompt": list(h.prompts.train)}),
        callbacks=[cb],
    )
    trainer.train()
    if generated[0] != budgets[-1]:
        print(f"warning: {name.upper()} scored {generated[0]} samples, expected {budgets[-1]}")
    return cb.points


def run_rloo(
    h: Harness, budgets: list[int], rollout: int, k: int, minibatch: int, lr: float, out_dir: Path
) -> tuple[list[dict], float]:
    """TRL's RLOOTrainer: `rollout` completions per generation round (k per prompt, leave-one-out baseline),
    `rollout // minibatch` optimiser steps on each; β = the task's kl_coef; same temperature/top-p/length."""
    _require_trl("RLOO")
    from trl import RLOOConfig, RLOOTrainer

    budgets = check_budgets(budgets, rollout)
    c, t0 = h.cfg, time.time()
    args = RLOOConfig(
        **_trl_common(h, out_dir, lr),
        per_device_train_batch_size=minibatch,
        gradient_accumulation_steps=1,
        steps_per_generation=rollout // minibatch,
        num_generations=k,
        max_completion_length=c.max_new_tokens,
        temperature=c.temperature,
        top_p=c.top_p,
        beta=c.kl_coef,
        max_steps=budgets[-1] // minibatch,
        num_iterations=1,
        log_completions=False,
    )
    points = _train_on_reward(h, "rloo", RLOOTrainer, args, budgets, minibatch)
    return points, time.time() - t0


# GRPO's settings that differ from TRL's GRPOConfig defaults, each with its reason; everything else is TRL's default
# (num_generations 8, beta 0 — no KL term, no reference model —, loss_type "dapo", scale_rewards "group",
# epsilon 0.2, one optimiser step per generation round of 8 completions, linear learning-rate decay).
GRPO_OVERRIDES = {
    # TRL's 1e-6 is for full fine-tuning; with LoRA on 256-2048 samples it does not move the policy (measured in
    # benchmarks/results/sample_efficiency_sentiment.md, "GRPO learning rate").
    "learning_rate": 1e-4,
}


def run_grpo(
    h: Harness, budgets: list[int], out_dir: Path, overrides: dict | None = None
) -> tuple[list[dict], float, dict]:
    """TRL's GRPOTrainer with the scorer as a plain reward function: the same policy (LoRA), prompts, temperature,
    top-p and completion length as the other methods; TRL's defaults otherwise, except GRPO_OVERRIDES (and
    `overrides`). Returns (points, seconds, the settings that differ from the defaults)."""
    _require_trl("GRPO")
    from trl import GRPOConfig, GRPOTrainer

    settings = {**GRPO_OVERRIDES, **(overrides or {})}
    c, t0 = h.cfg, time.time()
    common = {**_trl_common(h, out_dir, settings.pop("learning_rate")), **settings}
    probe = GRPOConfig(output_dir=str(out_dir), use_cpu=True)
    per_round = probe.per_device_train_batch_size * probe.gradient_accumulation_steps  # completions per step
    budgets = check_budgets(budgets, per_round)
    args = GRPOConfig(
        **common,
        max_completion_length=c.max_new_tokens,
        temperature=c.temperature,
        top_p=c.top_p,
        max_steps=budgets[-1] // per_round,
        log_completions=False,
    )
    points = _train_on_reward(h, "grpo", GRPOTrainer, args, budgets, per_round)
    differs = {k: getattr(args, k) for k in ("learning_rate", "max_completion_length", "temperature", "top_p", "beta")}
    differs.update(num_generations=args.num_generations, loss_type=args.loss_type, samples_per_step=per_round)
    return points, time.time() - t0, differs
