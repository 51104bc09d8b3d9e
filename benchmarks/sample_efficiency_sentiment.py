"""Sample efficiency where ALT learns: ALT-RM against GRPO, RLOO, PPO (TRL) and best-of-n SFT on the demo's task.

    .venv/bin/python benchmarks/sample_efficiency_sentiment.py --minutes 60   # resumable: run it again to go on
    .venv/bin/python benchmarks/sample_efficiency_sentiment.py --quick --out /tmp/se   # tiny random model, < 3 min

Task: the `sentiment-demo` recipe (SmolLM2-135M + LoRA on the top half of the blocks, clean fortune prefixes, VADER
compound, higher is better, T 1.0, top-p 1.0, 16 new tokens). Budgets are completions generated for training:
ALT-RM and GRPO at 256, 512, 1,024 and 2,048; RLOO, PPO and best-of-n SFT at 256, 512 and 1,024 (`--budgets`).

- ALT-RM is one `altlm train` run (the demo's settings, 64 prompts × 4 samples per iteration, 32 steps of 12 drawn
  from the pool: 1.5 training examples per generated sample), evaluated after every iteration. Its learning rate is
  constant and each iteration's prompts are seeded by the iteration, so its point at budget b is the run of b samples.
  The run folder lives in --work and resumes where a time-boxed or killed invocation stopped it.
- Every baseline point is its own run from scratch at that budget (their learning-rate schedules span the run), in
  `altlm.baselines` (GRPO: `run_grpo`, TRL's defaults but the learning rate, see GRPO_OVERRIDES).
- Evaluation: the same 200 held-out prompts × 2 samples (400) for every point, T 1.0, top-p 0.9, one seed; the
  baselines untagged, ALT under its best and its worst tag, the reference untagged and under both tags (the priming
  control). Perplexity of one completion per prompt under Gemma-3-270M; dist-2. Intervals: a paired bootstrap over the
  prompts (one resample of the prompts applies to every point at once).

Resume: the JSON in --out is the state — a finished point is never run again; `--minutes` starts no point it expects
to overrun and stops ALT's run at the deadline (Ctrl-C; it resumes next time). Writes
<out>/sample_efficiency_sentiment.{json,md,png} atomically after every point.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))
sys.path.insert(0, str(ROOT))  # common.py, beside this script

from altlm import baselines as B  # noqa: E402
from altlm.config import load_config  # noqa: E402
from altlm.errors import AltlmError  # noqa: E402
from altlm import metrics  # noqa: E402
from altlm.evaluation import clean  # noqa: E402
from common import DEMO_RECIPE_THEN, run_altlm, save_figure, write_atomic  # noqa: E402

NAME = "sample_efficiency_sentiment"
LABELS = {"alt": "ALT-RM", "grpo": "GRPO (TRL)", "rloo": "RLOO (TRL)", "ppo": "PPO (TRL)", "best_of_n": "best-of-n SFT"}
BUDGETS = {"alt": [256, 512, 1024, 2048], "grpo": [256, 512, 1024, 2048]}
BUDGETS.update({m: [256, 512, 1024] for m in ("rloo", "ppo", "best_of_n")})
EVAL = [
    "num_eval_prompts=200",
    "eval_samples_per_prompt=2",
    "perplexity_samples_per_prompt=1",
    "save_steps=0",
    *DEMO_RECIPE_THEN,
]
# ALT per iteration: 64 prompts × 4 samples, 32 steps × 12 (the demo's 1.5 training examples per generated sample)
ALT = ["prompts_per_iteration=64", "samples_per_prompt=4", "train_steps=32", "likelihood_texts=100"]
ROUND = 256
QUICK = [
    "model=tiny-smollm2",
    "num_train_prompts=64",
    "num_eval_prompts=6",
    "max_new_tokens=8",
    "sample_batch_size=32",
    "perplexity_model=tiny-smollm2",
]
QUICK_ALT = ["prompts_per_iteration=4", "train_steps=2", "batch_size=4", "likelihood_texts=8"]
QUICK_BUDGETS = {"alt": [16, 32], "grpo": [16], "rloo": [16], "ppo": [16], "best_of_n": [16]}
QUICK_ROUND = 16
N_BOOT = 2000


def config(quick: bool, threads: int, extra: list[str] = ()):
    return load_config("sentiment-demo", [*EVAL, f"threads={threads}", *(QUICK if quick else []), *extra])


# ---------------------------------------------------------------------------------------------- ALT: one resumable run
def run_alt(work: Path, budget: int, round_size: int, quick: bool, threads: int, seconds: float | None) -> bool:
    """`altlm train` to `budget` samples in work/alt (started, or resumed); stopped with Ctrl-C after `seconds`.
    True when the run has finished."""
    run = work / "alt"
    words = config(quick, threads).feedback_words
    args = [
        "train",
        "--config",
        "sentiment-demo",
        *EVAL,
        *ALT,
        *(QUICK + QUICK_ALT if quick else []),
        f"iterations={budget // round_size}",
        f"output_dir={run}",
        f"threads={threads}",
        "steer_eval_every=1",
        f"eval_feedback={json.dumps([words[0], words[-1]])}",
        "report=false",
        "--resume",
        str(run),
    ]
    if (run / "summary.json").exists():
        return True
    code, err, stopped = run_altlm(args, seconds, grace=120)
    if stopped:
        return False
    if code != 0:
        raise AltlmError(f"the ALT run in {run} failed (exit {code}): {err.strip()[-400:]}")
    return True


def alt_points(work: Path, round_size: int, prompts: list[str], metric: str) -> tuple[dict, dict]:
    """(reference, {budget: point}) from ALT's run folder: every evaluated iteration, under the best and worst tag."""
    run = work / "alt"
    if not (run / "metrics.jsonl").exists():
        return {}, {}
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    best, worst = cfg["feedback_words"][0], cfg["feedback_words"][-1]
    evals = [json.loads(x) for x in open(run / "metrics.jsonl") if '"kind": "eval"' in x]
    samples = [json.loads(x) for x in open(run / "eval_samples.jsonl")]
    reference, points = {}, {}
    for e in evals:
        it = e["iteration"]
        got = {}
        for key, fb in (("untagged", None), ("best", best), ("worst", worst)):
            block = e["by_feedback"].get(fb or "<none>")
            if block is None:
                continue
            rows = [r for r in samples if r["iteration"] == it and r["feedback"] == fb]
            got[key] = {**B.point(it * round_size, block, metric), "by_prompt": B.prompt_means(rows, prompts)}
            ppl = [r["perplexity"] for r in rows if r.get("perplexity") is not None]
            got[key]["perplexity_geomean"] = metrics.perplexity_geomean(ppl) if ppl else None  # (runs from before it)
        if it == 0:
            reference = got
        elif "best" in got:
            points[str(it * round_size)] = {**got["best"], "worst": got.get("worst")}
    return reference, points


# ---------------------------------------------------------------------------------------------- the baselines
def run_baseline(h: B.Harness, method: str, budget: int, work: Path, quick: bool) -> tuple[dict, dict]:
    """One baseline point from scratch: (point, its settings)."""
    out = work / f"{method}-{budget}"
    rollout = 16 if quick else 64
    if method == "grpo":
        pts, _, settings = B.run_grpo(h, [budget], out)
    elif method == "rloo":
        pts, _ = B.run_rloo(h, [budget], rollout, 2, 8 if quick else 16, 1e-4, out)
        settings = {"rollout": rollout, "k": 2, "minibatch": 8 if quick else 16, "learning_rate": 1e-4}
        settings["beta"] = h.cfg.kl_coef
    elif method == "ppo":
        pts, _ = B.run_ppo(h, [budget], rollout, 8 if quick else 16, 1e-4, 1, out)
        settings = {"rollout": rollout, "minibatch": 8 if quick else 16, "learning_rate": 1e-4, "ppo_epochs": 1}
        settings["kl_coef"] = h.cfg.kl_coef
    elif method == "best_of_n":
        round_size = 16 if quick else 128
        steps = round(1.5 * round_size / h.cfg.batch_size)  # ALT's 1.5 training examples per generated sample
        pts, _ = B.run_self_training(h, "best_of_n", [budget], round_size, 4, steps)
        settings = {"round": round_size, "n": 4, "steps_per_round": steps, "batch_size": h.cfg.batch_size}
        settings["learning_rate"] = h.cfg.learning_rate
    else:
        raise AltlmError(f"unknown method '{method}' ({', '.join(LABELS)})")
    if len(pts) != 1:
        raise AltlmError(f"{method} at {budget} samples produced {len(pts)} evaluation points, expected 1")
    return pts[0], settings


# ---------------------------------------------------------------------------------------------- what the curve shows
def _ci(boot: np.ndarray) -> list[float]:
    boot = boot[np.isfinite(boot)]
    return [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))] if boot.size else [None, None]


def analyse(res: dict, seed: int = 0) -> dict:
    """Means with bootstrap 95% intervals, ALT against each baseline at equal samples (paired over prompts), and the
    share of the best baseline's samples ALT needs to reach that baseline's final score."""
    ref = res.get("reference") or {}
    series = {m: pts for m, pts in res["points"].items() if pts}
    out: dict = {"means": {}, "alt_vs": {}, "reference": {}}
    anchor = ref.get("untagged") or next((p for pts in series.values() for p in pts.values()), None)
    if anchor is None:  # nothing evaluated yet (a time box that ended inside the reference evaluation)
        return out
    n = len(anchor["by_prompt"])
    picks = np.random.default_rng(seed).integers(0, n, size=(N_BOOT, n))

    def boot(p: dict) -> tuple[float, np.ndarray]:
        x = np.array([np.nan if v is None else v for v in p["by_prompt"]], dtype=float)
        valid = np.isfinite(x)
        total = np.where(valid, x, 0.0)[picks].sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return float(np.nanmean(x)), total / valid[picks].sum(1)

    reps: dict = {}
    for key, p in ref.items():
        est, b = boot(p)
        out["reference"][key] = {"mean": est, "interval_95": _ci(b)}
        reps[("reference", key)] = b
    for lr, p in (res.get("grpo_lr_sweep") or {}).items():
        est, b = boot(p)
        out.setdefault("sweep", {})[lr] = {"mean": est, "interval_95": _ci(b)}
    for m, pts in series.items():
        out["means"][m] = {}
        for budget, p in sorted(pts.items(), key=lambda kv: int(kv[0])):
            est, b = boot(p)
            out["means"][m][budget] = {"mean": est, "interval_95": _ci(b)}
            reps[(m, budget)] = b
            if m == "alt" and p.get("worst"):
                west, wb = boot(p["worst"])
                gap = {"estimate": est - west, "interval_95": _ci(b - wb)}
                if "best" in ref and "worst" in ref:
                    rgap = reps[("reference", "best")] - reps[("reference", "worst")]
                    r_est = out["reference"]["best"]["mean"] - out["reference"]["worst"]["mean"]
                    gap["beyond_priming"] = {"estimate": est - west - r_est, "interval_95": _ci(b - wb - rgap)}
                out["means"][m][budget]["worst"] = {"mean": west, "interval_95": _ci(wb)}
                out["means"][m][budget]["gap"] = gap
    alt = series.get("alt", {})
    for m, pts in series.items():
        if m == "alt":
            continue
        common = sorted(set(pts) & set(alt), key=int)
        out["alt_vs"][m] = {
            b: {
                "estimate": out["means"]["alt"][b]["mean"] - out["means"][m][b]["mean"],
                "interval_95": _ci(reps[("alt", b)] - reps[(m, b)]),
            }
            for b in common
        }
    others = {m: pts for m, pts in series.items() if m != "alt"}
    # The best baseline is the best *fluent* one: a final point whose perplexity (geometric mean) is more than 1.5×
    # the reference's has bought its score with degenerate text (GRPO at lr 1e-3: 0.96 at 11× the perplexity).
    ref_ppl = (ref.get("untagged") or {}).get("perplexity_geomean")
    out["not_fluent"] = []
    for m, pts in list(others.items()):
        ppl = pts[max(pts, key=int)].get("perplexity_geomean")
        if ref_ppl and ppl and ppl > 1.5 * ref_ppl:
            out["not_fluent"].append(m)
            del others[m]
    if alt and others:
        finals = {m: max(pts, key=int) for m, pts in others.items()}
        best = max(finals, key=lambda m: out["means"][m][finals[m]]["mean"])
        final_budget = finals[best]
        alt_budgets = sorted(alt, key=int)

        def reach(alt_means: list[float], target: float) -> float:
            hit = [int(b) for b, v in zip(alt_budgets, alt_means) if v >= target]
            return hit[0] / int(final_budget) if hit else float("inf")

        est = reach([out["means"]["alt"][b]["mean"] for b in alt_budgets], out["means"][best][final_budget]["mean"])
        boot_alt = np.stack([reps[("alt", b)] for b in alt_budgets], -1)
        shares = np.array([reach(list(row), t) for row, t in zip(boot_alt, reps[(best, final_budget)])])
        finite = shares[np.isfinite(shares)]
        out["share_of_best_baseline"] = {
            "best_baseline": best,
            "its_budget": int(final_budget),
            "its_final_mean": out["means"][best][final_budget]["mean"],
            "alt_share": est if np.isfinite(est) else None,
            "alt_reached_within": int(alt_budgets[-1]),
            # the bootstrap's share distribution; "not reached" replicates count as above every budget tried
            "share_interval_95": [
                float(np.percentile(np.where(np.isfinite(shares), shares, 1e9), 2.5)),
                float(np.percentile(np.where(np.isfinite(shares), shares, 1e9), 97.5)),
            ],
            "replicates_reached": float(finite.size / shares.size),
        }
    return out


def _f(x, spec=".3f") -> str:
    return "–" if x is None or x != x else format(x, spec)


def _iv(d: dict | None, spec="+.3f") -> str:
    if not d:
        return "–"
    est = d.get("mean", d.get("estimate"))
    lo, hi = d["interval_95"]
    return f"{_f(est, spec)} [{_f(lo, spec)}, {_f(hi, spec)}]"


def markdown(res: dict) -> str:
    a = res["analysis"]
    lines = [f"# Sample efficiency on sentiment ({res['meta']['when']})", ""]
    lines += [f"Task: {res['meta']['task']}  ", f"Evaluation: {res['meta']['evaluation']}", ""]
    lines += ["Commands (each invocation adds the points it finished):", ""]
    lines += [f"- `{c}`" for c in res["meta"]["commands"]] + [""]
    lines += [
        "| method | samples | sentiment mean [95%] | ALT − method [95%] | perplexity (geo. mean; mean) | dist-2 | seconds |"
    ]
    lines += ["|---|---|---|---|---|---|---|"]
    ref = res.get("reference", {}).get("untagged")
    if ref:
        lines.append(
            f"| reference (untagged) | 0 | {_iv(a['reference']['untagged'])} | | "
            f"{_f(ref.get('perplexity_geomean'), '.1f')}; {_f(ref['perplexity'], '.1f')} | {_f(ref['dist_2'])} | |"
        )
    for m in LABELS:
        for b, p in sorted(res["points"].get(m, {}).items(), key=lambda kv: int(kv[0])):
            vs = a["alt_vs"].get(m, {}).get(b)
            label = f"{LABELS[m]} (best tag)" if m == "alt" else LABELS[m]
            lines.append(
                f"| {label} | {b} | {_iv(a['means'][m][b])} | {_iv(vs)} | "
                f"{_f(p.get('perplexity_geomean'), '.1f')}; {_f(p['perplexity'], '.1f')} | "
                f"{_f(p['dist_2'])} | {_f(p.get('seconds'), '.0f')} |"
            )
    if a["means"].get("alt"):
        lines += ["", "ALT under its best and worst tag, and the gap beyond the reference's priming gap:", ""]
        lines += ["| samples | best tag | worst tag | best − worst | beyond priming |", "|---|---|---|---|---|"]
        if "best" in a["reference"]:
            r = a["reference"]
            lines.append(f"| reference | {_iv(r['best'])} | {_iv(r['worst'])} | | |")
        for b, v in a["means"]["alt"].items():
            gap = v.get("gap", {})
            lines.append(f"| {b} | {_iv(v)} | {_iv(v.get('worst'))} | {_iv(gap)} | {_iv(gap.get('beyond_priming'))} |")
    s = a.get("share_of_best_baseline")
    if s:
        share = "not reached" if s["alt_share"] is None else f"{s['alt_share']:.0%}"
        lo, hi = s["share_interval_95"]
        lo_text = "not reached" if lo >= 1e8 else f"{lo:.0%}"
        hi_text = "not reached" if hi >= 1e8 else f"{hi:.0%}"
        lines += [
            "",
            f"Share of the best baseline's samples ALT needs to reach its final score: best baseline "
            f"{LABELS[s['best_baseline']]} at {s['its_budget']} samples ({s['its_final_mean']:.3f}); ALT: {share} "
            f"(bootstrap 95%: {lo_text} – {hi_text}; ALT reached it in {s['replicates_reached']:.0%} of the "
            f"replicates within {s['alt_reached_within']} samples). Paper: ~20%.",
        ]
    if a.get("not_fluent"):
        names = ", ".join(LABELS[m] for m in a["not_fluent"])
        lines += ["", f"Left out of the best baseline (final perplexity > 1.5× the reference's): {names}."]
    if res.get("grpo_lr_sweep"):
        lines += ["", "GRPO learning rate (TRL's default 1e-6 is for full fine-tuning; the policy here is LoRA):", ""]
        lines += ["| learning rate | samples | sentiment mean [95%] | perplexity (mean) |", "|---|---|---|---|"]
        for lr, p in sorted(res["grpo_lr_sweep"].items(), key=lambda kv: float(kv[0])):
            mean = a.get("sweep", {}).get(lr)
            lines.append(f"| {float(lr):g} | {p['samples']} | {_iv(mean)} | {_f(p['perplexity'], '.1f')} |")
    lines += ["", "Settings per method:", "", "```json", json.dumps(res["meta"]["settings"], indent=1), "```", ""]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = res["analysis"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for m, label in LABELS.items():
        pts = a["means"].get(m)
        if not pts:
            continue
        xs = [int(b) for b in pts]
        ys = np.array([v["mean"] for v in pts.values()])
        err = np.array([[v["mean"] - v["interval_95"][0], v["interval_95"][1] - v["mean"]] for v in pts.values()]).T
        ax.errorbar(xs, ys, yerr=err, marker="o", ms=4, capsize=3, label=label + (" (best tag)" if m == "alt" else ""))
        if m == "alt" and all("worst" in v for v in pts.values()):
            wy = np.array([v["worst"]["mean"] for v in pts.values()])
            ax.plot(xs, wy, "v:", c="gray", label="ALT-RM (worst tag)")
        ppl = [res["points"][m][b].get("perplexity_geomean") for b in pts]
        ax2.plot(xs, [np.nan if v is None else v for v in ppl], marker="o", ms=4, label=label)
    ref = a["reference"].get("untagged")
    if ref:
        ax.axhline(ref["mean"], ls="--", c="k", lw=0.8, label="reference (untagged)")
        ax.axhspan(*ref["interval_95"], color="k", alpha=0.08)
        ref_ppl = res["reference"]["untagged"].get("perplexity_geomean")
        if ref_ppl:
            ax2.axhline(ref_ppl, ls="--", c="k", lw=0.8, label="reference")
    budgets = [int(b) for pts in a["means"].values() for b in pts] or [1]
    for axis in (ax, ax2):
        axis.set_xscale("log", base=2)
        axis.set_xlim(min(budgets) / 1.4, max(budgets) * 1.4)  # set: an axis of NaN perplexities has no data range
        axis.set_xlabel("completions generated for training")
        axis.grid(alpha=0.3)
    ax.set_ylabel("VADER sentiment, held-out (95% bootstrap)")
    ax2.set_ylabel("perplexity under Gemma-3-270M (geometric mean)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def write(out: Path, res: dict) -> None:
    res["analysis"] = analyse(res)
    write_atomic(out / f"{NAME}.json", json.dumps(clean(res), indent=1))
    write_atomic(out / f"{NAME}.md", markdown(res))
    plot(res, out / f"{NAME}.png")


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random model, every method at one small budget")
    ap.add_argument("--minutes", type=float, default=None, help="time box: no point starts that would overrun it")
    ap.add_argument("--methods", default=",".join(LABELS), help=f"comma list of {','.join(LABELS)}")
    ap.add_argument("--budgets", default=None, help="method:b1/b2,... e.g. grpo:256/512 (default: the issue's)")
    ap.add_argument("--grpo-lr-sweep", default=None, help="comma list of GRPO learning rates to try at --sweep-budget")
    ap.add_argument("--sweep-budget", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "results"))
    ap.add_argument("--work", default=None, help="run folders (default: runs/sample_efficiency_sentiment)")
    a = ap.parse_args(argv)
    t0 = time.time()
    deadline = t0 + a.minutes * 60 if a.minutes else None
    budgets = dict(QUICK_BUDGETS if a.quick else BUDGETS)
    round_size = QUICK_ROUND if a.quick else ROUND
    try:
        methods = [m for m in a.methods.split(",") if m]
        unknown = [m for m in methods if m not in LABELS]
        if unknown:
            raise AltlmError(f"unknown method(s) {unknown}; pick from {', '.join(LABELS)}")
        for item in (a.budgets or "").split(","):
            if item:
                m, _, bs = item.partition(":")
                budgets[m] = [int(b) for b in bs.split("/") if b]  # "grpo:" → no points
        if budgets["alt"] and any(b % round_size for b in budgets["alt"]):
            raise AltlmError(f"ALT budgets must be multiples of {round_size} (samples per iteration)")
    except ValueError:
        print(f"{NAME}: --budgets takes method:b1/b2,... with integer budgets", file=sys.stderr)
        return 2
    except AltlmError as e:
        print(f"{NAME}: {e}", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.work or (ROOT.parent / "runs" / NAME))
    work.mkdir(parents=True, exist_ok=True)
    state = out / f"{NAME}.json"
    res = json.loads(state.read_text()) if state.exists() else {"points": {}, "meta": {"commands": [], "settings": {}}}
    command = "python benchmarks/sample_efficiency_sentiment.py " + " ".join(argv if argv is not None else sys.argv[1:])
    res["meta"]["commands"].append(command)
    cfg = config(a.quick, a.threads)
    res["meta"].update(
        when=time.strftime("%Y-%m-%d"),
        machine=f"{os.cpu_count()} CPU cores",
        task=f"recipe sentiment-demo ({cfg.model} + LoRA r {cfg.lora_r}, VADER, {cfg.max_new_tokens} new tokens)",
        evaluation=f"{cfg.num_eval_prompts} held-out prompts × {cfg.eval_samples_per_prompt} samples, "
        f"top-p {cfg.eval_top_p}; perplexity under {cfg.perplexity_model}",
    )

    def left() -> float | None:
        return None if deadline is None else deadline - time.time()

    try:
        if "alt" in methods and budgets.get("alt"):
            res["meta"]["settings"]["alt"] = {"per_iteration": ALT, "examples_per_sample": 1.5}
            started = time.time()
            done = run_alt(work, max(budgets["alt"]), round_size, a.quick, a.threads, left())
            ref, pts = alt_points(work, round_size, cfg_prompts(cfg), "sentiment")
            res["reference"] = ref
            keep = {b: p for b, p in pts.items() if int(b) in budgets["alt"]}
            res["points"]["alt"] = keep
            res["meta"].setdefault("alt_seconds", 0.0)
            res["meta"]["alt_seconds"] += round(time.time() - started, 1)
            write(out, res)
            print(f"alt: {'finished' if done else 'stopped at the time box'}; points {sorted(keep, key=int)}")
        h = None
        for lr in [float(x) for x in (a.grpo_lr_sweep or "").split(",") if x]:
            sweep = res.setdefault("grpo_lr_sweep", {})
            if str(lr) in sweep or (left() is not None and left() <= 0):
                continue
            h = h or B.Harness.build(cfg)
            started = time.time()
            print(f"== GRPO learning rate {lr:g} at {a.sweep_budget} samples", flush=True)
            pts, _, settings = B.run_grpo(h, [a.sweep_budget], work / f"grpo-lr{lr:g}", {"learning_rate": lr})
            sweep[str(lr)] = {**pts[0], "seconds": round(time.time() - started, 1), "settings": settings}
            write(out, res)
        for b in sorted({b for m in methods if m != "alt" for b in budgets.get(m, [])}):
            for m in [m for m in methods if m != "alt" and b in budgets.get(m, [])]:
                if str(b) in res["points"].get(m, {}):
                    continue
                expect = estimate(res, m, b)
                if left() is not None and (left() <= 0 or (expect and expect > left())):
                    print(f"{NAME}: time box reached before {m} at {b} (expected {expect or 0:.0f} s)")
                    write(out, res)
                    return 0
                h = h or B.Harness.build(cfg)
                if not res.get("reference"):
                    ref = h.evaluate(h.policy(), 0, "reference")
                    res["reference"] = {"untagged": ref}
                started = time.time()
                print(f"== {m} at {b} samples", flush=True)
                p, settings = run_baseline(h, m, b, work, a.quick)
                p["seconds"] = round(time.time() - started, 1)
                res["points"].setdefault(m, {})[str(b)] = p
                res["meta"]["settings"][m] = settings
                write(out, res)
                print(f"   {m} {b}: {p['sentiment_mean']:.4f} in {p['seconds']:.0f} s", flush=True)
    except AltlmError as e:
        print(f"{NAME}: {e}", file=sys.stderr)
        return 2
    write(out, res)
    print((out / f"{NAME}.md").read_text())
    return 0


def cfg_prompts(cfg) -> list[str]:
    from altlm.data import load_prompts

    return list(load_prompts(cfg).eval)


def estimate(res: dict, method: str, budget: int) -> float | None:
    """Seconds a point should take: the method's last finished point scaled by samples (None: nothing to go by)."""
    done = res["points"].get(method, {})
    if not done:
        return None
    b, p = max(done.items(), key=lambda kv: int(kv[0]))
    return p.get("seconds", 0) * budget / int(b) if p.get("seconds") else None


if __name__ == "__main__":
    sys.exit(main())
