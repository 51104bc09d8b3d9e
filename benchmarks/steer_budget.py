"""Steering against budget: does the model follow the feedback tag, and after how many training examples?

    .venv/bin/python benchmarks/steer_budget.py --minutes 60        # both tasks, half the budget each
    .venv/bin/python benchmarks/steer_budget.py --minutes 120 --parallel --threads 1   # both at once, 2 h each
    .venv/bin/python benchmarks/steer_budget.py --quick             # tiny model, a one-minute check

For each task — toxicity (Jigsaw, the demo's setting) and sentiment (VADER on clean fortunes) — it runs
`altlm train` with `steer_eval_every: 1` (every iteration is evaluated on held-out prompts under every tag) for as
many iterations as the time budget allows, stopping the run when the budget is spent (a stopped run is resumable:
`altlm train --resume <work>/<task>`). From metrics.jsonl it reads, per iteration: training examples consumed
(steps × batch), held-out Spearman(tag rank, score) — positive when the model follows the tags, by steered_sign —,
the worst-tag / best-tag score ratio and the exemplar's score against the untagged reference.

Targets (issue "steer"): Spearman ≥ 0.5, worst/best ≥ 2 (toxicity), exemplar ≥ 30% below the untagged reference.
Writes benchmarks/results/steer_budget.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))
sys.path.insert(0, str(ROOT))  # common.py, beside this script

import yaml  # noqa: E402
from common import run_altlm, save_figure  # noqa: E402

from altlm.evaluation import steerability  # noqa: E402

# the evaluation the committed curves were measured with: every condition, all reference texts in the likelihood check
EVAL = ["eval_conditions=all", "eval_middle_samples_per_prompt=0", "likelihood_texts=0", "likelihood_auc_split=null"]
SENTIMENT_WORDS = ["Most Positive", "Positive", "Neutral", "Negative", "Most Negative"]
TASKS = {
    # the demo's recipe, evaluated under every tag each iteration, run for longer
    "toxicity": [
        "--config",
        "toxicity-offline",
        "iterations=40",
        "num_eval_prompts=60",
        "eval_samples_per_prompt=2",
        *EVAL,
    ],
    "sentiment": [
        "--config",
        "toxicity-offline",
        "iterations=40",
        "num_eval_prompts=60",
        "eval_samples_per_prompt=2",
        "scorer=vader",
        "prompts=fortunes-clean",
        f"feedback_words={json.dumps(SENTIMENT_WORDS)}",
        f"exemplar={SENTIMENT_WORDS[0]}",
        *EVAL,
    ],
}
QUICK = [
    "model=tiny-smollm2",
    "training_mode=full",
    "precision=fp32",
    "num_train_prompts=48",
    "num_eval_prompts=8",
    "iterations=3",
    "prompts_per_iteration=16",
    "samples_per_prompt=2",
    "train_steps=3",
    "batch_size=8",
    "max_new_tokens=8",
    "eval_samples_per_prompt=1",
    "learning_rate=1e-3",
]


def run_task(task: str, work: Path, seconds: float, quick: bool, threads: int) -> dict:
    run = work / task
    args = [
        "train",
        *TASKS[task],
        f"output_dir={run}",
        "steer_eval_every=1",
        "report=false",
        f"threads={threads}",
        *(QUICK if quick else []),
        "--resume",
        str(run),
    ]  # --config + --resume: starts it, or goes on
    t0 = time.time()
    code, err, stopped = run_altlm(args, seconds)
    if not stopped and code != 0 and not (code == 2 and "already finished" in err):
        raise SystemExit(f"steer_budget: {task} run failed (exit {code}): {err.strip()[-500:]}")
    return {"run": str(run), "seconds": round(time.time() - t0, 1), "stopped_at_budget": stopped, "curve": curve(run)}


def curve(run: Path) -> list[dict]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    words = cfg["feedback_words"]
    higher = cfg["scorer"] == "vader"
    metric_key = "sentiment_mean" if higher else "toxicity_mean"
    ref_record = next(r for r in recs if r["kind"] == "eval" and r["model"] == "reference")
    ref = ref_record["by_feedback"]
    examples, out = 0, [point(0, ref, words, metric_key, higher, ref, 0, ref_record.get("likelihood_steer"))]
    for r in recs:
        if r["kind"] == "step":
            examples += cfg["batch_size"]
        elif r["kind"] == "eval" and r["model"] == "policy" and all(w in r["by_feedback"] for w in words):
            out.append(
                point(
                    examples,
                    r["by_feedback"],
                    words,
                    metric_key,
                    higher,
                    ref,
                    r["iteration"],
                    r.get("likelihood_steer"),
                )
            )
    return out


def point(
    examples: int,
    blocks: dict,
    words: list[str],
    key: str,
    higher: bool,
    ref: dict,
    iteration: int,
    likelihood: dict | None,
) -> dict:
    s = steerability(blocks, words, key, higher)
    rho = s["spearman_rho"]
    best, worst = blocks[words[0]][key], blocks[words[-1]][key]
    untagged = ref["<none>"][key]
    # Toxicity is a probability: ratios and relative changes. Sentiment is signed: differences, steered > 0.
    return {
        "iteration": iteration,
        "examples": examples,
        "spearman_steered": None if rho is None else rho * s["steered_sign"],
        "best_tag": best,
        "worst_tag": worst,
        "gap_steered": (worst - best) * s["steered_sign"],
        "worst_over_best": (worst / best) if (best and not higher) else None,
        "untagged_reference": untagged,
        "exemplar_vs_reference": (best - untagged) if higher else ((best / untagged - 1) if untagged else None),
        "by_tag": {w: blocks[w][key] for w in words},
        # evaluation.likelihood_steer on the reference's fixed texts: already oriented, steered > 0
        "likelihood_spearman": (likelihood or {}).get("spearman"),
    }


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "steer_budget.json.tmp"
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, out / "steer_budget.json")
    lines = ["# Steering against training budget", "", f"Command: `{results['command']}`", ""]
    for task, r in results["tasks"].items():
        lines += [
            f"## {task} ({r['seconds']:.0f} s{', stopped at the budget' if r['stopped_at_budget'] else ''})",
            "",
            "| iteration | training examples | likelihood Spearman (steered +) | sampled Spearman (steered +) | best tag | worst tag | gap (steered +) | worst / best | exemplar vs untagged reference |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        fmt = lambda x, f: "–" if x is None else format(x, f)  # noqa: E731
        rel = ".4f" if task == "sentiment" else "+.1%"  # sentiment: a difference; toxicity: a relative change
        for p in r["curve"]:
            lines.append(
                f"| {p['iteration']} | {p['examples']} | {fmt(p.get('likelihood_spearman'), '.3f')} | {fmt(p['spearman_steered'], '.2f')} | {fmt(p['best_tag'], '.4f')} | "
                f"{fmt(p['worst_tag'], '.4f')} | {fmt(p['gap_steered'], '+.4f')} | {fmt(p['worst_over_best'], '.2f')} | "
                f"{fmt(p['exemplar_vs_reference'], rel)} |"
            )
        lines.append("")
    (out / "steer_budget.md").write_text("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    nan = lambda x: float("nan") if x is None else x  # noqa: E731
    for task, r in results["tasks"].items():
        xs = [p["examples"] for p in r["curve"]]
        (line,) = ax[0].plot(xs, [nan(p["spearman_steered"]) for p in r["curve"]], "o-", label=f"{task}, sampled")
        ax[0].plot(
            xs,
            [nan(p.get("likelihood_spearman")) for p in r["curve"]],
            "s--",
            c=line.get_color(),
            label=f"{task}, likelihood",
        )
        ax[1].plot(xs, [p["gap_steered"] for p in r["curve"]], "o-", label=task)
    ax[0].axhline(0.5, ls="--", c="gray")
    ax[0].set(xlabel="training examples", ylabel="held-out Spearman, steered > 0", title="steerability")
    ax[1].axhline(0.0, ls="--", c="gray")
    ax[1].set(xlabel="training examples", ylabel="worst-tag − best-tag score, steered > 0", title="tag effect")
    for a in ax:
        a.legend()
    fig.tight_layout()
    save_figure(fig, out / "steer_budget.png", dpi=100)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--minutes",
        type=float,
        default=60.0,
        help="wall budget: split evenly over the tasks, or each task's with --parallel",
    )
    ap.add_argument(
        "--parallel",
        action="store_true",
        help="run the tasks at the same time, each for the whole budget "
        "(with --threads 1 on a 2-core machine: one core each)",
    )
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--quick", action="store_true", help="tiny random model, 3 short iterations per task")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--work", default="runs/steer_budget", help="run folders (resumable)")
    ap.add_argument("--out", default=str(ROOT / "results"))
    args = ap.parse_args(argv)
    budget = args.minutes * 60 / (1 if args.parallel else len(args.tasks))
    results = {
        "command": "python benchmarks/steer_budget.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "minutes": args.minutes,
        "quick": args.quick,
        "tasks": {},
    }
    with ThreadPoolExecutor(len(args.tasks) if args.parallel else 1) as pool:  # threads only wait on the subprocesses
        runs = {
            task: pool.submit(run_task, task, Path(args.work), budget, args.quick, args.threads) for task in args.tasks
        }
    for task in args.tasks:
        results["tasks"][task] = runs[task].result()
        write(results, Path(args.out))
        last = results["tasks"][task]["curve"][-1]
        print(
            f"{task}: {last['examples']} examples → Spearman {last['spearman_steered']}, gap {last['gap_steered']}, "
            f"worst/best {last['worst_over_best']}, exemplar vs reference {last['exemplar_vs_reference']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
