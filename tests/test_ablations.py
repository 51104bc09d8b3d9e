"""The ablation keys (docs/ablations.md): feedback_noise, feedback_fraction and the number of feedback strings each
change exactly what they say, reproducibly and resumably; benchmarks/ablations.py runs and resumes point by point.

- noise: the realised rate lies in its binomial interval on a fixed seed; a noised row is trained with another
  string than its own, the same one after every re-cut of the quantiles (offset applied to the true bucket), and
  its replacement is uniform over the other strings; lmc/lmu replace a category / take another sample's sentence;
- fraction: exactly round(f · n) of each iteration's samples enter the pool, the rest are generated but unscored;
- strings: k feedback words give k quantile buckets (2, 3, 5);
- a run with the keys on, killed in sampling, feedback and training and resumed, equals the uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import run_altlm
from test_resume import CRASH, altlm, comparable
from test_train_smoke import jsonl, one_error_line, pool_rows

from altlm.feedback import Feedback, QuantileFeedback, quantile_buckets
from altlm.feedback.noise import labelled_indices, noise_categories, noise_offset, noise_sentences

ROOT = Path(__file__).resolve().parent.parent
WORDS3 = ["good", "middling", "bad"]
KEYS = ["feedback_noise=0.4", "feedback_fraction=0.5", f"feedback_words={json.dumps(WORDS3)}"]


def binomial_region(n: int, p: float, alpha: float = 1e-3) -> tuple[int, int]:
    """[lo, hi]: the counts an exact Binomial(n, p) stays within with probability ≥ 1 − alpha (equal tails)."""
    log_pmf = [
        math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(p) + (n - k) * math.log1p(-p)
        for k in range(n + 1)
    ]
    pmf = [math.exp(x) for x in log_pmf]
    lo, tail = 0, 0.0
    while tail + pmf[lo] <= alpha / 2:
        tail += pmf[lo]
        lo += 1
    hi, tail = n, 0.0
    while tail + pmf[hi] <= alpha / 2:
        tail += pmf[hi]
        hi -= 1
    return lo, hi


# ---------------------------------------------------------------- the decisions, unit by unit
@pytest.mark.parametrize("p", [0.2, 0.4])
def test_noise_rate_is_binomial_and_replacements_uniform_over_the_others(p):
    n, k = 5000, 5
    offsets = [noise_offset(7, 3, i, p, k) for i in range(n)]
    noised = [o for o in offsets if o is not None]
    lo, hi = binomial_region(n, p)
    assert lo <= len(noised) <= hi, (len(noised), lo, hi)
    # offsets 1..k-1 (never the row's own string), each about equally often: within its own binomial region
    counts = Counter(noised)
    assert set(counts) == set(range(1, k))
    for c in counts.values():
        a, b = binomial_region(len(noised), 1 / (k - 1))
        assert a <= c <= b, counts
    # seeded per sample: the same decision whatever else is asked, and another seed or iteration differs
    assert offsets == [noise_offset(7, 3, i, p, k) for i in range(n)]
    assert offsets != [noise_offset(8, 3, i, p, k) for i in range(n)]
    assert offsets != [noise_offset(7, 4, i, p, k) for i in range(n)]
    assert [noise_offset(7, 3, i, 0.0, k) for i in range(50)] == [None] * 50


def test_noised_rows_do_not_depend_on_the_number_of_strings():
    """Which rows are noised is the first draw of each row's stream: 2 and 5 strings noise the same rows."""
    two = [noise_offset(0, 1, i, 0.3, 2) is not None for i in range(500)]
    five = [noise_offset(0, 1, i, 0.3, 5) is not None for i in range(500)]
    assert two == five
    assert {noise_offset(0, 1, i, 0.3, 2) for i in range(500)} == {None, 1}


@pytest.mark.parametrize("words", [["A", "B"], ["A", "B", "C"], ["A", "B", "C", "D", "E"]])
def test_quantiles_follow_the_number_of_feedback_strings_and_noise_moves_off_the_true_one(words):
    class Fixed:
        name, higher_is_better = "s", True

    k, n = len(words), 60
    scores = [((i * 37) % n) / n for i in range(n)]  # distinct, shuffled
    provider = QuantileFeedback(Fixed(), words)
    buckets, texts = provider.rebucket(scores, [0] * n)
    assert Counter(buckets) == {b: n // k for b in range(k)}  # k equal quantiles, best first
    assert all(texts[i] == words[b] for i, b in enumerate(buckets))
    assert all(buckets[i] == 0 for i in range(n) if scores[i] >= 1 - 1 / k)
    noise = [noise_offset(0, 1, i, 0.5, k) for i in range(n)]
    noisy, noisy_texts = provider.rebucket(scores, [0] * n, noise)
    for i in range(n):
        if noise[i] is None:
            assert noisy[i] == buckets[i]
        else:
            assert noisy[i] == (buckets[i] + noise[i]) % k != buckets[i]
            assert noisy_texts[i] == words[noisy[i]] != texts[i]


def test_lmc_noise_replaces_the_category_and_keeps_the_judges_score():
    cats = ["best", "ok", "poor", "worst"]
    fbs = [Feedback(cats[i % 4], (3 - i % 4) / 3, i % 4, agreement=1.0) for i in range(400)]
    fbs[5] = Feedback(None, None, None, valid=False)
    out, offsets = noise_categories(fbs, list(range(400)), cats, 0, 2, 0.3)
    assert offsets[5] is None and out[5] is fbs[5]  # nothing to replace on an invalid sample
    lo, hi = binomial_region(399, 0.3)
    assert lo <= sum(o is not None for o in offsets) <= hi
    for f, g, o in zip(fbs, out, offsets):
        if o is None:
            assert g is f
        else:
            assert g.bucket == (f.bucket + o) % 4 != f.bucket and g.text == cats[g.bucket]
            assert (g.score, g.agreement, g.valid) == (f.score, f.agreement, True)


def test_lmu_noise_takes_another_samples_sentence():
    fbs = [Feedback(f"sentence {i}", float(i % 4), 3 - i % 4) for i in range(300)]
    fbs[0] = Feedback(None, None, None, valid=False)
    out, offsets = noise_sentences(fbs, list(range(300)), 1, 1, 0.4)
    assert offsets[0] is None
    donors = []
    for i, (f, g, o) in enumerate(zip(fbs, out, offsets)):
        if o is None:
            assert g is f
            continue
        donor = int(g.text.split()[1])
        assert donor != i and donor != 0  # another sample's, and a judged one
        assert g.bucket == fbs[donor].bucket and g.score == f.score  # the donor's bucket, the row's own score
        donors.append(donor)
    lo, hi = binomial_region(299, 0.4)
    assert lo <= len(donors) <= hi
    assert len(set(donors)) > len(donors) // 2  # spread over the iteration, not one donor


@pytest.mark.parametrize("f", [0.25, 0.5, 0.9])
def test_fraction_picks_exactly_its_share_seeded(f):
    picked = labelled_indices(3, 2, 200, f)
    assert len(picked) == round(f * 200) == len(set(picked)) and picked == sorted(picked)
    assert picked == labelled_indices(3, 2, 200, f) != labelled_indices(3, 3, 200, f)
    assert labelled_indices(3, 2, 200, 1.0) == list(range(200))
    assert len(labelled_indices(3, 2, 3, 0.01)) == 1  # at least one sample gets feedback


@pytest.mark.parametrize(
    "override, needle",
    [
        ("feedback_noise=1.5", "'feedback_noise' must be in [0, 1]"),
        ("feedback_noise=-0.1", "'feedback_noise' must be in [0, 1]"),
        ("feedback_fraction=0", "'feedback_fraction' must be in (0, 1]"),
        ("feedback_fraction=1.2", "'feedback_fraction' must be in (0, 1]"),
        ("feedback_noise=lots", "'feedback_noise' must be float"),
    ],
)
def test_bad_values_are_one_error_line(tmp_path, override, needle):
    r = run_altlm("train", "--config", "smoke", f"output_dir={tmp_path / 'r'}", override, cwd=tmp_path)
    one_error_line(r, needle)
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------- through `altlm train`
@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    """One uninterrupted run with all three keys on (noise 0.4, fraction 0.5, three strings)."""
    base = tmp_path_factory.mktemp("ablation")
    run = base / "straight"
    r = altlm(["train", "--config", "smoke", f"output_dir={run}", "training_mode=full", *CRASH, *KEYS], base)
    assert r.returncode == 0, r.stderr[-3000:]
    return base, run


def test_run_applies_the_keys_exactly_and_records_them(keyed):
    _, run = keyed
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert (cfg["feedback_noise"], cfg["feedback_fraction"], cfg["feedback_words"]) == (0.4, 0.5, WORDS3)
    rows = pool_rows(run)
    its = [r for r in jsonl(run / "metrics.jsonl") if r["kind"] == "iteration"]
    # fraction: 12 samples generated per iteration, exactly 6 enter the pool — the seeded choice of them
    requests = 6 * 2
    assert [(r["generated"], r["labelled"]) for r in its] == [(requests, requests // 2)] * 2
    assert Counter(r["iteration"] for r in rows) == {1: 6, 2: 6}
    # noise: the final pool's buckets are the quantiles of the true scores, moved by each row's offset
    true = quantile_buckets([r["score"] for r in rows], 3, higher_is_better=False)
    noised = 0
    for r, b in zip(rows, true):
        if r["noise"] is None:
            assert r["bucket"] == b
        else:
            noised += 1
            assert r["bucket"] == (b + r["noise"]) % 3 != b
        assert r["feedback"] == WORDS3[r["bucket"]]
    assert noised == sum(r["noised"] for r in its)
    # every row's decision is its own seeded stream: (seed, iteration, the sample's request index)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["ablation"] == {
        "feedback_noise": 0.4,
        "feedback_fraction": 0.5,
        "feedback_strings": 3,
        "use_feedback": True,
        "generated": 2 * requests,
        "labelled": requests,
        "noised": noised,
        "valid": requests,
    }
    lo, hi = binomial_region(requests, 0.4)
    assert lo <= noised <= hi


def test_noised_rows_are_trained_with_their_noised_feedback(keyed):
    """What the trainer draws from the pool is the noised row: redo iteration 2's draw and check the rows."""
    import random

    from altlm.pool import Pool

    _, run = keyed
    pool = Pool(run / "pool.sqlite")
    drawn = pool.draw_uniform(3 * 4, random.Random("0/2/train"))
    rows = {r.id: r for r in pool.rows()}
    pool.close()
    assert any(r.noise is not None for r in drawn)
    assert all(r.feedback == rows[r.id].feedback == WORDS3[r.bucket] for r in drawn)


def test_killed_and_resumed_run_with_the_keys_equals_the_uninterrupted_one(keyed):
    base, straight = keyed
    run = base / "killed"
    kills = ["sample:2", "feedback:1", "train:2", "sample:1", "feedback:1", None]
    args = ["train", "--config", "smoke", f"output_dir={run}", "training_mode=full", *CRASH, *KEYS]
    for n, point in enumerate(kills):
        r = altlm(args if n == 0 else ["train", "--resume", str(run)], base, failpoint=point)
        assert r.returncode == (0 if point is None else -9), (point, r.returncode, r.stderr[-3000:])
    got, want = comparable(run), comparable(straight)
    for key in ("pool", "metrics", "eval_samples", "summary", "weights"):
        assert got[key] == want[key], key
    cols = ["noise", "feedback", "bucket"]
    assert [{c: r[c] for c in cols} for r in pool_rows(run)] == [{c: r[c] for c in cols} for r in pool_rows(straight)]


def test_resume_refuses_changed_keys(keyed):
    base, straight = keyed
    r = run_altlm("train", "--resume", str(straight), "feedback_noise=0.2", cwd=base)
    one_error_line(r, "keys differ: feedback_noise")


# ---------------------------------------------------------------- benchmarks/ablations.py
def bench(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "ablations.py"), "--quick", "--threads", "1"]
    cmd += ["--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"), *args]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)


def test_benchmark_quick_runs_every_point_and_resumes_without_redoing_finished_ones(tmp_path):
    r = bench(tmp_path, "--points", "base")
    assert r.returncode == 0, r.stderr[-3000:]
    work = tmp_path / "work"

    def written(run: Path) -> dict:  # (SQLite's shared-memory index, pool.sqlite-shm, changes with any reader)
        return {f.name: f.stat().st_mtime_ns for f in run.iterdir() if f.is_file() and f.suffix != ".sqlite-shm"}

    base_files = written(work / "base")
    # a budget too small for the next points: the running one is stopped (Ctrl-C), resumable
    r = bench(tmp_path, "--minutes", "0.2")
    assert r.returncode == 0, r.stderr[-3000:]
    first = json.loads((tmp_path / "out" / "ablations.json").read_text())
    states = {p["point"]: p["status"] for p in first["points"]}
    assert states["base"] == "finished" and set(states.values()) != {"finished"}, states
    stopped = [p for p, s in states.items() if s == "stopped"]
    started = {p: (work / p / "config.yaml").stat().st_mtime_ns for p in stopped}
    r = bench(tmp_path, "--minutes", "30")
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "ablations.json").read_text())
    points = {p["point"]: p for p in results["points"]}
    assert list(points) == ["base", "noise0.4", "fraction0.5", "strings2", "noise0.2", "sft", "judge", "judge_sc"]
    assert all(p["status"] == "finished" for p in points.values()), points
    # finished points are read, never rerun; a stopped one was resumed in its folder, not started again
    assert written(work / "base") == base_files
    assert {p: (work / p / "config.yaml").stat().st_mtime_ns for p in stopped} == started
    # each point ran with its key, recorded in its summary
    assert points["base"]["ablation"]["feedback_noise"] == 0.0 and points["base"]["ablation"]["feedback_strings"] == 5
    assert points["noise0.4"]["ablation"]["feedback_noise"] == 0.4 and points["noise0.4"]["ablation"]["noised"] > 0
    frac = points["fraction0.5"]["ablation"]
    assert frac["feedback_fraction"] == 0.5 and frac["labelled"] * 2 == frac["generated"]
    assert points["strings2"]["ablation"]["feedback_strings"] == 2
    assert points["sft"]["ablation"]["use_feedback"] is False and points["sft"]["untagged_vs_reference"]["estimate"]
    for name in ("base", "noise0.4", "strings2", "sft", "judge_sc"):
        p = points[name]
        assert p["best_feedback"]["mean"] is not None and len(p["beyond_priming"]["interval"]) == 2, name
    # the judge pair: asked once vs three times per sample, the filter dropping disagreeing samples
    once, thrice = points["judge"]["judge"], points["judge_sc"]["judge"]
    assert once["kept"] == once["judged"] and thrice["kept"] < thrice["judged"]
    assert thrice["judge_requests"] > once["judge_requests"]
    md = (tmp_path / "out" / "ablations.md").read_text()
    assert all(f"| {name} | finished |" in md for name in points)
    assert (tmp_path / "out" / "ablations.png").stat().st_size > 10_000
