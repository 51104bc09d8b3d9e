"""The run report: `report.md` with PNG plots, from what a run folder already holds (nothing is re-run); and the
live view of a run in TensorBoard / W&B (`open_trackers`).

Reads metrics.jsonl (per-iteration evaluations, pool records, training steps), summary.json, eval.json (from
`altlm eval`, if present), pool.sqlite (scores and buckets) and eval_samples.jsonl (sample tables). With several
run folders: one side-by-side table and overlaid per-iteration curves, then each run's own section.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import yaml

from . import metrics
from .errors import AltlmError

# Samples shown in the best/worst tables; enough to see a pattern, few enough to read.
TABLE_ROWS = 5


def open_trackers(report_to: str, run: Path, config: dict):
    """accelerate's trackers (TensorBoard, W&B) when `report_to` asks for them, else None; checked before any work."""
    if report_to == "none":
        return None
    from accelerate import Accelerator
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    for name, ok, pkg in (
        ("tensorboard", is_tensorboard_available, "tensorboardX"),
        ("wandb", is_wandb_available, "wandb"),
    ):
        if report_to in (name, "all") and not ok():
            raise AltlmError(
                f"report_to={report_to} needs the {name} logger; pip install {pkg} (or set report_to=none)"
            )
    acc = Accelerator(log_with=report_to, project_dir=str(run / "trackers"))  # logs from the main process only
    acc.init_trackers(run.name or "altlm", config={k: str(v) for k, v in config.items()})
    return acc


def read_run(folder: Path) -> dict:
    folder = Path(folder)
    if not (folder / "metrics.jsonl").exists() or not (folder / "config.yaml").exists():
        raise AltlmError(
            f"report: '{folder}' is not an altlm run folder (no metrics.jsonl/config.yaml); pass the output_dir of `altlm train`"
        )
    records = []
    for n, line in enumerate(open(folder / "metrics.jsonl"), 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if line.endswith("\n"):  # a torn last line is what a killed run leaves; anything else is damage
                raise AltlmError(
                    f"report: {folder / 'metrics.jsonl'} line {n} is not JSON; the file is damaged"
                ) from None
    load = lambda name: json.loads((folder / name).read_text()) if (folder / name).exists() else None  # noqa: E731
    run = {
        "name": folder.name,
        "folder": folder,
        "config": yaml.safe_load((folder / "config.yaml").read_text()) or {},
        "evals": [r for r in records if r.get("kind") == "eval"],
        "iterations": [r for r in records if r.get("kind") == "iteration"],
        "steps": [r for r in records if r.get("kind") == "step"],
        "summary": load("summary.json"),
        "eval": load("eval.json"),
        "pool": [],
        "samples": [],
    }
    if (folder / "pool.sqlite").exists():
        db = sqlite3.connect(f"file:{folder / 'pool.sqlite'}?mode=ro", uri=True)
        run["pool"] = db.execute(
            "SELECT iteration, score, bucket FROM samples WHERE dropped_at IS NULL AND valid = 1"
        ).fetchall()
        db.close()
    if (folder / "eval_samples.jsonl").exists():
        run["samples"] = [json.loads(line) for line in open(folder / "eval_samples.jsonl") if line.endswith("\n")]
    return run


def _metric(run: dict) -> str:
    if run["summary"]:
        return run["summary"]["metric"]
    for e in run["evals"]:
        for block in e["by_feedback"].values():
            return next(k[:-5] for k in block if k.endswith("_mean") and k not in ("reward_mean", "length_mean"))
    return "score"


def _exemplar(run: dict) -> str:
    c = run["config"]
    return c.get("exemplar") or c.get("feedback_words", ["?"])[0]


def _curve(run: dict, key: str) -> tuple[list[int], list[float]]:
    """(iterations, value) of `key` under the exemplar; iteration 0 is the untagged reference."""
    xs, ys, ex = [], [], _exemplar(run)
    for e in run["evals"]:
        block = e["by_feedback"].get("<none>" if e["model"] == "reference" else ex)
        if block and block.get(key) is not None:
            xs.append(e["iteration"])
            ys.append(block[key])
    return xs, ys


def _fmt(x, digits: int = 4) -> str:
    return "–" if x is None else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))


def _cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "⏎").strip() or "(empty)"


def plot_iterations(runs: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    m = _metric(runs[0])
    panels = [
        (f"{m}_mean", f"{m} mean (exemplar; 0 = reference)"),
        (f"{m}_gt_0_5", f"share of samples with {m} > 0.5"),
        ("dist_2", "dist-2"),
        ("perplexity", "perplexity (scoring LM)"),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (key, title) in zip(axes.flat, panels):
        curves = [(run["name"], *_curve(run, key)) for run in runs]
        for name, xs, ys in curves:
            ax.plot(xs, ys, marker="o", label=name)
        if not any(xs for _, xs, _ in curves):
            ax.text(
                0.5,
                0.5,
                "not computed" + (" (perplexity_model: none)" if key == "perplexity" else ""),
                ha="center",
                va="center",
                transform=ax.transAxes,
                color="gray",
            )
        ax.set_title(title)
        ax.set_xlabel("iteration")
    for ax, key in zip(axes.flat[4:], ("nll", "kl")):
        for run in runs:
            its = sorted({s["iteration"] for s in run["steps"]})
            ax.plot(
                its,
                [metrics.mean([s[key] for s in run["steps"] if s["iteration"] == i]) for i in its],
                marker="o",
                label=run["name"],
            )
        ax.set_title(f"training {key} (mean over the iteration's steps)")
        ax.set_xlabel("iteration")
    for ax in axes.flat:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_pool(run: dict, path: Path) -> None:
    """Left: each iteration's new samples per feedback bucket. Right: scores of the active pool by bucket."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    words = bucket_labels(run["config"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(14, 4.5))
    its = run["iterations"]
    bottom = [0.0] * len(its)
    for k, w in enumerate(words):
        share = [(r.get("new_bucket_distribution") or [0] * len(words))[k] or 0.0 for r in its]
        a.bar([r["iteration"] for r in its], share, bottom=bottom, label=w)
        bottom = [x + y for x, y in zip(bottom, share)]
    a.xaxis.set_major_locator(MaxNLocator(integer=True))
    a.set_title("new samples per feedback bucket")
    a.set_xlabel("iteration")
    a.legend(fontsize=7)
    every = [s for _, s, _ in run["pool"] if s is not None]
    edges = (
        [min(every) + (max(every) - min(every)) * i / 50 for i in range(51)]
        if every and max(every) > min(every)
        else 10
    )
    for k, w in enumerate(words):
        scores = [s for _, s, bk in run["pool"] if bk == k and s is not None]
        if scores:  # shared bin edges: the buckets' widths are then comparable at a glance
            b.hist(scores, bins=edges, alpha=0.55, label=w, log=True)
    b.set_title(f"{_metric(run)} of the active pool, by bucket")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def bucket_labels(cfg: dict) -> list[str]:
    """Names of the pool's buckets, best first: the feedback vocabulary, or LMU's judge scores."""
    if cfg.get("feedback_type") == "lmu":
        return [f"score {s}" for s in (3, 2, 1, 0)]
    return cfg.get("feedback_words", [])


def judge_lines(run: dict) -> list[str]:
    """Per-iteration judge accounting (LLM feedback runs) and the category/score distribution of new samples."""
    its = [r for r in run["iterations"] if "judge" in r]
    if not its:
        return []
    labels = bucket_labels(run["config"])
    lines = [
        "| iteration | questions | cache hits | requests | retries | failures | invalid | agreement | tokens | cost | "
        + " | ".join(labels)
        + " |",
        "|---" * (10 + len(labels)) + "|",
    ]
    for r in its:
        j = r["judge"]
        dist = r.get("new_bucket_distribution") or []
        lines.append(
            f"| {r['iteration']} | {j['questions']} | {j['cache_hits']} | {j['requests']} | {j['retries']} | {j['failures']} | "
            f"{r.get('invalid', '–')} | {_fmt(r.get('agreement_mean'), 2)} | {j['prompt_tokens'] + j['completion_tokens']} | "
            f"{_fmt(j['cost'], 4)} | " + " | ".join(_fmt(x, 2) for x in dist) + " |"
        )
    return (
        ["**LLM judge per iteration** (distribution: share of the iteration's judged samples per category/score)", ""]
        + lines
        + [""]
    )


def steer_table(run: dict) -> list[tuple[str, str, dict]]:
    """(model, feedback, block) for the reference eval and the last policy eval, untagged first."""
    out = []
    for e in [
        next((e for e in run["evals"] if e["model"] == "reference"), None),
        next((e for e in reversed(run["evals"]) if e["model"] == "policy"), None),
    ]:
        if e:
            out += [(e["model"], fb, block) for fb, block in e["by_feedback"].items()]
    return out


def plot_claims_means(means: dict, metric: str, path: Path) -> None:
    """The mean score under each feedback string (best first, then untagged), reference and final model, with the
    bootstrap 95% intervals of summary.json's claims: the demo's plot."""
    import matplotlib.pyplot as plt

    labels = list(
        dict.fromkeys(
            [fb for fb in means["final"] if fb != "<none>"]
            + [fb for fb in means["reference"] if fb != "<none>"]
            + ["<none>"]
        )
    )
    fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(labels)), 4.5))
    for j, (model, name) in enumerate((("reference", "reference (untrained)"), ("final", "final (trained)"))):
        xs, ys, errs = [], [], [[], []]
        for i, fb in enumerate(labels):
            block = means[model].get(fb)
            if block is None or block["mean"] is None or None in block["interval_95"]:
                continue  # nothing scored under it (e.g. every judge answer unparsable)
            lo, hi = block["interval_95"]
            xs.append(i + (j - 0.5) * 0.25)
            ys.append(block["mean"])
            errs[0].append(block["mean"] - lo)
            errs[1].append(hi - block["mean"])
        ax.errorbar(xs, ys, yerr=errs, fmt="o", capsize=4, label=name)
    ax.set_xticks(range(len(labels)), [fb.replace("<none>", "(no feedback)") for fb in labels], rotation=15, fontsize=8)
    ax.set_ylabel(f"{metric} mean (95% bootstrap interval over prompts)")
    ax.set_title("the score under each feedback string: reference vs trained")
    ax.axhline(means["reference"]["<none>"]["mean"], color="grey", lw=0.8, ls="--")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_steer(run: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    m = _metric(run)
    claims = (run["summary"] or {}).get("claims")
    if claims:
        plot_claims_means(claims["means"], m, path)
        return
    rows = steer_table(run)
    labels = list(dict.fromkeys(fb for _, fb, _ in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(labels)), 4.5))
    width = 0.38
    for j, model in enumerate(("reference", "policy")):
        vals = {fb: blk[f"{m}_mean"] for mm, fb, blk in rows if mm == model}
        ax.bar(
            [i + (j - 0.5) * width for i in range(len(labels))],
            [vals.get(fb, 0.0) or 0.0 for fb in labels],
            width,
            label="reference" if model == "reference" else "final",
        )
    ax.set_xticks(range(len(labels)), [fb.replace("<none>", "(none)") for fb in labels], rotation=20, fontsize=8)
    ax.set_ylabel(f"{m} mean")
    ax.set_title("steerability: the metric under each feedback")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _run_section(run: dict, out: Path, prefix: str) -> list[str]:
    m, ex = _metric(run), _exemplar(run)
    lines = [f"## {run['name']}", "", f"`{run['folder']}` — {run['config'].get('description', '')}", ""]
    s = run["summary"]
    if s:
        red = s.get("reduction", {})
        st = s.get("steerability", {})
        lines += [
            f"- exemplar **{ex}**: {m} mean {_fmt(s['final'][f'{m}_mean'])} vs {_fmt(s['reference'][f'{m}_mean'])} untagged reference "
            f"({_fmt(-100 * red[f'{m}_mean'], 1) if red.get(f'{m}_mean') is not None else '–'}%)",
            f"- steerability: Spearman(feedback rank, {m}) = {_fmt(st.get('spearman_rho'), 3)}, worst − best = {_fmt(st.get('gap'))}",
            f"- likelihood check (fixed reference texts, no sampling noise; > 0 when the feedback is followed): "
            f"Spearman(log p(text | worst) − log p(text | best), badness) = {_fmt((s.get('likelihood_steer') or {}).get('spearman'), 3)}",
            f"- wall time {_fmt(s['wall_seconds'], 0)} s",
            "",
        ]
        if s.get("claims"):
            c = s["claims"]
            lines += [
                f"Claims (bootstrap over {c['prompts']} held-out prompts; scores {c['sign']}):",
                "",
                "| claim | estimate | interval | target | holds |",
                "|---|---|---|---|---|",
            ]
            for row in c["claims"]:
                lo, hi = row["interval"]
                num = lambda x: "n/a" if x is None else f"{x:+.4f}"  # noqa: E731  (None: undefined)
                lines.append(
                    f"| {row['claim']} | {num(row['estimate'])} | {round(row['level'] * 100)}% [{num(lo)}, "
                    f"{num(hi)}] | {row['target']} | {'yes' if row['holds'] else '**no**'} |"
                )
            lines.append("")
    rows = steer_table(run)
    if rows:
        lines += [
            f"| model | feedback | {m} mean | > 0.5 | avg max | prob | dist-2 | ppl | length | truncated |",
            "|---" * 10 + "|",
        ]
        for model, fb, b in rows:
            lines.append(
                f"| {model} | {fb.replace('<none>', '(none)')} | {_fmt(b.get(f'{m}_mean'))} | {_fmt(b.get(f'{m}_gt_0_5'))} | "
                f"{_fmt(b.get(f'avg_max_{m}'))} | {_fmt(b.get(f'{m}_prob'))} | {_fmt(b.get('dist_2'), 3)} | "
                f"{_fmt(b.get('perplexity'), 1)} | {_fmt(b.get('length_mean'), 1)} | {_fmt(b.get('truncated_share'), 3)} |"
            )
        lines.append("")
    if run["eval"]:
        lines += eval_lines(run["eval"]) + [""]
    lines += judge_lines(run)
    for name, fn in ((f"{prefix}steerability.png", plot_steer), (f"{prefix}pool.png", plot_pool)):
        if (fn is plot_steer and rows) or (fn is plot_pool and run["iterations"]):
            fn(run, out / name)
            lines += [f"![{name}]({name})", ""]
    lines += sample_lines(run)
    return lines


def eval_lines(ev: dict) -> list[str]:
    from .evaluation import eval_rows

    header, *rows = eval_rows(ev)
    lines = [
        f"`altlm eval` ({ev['prompts']} prompts; samples per prompt per row):",
        "",
        "| " + " | ".join(header) + " |",
        "|---" * len(header) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    st = ev.get("steerability") or {}
    lines += [
        "",
        f"steerability ({st.get('metric')} over {len(st.get('feedback') or [])} feedback strings): "
        f"Spearman ρ = {_fmt(st.get('spearman_rho'), 3)}, gap = {_fmt(st.get('gap'))}",
    ]
    return lines


def sample_lines(run: dict) -> list[str]:
    ex = _exemplar(run)
    final_it = max((r["iteration"] for r in run["samples"] if r["model"] != "reference"), default=None)
    if final_it is None:
        return []
    # unscored samples (an LLM judge that failed: score null) have no place in a ranking by score
    final = [
        r for r in run["samples"] if r["iteration"] == final_it and r["model"] != "reference" and r["score"] is not None
    ]
    under_ex = sorted((r for r in final if r["feedback"] == ex), key=lambda r: r["score"])
    lines = []
    for title, rows in (("lowest-scoring", under_ex[:TABLE_ROWS]), ("highest-scoring", under_ex[::-1][:TABLE_ROWS])):
        lines += [
            f"**{title} completions under the exemplar ({ex}), final model**",
            "",
            "| score | prompt | completion |",
            "|---|---|---|",
        ]
        lines += [f"| {r['score']:.3f} | {_cell(r['prompt'])} | {_cell(r['completion'])} |" for r in rows] + [""]
    by_prompt: dict[str, dict] = {}
    for r in final:
        by_prompt.setdefault(r["prompt"], {}).setdefault(r["feedback"] or "(none)", r)
    if by_prompt:
        # the prompt whose completions the feedback changed most: where steering (or its absence) is visible
        prompt, per_fb = max(
            by_prompt.items(),
            key=lambda kv: (
                len(kv[1]),
                max(r["score"] for r in kv[1].values()) - min(r["score"] for r in kv[1].values()),
            ),
        )
        if len(per_fb) > 1:
            lines += [
                f"**one prompt under each feedback, final model**: {_cell(prompt)}",
                "",
                "| feedback | score | completion |",
                "|---|---|---|",
            ]
            lines += [f"| {fb} | {r['score']:.3f} | {_cell(r['completion'])} |" for fb, r in per_fb.items()] + [""]
    return lines


def write_report(folders: list[Path], out: Path | None = None) -> Path:
    """Write report.md (+ PNGs) into `out` (default: the run folder, or ./altlm-report for several runs)."""
    runs = [read_run(Path(f)) for f in folders]
    out = Path(out) if out else (Path(folders[0]) if len(folders) == 1 else Path("altlm-report"))
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# altlm report", ""]
    if len(runs) > 1:
        m = _metric(runs[0])
        lines += [
            f"| run | exemplar | reference {m} | final {m} | change | final > 0.5 | Spearman | gap | wall s |",
            "|---" * 9 + "|",
        ]
        for r in runs:
            s = r["summary"]
            if not s:
                lines.append(f"| {r['name']} | {_exemplar(r)} | (unfinished) | | | | | | |")
                continue
            red = s["reduction"].get(f"{m}_mean")
            lines.append(
                f"| {r['name']} | {s['exemplar']} | {_fmt(s['reference'][f'{m}_mean'])} | {_fmt(s['final'][f'{m}_mean'])} | "
                f"{_fmt(-100 * red, 1) + '%' if red is not None else '–'} | {_fmt(s['final'][f'{m}_gt_0_5'])} | "
                f"{_fmt(s['steerability']['spearman_rho'], 3)} | {_fmt(s['steerability']['gap'])} | {_fmt(s['wall_seconds'], 0)} |"
            )
        lines.append("")
    if any(r["evals"] for r in runs):
        plot_iterations(runs, out / "iterations.png")
        lines += ["![per-iteration metrics](iterations.png)", ""]
    for r in runs:
        lines += _run_section(r, out, f"{r['name']}-" if len(runs) > 1 else "")
    tmp = out / "report.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out / "report.md")
    return out / "report.md"
