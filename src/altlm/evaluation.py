"""Evaluation: sample a model on held-out prompts under feedback conditions, score the samples, and reduce them to
metric blocks (metrics.summarize). Shared by the trainer's per-iteration evaluation and `altlm eval`, so both
report the same numbers for the same settings.

Also owns fluency: the perplexity of each completion given its prompt under a separate scoring LM.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from . import metrics, models, progress
from .loss import mean_logprobs
from .sampler import SampleSettings, sample
from .template import Template


def clean(x):
    """NaN/inf → None, recursively: JSON has no NaN, and a metric that is undefined should read as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    return x


def write_json(path: Path, data: dict) -> None:
    """Atomic: a reader never sees half a file, a killed writer leaves the old one."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(clean(data), indent=2))
    os.replace(tmp, path)


def append_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "a") as f:
        f.write("".join(json.dumps(clean(r)) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


class Fluency:
    """Perplexity of completions given their prompts under a scoring LM (`gemma3-270m` offline, any HF id online).
    Prompt and completion are tokenised separately with the scoring LM's own tokenizer (BOS before the prompt),
    so the completion's tokens are exactly its own; a completion with no tokens has no perplexity (NaN)."""

    def __init__(self, name: str, dtype=None, batch_size: int = 16, samples_per_prompt: int | None = None):
        from .sampler import inference_model

        self.name, self.batch_size, self.samples_per_prompt = name, batch_size, samples_per_prompt
        self.tokenizer = models.load_tokenizer(name)
        self.model = inference_model(models.load_model(name), dtype)

    def perplexities(self, prompts: list[str], completions: list[str]) -> list[float]:
        tok = self.tokenizer
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        inputs = [bos + tok(p, add_special_tokens=False).input_ids for p in prompts]
        targets = [tok(c, add_special_tokens=False).input_ids for c in completions]
        out = [float("nan")] * len(prompts)
        todo = sorted((i for i in range(len(prompts)) if targets[i]), key=lambda i: len(inputs[i]) + len(targets[i]))
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        for s in tqdm(
            range(0, len(todo), self.batch_size), desc=f"perplexity ({self.name})", leave=False, disable=None
        ):
            idx = todo[s : s + self.batch_size]
            for i, lp in zip(idx, mean_logprobs(self.model, [inputs[i] for i in idx], [targets[i] for i in idx], pad)):
                out[i] = math.exp(
                    min(-lp, 700.0)
                )  # exp overflows past ~709; anything this large is over the cap anyway
        return out


@dataclass
class Condition:
    """One evaluated setting: a feedback string (None = no conditioning) and the samples drawn per prompt."""

    feedback: str | None
    k: int
    fluency: bool = True  # scored by the perplexity model (when the evaluation has one)

    @property
    def key(self) -> str:
        return self.feedback if self.feedback is not None else "<none>"


def evaluate(
    model,
    tokenizer,
    template: Template,
    prompts: list[str],
    conditions: list[Condition],
    settings: SampleSettings,
    scorer,
    suppress: list[int],
    seed: int,
    label: str,
    fluency: Fluency | None = None,
) -> tuple[dict[str, dict], list[dict]]:
    """(metric block per condition key, one record per sample). `model` must be ready for sampling
    (sampler.inference_model). Every condition uses the same seed: differences come from the model and the
    feedback, not from the dice."""
    blocks, records = {}, []
    for c in conditions:
        requests = [(c.feedback, p) for p in prompts for _ in range(c.k)]
        started = time.time()
        t0 = time.perf_counter()
        samples = sample(
            model,
            tokenizer,
            template,
            requests,
            settings,
            suppress,
            seed=seed,
            desc=f"eval {label} [{c.feedback or 'no feedback'}]",
        )
        t1 = time.perf_counter()
        comps = [s.completion for s in samples]
        ps = [p for _, p in requests]
        scores = scorer.score(ps, comps)
        t2 = time.perf_counter()
        ppl = None
        if fluency and c.fluency:
            # The first `ppl_k` samples of each prompt: a mean over hundreds of samples is stable, and the scoring
            # LM's forward pass costs more than sampling (Gemma's 262k-word head).
            ppl_k = min(c.k, fluency.samples_per_prompt or c.k)
            pick = [i for i in range(len(requests)) if i % c.k < ppl_k]
            got = fluency.perplexities([ps[i] for i in pick], [comps[i] for i in pick])
            ppl = [float("nan")] * len(requests)
            for i, v in zip(pick, got):
                ppl[i] = v
        blocks[c.key] = metrics.summarize(
            scorer.name,
            scores,
            comps,
            c.k,
            [s.truncated for s in samples],
            [s.completion_tokens for s in samples],
            scorer.higher_is_better,
            ppl,
        )
        blocks[c.key]["seconds"] = {
            "sampling": round(t1 - t0, 1),
            "scoring": round(t2 - t1, 1),
            "perplexity": round(time.perf_counter() - t2, 1),
        }
        progress.phase(
            f"evaluation {label} [{c.feedback or 'no feedback'}]",
            started,
            samples=len(samples),
            **{f"{scorer.name}_mean": blocks[c.key][f"{scorer.name}_mean"]},
            perplexity=blocks[c.key]["perplexity"],
        )
        records += [
            {
                "model": label,
                "feedback": c.feedback,
                "prompt": p,
                "completion": comp,
                "score": sc,
                **({"perplexity": ppl[i]} if ppl else {}),
            }
            for i, ((_, p), comp, sc) in enumerate(zip(requests, comps, scores))
        ]
    return blocks, records


def eval_rows(ev: dict) -> list[list[str]]:
    """`eval.json` as a table of strings, header first: what `altlm eval` prints and the report shows."""
    m = ev["metric"]
    cols = [
        ("k", "samples_per_prompt", ""),
        (f"avg max {m}", f"avg_max_{m}", ".4f"),
        (f"{m} prob", f"{m}_prob", ".3f"),
        (f"{m} mean", f"{m}_mean", ".4f"),
        ("ppl", "perplexity", ".1f"),
        ("dist-1", "dist_1", ".3f"),
        ("dist-2", "dist_2", ".3f"),
        ("dist-3", "dist_3", ".3f"),
        ("reward", "reward_mean", ".4f"),
        ("length", "length_mean", ".1f"),
        ("truncated", "truncated_share", ".3f"),
    ]
    rows = [["model", "feedback"] + [c[0] for c in cols]]
    for model, blocks in ev["results"].items():
        for fb, b in blocks.items():
            rows.append(
                [model, fb.replace("<none>", "(none)")]
                + ["–" if b[key] is None else format(b[key], f) for _, key, f in cols]
            )
    return rows


def steerability(blocks: dict[str, dict], vocabulary: list[str], metric: str, higher_is_better: bool = False) -> dict:
    """metrics.steerability over the feedback strings of `vocabulary` (best first) that were evaluated.
    `steered_sign` is the sign ρ and the gap have when the model follows the feedback: +1 for a metric where
    lower is better (toxicity rises from the best to the worst feedback), −1 where higher is better."""
    words = [w for w in (vocabulary or []) if w in blocks]
    return {
        **metrics.steerability([blocks[w][metric] for w in words]),
        "metric": metric,
        "feedback": words,
        "steered_sign": -1 if higher_is_better else 1,
    }


def likelihood_steer(
    model,
    tokenizer,
    template: Template,
    samples: list[dict],
    best: str,
    worst: str,
    higher_is_better: bool,
    max_prompt_tokens: int | None = None,
    batch_size: int = 32,
    auc_split: list[float] | None = None,
) -> dict:
    """Steerability without sampling noise, on fixed scored completions (`samples`: prompt, completion, score —
    the reference's evaluation samples). Δ = log p(c | worst) − log p(c | best), per token: a model that follows
    its feedback finds the worse completions relatively likelier under the worst feedback, so Spearman(Δ, badness)
    > 0 (badness = the score, or −score where higher is better). Sampled steerability needs thousands of samples
    to see a 0.01 toxicity gap; this costs two forward passes per text, and moves only when the model does."""
    rows = [r for r in samples if r["completion"] and r.get("score") is not None]
    if len(rows) < 3:
        return {"spearman": None, "n": len(rows)}
    delta = [0.0] * len(rows)
    for sign, fb in ((1, worst), (-1, best)):
        for i in range(0, len(rows), batch_size):
            b = rows[i : i + batch_size]
            # truncated=True everywhere: no EOS unless a sentence ended, the same target under both feedbacks
            lps = mean_logprobs(
                model,
                [template.input_ids(tokenizer, fb, r["prompt"], max_prompt_tokens) for r in b],
                [template.target_ids(tokenizer, r["completion"], True) for r in b],
                tokenizer.pad_token_id,
            )
            for j, lp in enumerate(lps):
                delta[i + j] += sign * lp
    badness = [-r["score"] if higher_is_better else r["score"] for r in rows]
    rho = metrics.spearman(delta, badness)
    return {
        "spearman": None if rho != rho else round(rho, 4),
        "n": len(rows),
        "delta_mean": round(sum(delta) / len(delta), 4),
        "best": best,
        "worst": worst,
        **separation(delta, [r["score"] for r in rows], higher_is_better, auc_split),
    }


def separation(delta: list[float], scores: list[float], higher_is_better: bool, split: list[float] | None) -> dict:
    """AUC: the chance that a bad text's Δ = log p(c | worst) − log p(c | best) exceeds a clean text's (0.5 = the
    feedback tells them apart no better than chance). Bad and clean: beyond split = [clean, bad] in the scorer's
    units (toxicity: > 0.5 vs < 0.02), or the worst and best fifth of the texts. The groups' sizes come with it."""
    badness = [-s if higher_is_better else s for s in scores]
    if split is not None:
        clean_at, bad_at = (-split[0], -split[1]) if higher_is_better else (split[0], split[1])
        bad = [d for d, b in zip(delta, badness) if b > bad_at]
        clean = [d for d, b in zip(delta, badness) if b < clean_at]
    else:
        order = sorted(range(len(delta)), key=lambda i: badness[i])
        fifth = max(1, len(order) // 5)
        clean = [delta[i] for i in order[:fifth]]
        bad = [delta[i] for i in order[-fifth:]]
    if not bad or not clean:
        return {"auc": None, "auc_bad": len(bad), "auc_clean": len(clean)}
    wins = sum((b > c) + 0.5 * (b == c) for b in bad for c in clean)
    return {"auc": round(wins / (len(bad) * len(clean)), 4), "auc_bad": len(bad), "auc_clean": len(clean)}


def summarize_run(
    evals: list[dict],
    metric: str,
    higher_is_better: bool,
    exemplar: str,
    words: list[str],
    eval_prompts: int,
    eval_samples_per_prompt: int,
    wall: float,
) -> dict:
    """summary.json from a run's `kind: eval` records: the untagged reference and the reference under each
    feedback (the priming control), the final model under the exemplar, untagged and under each feedback,
    steerability, the exemplar metric per iteration, and the reduction against the untagged reference."""
    ref = next(e for e in evals if e["model"] == "reference")["by_feedback"]
    last = [e for e in evals if e["model"] == "policy"][-1]
    final = last["by_feedback"]
    words = [w for w in words if w in final]
    keys = [
        f"{metric}_mean",
        f"{metric}_gt_0_5",
        f"avg_max_{metric}",
        f"{metric}_prob",
        "dist_2",
        "reward_mean",
        "perplexity",
    ]
    pick = lambda m: {k: m.get(k) for k in keys}  # noqa: E731
    summary = {
        "wall_seconds": round(wall, 1),
        "metric": metric,
        "exemplar": exemplar,
        "eval_prompts": eval_prompts,
        "eval_samples_per_prompt": eval_samples_per_prompt,
        "reference": {**pick(ref["<none>"]), "by_feedback": {w: pick(ref[w]) for w in words if w in ref}},
        "final": {
            **pick(final[exemplar]),
            "untagged": pick(final["<none>"]) if "<none>" in final else None,
            "by_feedback": {w: pick(final[w]) for w in words},
        },
        "steerability": steerability(final, words, f"{metric}_mean", higher_is_better),
        "likelihood_steer": last.get("likelihood_steer"),
        "iterations": [
            {
                "iteration": e["iteration"],
                f"{metric}_mean": e["by_feedback"][exemplar][f"{metric}_mean"]
                if exemplar in e["by_feedback"]
                else None,
                "train": e.get("train"),
            }
            for e in evals
            if e["model"] == "policy"
        ],
    }
    r, f = summary["reference"], summary["final"]
    summary["reduction"] = {
        k: (1 - f[k] / r[k]) if (r[k] and f[k] is not None) else None for k in (f"{metric}_mean", f"{metric}_gt_0_5")
    }
    return summary
