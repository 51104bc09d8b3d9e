"""Sample efficiency: ALT-RM against Quark, SFT, best-of-n SFT, TRL's PPO and RLOO under one harness.

    .venv/bin/python benchmarks/sample_efficiency.py            # both tasks, ≈ 60 min on 2 CPU cores
    .venv/bin/python benchmarks/sample_efficiency.py --quick --out /tmp/se   # tiny random model, every method once (< 90 s)

Same policy (SmolLM2-135M + the toxicity-offline recipe's LoRA), same fortune prompts and held-out split, same
scorer (Jigsaw toxicity; VADER sentiment as the second task), same sampling settings, evaluation on the same
held-out prompts with the same seed; every method is evaluated at sample budgets counted in completions it
generated for training. Writes <out>/sample_efficiency.{json,md,png} atomically (JSON shape: docs/baselines.md).
Needs `pip install -e '.[baselines]'` (trl==1.12.0: the last TRL with a PPOTrainer).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))
sys.path.insert(0, str(ROOT))  # common.py, beside this script

from altlm import baselines as B  # noqa: E402
from altlm.config import load_config  # noqa: E402
from altlm.errors import AltlmError  # noqa: E402
from altlm.evaluation import clean  # noqa: E402
from common import save_figure, write_atomic  # noqa: E402

METHODS = ["alt", "quark", "sft", "best_of_n", "ppo", "rloo"]
LABELS = {
    "alt": "ALT-RM",
    "quark": "Quark",
    "sft": "SFT (ref. samples)",
    "best_of_n": "best-of-n SFT",
    "ppo": "PPO (TRL)",
    "rloo": "RLOO (TRL)",
}
SENTIMENT_WORDS = ["Very Positive", "Positive", "Neutral", "Negative", "Very Negative"]


@dataclasses.dataclass
class Sizes:
    model: str = "smollm2-135m"
    budgets: tuple[int, ...] = (256, 512)  # every method is evaluated here
    alt_round: int = 128  # ALT/Quark/SFT/best-of-n samples per round (ALT: per iteration)
    samples_per_prompt: int = 2  # ALT/Quark/SFT: completions per prompt; RLOO's k
    best_of: int = 4  # best-of-n: n
    steps_per_round: int = 8  # optimiser steps per round of alt_round samples (batch 16)
    rl_rollout: int = 64  # PPO/RLOO completions per generation round
    rl_minibatch: int = 16  # PPO/RLOO sequences per optimiser step
    rl_lr: float = 1e-4
    ppo_epochs: int = 1
    eval_prompts: int = 64
    eval_samples_per_prompt: int = 2
    train_prompts: int = 1500
    perplexity_model: str | None = "gemma3-270m"


QUICK = Sizes(
    model="tiny-smollm2",
    budgets=(16,),
    alt_round=16,
    best_of=4,
    steps_per_round=1,
    rl_rollout=16,
    rl_minibatch=8,
    eval_prompts=4,
    eval_samples_per_prompt=2,
    train_prompts=32,
    perplexity_model="tiny-smollm2",
)


def task_config(task: str, s: Sizes, threads: int):
    """The toxicity-offline recipe (model, LoRA, prompts, sampling, loss) resized; sentiment swaps the scorer."""
    over = [
        f"model={s.model}",
        f"num_train_prompts={s.train_prompts}",
        f"num_eval_prompts={s.eval_prompts}",
        f"eval_samples_per_prompt={s.eval_samples_per_prompt}",
        f"threads={threads}",
        "save_steps=0",
        f"perplexity_model={s.perplexity_model or 'null'}",
    ]
    if s.model.startswith("tiny-"):
        over += ["max_new_tokens=8", "sample_batch_size=32"]
    if task == "sentiment":
        over += ["scorer=vader", f"feedback_words=[{','.join(SENTIMENT_WORDS)}]", f"exemplar={SENTIMENT_WORDS[0]}"]
    elif task != "toxicity":
        raise AltlmError(f"unknown task '{task}' (toxicity, sentiment)")
    return load_config("toxicity-offline", over)


def run_task(task: str, s: Sizes, methods: list[str], work: Path, threads: int, on_method=None) -> dict:
    cfg = task_config(task, s, threads)
    h = B.Harness.build(cfg)
    res = {
        "task": task,
        "metric": h.metric,
        "higher_is_better": h.scorer.higher_is_better,
        "methods": {},
        "seconds": {},
        "reference": None,
    }
    budgets = list(s.budgets)
    alt_budgets = list(range(s.alt_round, budgets[-1] + 1, s.alt_round))
    for m in methods:
        t = time.time()
        print(f"== {task}: {m}", flush=True)
        if m in ("alt", "quark"):
            pts, ref, _ = B.run_alt(
                h,
                alt_budgets,
                s.alt_round,
                s.samples_per_prompt,
                s.steps_per_round,
                work / task / m,
                quark=m == "quark",
            )
            res["reference"] = res["reference"] or ref
        elif m == "sft":
            pts, _ = B.run_self_training(h, "sft", budgets, s.alt_round, s.samples_per_prompt, s.steps_per_round)
        elif m == "best_of_n":
            pts, _ = B.run_self_training(h, "best_of_n", budgets, s.alt_round, s.best_of, s.steps_per_round)
        elif m == "ppo":
            pts, _ = B.run_ppo(h, budgets, s.rl_rollout, s.rl_minibatch, s.rl_lr, s.ppo_epochs, work / task / m)
        elif m == "rloo":
            pts, _ = B.run_rloo(
                h, budgets, s.rl_rollout, s.samples_per_prompt, s.rl_minibatch, s.rl_lr, work / task / m
            )
        else:
            raise AltlmError(f"unknown method '{m}' ({', '.join(METHODS)})")
        res["methods"][m] = pts
        res["seconds"][m] = round(time.time() - t, 1)
        if on_method is not None:  # partial results survive a run cut short
            on_method({**res, "targets": targets(res)})
        print(
            f"   {m}: {round(time.time() - t)} s; "
            + "; ".join(f"{p['samples']}: {p[f'{h.metric}_mean']:.4f}" for p in pts),
            flush=True,
        )
    if res["reference"] is None:
        res["reference"] = h.evaluate(h.policy(), 0, "reference")
    res["targets"] = targets(res)
    return res


def targets(res: dict) -> dict:
    """The issue's targets, computed (for a lower-is-better metric; for sentiment the same with signs flipped)."""
    m, hib = res["metric"], res["higher_is_better"]
    key = f"{m}_mean"
    better = (lambda a, b: a >= b) if hib else (lambda a, b: a <= b)
    alt = res["methods"].get("alt") or []
    others = {k: v for k, v in res["methods"].items() if k != "alt" and v}
    out: dict = {}
    if alt and others:
        finals = {k: v[-1][key] for k, v in others.items()}
        best = (max if hib else min)(finals, key=finals.get)
        reach = next((p["samples"] for p in alt if better(p[key], finals[best])), None)
        out["best_baseline"] = best
        out["best_baseline_final"] = finals[best]
        out["best_baseline_samples"] = others[best][-1]["samples"]
        out["alt_samples_to_reach_it"] = reach
        out["alt_share_of_samples"] = reach / others[best][-1]["samples"] if reach else None
        out["met_15pct"] = bool(reach and reach <= 0.15 * others[best][-1]["samples"])
        for rl in ("ppo", "rloo"):
            if rl in others:
                by = {p["samples"]: p[key] for p in alt}
                pairs = [(p["samples"], by[p["samples"]], p[key]) for p in others[rl] if p["samples"] in by]
                if pairs:
                    n, a, r = pairs[-1]
                    # relative improvement over the RL baseline at equal samples (toxicity: how far below)
                    rel = (1 - a / r) if (not hib and r) else ((a - r) / abs(r) if r else None)
                    out[f"vs_{rl}_at_{n}"] = rel
                    out[f"met_50pct_vs_{rl}"] = bool(rel is not None and rel >= 0.5)
        ref_ppl = (res["reference"] or {}).get("perplexity")
        alt_ppl = alt[-1].get("perplexity")
        if ref_ppl and alt_ppl:
            out["alt_perplexity_ratio"] = alt_ppl / ref_ppl
            out["met_fluency"] = alt_ppl <= 1.5 * ref_ppl
    return out


# ---------------------------------------------------------------------------------------------- outputs
def _fmt(x, f=".4f"):
    return "–" if x is None or x != x else format(x, f)


def markdown(results: list[dict], meta: dict) -> str:
    lines = [
        f"# Sample efficiency ({meta['when']})",
        "",
        f"Command: `{meta['command']}`  ",
        f"Wall time: {meta['wall_seconds'] / 60:.1f} min on {meta['machine']}.",
        "",
    ]
    for r in results:
        m = r["metric"]
        lines += [
            f"## {r['task']} ({'higher' if r['higher_is_better'] else 'lower'} is better)",
            "",
            f"| method | samples | {m} mean | share > 0.5 | perplexity | dist-2 |",
            "|---|---|---|---|---|---|",
        ]
        ref = r["reference"] or {f"{m}_mean": None, f"{m}_gt_0_5": None, "perplexity": None, "dist_2": None}
        lines.append(
            f"| reference | 0 | {_fmt(ref[f'{m}_mean'])} | {_fmt(ref[f'{m}_gt_0_5'], '.3f')} | {_fmt(ref['perplexity'], '.1f')} | {_fmt(ref['dist_2'], '.3f')} |"
        )
        for k, pts in r["methods"].items():
            for p in pts:  # noqa: B007
                lines.append(
                    f"| {LABELS[k]} | {p['samples']} | {_fmt(p[f'{m}_mean'])} | {_fmt(p[f'{m}_gt_0_5'], '.3f')} | "
                    f"{_fmt(p['perplexity'], '.1f')} | {_fmt(p['dist_2'], '.3f')} |"
                )
        lines += [
            "",
            "Seconds per method: " + ", ".join(f"{LABELS[k]} {v:.0f}" for k, v in r["seconds"].items()),
            "",
            "Targets: `" + json.dumps(clean(r["targets"])) + "`",
            "",
        ]
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [
        ("mean", "mean"),
        ("gt_0_5", "share > 0.5"),
        ("perplexity", "perplexity (Gemma-3-270M)"),
        ("dist_2", "dist-2"),
    ]
    fig, axes = plt.subplots(len(results), len(cols), figsize=(4.2 * len(cols), 3.4 * len(results)), squeeze=False)
    for row, r in zip(axes, results):
        m = r["metric"]
        for ax, (c, title) in zip(row, cols):
            key = f"{m}_{c}" if c in ("mean", "gt_0_5") else c
            for k, pts in r["methods"].items():
                xs = [0] + [p["samples"] for p in pts]
                ys = [(r["reference"] or {}).get(key)] + [p[key] for p in pts]
                ax.plot(xs, [float("nan") if y is None else y for y in ys], marker="o", ms=3, label=LABELS[k])
            ax.set_title(f"{r['task']}: {m + ' ' if c in ('mean', 'gt_0_5') else ''}{title}", fontsize=9)
            ax.set_xlabel("samples generated")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random model, every method for one short round (CI)")
    ap.add_argument("--tasks", default=None, help="comma list of toxicity,sentiment (default: both; --quick: toxicity)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {','.join(METHODS)}")
    ap.add_argument("--budgets", default=None, help="comma list of sample budgets (multiples of the round sizes)")
    ap.add_argument("--sentiment-budgets", default="256", help="budgets for the second task (smaller: the hour)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--eval-prompts", type=int, default=None)
    ap.add_argument("--perplexity-model", default=None, help="scoring LM for fluency ('none' skips it)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "results"))
    ap.add_argument("--work", default=None, help="run folders (default: a temp dir)")
    a = ap.parse_args(argv)
    s = dataclasses.replace(QUICK) if a.quick else Sizes()
    if a.model:
        s.model = a.model
    if a.eval_prompts:
        s.eval_prompts = a.eval_prompts
    if a.perplexity_model:
        s.perplexity_model = None if a.perplexity_model == "none" else a.perplexity_model
    try:
        if a.budgets:
            s.budgets = tuple(int(x) for x in a.budgets.split(","))
        tasks = (a.tasks or ("toxicity" if a.quick else "toxicity,sentiment")).split(",")
        methods = a.methods.split(",")
        sent_budgets = tuple(int(x) for x in a.sentiment_budgets.split(","))
    except ValueError:
        print("sample_efficiency: --budgets and --sentiment-budgets take comma-separated integers", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="altlm-se-") as tmp:
            work = Path(a.work or tmp)
            for task in tasks:
                sizes = s if (task == "toxicity" or a.quick) else dataclasses.replace(s, budgets=sent_budgets)
                results.append(
                    run_task(
                        task,
                        sizes,
                        methods,
                        work,
                        a.threads,
                        on_method=lambda r: write_outputs(out, results + [r], s, t0, argv, sent_budgets),
                    )
                )
                write_outputs(out, results, s, t0, argv, sent_budgets)  # after each task: a long run keeps what it has
    except AltlmError as e:
        print(f"sample_efficiency: {e}", file=sys.stderr)
        return 2
    print((out / "sample_efficiency.md").read_text())
    return 0


def write_outputs(out: Path, results: list[dict], s: Sizes, t0: float, argv, sent_budgets) -> None:
    meta = {
        "command": "python benchmarks/sample_efficiency.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "when": time.strftime("%Y-%m-%d"),
        "wall_seconds": round(time.time() - t0, 1),
        "machine": f"{os.cpu_count()} CPU cores",
        "sizes": dataclasses.asdict(s),
        "sentiment_budgets": list(sent_budgets),
    }
    data = {**results[0], "meta": meta, "other_tasks": {r["task"]: r for r in results[1:]}}
    write_atomic(out / "sample_efficiency.json", json.dumps(clean(data), indent=2))
    write_atomic(out / "sample_efficiency.md", markdown(results, meta))
    plot(results, out / "sample_efficiency.png")


if __name__ == "__main__":
    sys.exit(main())
