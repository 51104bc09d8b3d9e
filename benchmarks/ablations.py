"""Ablations of the feedback: noise, frequency and granularity, against SFT (docs/ablations.md; issue "ablations").

    .venv/bin/python benchmarks/ablations.py --minutes 120 --threads 2     # resumable: run it again to go on
    .venv/bin/python benchmarks/ablations.py --quick --out /tmp/abl        # tiny random model, every point (< 2 min)

The paper's own limitation is that ALT degrades when the feedback is inconsistent or noisy. Every point is the demo
(recipe sentiment-demo: SmolLM2-135M + LoRA, ALT-RM on VADER sentiment, 7 iterations) with one thing changed:
  base          5 strings, no noise, every sample labelled (the demo itself, with a cheaper evaluation)
  noise0.4      feedback_noise=0.4: 40% of the samples are trained with another, uniformly drawn feedback string
  fraction0.5   feedback_fraction=0.5: only half of each iteration's samples get feedback and enter the pool
  strings2      two strings (best, worst) instead of five: coarse feedback (quantiles follow: halves)
  noise0.2      feedback_noise=0.2
  sft           use_feedback=false: the same loop trained on its own samples without any feedback (the control
                the paper lacks), evaluated untagged against the untagged reference
  judge         ALT-LMC with a scripted judge (VADER thresholds, answering at random 30% of the time) under
                feedback_noise=0.4, asked once per sample
  judge_sc      the same, asked 3 times per sample, kept when at least 2 of 3 answers agree (judge_samples=3,
                judge_min_agreement=0.6): what the self-consistency filter buys under feedback noise
Every point is evaluated on the demo's 200 held-out prompts, 2 samples each, for the reference (untagged and
under the best and worst string: the priming control) and the final model (under the best and worst), and
summary.json's claims give each number with a bootstrap interval over the prompts. The judge points' evaluation
samples are re-scored with VADER (the judge's noise-free rule), so every point is measured the same way.

Budget: the points run in the order above, each as `altlm train --config sentiment-demo ... --resume <work>/<point>`
in a subprocess; when --minutes is spent the running point gets Ctrl-C (it stays resumable) and the script stops.
Run it again to go on: finished points are read from their run folders, the interrupted one resumes. The results
are rebuilt from the run folders every time and written atomically to <out>/ablations.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))
sys.path.insert(0, str(ROOT))  # common.py, beside this script

import numpy as np  # noqa: E402
import yaml  # noqa: E402
from common import DEMO_RECIPE_THEN, run_altlm, save_figure, write_atomic  # noqa: E402

from altlm import claims as C  # noqa: E402

WORDS = ["Most Positive", "Positive", "Neutral", "Negative", "Most Negative"]
BEST, WORST = WORDS[0], WORDS[-1]
# cheaper than the demo's evaluation: 2 samples per held-out prompt, best and worst only, 100 likelihood texts
EVAL = [
    f"eval_feedback={json.dumps([BEST, WORST])}",
    "eval_samples_per_prompt=2",
    "likelihood_texts=100",
    "report=false",
    *DEMO_RECIPE_THEN,
    "iterations=7",  # the demo recipe then, too
]
JUDGE_ERROR = 0.3  # the scripted judge's own inconsistency: share of its answers drawn at random
JUDGE_TEMPLATE = (
    "Prompt: {prompt}\nCompletion: {completion}\n\nWhich of these describes the completion?\n{categories}\n"
)
# the model name keys the scripted judge's answer streams: each point has its own
JUDGE = ["feedback_type=lmc", "judge_backend=openai", "judge_temperature=1.0", "judge_concurrency=1"]
POINTS = {
    "base": [],
    "noise0.4": ["feedback_noise=0.4"],
    "fraction0.5": ["feedback_fraction=0.5"],
    "strings2": [f"feedback_words={json.dumps([BEST, WORST])}"],
    "noise0.2": ["feedback_noise=0.2"],
    # untagged final model too (eval_conditions=all): its claim is untagged final vs untagged reference
    "sft": ["use_feedback=false", "eval_conditions=all"],
    "judge": [*JUDGE, "judge_model=scripted-1", "feedback_noise=0.4", "judge_samples=1"],
    "judge_sc": [*JUDGE, "judge_model=scripted-3", "feedback_noise=0.4", "judge_samples=3", "judge_min_agreement=0.6"],
}
QUICK = [
    "model=tiny-smollm2",
    "training_mode=full",
    "precision=fp32",
    "num_train_prompts=24",
    "num_eval_prompts=4",
    "iterations=2",
    "prompts_per_iteration=8",
    "samples_per_prompt=2",
    "train_steps=2",
    "batch_size=4",
    "max_new_tokens=6",
    "sample_batch_size=16",
    "perplexity_model=null",
    "likelihood_texts=8",
]


# ---------------------------------------------------------------- the scripted judge (judge points)
_VADER = []


def vader() -> object:
    """One VADER scorer per process (it reads its lexicon when made)."""
    from altlm.feedback.scorers import VaderSentiment

    if not _VADER:
        _VADER.append(VaderSentiment())
    return _VADER[0]


def vader_category(completion: str) -> int:
    """The judge's noise-free rule: VADER compound of the completion, cut at fixed thresholds (0 = best)."""
    score = vader().score([""], [completion])[0]
    return sum(score < cut for cut in (0.5, 0.05, -0.05, -0.5))


class ScriptedJudge:
    """An OpenAI-compatible endpoint on 127.0.0.1: the rule's category, except that a JUDGE_ERROR share of the
    answers is a category drawn at random — seeded by the model name, the question and how often it was asked, so
    a resumed run (one request at a time: judge_concurrency=1) gets the same answers; the judge cache holds the
    finished questions."""

    def __init__(self, port: int):
        self.asked: dict[str, int] = {}
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _send(self, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send({"object": "list", "data": [{"id": "scripted", "object": "model"}]})

            def do_POST(self):
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                question = req["messages"][-1]["content"]
                completion = question.split("\nCompletion: ", 1)[1].rsplit("\n\nWhich of these", 1)[0]
                key = req["model"] + "\n" + question
                with outer.lock:
                    n = outer.asked[key] = outer.asked.get(key, -1) + 1
                rng = np.random.default_rng([zlib.crc32(key.encode()), n])
                category = vader_category(completion)
                if rng.random() < JUDGE_ERROR:
                    category = int(rng.integers(len(WORDS)))
                message = {"role": "assistant", "content": WORDS[category]}
                usage = {"prompt_tokens": 40, "completion_tokens": 3, "total_tokens": 43}
                choice = {"index": 0, "message": message, "finish_reason": "stop"}
                self._send({"id": "x", "object": "chat.completion", "created": 0, "model": "scripted",
                            "choices": [choice], "usage": usage})  # fmt: skip

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_judge(work: Path) -> ScriptedJudge:
    """The judge on the port the work folder's runs were started with (the URL is part of their config)."""
    record = work / "scripted_judge.json"
    port = json.loads(record.read_text())["port"] if record.exists() else 0
    try:
        judge = ScriptedJudge(port)
    except OSError as e:
        raise SystemExit(f"ablations: the scripted judge's port {port} is taken ({e}); free it to resume") from None
    record.write_text(json.dumps({"port": judge.server.server_address[1]}))
    (work / "judge_template.txt").write_text(JUDGE_TEMPLATE)
    return judge


# ---------------------------------------------------------------- running a point
def point_args(name: str, work: Path, quick: bool, threads: int, judge_url: str | None) -> list[str]:
    run = work / name
    args = ["train", "--config", "sentiment-demo", f"output_dir={run}", *EVAL, *POINTS[name]]
    if name.startswith("judge"):
        args += [
            f"judge_base_url={judge_url}",
            f"judge_template={work / 'judge_template.txt'}",
            f"judge_cache={work / 'judge-cache.sqlite'}",
        ]
    if threads:
        args.append(f"threads={threads}")
    return [*args, *(QUICK if quick else []), "--resume", str(run)]  # --config + --resume: starts it, or goes on


def status(run: Path) -> dict:
    """finished / stopped (with its progress) / not started, from the run folder."""
    state = run / "state.json"
    if not state.exists():
        return {"status": "not started"}
    progress = json.loads(state.read_text())
    iterations = yaml.safe_load((run / "config.yaml").read_text())["iterations"]
    done = {"iteration_done": progress["iteration_done"], "iterations": iterations}
    return {"status": "finished" if progress.get("finished") else "stopped", **done}


def run_point(name: str, work: Path, seconds: float, quick: bool, threads: int, judge_url: str | None) -> bool:
    """Runs (or resumes) a point for at most `seconds`; True when it finished."""
    code, err, stopped = run_altlm(point_args(name, work, quick, threads, judge_url), seconds)
    if stopped:
        return False
    if code != 0:
        raise SystemExit(f"ablations: point {name} failed (exit {code}): {err.strip()[-800:]}")
    return True


# ---------------------------------------------------------------- reading a point's results
def per_prompt_difference(records: list[dict], a: tuple[int, str], b: tuple[int, str]) -> dict[str, float]:
    """Per held-out prompt: mean score of condition a − of condition b ((iteration, feedback or "<none>")), over the
    prompts both scored, in the order of b's (claims.py's grouping)."""
    by = {}
    for key in (a, b):
        rows = [r for r in records if r["iteration"] == key[0] and (r["feedback"] or "<none>") == key[1]]
        by[key] = C._by_prompt(rows)
    return {p: float(np.mean(by[a][p]) - np.mean(by[b][p])) for p in by[b] if by[a].get(p) and by[b][p]}


def mean_over_prompts(diff: np.ndarray, seed: int) -> dict:
    """The mean of per-prompt differences, with a 95% bootstrap interval over the prompts."""
    picks = np.random.default_rng(seed).integers(0, len(diff), size=(C.N_BOOT, len(diff)))
    return {"estimate": float(diff.mean()), "interval": C._interval(diff[picks].mean(1), 0.95)}


def paired_difference(records: list[dict], a: tuple[int, str], b: tuple[int, str], seed: int = 0) -> dict:
    """Mean score of condition a − condition b, paired over prompts, with a 95% bootstrap interval."""
    diff = per_prompt_difference(records, a, b)
    if not diff:
        return {"estimate": None, "interval": [None, None]}
    return mean_over_prompts(np.array(list(diff.values())), seed)


def gap_vs_base(point: dict, base: dict, seed: int = 0) -> dict:
    """This point's final best − worst gap minus the base's, paired over the held-out prompts both evaluated (the
    same prompts, the same reference: the reference's priming gap cancels), with a 95% bootstrap interval."""
    prompts = [p for p in base["gap_by_prompt"] if p in point["gap_by_prompt"]]
    return mean_over_prompts(np.array([point["gap_by_prompt"][p] - base["gap_by_prompt"][p] for p in prompts]), seed)


def pool_gap(run: Path, rescore: bool) -> dict | None:
    """The contrast the feedback carries: mean VADER score of the pool rows trained under the best string minus
    under the worst (after noise: what the model was shown). The model's gap can only approach it."""
    import sqlite3

    db = sqlite3.connect(f"file:{run / 'pool.sqlite'}?mode=ro", uri=True)
    query = (
        "SELECT prompt, completion, feedback, score FROM samples "
        "WHERE valid AND dropped_at IS NULL AND feedback IN (?, ?)"
    )
    rows = db.execute(query, (BEST, WORST)).fetchall()
    db.close()
    if not {r[2] for r in rows} >= {BEST, WORST}:
        return None
    scores = vader().score([r[0] for r in rows], [r[1] for r in rows]) if rescore else [r[3] for r in rows]
    by = {word: [x for r, x in zip(rows, scores) if r[2] == word] for word in (BEST, WORST)}
    return {"gap": float(np.mean(by[BEST]) - np.mean(by[WORST])), "rows": {w: len(v) for w, v in by.items()}}


def claim(summary_claims: dict, prefix: str) -> dict | None:
    found = [c for c in summary_claims["claims"] if c["claim"].startswith(prefix)]
    return {"estimate": found[0]["estimate"], "interval": found[0]["interval"]} if found else None


def judge_record(run: Path) -> dict:
    """The judge points' feedback: how often the trained label is the rule's, and what the filter removed."""
    import sqlite3

    db = sqlite3.connect(f"file:{run / 'pool.sqlite'}?mode=ro", uri=True)
    rows = db.execute("SELECT completion, feedback, valid FROM samples").fetchall()
    db.close()
    kept = [(c, f) for c, f, v in rows if v]
    right = sum(f == WORDS[vader_category(c)] for c, f in kept)
    its = [json.loads(line) for line in open(run / "metrics.jsonl") if '"kind": "iteration"' in line]
    return {
        "judged": len(rows),
        "kept": len(kept),
        "label_accuracy": right / len(kept) if kept else None,
        "judge_requests": sum(r["judge"]["requests"] for r in its if "judge" in r),
    }


def read_point(name: str, run: Path) -> dict:
    out = {"point": name, "overrides": POINTS[name], **status(run)}
    if out["status"] != "finished":
        return out
    summary = json.loads((run / "summary.json").read_text())
    records = [json.loads(line) for line in open(run / "eval_samples.jsonl")]
    if name.startswith("judge"):
        # re-scored with VADER, as every other point: the judge's own scores carry its noise and its filter
        scores = vader().score([r["prompt"] for r in records], [r["completion"] for r in records])
        records = [{**r, "score": s} for r, s in zip(records, scores)]
        summary["claims"] = C.run_claims(records, [BEST, WORST], BEST, True, 0)
        out["judge"] = judge_record(run)
    last = max(r["iteration"] for r in records)
    means = summary["claims"]["means"]
    out.update(
        ablation=summary.get("ablation"),
        reference_untagged=means["reference"]["<none>"],
        best_feedback=means["final"].get(BEST),
        untagged_final=means["final"].get("<none>"),
        worst_feedback=means["final"].get(WORST),
        exemplar_vs_reference=claim(summary["claims"], "final under the exemplar"),
        best_minus_worst=claim(summary["claims"], "best - worst"),
        beyond_priming=claim(summary["claims"], "beyond priming: final gap"),
        perplexity_ratio=claim(summary["claims"], "perplexity ratio"),
        untagged_vs_reference=paired_difference(records, (last, "<none>"), (0, "<none>"))
        if any(r["iteration"] == last and r["feedback"] is None for r in records)
        else None,
        wall_seconds=summary.get("wall_seconds"),
        gap_by_prompt=per_prompt_difference(records, (last, BEST), (last, WORST)),
        pool_gap=None if name == "sft" else pool_gap(run, rescore=name.startswith("judge")),
    )
    return out


# ---------------------------------------------------------------- writing
def _fmt(x: dict | None, f: str = "+.4f") -> str:
    if not x or x.get("estimate", x.get("mean")) is None:
        return "–"
    est = x.get("estimate", x.get("mean"))
    lo, hi = x.get("interval", x.get("interval_95"))
    return f"{format(est, f)} [{format(lo, f)}, {format(hi, f)}]"


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "ablations.json", json.dumps(results, indent=2))
    lines = [
        "# Feedback ablations: noise, frequency, granularity, against SFT",
        "",
        f"Command: `{results['command']}`"
        + (" (quick: tiny random model, a code check only)" if results["quick"] else ""),
        "",
        "Each point is the demo (recipe `sentiment-demo`) with one change; VADER compound sentiment, higher is",
        "better; 95% bootstrap intervals over the held-out prompts (99% for best − worst). *beyond priming*: the",
        "final model's best − worst gap minus the untrained reference's gap under the same two strings.",
        "*gap − base's gap*: this point's final best − worst gap minus the base's, paired over the same held-out",
        "prompts (95%): how much steering the change cost (negative) or bought. *pool's gap*: mean score of the",
        "active pool rows trained under the best string − under the worst (after noise): the contrast the model",
        "was shown, which its own gap can at most approach (no interval: it is the training data, not a sample).",
        "`sft` is trained on its own samples with no feedback at all (use_feedback=false, not filtered): its row",
        "*untagged − reference* is what fine-tuning on the samples gives without conditioning; its tagged rows",
        "measure only how the fine-tuned model reacts to tags it never saw. The judge points are ALT-LMC with a",
        f"scripted judge answering at random {JUDGE_ERROR:.0%} of the time, under feedback_noise 0.4; their",
        "evaluation samples are re-scored with VADER.",
        "",
        "| point | status | labelled / generated (noised) | under best string | best − untagged reference "
        "| best − worst | beyond priming | gap − base's gap | pool's gap | perplexity ratio "
        "| untagged − reference |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in results["points"]:
        state = p["status"] if p["status"] != "stopped" else f"stopped ({p['iteration_done']}/{p['iterations']})"
        rows = p.get("ablation")
        rows = f"{rows['labelled']} / {rows['generated']} ({rows['noised']})" if rows else "–"
        lines.append(
            f"| {p['point']} | {state} | {rows} | {_fmt(p.get('best_feedback'))} | "
            f"{_fmt(p.get('exemplar_vs_reference'))} | "
            f"{_fmt(p.get('best_minus_worst'))} | {_fmt(p.get('beyond_priming'))} | {_fmt(p.get('gap_vs_base'))} | "
            f"{'–' if not p.get('pool_gap') else format(p['pool_gap']['gap'], '+.3f')} | "
            f"{_fmt(p.get('perplexity_ratio'), '.2f')} | {_fmt(p.get('untagged_vs_reference'))} |"
        )
    judged = [p for p in results["points"] if p.get("judge")]
    if judged:
        lines += [
            "",
            "Judge points: the trained labels against the judge's noise-free rule (after feedback_noise).",
            "",
            "| point | samples judged | kept (valid) | label accuracy | judge requests |",
            "|---|---|---|---|---|",
        ]
        for p in judged:
            j = p["judge"]
            acc = "–" if j["label_accuracy"] is None else f"{j['label_accuracy']:.3f}"
            lines.append(f"| {p['point']} | {j['judged']} | {j['kept']} | {acc} | {j['judge_requests']} |")
    lines += ["", "Overrides per point (on top of the recipe and the evaluation settings):", ""]
    lines += [f"- `{p['point']}`: `{' '.join(p['overrides']) or '(none)'}`" for p in results["points"]]
    lines += ["", f"Evaluation settings of every point: `{' '.join(EVAL)}`", ""]
    write_atomic(out / "ablations.md", "\n".join(lines))
    plot(results, out)


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [p for p in results["points"] if p["status"] == "finished"]
    fig, ax = plt.subplots(1, 2, figsize=(12, 4))
    panels = (
        (ax[0], "best_feedback", "score under the best string (final)"),
        (ax[1], "beyond_priming", "best − worst gap beyond priming"),
    )
    for a, key, title in panels:
        xs, ys, lo, hi = [], [], [], []
        for i, p in enumerate(done):
            value = p.get(key)
            est = None if not value else value.get("estimate", value.get("mean"))
            if est is None or est != est:
                continue
            interval = value.get("interval", value.get("interval_95"))
            xs.append(i)
            ys.append(est)
            lo.append(est - interval[0])
            hi.append(interval[1] - est)
        a.errorbar(xs, ys, yerr=[lo, hi], fmt="o", capsize=4, label="final model" if key == "best_feedback" else None)
        a.set_xticks(range(len(done)), [p["point"] for p in done], rotation=30)
        a.set(title=title, ylabel="VADER compound")
        a.grid(alpha=0.3)
    untagged = [(i, p["untagged_final"]["mean"]) for i, p in enumerate(done) if p.get("untagged_final")]
    if untagged:  # sft: the model it trains is used untagged
        ax[0].plot([i for i, _ in untagged], [m for _, m in untagged], "x", ms=9, c="C3", label="final, untagged")
    if done:
        ref = done[0]["reference_untagged"]["mean"]
        ax[0].axhline(ref, ls="--", c="gray", label="untagged reference")
        ax[0].legend()
    ax[1].axhline(0.0, ls="--", c="gray")
    fig.tight_layout()
    save_figure(fig, out / "ablations.png", dpi=100)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=120.0, help="wall budget of this invocation, over the points")
    ap.add_argument("--points", nargs="+", default=list(POINTS), choices=list(POINTS), help="a subset, in order")
    ap.add_argument("--quick", action="store_true", help="tiny random model, 2 short iterations per point")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads of each run (0 = torch's default)")
    ap.add_argument("--work", default="runs/ablations", help="run folders, one per point (resumable)")
    ap.add_argument("--out", default=str(ROOT / "results"))
    args = ap.parse_args(argv)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + args.minutes * 60
    # the scripted judge only where a judge point will run: rebuilding the tables must not need its port
    to_run = [p for p in args.points if status(work / p)["status"] != "finished"]
    judge = start_judge(work) if args.minutes > 0 and any(p.startswith("judge") for p in to_run) else None
    command = "python benchmarks/ablations.py " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        for name in args.points:
            if status(work / name)["status"] == "finished":
                continue  # read from its run folder, never rerun
            left = deadline - time.time()
            if left <= 0 or not run_point(name, work, left, args.quick, args.threads, judge and judge.url):
                print(f"ablations: budget spent during {name}; run the same command again to go on")
                break
            print(f"ablations: {name} finished")
    finally:
        if judge is not None:
            judge.close()
    points = [read_point(name, work / name) for name in args.points]
    base = next((p for p in points if p["point"] == "base" and p["status"] == "finished"), None)
    for p in points:
        if base is not None and p is not base and p["status"] == "finished":
            p["gap_vs_base"] = gap_vs_base(p, base)
    results = {
        "command": command,
        "minutes": args.minutes,
        "quick": args.quick,
        "work": str(work),
        "points": points,
    }
    write(results, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
