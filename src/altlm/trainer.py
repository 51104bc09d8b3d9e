"""The ALT loop (method.md §1), top to bottom: sample → feedback → pool → train → evaluate, per iteration.

Run folder (`output_dir`):
  config.yaml     the resolved config            pool.sqlite   every sample and its feedback
  metrics.jsonl   one line per step / eval       state.json    last completed iteration
  checkpoint/     save_pretrained + altlm.json   summary.json  reference vs final, per feedback
  eval_samples.jsonl  every evaluation completion with its score

Every iteration seeds its own RNGs from (seed, iteration), so a run resumed at an iteration boundary
(`--resume`) replays exactly what an uninterrupted run would have done.
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from . import checkpoint, evaluation, metrics, models
from .config import ALTConfig
from .data import CONTINUATION_WORDS, load_prompts
from .errors import AltlmError
from .feedback import build_feedback
from .loss import alt_loss, target_logits
from .pool import Pool, Row
from .sampler import SampleSettings, inference_model, sample
from .template import Template


def autocast_dtype(precision: str, device: torch.device):
    """bf16 autocast where matmuls are natively fast in bf16 (CUDA; CPUs with AMX or AVX512-BF16)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return torch.bfloat16 if ("amx_bf16" in flags or "avx512_bf16" in flags) else None


class ALTTrainer:
    def __init__(self, cfg: ALTConfig, resume: bool = False):
        self.cfg, self.run = cfg, Path(cfg.output_dir)
        self.start_iteration = self._check_run_folder(resume)  # read-only: bad input below leaves no folder behind
        self.tracker = self._tracker()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.prompts = load_prompts(cfg)
        if cfg.seed_pool and not self.prompts.continuations:
            raise AltlmError("seed_pool needs prompts with known continuations (prompts: fortunes...); set seed_pool=false for prompt files")
        self.template = Template.from_config(cfg)
        self.feedback, self.scorer = build_feedback(cfg, models.cache_root())
        # buckets: the feedback vocabulary (RM quantiles, LMC categories), or LMU's scores 3..0
        self.n_buckets = len(self.feedback.vocabulary) if self.feedback.vocabulary else 4

        self.tokenizer = models.load_tokenizer(cfg.model, cfg.trust_remote_code)
        self.vocab_size = len(self.tokenizer)  # logits beyond this belong to conditioning tokens
        base = models.load_model(cfg.model, cfg.trust_remote_code, seed=cfg.seed)
        new, init = self.template.new_tokens(cfg.feedback_words)
        self.added_ids = models.add_tokens(base, self.tokenizer, new, init) if new else []
        # Full/top-fraction training needs a frozen copy as reference; LoRA gets it free by disabling the adapter.
        self.ref_model = None
        if cfg.training_mode != "lora" or (cfg.reference_model and cfg.reference_model != cfg.model):
            ref = copy.deepcopy(base) if not cfg.reference_model else models.load_model(cfg.reference_model, cfg.trust_remote_code, seed=cfg.seed)
            models.add_tokens(ref, self.tokenizer, new, init)
            self.ref_model = ref.eval().requires_grad_(False)
        lora = dict(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=cfg.lora_target_modules,
                    layers=cfg.lora_layers, train_new_tokens=cfg.template == "quark")
        self.model = models.prepare_for_training(base, cfg.training_mode, cfg.top_fraction, lora, self.added_ids)
        models.contiguous_lm_head(self.model)
        if self.start_iteration > 1:
            self._load_weights(self.run / "checkpoint")
        self.device = next(self.model.parameters()).device
        self.amp = autocast_dtype(cfg.precision, self.device)
        self.fluency = evaluation.Fluency(cfg.perplexity_model, self.amp) if cfg.perplexity_model else None
        self._open_run_folder()
        self.pool = Pool(self.run / "pool.sqlite")
        self.pool.rollback(self.start_iteration)  # drop rows of an iteration that was killed half-way
        self.global_step = sum(1 for line in open(self.run / "metrics.jsonl") if '"kind": "step"' in line) \
            if (self.run / "metrics.jsonl").exists() else 0
        self.train_settings = SampleSettings(cfg.temperature, cfg.top_p, cfg.min_new_tokens, cfg.max_new_tokens,
                                             cfg.sample_batch_size, cfg.max_prompt_tokens)
        self.eval_settings = SampleSettings(cfg.eval_temperature, cfg.eval_top_p, cfg.min_new_tokens, cfg.max_new_tokens,
                                            cfg.sample_batch_size, cfg.max_prompt_tokens)

    # ------------------------------------------------------------------ run folder
    def _check_run_folder(self, resume: bool) -> int:
        """The iteration to start at; refuses a folder that holds another run, or a resume that cannot match."""
        state_path, cfg_path = self.run / "state.json", self.run / "config.yaml"
        if not resume:
            if state_path.exists():
                raise AltlmError(f"run folder '{self.run}' already holds a run; pass --resume {self.run} to continue it, or set output_dir= to a new folder")
            return 1
        if not state_path.exists() or not cfg_path.exists():
            raise AltlmError(f"--resume: '{self.run}' is not an altlm run folder (no state.json/config.yaml); start it without --resume")
        try:
            old = yaml.safe_load(cfg_path.read_text())
            state = json.loads(state_path.read_text())
        except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError):
            raise AltlmError(f"--resume: '{self.run}' has a corrupt config.yaml or state.json; start a new run folder") from None
        saved = self.cfg.to_dict()
        diff = sorted(k for k in saved if k != "output_dir" and old.get(k) != saved[k])
        if diff:
            raise AltlmError(f"--resume: '{self.run}' was made with a different config (keys differ: {', '.join(diff)}); resume with the same config or pick another output_dir")
        if state.get("finished"):
            raise AltlmError(f"--resume: '{self.run}' already finished all {self.cfg.iterations} iterations; see summary.json")
        return int(state.get("iteration_done", 0)) + 1

    def _open_run_folder(self) -> None:
        """Fresh run: write config.yaml and state.json. Resume: drop log lines of the unfinished iteration."""
        if self.start_iteration > 1 or (self.run / "state.json").exists():
            first = self.start_iteration if self.start_iteration > 1 else 0  # iteration 1 redoes the reference eval
            for name in ("metrics.jsonl", "eval_samples.jsonl"):
                path = self.run / name
                if path.exists():
                    keep = [line for line in path.read_text().splitlines(keepends=True)
                            if json.loads(line)["iteration"] < first]
                    tmp = path.with_suffix(".tmp")
                    tmp.write_text("".join(keep))
                    os.replace(tmp, path)
            return
        self.run.mkdir(parents=True, exist_ok=True)
        cfg_path = self.run / "config.yaml"
        tmp = cfg_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False, allow_unicode=True))
        os.replace(tmp, cfg_path)
        evaluation.write_json(self.run / "state.json", {"iteration_done": 0, "finished": False})

    def _tracker(self):
        """accelerate's trackers (TensorBoard, W&B) when `report_to` asks for them; checked before any work."""
        want = self.cfg.report_to
        if want == "none":
            return None
        from accelerate import Accelerator
        from accelerate.utils import is_tensorboard_available, is_wandb_available

        for name, ok, pkg in (("tensorboard", is_tensorboard_available, "tensorboardX"), ("wandb", is_wandb_available, "wandb")):
            if want in (name, "all") and not ok():
                raise AltlmError(f"report_to={want} needs the {name} logger; pip install {pkg} (or set report_to=none)")
        acc = Accelerator(cpu=True, log_with=want, project_dir=str(self.run / "trackers"))
        acc.init_trackers(self.run.name or "altlm", config={k: str(v) for k, v in self.cfg.to_dict().items()})
        return acc

    def track(self, step: int, values: dict) -> None:
        if self.tracker is not None:
            self.tracker.log({k: v for k, v in values.items() if isinstance(v, (int, float)) and v == v}, step=step)

    def _load_weights(self, folder: Path) -> None:
        if self.cfg.training_mode == "lora":
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(self.model, load_file(folder / "adapter_model.safetensors"))
        else:
            from safetensors.torch import load_file

            self.model.load_state_dict(load_file(folder / "model.safetensors"), strict=False)
            self.model.tie_weights()

    def _meta(self, iteration: int) -> dict:
        c = self.cfg
        return {"model": c.model, "seed": c.seed, "training_mode": c.training_mode, "template": self.template.to_dict(),
                "feedback_words": c.feedback_words, "exemplar": (self.exemplars() or [c.exemplar_text])[0], "vocab_size": self.vocab_size,
                "iteration": iteration, "scorer": c.scorer,
                "sampling": {"temperature": c.eval_temperature, "top_p": c.eval_top_p, "min_new_tokens": c.min_new_tokens,
                             "max_new_tokens": c.max_new_tokens, "max_prompt_tokens": c.max_prompt_tokens}}

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        cfg, t0 = self.cfg, time.time()
        words = self.eval_words()
        if self.start_iteration == 1:
            # Iteration 0: the reference, untagged and under every feedback string (the priming control).
            self.evaluate(0, [None] + (words if cfg.eval_all_feedback else []), label="reference",
                          model=self.ref_model or self.model)
        if cfg.seed_pool and self.pool.count("iteration = 0") == 0:
            self.seed_pool()
        for it in range(self.start_iteration, cfg.iterations + 1):
            rng = random.Random(cfg.seed * 100_003 + it)
            torch.manual_seed(cfg.seed * 100_003 + it)

            # 1. Sample: the reference unconditioned first, then the policy under the exemplar feedback.
            exemplars = [] if (it == 1 or not cfg.use_feedback) else self.exemplars()
            prompt_ids = rng.sample(range(len(self.prompts.train)), min(cfg.prompts_per_iteration, len(self.prompts.train)))
            requests = [(pid, self.prompts.train[pid]) for pid in prompt_ids for _ in range(cfg.samples_per_prompt)]
            # LMU spreads its several exemplar sentences over the prompts; RM/LMC have one exemplar.
            conditioned = [(rng.choice(exemplars) if exemplars else None, p) for _, p in requests]
            # (Without a separate reference_model, the untrained policy *is* the reference at iteration 1.)
            sampler_model = self.ref_model if (it == 1 and self.ref_model is not None) else self.model
            samples = sample(inference_model(sampler_model, self.amp), self.tokenizer, self.template,
                             conditioned, self.train_settings, self.added_ids, desc=f"iter {it} sampling")

            # 2. Feedback: RM gives a score per sample (its words come from the pool's quantiles, step 3);
            #    an LLM judge gives the words itself. Samples it could not judge are kept, marked invalid.
            judge_before = self.feedback.judge.stats.as_dict() if hasattr(self.feedback, "judge") else None
            fbs = self.feedback([p for _, p in requests], [s.completion for s in samples])

            # 3. Pool: flush (per drop_factor), add, re-cut quantiles over the active pool.
            self.pool.flush(cfg.drop_factor, rng, it)
            self.pool.add([Row(it, pid, p, s.completion, f.text, f.score, f.bucket, s.truncated, s.prompt_tokens,
                               s.completion_tokens, f.valid, f.raw, f.agreement)
                           for (pid, p), s, f in zip(requests, samples, fbs)])
            active = self.pool.rows()
            if self.feedback.relative:
                buckets, texts = self.feedback.rebucket([r.score for r in active], [r.prompt_id for r in active])
                self.pool.set_feedback([r.id for r in active], buckets, texts)
            else:
                buckets = [r.bucket for r in active]
            new_buckets = [b for r, b in zip(active, buckets) if r.iteration == it]
            agreements = [f.agreement for f in fbs if f.agreement is not None]
            pool_record = {"pool_size": len(active), "sample_score_mean": metrics.mean([f.score for f in fbs if f.score is not None]),
                           "bucket_counts": [buckets.count(b) for b in range(self.n_buckets)],
                           "new_bucket_distribution": metrics.bucket_distribution(new_buckets, self.n_buckets),
                           "invalid": sum(not f.valid for f in fbs), "agreement_mean": metrics.mean(agreements) if agreements else None}
            if judge_before is not None:
                pool_record["judge"] = self.feedback.judge.stats.minus(judge_before)
            evaluation.append_jsonl(self.run / "metrics.jsonl", [{"kind": "iteration", "iteration": it, **pool_record}])
            self.track(it, {"pool/score_mean": pool_record["sample_score_mean"], "pool/size": len(active),
                            "pool/invalid": pool_record["invalid"]})

            # 4. Train on feedback + prompt → completion, drawn from the pool.
            train_stats = self.train_phase(it, rng)

            # 5. Evaluate on held-out prompts; at the end under every feedback string.
            last = it == cfg.iterations
            if last or it % cfg.eval_every == 0:
                if last:
                    words = self.eval_words()  # LMU: the sentences come from the pool, which has grown
                conditions = ([None] + words) if (last and cfg.eval_all_feedback) else (self.exemplars()[:1] or [None])
                self.evaluate(it, conditions, label="policy", extra={"train": train_stats, **pool_record})
            checkpoint.save(self.model, self.tokenizer, self.run / "checkpoint", self._meta(it))
            evaluation.write_json(self.run / "state.json", {"iteration_done": it, "finished": last})

        summary = self.summarize(time.time() - t0)
        evaluation.write_json(self.run / "summary.json", summary)
        self.pool.close()
        if hasattr(self.feedback, "judge"):
            self.feedback.judge.close()
        if self.tracker is not None:
            self.tracker.end_training()
        if cfg.report:
            from .report import write_report

            write_report([self.run], self.run)
        return summary

    def exemplars(self) -> list[str]:
        """What the policy is sampled and evaluated under: the exemplar feedback (RM, LMC), or for LMU the
        `lmu_exemplars` most frequent feedback sentences of the pool's best score (method.md §4)."""
        if self.feedback.vocabulary is not None:
            return [self.cfg.exemplar_text]
        return self._common_sentences(best=True)[:self.cfg.lmu_exemplars]

    def _common_sentences(self, best: bool) -> list[str]:
        rows = [r for r in self.pool.rows() if r.feedback is not None and r.bucket is not None]
        if not rows:
            return []
        target = min(r.bucket for r in rows) if best else max(r.bucket for r in rows)
        counts: dict[str, int] = {}
        for r in rows:
            if r.bucket == target:
                counts[r.feedback] = counts.get(r.feedback, 0) + 1
        return sorted(counts, key=lambda t: -counts[t])

    def eval_words(self) -> list[str]:
        """Feedback strings evaluated at the end, best first: the vocabulary (RM, LMC; `eval_feedback` filters it),
        or LMU's most common best- and worst-score sentences."""
        cfg = self.cfg
        if self.feedback.vocabulary is not None:
            return [w for w in self.feedback.vocabulary if cfg.eval_feedback is None or w in cfg.eval_feedback]
        best, worst = self._common_sentences(best=True)[:1], self._common_sentences(best=False)[:1]
        return best + [w for w in worst if w not in best]

    def seed_pool(self) -> None:
        """Iteration-0 rows: each training prompt's original continuation, scored like any sample."""
        conts = self.prompts.continuations
        pids = [i for i, p in enumerate(self.prompts.train) if p in conts]
        prompts = [self.prompts.train[i] for i in pids]
        texts = [conts[p] for p in prompts]
        fbs = self.feedback(prompts, texts)
        tok = self.tokenizer
        # token counts as the sampler records them: conditioned input (none here) and the body without EOS
        self.pool.add([Row(0, pid, p, c, None, f.score, None, len(c.split()) >= CONTINUATION_WORDS,
                           len(self.template.input_ids(tok, None, p)), len(tok(c, add_special_tokens=False).input_ids), f.valid)
                       for pid, p, c, f in zip(pids, prompts, texts, fbs)])

    def train_phase(self, it: int, rng: random.Random) -> dict:
        cfg = self.cfg
        if cfg.quantiles == "global":
            rows = self.pool.draw_uniform(cfg.train_steps * cfg.batch_size, rng)
        else:
            rows = self.pool.draw_balanced(cfg.per_bucket, len(cfg.feedback_words), rng)
            # Shuffle prompts, not rows: a prompt's samples under their different feedback stay in one batch
            # (contrastive batches), so each step sees what the feedback changes with the prompt held fixed.
            groups: dict[int, list[Row]] = {}
            for r in rows:
                groups.setdefault(r.prompt_id, []).append(r)
            order = list(groups)
            rng.shuffle(order)
            rows = [r for pid in order for r in groups[pid]]
            if cfg.train_steps:
                rows = rows[:cfg.train_steps * cfg.batch_size]
        steps = math.ceil(len(rows) / cfg.batch_size)
        params = [p for p in self.model.parameters() if p.requires_grad]
        # Re-created each iteration (as the paper's TL;DR/HH runs): resume needs no optimiser state.
        opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        warm = max(1, round(steps * cfg.warmup_ratio))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))
        self.model.train()
        tok, totals, t0 = self.tokenizer, {"loss": 0.0, "nll": 0.0, "kl": 0.0, "entropy": 0.0, "tokens": 0}, time.time()
        for step in tqdm(range(steps), desc=f"iter {it} training", leave=False, disable=None):
            batch = rows[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            inputs = [self.template.input_ids(tok, r.feedback if cfg.use_feedback else None, r.prompt, cfg.max_prompt_tokens)
                      for r in batch]
            targets = [self.template.target_ids(tok, r.completion, bool(r.truncated)) for r in batch]
            with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                logits, tgt, mask = target_logits(self.model, inputs, targets, tok.pad_token_id)
                ref_logits = None
                if cfg.kl_coef:
                    ref_inputs = inputs if cfg.reference_input == "conditioned" else \
                        [self.template.input_ids(tok, None, r.prompt, cfg.max_prompt_tokens) for r in batch]
                    ref_logits = self.reference_logits(ref_inputs, targets)
            loss, stats = alt_loss(logits, tgt, mask, ref_logits, cfg.kl_coef, cfg.entropy_coef, cfg.kl_direction, self.vocab_size)
            if not torch.isfinite(loss):
                print(f"warning: iteration {it} step {step}: non-finite loss, batch skipped")
                opt.zero_grad(set_to_none=True)
                continue
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            for k in ("nll", "kl", "entropy", "tokens"):
                totals[k] += stats[k] * (1 if k == "tokens" else stats["tokens"])
            totals["loss"] += loss.item() * stats["tokens"]
            record = {"loss": loss.item(), **stats, "lr": sched.get_last_lr()[0]}
            evaluation.append_jsonl(self.run / "metrics.jsonl", [{"kind": "step", "iteration": it, "step": step, **record}])
            self.track(self.global_step, {f"train/{k}": v for k, v in record.items()})
            self.global_step += 1
        n = max(totals["tokens"], 1)
        return {"steps": steps, "examples": len(rows), "seconds": round(time.time() - t0, 2),
                **{k: totals[k] / n for k in ("loss", "nll", "kl", "entropy")}, "tokens": totals["tokens"]}

    @torch.no_grad()
    def reference_logits(self, inputs, targets):
        if self.ref_model is not None:
            return target_logits(self.ref_model, inputs, targets, self.tokenizer.pad_token_id)[0]
        with self.model.disable_adapter():
            return target_logits(self.model, inputs, targets, self.tokenizer.pad_token_id)[0]

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, it: int, conditions: list[str | None], label: str, extra: dict | None = None, model=None) -> dict:
        cfg = self.cfg
        blocks, records = evaluation.evaluate(
            inference_model(model or self.model, self.amp), self.tokenizer, self.template, self.prompts.eval,
            [evaluation.Condition(fb, cfg.eval_samples_per_prompt) for fb in conditions], self.eval_settings,
            self.scorer, self.added_ids, cfg.seed + 7, label, self.fluency)
        evaluation.append_jsonl(self.run / "eval_samples.jsonl", [{"iteration": it, **r} for r in records])
        record = {"kind": "eval", "iteration": it, "model": label, "by_feedback": blocks, **(extra or {})}
        evaluation.append_jsonl(self.run / "metrics.jsonl", [record])
        self.track(it, {f"eval/{label}/{k}/{m}": v for k, b in blocks.items() for m, v in b.items()})
        return record

    def summarize(self, wall: float) -> dict:
        cfg, name = self.cfg, self.scorer.name
        evals = [json.loads(line) for line in open(self.run / "metrics.jsonl") if '"kind": "eval"' in line]
        ref = next(e for e in evals if e["model"] == "reference")["by_feedback"]
        final = [e for e in evals if e["model"] == "policy"][-1]["by_feedback"]
        words = [w for w in (self.feedback.vocabulary or self.eval_words()) if w in final]
        keys = [f"{name}_mean", f"{name}_gt_0_5", f"avg_max_{name}", f"{name}_prob", "dist_2", "reward_mean", "perplexity"]
        pick = lambda m: {k: m.get(k) for k in keys}  # noqa: E731
        ex = (self.exemplars() or ["<none>"])[0]
        summary = {
            "wall_seconds": round(wall, 1), "metric": name, "exemplar": ex, "eval_prompts": len(self.prompts.eval),
            "eval_samples_per_prompt": cfg.eval_samples_per_prompt,
            "reference": {**pick(ref["<none>"]), "by_feedback": {w: pick(ref[w]) for w in words if w in ref}},
            "final": {**pick(final[ex]), "untagged": pick(final["<none>"]) if "<none>" in final else None,
                      "by_feedback": {w: pick(final[w]) for w in words}},
            "steerability": evaluation.steerability(final, words, f"{name}_mean", self.scorer.higher_is_better),
            "iterations": [{"iteration": e["iteration"], f"{name}_mean": e["by_feedback"][ex][f"{name}_mean"] if ex in e["by_feedback"] else None,
                            "train": e.get("train")} for e in evals if e["model"] == "policy"],
        }
        r, f = summary["reference"], summary["final"]
        summary["reduction"] = {k: (1 - f[k] / r[k]) if (r[k] and f[k] is not None) else None for k in (f"{name}_mean", f"{name}_gt_0_5")}
        return summary
