"""The ALT loop (method.md §1), top to bottom: sample → feedback → pool → train → evaluate, per iteration.

Run folder (`output_dir`):
  config.yaml     the resolved config            pool.sqlite   every sample and its feedback, the progress record
  metrics.jsonl   one line per step / eval       state.json    a copy of the progress record (runfolder.py)
  checkpoint/     save_pretrained + altlm.json   summary.json  reference vs final, per feedback
  eval_samples.jsonl  every evaluation completion with its score      resume/  the unfinished iteration's snapshot

A run killed at any moment resumes (`--resume`) where it stopped, redoing only unsaved work, and ends exactly as
an uninterrupted run would have: how is runfolder.py's concern.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import checkpoint, claims, evaluation, metrics, models, progress, refcache, runfolder
from .config import ALTConfig
from .data import CONTINUATION_WORDS, load_prompts
from .distributed import Processes
from .errors import AltlmError
from .feedback import Feedback, build_feedback
from .feedback.noise import labelled_indices, noise_categories, noise_offset, noise_sentences
from .loss import (
    alt_loss,
    block_inputs,
    head_logits,
    head_loss,
    layer_input,
    tail_target_hidden,
    target_hidden,
    target_hidden_from,
    target_logits,
)
from .pool import Pool, Row
from .refcache import ReferenceCache
from .report import open_trackers, write_report
from .sampler import Sample, SampleSettings, inference_model, sample
from .template import Template
from .vllm_sampler import VLLMSampler

FEEDBACK_CHUNK = 256  # samples scored (and staged) at once: a kill loses at most one chunk of judge calls


class ALTTrainer:
    def __init__(self, cfg: ALTConfig, resume: bool = False):
        self.cfg, self.run = cfg, Path(cfg.output_dir)
        # Read-only until runfolder.open_run: bad input (config, files, models, a corrupt run) leaves the folder as it was.
        self.progress = runfolder.check(self.run, cfg.to_dict(), resume)
        # The tokenizer first: input checks that need it answer before any model is loaded or converted.
        self.tokenizer = models.load_tokenizer(cfg.model, cfg.trust_remote_code)
        self.vocab_size = len(self.tokenizer)  # logits beyond this belong to conditioning tokens
        if cfg.bos_token and cfg.bos_token not in self.tokenizer.get_vocab():
            raise AltlmError(
                f"config key 'bos_token': {cfg.bos_token!r} is not a token of {cfg.model}'s tokenizer (SmolLM2: '<|endoftext|>'; '' = none)"
            )
        self.procs = Processes(cfg.sharding)  # one, or several under torchrun / accelerate launch (distributed.py)
        self.tracker = open_trackers(cfg.report_to, self.run, cfg.to_dict())
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.prompts = load_prompts(cfg)
        if cfg.seed_pool and not self.prompts.continuations:
            raise AltlmError(
                "seed_pool needs prompts with known continuations (prompts: fortunes...); set seed_pool=false for prompt files"
            )
        self.template = Template.from_config(cfg)
        self.feedback, self.scorer = build_feedback(cfg, models.cache_root())
        # buckets: the feedback vocabulary (RM quantiles, LMC categories), or LMU's scores 3..0
        self.n_buckets = len(self.feedback.vocabulary) if self.feedback.vocabulary else 4

        base = models.load_model(cfg.model, cfg.trust_remote_code, seed=cfg.seed)
        models.set_attention(base, cfg.attn_implementation, self.procs.device)
        self.pack_rows = cfg.pack_rows and models.packs_rows(base)  # (the adapted and frozen blocks' forwards)
        new, init = self.template.new_tokens(cfg.feedback_words)
        self.added_ids = models.add_tokens(base, self.tokenizer, new, init) if new else []
        # Full/top-fraction training needs a frozen copy as reference; LoRA gets it free by disabling the adapter.
        self.ref_model = None
        if cfg.training_mode != "lora" or (cfg.reference_model and cfg.reference_model != cfg.model):
            ref = (
                copy.deepcopy(base)
                if not cfg.reference_model
                else models.load_model(cfg.reference_model, cfg.trust_remote_code, seed=cfg.seed)
            )
            models.add_tokens(ref, self.tokenizer, new, init)
            models.set_attention(ref, cfg.attn_implementation, self.procs.device)
            self.ref_model = ref.eval().requires_grad_(False)
        lora = dict(
            r=cfg.lora_r,
            alpha=cfg.lora_alpha,
            dropout=cfg.lora_dropout,
            target_modules=cfg.lora_target_modules,
            layers=cfg.lora_layers,
            train_new_tokens=cfg.template == "quark",
        )
        self.model = models.prepare_for_training(base, cfg.training_mode, cfg.top_fraction, lora, self.added_ids)
        models.contiguous_lm_head(self.model)
        models.check_context(base, cfg.model, cfg.max_prompt_tokens + cfg.max_new_tokens)
        runfolder.recover_checkpoint(self.run / "checkpoint")  # (a no-op unless a kill hit checkpoint.save)
        if self.progress.iteration_done:
            checkpoint.load_weights(self.model, self.run / "checkpoint", cfg.training_mode == "lora")
        if self.progress.step:  # eval phase: the trained weights; train phase: checked here, loaded with the optimiser
            runfolder.load_snapshot(self.run, self.progress.step, self.model, None)
        self.device = self.procs.device
        for m in filter(None, (self.model, self.ref_model)):
            m.to(self.device)
        self.amp = models.autocast_dtype(cfg.precision, self.device)
        models.cast_frozen_linears(self.model, self.amp if cfg.training_mode == "lora" else None)
        # The training forward goes through DDP, or FSDP's shards; sampling, evaluation and saving get whole weights (procs.full).
        self.ddp = self.procs.wrap(self.model)
        self.refcache = self.open_reference_cache()
        # The frozen head in its matmul's dtype, once (autocast would cast it at every forward): the reference cache's
        # statistics and the fused loss run the head themselves.
        self.head_weight = None
        if self.refcache is not None:
            head = self.model.get_output_embeddings().weight.detach()
            self.head_weight = head.to(self.amp) if self.amp is not None else head
        self.shared_layers = self.frozen_layers_below_adapter()
        self.cached_block = self.lowest_adapted_block() if cfg.cache_frozen_layers else 0
        self.vllm = VLLMSampler.for_run(cfg, self.run, self.procs.world)  # None unless sampler=vllm
        self.fluency = None
        if cfg.perplexity_model:
            per_prompt = cfg.perplexity_samples_per_prompt or None
            self.fluency = evaluation.Fluency(cfg.perplexity_model, self.amp, samples_per_prompt=per_prompt)
        if self.procs.main:  # the only writer; the other processes read the pool once it is there
            self.pool = runfolder.open_run(self.run, cfg.to_dict(), self.progress, resume)
        self.procs.wait()
        if not self.procs.main:
            self.pool = Pool(self.run / "pool.sqlite")
        self.global_step = (
            sum('"kind": "step"' in line for line in open(self.run / "metrics.jsonl"))
            if (self.run / "metrics.jsonl").exists()
            else 0
        )
        self.train_settings = SampleSettings(
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            min_new_tokens=cfg.min_new_tokens,
            max_new_tokens=cfg.max_new_tokens,
            batch_size=cfg.sample_batch_size,
            max_prompt_tokens=cfg.max_prompt_tokens,
            top_p_method=cfg.top_p_method,
            share_prefill=cfg.share_prefill,
        )
        self.eval_settings = dataclasses.replace(
            self.train_settings, temperature=cfg.eval_temperature, top_p=cfg.eval_top_p
        )

    # ------------------------------------------------------------------ run folder
    def save_progress(self, **changes) -> None:
        """Advance the progress record (inside the caller's pool transaction, if any) and copy it to state.json."""
        self.progress = dataclasses.replace(self.progress, **changes, files=runfolder.log_sizes(self.run))
        if not self.procs.main:  # every process keeps the same phase and step; the main one writes them
            return
        self.pool.set_progress(self.progress.to_dict())
        evaluation.write_json(self.run / "state.json", self.progress.to_dict())

    def open_reference_cache(self) -> ReferenceCache | None:
        """The reference cache where it is exact and one process trains (refcache.py); None: the reference forward."""
        cfg = self.cfg
        applies = (
            cfg.reference_cache
            and self.procs.world == 1
            and cfg.training_mode == "lora"
            and cfg.kl_coef != 0.0
            and cfg.kl_direction == "ref_policy"
        )
        if not applies:
            return None
        # exact only for a plain, frozen, bias-free head (a wrapped one, e.g. Quark's token rows, takes the old path)
        head = self.model.get_output_embeddings()
        weight = getattr(head, "weight", None)
        if weight is None or weight.requires_grad or getattr(head, "bias", None) is not None:
            return None
        cache = ReferenceCache(self.run, cfg.cache_frozen_gb * 2**30 if cfg.cache_frozen_layers else 0)
        # Entries up to the point this run resumes from: its training snapshot, or the last finished iteration.
        if self.progress.phase in ("train", "eval"):
            cache.load(self.progress.iteration_done + 1, self.progress.step)
        else:
            cache.load(self.progress.iteration_done, 10**9)
        return cache

    def track(self, step: int, values: dict) -> None:
        if self.tracker is not None:
            self.tracker.log({k: v for k, v in values.items() if isinstance(v, (int, float)) and v == v}, step=step)

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        cfg, t0 = self.cfg, time.time()
        words = self.eval_words()
        if self.progress.phase == "reference":
            # Iteration 0: the reference, untagged and under the feedback strings (the priming control).
            self.evaluate(0, self.reference_conditions(words), label="reference", model=self.ref_model or self.model)
            self.save_progress(phase="sample")
        if cfg.seed_pool and self.pool.count("iteration = 0") == 0:
            self.seed_pool()
        for it in range(self.progress.iteration_done + 1, cfg.iterations + 1):
            rng = random.Random(cfg.seed * 100_003 + it)

            # 1. Sample: the reference unconditioned first, then the policy under the exemplar feedback.
            exemplars = [] if (it == 1 or not cfg.use_feedback) else self.exemplars()
            prompt_ids = rng.sample(
                range(len(self.prompts.train)), min(cfg.prompts_per_iteration, len(self.prompts.train))
            )
            requests = [(pid, self.prompts.train[pid]) for pid in prompt_ids for _ in range(cfg.samples_per_prompt)]
            # LMU spreads its several exemplar sentences over the prompts; RM/LMC have one exemplar.
            conditioned = [(rng.choice(exemplars) if exemplars else None, p) for _, p in requests]
            if self.progress.phase == "sample":
                staged = self.pool.staged(it)  # what a killed attempt at this iteration already sampled and scored
                started = time.time()
                samples = self.sample_round(it, conditioned, {i: Sample(**s) for i, (s, _) in staged.items()})
                progress.phase(f"iteration {it} sampling", started, samples=len(samples))

                # 2. Feedback: RM gives a score per sample (its words come from the pool's quantiles, step 3);
                #    an LLM judge gives the words itself. Samples it could not judge are kept, marked invalid.
                #    feedback_fraction < 1: only a seeded share of the samples is scored (the rest stays out).
                judge_before = self.feedback.judge.stats.as_dict() if hasattr(self.feedback, "judge") else None
                started = time.time()
                labelled = labelled_indices(cfg.seed, it, len(requests), cfg.feedback_fraction)
                done = {i: Feedback(**f) for i, (_, f) in staged.items() if f}
                fbs = self.score_staged(it, requests, samples, done, labelled)
                scores = [f.score for f in fbs if f.score is not None and f.score == f.score]
                progress.phase(
                    f"iteration {it} feedback",
                    started,
                    scored=len(scores),
                    mean_score=metrics.mean(scores) if scores else None,
                )

                # 3. Pool: the main process commits the samples and their feedback (and re-cuts the quantiles).
                if self.procs.main:
                    self.commit_pool(it, rng, requests, samples, fbs, judge_before, labelled)
                else:
                    self.save_progress(phase="train", step=0)
                self.procs.wait()  # committed before anyone draws from it

            # 4. Train on feedback + prompt → completion, drawn from the pool; its end state is snapshotted.
            if self.progress.phase == "train":
                started = time.time()
                train_stats = self.train_phase(it)
                progress.phase(
                    f"iteration {it} training",
                    started,
                    steps=train_stats["steps"],
                    examples=train_stats["examples"],
                    loss=train_stats["loss"],
                    kl=train_stats["kl"],
                    first_draws=train_stats.get("reference_forward_rows"),  # (None: not shown, no reference cache)
                )
                self.save_progress(
                    phase="eval", step=train_stats["steps"], record={**self.progress.record, "train": train_stats}
                )
                if self.procs.main:
                    runfolder.prune_snapshots(self.run, keep=train_stats["steps"])

            # 5. Evaluate on held-out prompts; at the end under every feedback string (main process only).
            last, full = (
                it == cfg.iterations,
                self.procs.full(self.model, everyone=False),
            )  # (FSDP: None but on the main process)
            if self.procs.main:
                checkpoint.save(
                    full,
                    self.tokenizer,
                    self.run / "checkpoint",
                    checkpoint.run_meta(
                        cfg, self.template, (self.exemplars() or [cfg.exemplar_text])[0], self.vocab_size, it
                    ),
                )
                every = last or bool(cfg.steer_eval_every and it % cfg.steer_eval_every == 0)  # under every feedback
                if every or it % cfg.eval_every == 0:
                    words = self.eval_words()  # LMU: the sentences come from the pool, which has grown
                    if every and cfg.eval_all_feedback:
                        conditions = words if cfg.eval_conditions == "claims" else [None] + words
                    else:
                        conditions = self.exemplars()[:1] or [None]
                    self.evaluate(it, conditions, label="policy", extra=self.progress.record, model=full)
                if last:
                    self.write_summary(time.time() - t0)
                    if cfg.report:
                        write_report([self.run], self.run)
            if self.procs.main and cfg.lr_schedule != "iteration":
                runfolder.keep_optimizer_carry(self.run, self.progress.step)  # before the progress moves past it
            self.save_progress(iteration_done=it, phase="sample", step=0, record={}, finished=last)
            if self.procs.main:
                runfolder.prune_snapshots(self.run, keep=None)
            self.procs.wait()

        if self.refcache is not None and self.procs.main:
            self.refcache.remove()  # needed only to resume, and the run is finished
        self.pool.close()
        if hasattr(self.feedback, "judge"):
            self.feedback.judge.close()
        if self.tracker is not None:
            self.tracker.end_training()
        self.procs.close()
        return json.loads((self.run / "summary.json").read_text())

    def write_summary(self, wall: float) -> None:
        """summary.json: the reference against the final model, and each claim with its bootstrap interval."""
        cfg = self.cfg
        evals = [json.loads(line) for line in open(self.run / "metrics.jsonl") if '"kind": "eval"' in line]
        exemplar = (self.exemplars() or ["<none>"])[0]
        words = self.feedback.vocabulary or self.eval_words()
        summary = evaluation.summarize_run(
            evals,
            self.scorer.name,
            self.scorer.higher_is_better,
            exemplar,
            words,
            len(self.prompts.eval),
            cfg.eval_samples_per_prompt,
            wall,
        )
        records = [json.loads(line) for line in open(self.run / "eval_samples.jsonl")]
        eval_words = [w for w in words if w in summary["final"]["by_feedback"]]
        if len(eval_words) >= 2:
            summary["claims"] = claims.run_claims(records, eval_words, exemplar, self.scorer.higher_is_better, cfg.seed)
        summary["ablation"] = self.ablation_summary()
        evaluation.write_json(self.run / "summary.json", summary)

    def ablation_summary(self) -> dict:
        """The ablation keys (docs/ablations.md) and what they did over the run's iterations."""
        cfg = self.cfg
        its = [json.loads(line) for line in open(self.run / "metrics.jsonl") if '"kind": "iteration"' in line]
        return {
            "feedback_noise": cfg.feedback_noise,
            "feedback_fraction": cfg.feedback_fraction,
            "feedback_strings": len(self.feedback.vocabulary) if self.feedback.vocabulary else None,
            "use_feedback": cfg.use_feedback,
            "generated": sum(r.get("generated", 0) for r in its),
            "labelled": sum(r.get("labelled", 0) for r in its),
            # rows whose feedback was replaced, and how many of them had feedback to replace (valid rows)
            "noised": sum(r.get("noised", 0) for r in its),
            "valid": sum(r.get("labelled", 0) - r.get("invalid", 0) for r in its),
        }

    def commit_pool(
        self,
        it: int,
        rng: random.Random,
        requests,
        samples: list[Sample],
        fbs: list[Feedback],
        judge_before,
        labelled: list[int],
    ) -> dict:
        """Step 3 (main process): in one transaction with the progress record, flush (per drop_factor), add the
        iteration's labelled samples (`labelled`: their request indices; `fbs`: their feedback) with feedback_noise
        applied, re-cut quantiles over the active pool, drop the staged copies; log the pool record."""
        cfg = self.cfg
        generated = len(requests)
        fbs, offsets = self.apply_noise(it, fbs, labelled)
        requests = [requests[i] for i in labelled]
        samples = [samples[i] for i in labelled]
        with self.pool.transaction():
            self.pool.flush(cfg.drop_factor, rng, it)
            self.pool.add(
                [
                    Row(
                        it,
                        pid,
                        p,
                        s.completion,
                        f.text,
                        f.score,
                        f.bucket,
                        s.truncated,
                        s.prompt_tokens,
                        s.completion_tokens,
                        f.valid,
                        f.raw,
                        f.agreement,
                        offset,
                    )
                    for (pid, p), s, f, offset in zip(requests, samples, fbs, offsets)
                ]
            )
            active = self.pool.rows()
            if self.feedback.relative:
                buckets, texts = self.feedback.rebucket(
                    [r.score for r in active], [r.prompt_id for r in active], [r.noise for r in active]
                )
                self.pool.set_feedback([r.id for r in active], buckets, texts)
            else:
                buckets = [r.bucket for r in active]
            self.pool.unstage(it)
            new_buckets = [b for r, b in zip(active, buckets) if r.iteration == it]
            agreements = [f.agreement for f in fbs if f.agreement is not None]
            record = {
                "pool_size": len(active),
                "generated": generated,
                "labelled": len(labelled),
                "noised": sum(offset is not None for offset in offsets),
                "sample_score_mean": metrics.mean([f.score for f in fbs if f.score is not None]),
                "bucket_counts": [buckets.count(b) for b in range(self.n_buckets)],
                "new_bucket_distribution": metrics.bucket_distribution(new_buckets, self.n_buckets),
                "invalid": sum(not f.valid for f in fbs),
                "agreement_mean": metrics.mean(agreements) if agreements else None,
            }
            if judge_before is not None:
                record["judge"] = self.feedback.judge.stats.minus(judge_before)
            evaluation.append_jsonl(self.run / "metrics.jsonl", [{"kind": "iteration", "iteration": it, **record}])
            self.save_progress(phase="train", step=0, record=record)
        self.track(
            it,
            {
                "pool/score_mean": record["sample_score_mean"],
                "pool/size": record["pool_size"],
                "pool/invalid": record["invalid"],
            },
        )
        return record

    def sample_round(self, it: int, conditioned: list, done: dict[int, Sample]) -> list[Sample]:
        """Step 1's samples: HF (batches dealt out over the processes, each staged as it finishes), or vLLM, restarted
        on the current weights and checked against them first. `done`: what a killed attempt already staged."""
        # (Without a separate reference_model, the untrained policy *is* the reference at iteration 1.)
        model = self.procs.full(self.ref_model if (it == 1 and self.ref_model is not None) else self.model)
        seed = self.cfg.seed * 100_003 + it
        if self.vllm is None:
            out = sample(
                inference_model(model, self.amp, owned=model not in (self.model, self.ref_model)),
                self.tokenizer,
                self.template,
                conditioned,
                self.train_settings,
                self.added_ids,
                seed=seed,
                desc=f"iter {it} sampling",
                done=done,
                shard=(self.procs.rank, self.procs.world),
                on_batch=(lambda b: self._stage(it, b)) if self.procs.main else None,
            )
            return self._gathered(it, out, self._stage)
        self.vllm.sync(model, self.tokenizer)
        self.vllm.check(model, self.tokenizer, self.template, conditioned[:8], self.train_settings)
        todo = [i for i in range(len(conditioned)) if i not in done]
        new = self.vllm.sample(
            self.tokenizer,
            self.template,
            [conditioned[i] for i in todo],
            self.train_settings,
            self.added_ids,
            seed,
            indices=todo,
        )  # per-request seeds by index: a resume draws alike
        self._stage(it, list(zip(todo, new)))
        done = {**done, **dict(zip(todo, new))}
        return [done[i] for i in range(len(conditioned))]

    def _stage(self, it: int, batch: list[tuple[int, Sample]]) -> None:
        self.pool.stage(it, [(i, dataclasses.asdict(s)) for i, s in batch])
        runfolder.failpoint("sample")

    def _stage_feedback(self, it: int, batch: list[tuple[int, Feedback]]) -> None:
        self.pool.stage_feedback(it, [(i, dataclasses.asdict(f)) for i, f in batch])
        runfolder.failpoint("feedback")

    def _gathered(self, it: int, items: list, stage) -> list:
        """Several processes: each one's share of `items` (None elsewhere), merged on all; the main one stages the others'."""
        if self.procs.world == 1:
            return items
        got = self.procs.merge({i: x for i, x in enumerate(items) if x is not None})
        if self.procs.main:
            stage(it, [(i, got[i]) for i in sorted(got) if items[i] is None])
        return [got[i] for i in range(len(items))]

    def score_staged(
        self, it: int, requests, samples: list[Sample], done: dict[int, Feedback], labelled: list[int]
    ) -> list[Feedback]:
        """Feedback for the `labelled` samples (request indices; all of them unless feedback_fraction < 1), in that
        order, FEEDBACK_CHUNK at a time, each chunk staged in the pool as it arrives; chunks a killed attempt already
        scored (`done`, by request index) are kept. Fixed chunk boundaries keep the scorer's batches as they were,
        so the scores are too. Several processes: chunk c is scored by process c mod N."""
        out = [done.get(i) for i in labelled]
        for c, start in enumerate(range(0, len(labelled), FEEDBACK_CHUNK)):
            todo = [j for j in range(start, min(start + FEEDBACK_CHUNK, len(labelled))) if out[j] is None]
            if not todo or c % self.procs.world != self.procs.rank:
                continue
            idx = [labelled[j] for j in todo]
            fbs = self.feedback([requests[i][1] for i in idx], [samples[i].completion for i in idx])
            if self.procs.main:
                self._stage_feedback(it, list(zip(idx, fbs)))
            for j, f in zip(todo, fbs):
                out[j] = f
        return self._gathered(it, out, self._stage_feedback_at(labelled))

    def _stage_feedback_at(self, labelled: list[int]):
        """_stage_feedback for items numbered by their position in `labelled` (what _gathered hands over)."""

        def stage(it: int, batch: list[tuple[int, Feedback]]) -> None:
            self._stage_feedback(it, [(labelled[j], f) for j, f in batch])

        return stage

    def apply_noise(self, it: int, fbs: list[Feedback], labelled: list[int]) -> tuple[list[Feedback], list]:
        """feedback_noise (feedback/noise.py): the labelled samples' feedback as trained, and each one's offset (None:
        its own). rm: only the offsets (the quantile re-cut applies them); lmc: another category; lmu: another
        sample's sentence. The streams are the samples' request indices, so the decisions survive a resume."""
        cfg = self.cfg
        if cfg.feedback_noise <= 0:
            return fbs, [None] * len(fbs)
        if self.feedback.relative:
            k = len(self.feedback.vocabulary)
            offsets = [
                noise_offset(cfg.seed, it, i, cfg.feedback_noise, k) if f.valid else None for i, f in zip(labelled, fbs)
            ]
            return fbs, offsets
        if self.feedback.vocabulary is not None:
            return noise_categories(fbs, labelled, self.feedback.vocabulary, cfg.seed, it, cfg.feedback_noise)
        return noise_sentences(fbs, labelled, cfg.seed, it, cfg.feedback_noise)

    def exemplars(self) -> list[str]:
        """What the policy is sampled and evaluated under: the exemplar (RM, LMC), or LMU's `lmu_exemplars` commonest best-score sentences."""
        if self.feedback.vocabulary is not None:
            return [self.cfg.exemplar_text]
        return self.pool.common_feedback(best=True)[: self.cfg.lmu_exemplars]

    def eval_words(self) -> list[str]:
        """Feedback evaluated at the end, best first: the vocabulary (RM, LMC; `eval_feedback` filters it) or LMU's commonest best/worst."""
        cfg = self.cfg
        if self.feedback.vocabulary is not None:
            return [w for w in self.feedback.vocabulary if cfg.eval_feedback is None or w in cfg.eval_feedback]
        best, worst = self.pool.common_feedback(best=True)[:1], self.pool.common_feedback(best=False)[:1]
        return best + [w for w in worst if w not in best]

    def seed_pool(self) -> None:
        """Iteration-0 rows (main process): each training prompt's original continuation, scored like any sample."""
        if self.procs.main:
            pids = [i for i, p in enumerate(self.prompts.train) if p in self.prompts.continuations]
            prompts, tok = [self.prompts.train[i] for i in pids], self.tokenizer
            texts = [self.prompts.continuations[p] for p in prompts]
            fbs = self.feedback(prompts, texts)
            # feedback_noise reaches these rows too (rm: through the quantile re-cut), as iteration 0's samples
            offsets = (
                self.apply_noise(0, fbs, list(range(len(fbs))))[1] if self.feedback.relative else [None] * len(fbs)
            )
            # token counts as the sampler records them: conditioned input (none here) and the body without EOS
            self.pool.add(
                [
                    Row(
                        0,
                        pid,
                        p,
                        c,
                        None,
                        f.score,
                        None,
                        len(c.split()) >= CONTINUATION_WORDS,
                        len(self.template.input_ids(tok, None, p)),
                        len(tok(c, add_special_tokens=False).input_ids),
                        f.valid,
                        noise=offset,
                    )
                    for pid, p, c, f, offset in zip(pids, prompts, texts, fbs, offsets)
                ]
            )
        self.procs.wait()

    def train_phase(self, it: int) -> dict:
        """Optimiser steps on rows drawn from the pool, all drawn up front (so their first draws can be staged);
        from `progress.step` on when resuming (its snapshot)."""
        cfg, start = self.cfg, self.progress.step
        rng = random.Random(f"{cfg.seed}/{it}/train")  # its own stream: the draw is the same after a resume
        torch.manual_seed(cfg.seed * 100_003 + it)
        if cfg.quantiles == "global":
            n = cfg.train_steps * cfg.batch_size
            if cfg.train_draw == "by_bucket":
                rows = self.pool.draw_by_bucket(n, self.n_buckets, rng)
            else:
                rows = self.pool.draw_uniform(n, rng)
        else:
            rows = self.pool.draw_balanced(cfg.per_bucket, self.n_buckets, rng, group=True)
            if cfg.train_steps:
                rows = rows[: cfg.train_steps * cfg.batch_size]
        steps = math.ceil(len(rows) / cfg.batch_size)
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        totals, t0 = (
            {
                "loss": 0.0,
                "nll": 0.0,
                "kl": 0.0,
                "entropy": 0.0,
                "tokens": 0,
                "reference_forward_rows": 0,
                "staged_rows": 0,
            },
            time.time(),
        )
        if start:
            totals = runfolder.load_snapshot(self.run, start, self.model, opt)["totals"]
        elif cfg.lr_schedule != "iteration" and it > 1:
            # One AdamW over the run: the moments (and step count) the previous iteration ended with.
            runfolder.load_optimizer_carry(self.run, self.model, opt)
            torch.manual_seed(cfg.seed * 100_003 + it)  # the carry holds the previous phase's RNG state
        schedule = self.lr_multiplier(steps, offset=0 if cfg.lr_schedule == "iteration" else (it - 1) * cfg.train_steps)
        for (
            group
        ) in opt.param_groups:  # the carry holds the last step's decayed rate; the schedule starts from the peak
            group["lr"] = group["initial_lr"] = cfg.learning_rate
        # last_epoch: the schedule goes on at the resumed step
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule, last_epoch=start - 1)
        self.model.train()
        if self.refcache is not None and self.cached_block and cfg.stage_first_draws:
            # (resumed: the rows left were staged before the snapshot and reload with the cache, so none is computed)
            staged = self.stage_first_draws(rows[start * cfg.batch_size :])
            totals["staged_rows"] = totals.get("staged_rows", 0) + staged
            totals["reference_forward_rows"] += staged
        tok, bad, world = self.tokenizer, 0, self.procs.world
        for step in tqdm(range(start, steps), desc=f"iter {it} training", leave=False, disable=None):
            batch = rows[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            # Several processes: every N-th row each, in as many passes as the first (largest) share, as FSDP gathers
            # weights in every pass; a pass past a process's rows (or a batch shorter than N) takes a filler row, weight 0.
            mine, first = batch[self.procs.rank :: world], len(batch[::world])
            # Token sums over the whole batch's token count, × N as DDP/FSDP average gradients: the update is one
            # process's step on the whole batch, however processes and micro-batches split it.
            denom = sum(len(self.template.target_ids(tok, r.completion, bool(r.truncated))) for r in batch) / world
            micro, acc = cfg.micro_batch_size or first, [0.0] * 6  # loss, nll·n, kl·n, entropy·n, n, non-finite
            misses_before = self.refcache.misses if self.refcache is not None else 0
            for j in range(0, first, micro):  # gradient accumulation; DDP all-reduces once, at the last part
                with self.procs.no_sync(self.ddp, skip=j + micro < first):
                    self.micro_step(mine[j : j + micro] or batch[:1], denom, int(bool(mine[j : j + micro])), acc)
            acc = self.procs.sum(acc)  # (one process: as is) all take or skip the step together
            if self.refcache is not None:
                totals["reference_forward_rows"] = (
                    totals.get("reference_forward_rows", 0) + self.refcache.misses - misses_before
                )
            n = max(acc[4], 1)
            loss_value, stats = (
                acc[0] / world,
                {"nll": acc[1] / n, "kl": acc[2] / n, "entropy": acc[3] / n, "tokens": int(acc[4])},
            )
            if acc[5]:
                opt.zero_grad(set_to_none=True)
                bad += 1
                print(f"warning: iteration {it} step {step}: non-finite loss, batch skipped")
                if bad >= cfg.max_nonfinite_steps:
                    raise AltlmError(
                        f"training diverged: {bad} non-finite losses in a row (iteration {it}, step {step}); "
                        "lower learning_rate or set precision=fp32, and start a new run folder"
                    )
            else:  # (a skipped step still reaches the snapshot below: the phase's last one must be written)
                bad = 0
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                for k, v in zip(
                    ("loss", "nll", "kl", "entropy", "tokens"), (loss_value * acc[4], *acc[1:4], int(acc[4]))
                ):
                    totals[k] += v
                record = {"loss": loss_value, **stats, "lr": sched.get_last_lr()[0]}
                if self.procs.main:
                    evaluation.append_jsonl(
                        self.run / "metrics.jsonl", [{"kind": "step", "iteration": it, "step": step, **record}]
                    )
                self.track(self.global_step, {f"train/{k}": v for k, v in record.items()})
                self.global_step += 1
            runfolder.failpoint("train")
            if step + 1 == steps or (cfg.save_steps and (step + 1) % cfg.save_steps == 0):
                if self.refcache is not None:
                    self.refcache.flush(it, step + 1)  # before the snapshot that a resume would start from
                runfolder.save_snapshot(self.run, step + 1, self.model, opt, {"totals": totals}, write=self.procs.main)
                if step + 1 < steps:  # the last one is recorded with the phase's end (train())
                    self.save_progress(step=step + 1)
                    if self.procs.main:
                        runfolder.prune_snapshots(self.run, keep=step + 1)
        n = max(totals["tokens"], 1)
        # rows whose reference statistics this phase computed (staged_rows of them before its first step); the other
        # drawn rows reused them
        cache = {}
        if self.refcache is not None:
            cache = {k: totals.get(k, 0) for k in ("reference_forward_rows", "staged_rows")}
            cache["packed_rows"] = bool(self.pack_rows and self.cached_block)  # (pack_rows took effect)
        return {
            "steps": steps,
            "examples": len(rows),
            "examples_per_bucket": [sum(r.bucket == b for r in rows) for b in range(self.n_buckets)],
            "seconds": round(time.time() - t0, 2),
            **cache,
            **{k: totals[k] / n for k in ("loss", "nll", "kl", "entropy")},
            "tokens": totals["tokens"],
        }

    def lr_multiplier(self, steps: int, offset: int):
        """The learning-rate factor at step i of this phase. iteration: warmup over `warmup_ratio` of the phase's
        `steps`, then linear decay to 0 at its end. run / constant: the same over the whole run's
        iterations × train_steps (the phase's step i is the run's step offset + i); constant stays at the peak."""
        cfg = self.cfg
        total = steps if cfg.lr_schedule == "iteration" else cfg.iterations * cfg.train_steps
        warm = max(1, round(total * cfg.warmup_ratio))

        def multiplier(i: int) -> float:
            step = offset + i
            if step < warm or cfg.lr_schedule == "constant":
                return min(1.0, (step + 1) / warm)
            return max(0.0, (total - step) / max(1, total - warm))

        return multiplier

    def micro_step(self, batch, denom: float, weight: int, acc: list[float]) -> None:
        """Forward, ALT loss and backward of one micro-batch (gradients accumulate); adds its sums to `acc`."""
        cfg, tok = self.cfg, self.tokenizer
        inputs = [self.policy_input(r) for r in batch]
        targets = [self.template.target_ids(tok, r.completion, bool(r.truncated)) for r in batch]
        autocast = self.autocast()
        if self.refcache is not None and self.cached_block:  # the frozen blocks' output is cached per row
            acts = self.cached_block_inputs(batch, inputs, targets)
            with autocast:
                hidden, tgt = target_hidden_from(
                    self.ddp, acts, inputs, targets, tok.pad_token_id, self.cached_block, self.pack_rows
                )
            self.fill_reference_cache(batch, targets, acts=acts)
        elif self.refcache is not None:
            shared = self.shared_layers  # 0: nothing to record, the reference forward runs whole
            record_input = layer_input(self.model, shared) if shared else contextlib.nullcontext({})
            with autocast, record_input as record:
                hidden, tgt = target_hidden(self.ddp, inputs, targets, tok.pad_token_id)
            self.fill_reference_cache(batch, targets, record)
        if self.refcache is not None:
            ref = self.refcache.gather(self.reference_keys(batch), hidden.device)
            coefs = (cfg.kl_coef, cfg.entropy_coef)
            if cfg.fused_loss:
                loss, stats = head_loss(hidden, self.head_weight, tgt, *coefs, self.vocab_size, denom, ref)
            else:
                with autocast:
                    logits = head_logits(self.ddp, hidden)
                stats_in = (hidden, *ref)
                loss, stats = alt_loss(logits, tgt, None, None, *coefs, "ref_policy", self.vocab_size, denom, stats_in)
        else:
            with autocast:
                logits, tgt, mask = target_logits(self.ddp, inputs, targets, tok.pad_token_id)
                ref_in = [self.reference_input(r) for r in batch]
                ref_logits = self.reference_logits(ref_in, targets) if cfg.kl_coef else None
            loss, stats = alt_loss(
                logits,
                tgt,
                mask,
                ref_logits,
                cfg.kl_coef,
                cfg.entropy_coef,
                cfg.kl_direction,
                self.vocab_size,
                denom,
            )
        (loss * weight).backward()  # even when non-finite: under DDP every process must reach the all-reduce
        n = stats["tokens"] * weight
        for i, v in enumerate(
            (
                loss.item() * weight,
                stats["nll"] * n,
                stats["kl"] * n,
                stats["entropy"] * n,
                n,
                not math.isfinite(loss.item()),
            )
        ):
            acc[i] += v

    def policy_input(self, row) -> list[int]:
        """The policy's input ids for a pool row: feedback + prompt (the prompt alone under use_feedback=false)."""
        feedback = row.feedback if self.cfg.use_feedback else None
        return self.template.input_ids(self.tokenizer, feedback, row.prompt, self.cfg.max_prompt_tokens)

    def reference_input(self, row) -> list[int]:
        """What the reference reads (reference_input): the prompt alone, or the policy's own input."""
        if self.cfg.reference_input == "conditioned":
            return self.policy_input(row)
        return self.template.input_ids(self.tokenizer, None, row.prompt, self.cfg.max_prompt_tokens)

    def reference_keys(self, rows) -> list[str]:
        """The reference cache's keys: a conditioned reference's statistics change with the row's feedback."""
        conditioned = self.cfg.reference_input == "conditioned" and self.cfg.use_feedback
        return [refcache.key(r.id, r.feedback, conditioned) for r in rows]

    def block_input_keys(self, rows) -> list[str]:
        """The keys of the rows' stored inputs to the lowest adapted block: the policy reads the feedback."""
        return [refcache.key(r.id, r.feedback if self.cfg.use_feedback else None, True) for r in rows]

    def autocast(self):
        """The training forward's precision context: autocast to the compute dtype, or none under fp32."""
        return torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None)

    def lowest_adapted_block(self) -> int:
        """The lowest decoder block LoRA adapts, when the blocks below it are frozen (they compute the same for a
        sequence whatever the adapters hold) and every block takes the same keyword arguments (mask, rotary
        embeddings: recorded once, loss.layer_input). 0: none qualifies, the whole forward runs."""
        if self.refcache is None:
            return 0
        types = getattr(self.model.config, "layer_types", None)
        if types and len(set(types)) > 1:  # e.g. Gemma 3's sliding-window blocks take another mask
            return 0
        from peft.tuners.tuners_utils import BaseTunerLayer

        def adapted(module) -> bool:
            return any(isinstance(m, BaseTunerLayer) for m in module.modules())

        if adapted(self.model.get_input_embeddings()):  # e.g. Quark's trained token rows
            return 0
        layers = self.model.get_base_model().base_model.layers
        return next((i for i, layer in enumerate(layers) if adapted(layer)), 0)

    def frozen_layers_below_adapter(self) -> int:
        """The bottom decoder blocks a cache miss's reference forward can skip (share_frozen_layers): where the
        reference is the frozen base reading the policy's own input (conditioned), the blocks below the lowest
        adapted one compute the same for both. 0: the whole forward runs."""
        cfg = self.cfg
        if not cfg.share_frozen_layers or cfg.reference_input != "conditioned" or self.ref_model is not None:
            return 0
        return self.lowest_adapted_block()

    def cached_block_inputs(self, rows, inputs, targets) -> list:
        """The rows' inputs to the lowest adapted block (cache_frozen_layers): stored at a row's first draw under
        its feedback string, then reused (the frozen blocks below compute the same at every draw)."""
        keys = self.block_input_keys(rows)
        stored = self.refcache.block_inputs
        missing = [i for i, k in enumerate(keys) if k not in stored]
        acts = {}
        if missing:
            with self.autocast():
                computed = block_inputs(
                    self.model,
                    [inputs[i] for i in missing],
                    [targets[i] for i in missing],
                    self.tokenizer.pad_token_id,
                    self.cached_block,
                    self.pack_rows,
                )
            for i, a in zip(missing, computed):
                acts[i] = a
                self.refcache.add_block_input(keys[i], a)
        return [acts[i] if i in acts else stored[k].to(self.device) for i, k in enumerate(keys)]

    @torch.no_grad()
    def stage_first_draws(self, rows) -> int:
        """Before a phase's first step (stage_first_draws): the frozen blocks' output and the reference statistics of
        the rows drawn for the first time, in batches of similar lengths, so that every step runs the adapted blocks
        only. Returns how many rows' statistics it computed. Deterministic, so a run killed before its first snapshot
        stages the same batches again (their entries are written with that snapshot)."""
        cfg, tok, cache = self.cfg, self.tokenizer, self.refcache
        room = cache.stored_bytes < cache.block_input_bytes  # past the budget the steps run the frozen blocks
        firsts, seen = [], set()
        for row, ref_key, policy_key in zip(rows, self.reference_keys(rows), self.block_input_keys(rows)):
            if ref_key in cache.entries and (policy_key in cache.block_inputs or not room):
                continue
            if (ref_key, policy_key) not in seen:
                seen.add((ref_key, policy_key))
                firsts.append(
                    (row, self.policy_input(row), self.template.target_ids(tok, row.completion, bool(row.truncated)))
                )
        firsts.sort(key=lambda f: len(f[1]) + len(f[2]))  # stable: equal lengths keep the draw's order
        misses = cache.misses
        for i in range(0, len(firsts), cfg.stage_first_draws):
            chunk = firsts[i : i + cfg.stage_first_draws]
            batch = [f[0] for f in chunk]
            targets = [f[2] for f in chunk]
            acts = self.cached_block_inputs(batch, [f[1] for f in chunk], targets)
            self.fill_reference_cache(batch, targets, acts=acts)
        return cache.misses - misses

    @torch.no_grad()
    def fill_reference_cache(self, rows, targets, record: dict | None = None, acts: list | None = None) -> None:
        """Reference statistics for the rows of a step that have none yet (refcache.py), in one forward pass: from
        the lowest adapted block up when the policy's forward recorded its input there (`record`) or the rows'
        inputs to it are cached (`acts`, cache_frozen_layers), else whole."""
        tok = self.tokenizer
        keys = self.reference_keys(rows)
        missing = self.refcache.missing(keys)
        if not missing:
            return
        ref_targets = [targets[i] for i in missing]
        ref_in = [self.reference_input(rows[i]) for i in missing]
        model = self.ref_model if self.ref_model is not None else self.model
        adapter_off = self.model.disable_adapter() if self.ref_model is None else contextlib.nullcontext()
        with adapter_off, self.autocast():
            if self.shared_layers and acts is not None:
                picked = [acts[i] for i in missing]
                hidden = target_hidden_from(
                    model, picked, ref_in, ref_targets, tok.pad_token_id, self.shared_layers, self.pack_rows
                )[0]
            elif record:
                hidden = tail_target_hidden(model, record, self.shared_layers, missing, targets, tok.pad_token_id)
            else:
                hidden = target_hidden(model, ref_in, ref_targets, tok.pad_token_id)[0]
        weight = self.head_weight  # the reference's head: the policy's frozen one, or a separate reference's
        if self.ref_model is not None:
            weight = self.ref_model.get_output_embeddings().weight.to(self.head_weight.dtype)
        head = self.model.get_output_embeddings().weight
        mean_embedding, negentropy = refcache.statistics(hidden, weight, head, self.vocab_size)
        start = 0
        for i, t in zip(missing, ref_targets):
            end = start + len(t)
            self.refcache.add(keys[i], mean_embedding[start:end].clone(), negentropy[start:end].clone())
            start = end

    @torch.no_grad()
    def reference_logits(self, inputs, targets):  # LoRA without a separate reference: the base is the adapter disabled
        with contextlib.nullcontext() if self.ref_model is not None else self.model.disable_adapter():
            return target_logits(
                self.model if self.ref_model is None else self.ref_model, inputs, targets, self.tokenizer.pad_token_id
            )[0]

    # ------------------------------------------------------------------ evaluation
    def reference_conditions(self, words: list[str]) -> list[str | None]:
        """The reference's feedback strings: every one, or (eval_conditions=claims) the best and the worst."""
        if not self.cfg.eval_all_feedback:
            return [None]
        if self.cfg.eval_conditions == "claims":
            return [None] + list(dict.fromkeys([words[0], words[-1]]))
        return [None] + words

    def condition(self, it: int, feedback: str | None, words: list[str]) -> evaluation.Condition:
        """How one feedback string is evaluated: its samples per prompt, and whether the perplexity model scores it."""
        cfg = self.cfg
        middle = feedback is not None and feedback not in (words[:1] + words[-1:])
        k = (
            cfg.eval_middle_samples_per_prompt
            if (middle and cfg.eval_middle_samples_per_prompt)
            else cfg.eval_samples_per_prompt
        )
        fluency = True
        if cfg.eval_conditions == "claims":  # the claims compare the untagged reference with the final exemplar
            fluency = feedback is None if it == 0 else feedback == cfg.exemplar_text
        return evaluation.Condition(feedback, k, fluency)

    def evaluate(
        self, it: int, conditions: list[str | None], label: str, extra: dict | None = None, model=None
    ) -> dict:
        cfg, model = self.cfg, self.procs.full(model or self.model, everyone=False)  # (collective under FSDP)
        if not self.procs.main:
            return {}
        im = inference_model(
            model, self.amp, owned=model not in (self.model, self.ref_model)
        )  # (FSDP: the gathered copy)
        words = [w for w in conditions if w is not None]
        blocks, records = evaluation.evaluate(
            im,
            self.tokenizer,
            self.template,
            self.prompts.eval,
            [self.condition(it, fb, words) for fb in conditions],
            self.eval_settings,
            self.scorer,
            self.added_ids,
            cfg.seed + 7,
            label,
            self.fluency,
        )
        evaluation.append_jsonl(self.run / "eval_samples.jsonl", [{"iteration": it, **r} for r in records])
        runfolder.failpoint("eval")
        record = {"kind": "eval", "iteration": it, "model": label, "by_feedback": blocks, **(extra or {})}
        if len(words) >= 2:  # under several feedback strings: also the noise-free check on the reference's texts
            ref = [r for r in map(json.loads, open(self.run / "eval_samples.jsonl")) if r["iteration"] == 0]
            if cfg.likelihood_texts:  # an even spread over the reference's conditions and prompts
                ref = ref[:: max(1, len(ref) // cfg.likelihood_texts)][: cfg.likelihood_texts]
            record["likelihood_steer"] = evaluation.likelihood_steer(
                im,
                self.tokenizer,
                self.template,
                ref,
                words[0],
                words[-1],
                self.scorer.higher_is_better,
                cfg.max_prompt_tokens,
                auc_split=cfg.likelihood_auc_split,
            )
        evaluation.append_jsonl(self.run / "metrics.jsonl", [record])
        self.track(it, {f"eval/{label}/{k}/{m}": v for k, b in blocks.items() for m, v in b.items()})
        return record
