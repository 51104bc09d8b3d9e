"""Crash tests: a run killed with SIGKILL inside each phase and resumed ends exactly as an uninterrupted run.

The kills are real (`ALTLM_FAILPOINT=<phase>:<n>` makes the process SIGKILL itself the n-th time it passes that
point, see runfolder.failpoint), so each resume sees what a power cut leaves on disk. The points within each
phase (which sampling batch, which training step) are drawn at random; the seed is in the test id.
On CPU everything is deterministic, so weights and metrics are compared bit for bit.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_train_smoke import SMALL, jsonl

# 12 requests in 3 sampling batches, 3 training steps with a snapshot after each, 2 iterations
CRASH = [*SMALL, "iterations=2", "sample_batch_size=4", "train_steps=3", "save_steps=1"]
POOL_COLS = (
    "iteration",
    "prompt_id",
    "prompt",
    "completion",
    "feedback",
    "score",
    "bucket",
    "truncated",
    "prompt_tokens",
    "completion_tokens",
    "valid",
    "dropped_at",
)


def altlm(args: list[str], cwd: Path, failpoint: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    env.pop("ALTLM_FAILPOINT", None)
    if failpoint:
        env["ALTLM_FAILPOINT"] = failpoint
    return subprocess.run(
        [sys.executable, "-m", "altlm", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def pool(run: Path) -> tuple[list[tuple], int]:
    db = sqlite3.connect(run / "pool.sqlite")
    rows = db.execute(f"SELECT {', '.join(POOL_COLS)} FROM samples ORDER BY id").fetchall()
    staged = db.execute("SELECT COUNT(*) FROM staged").fetchone()[0]
    db.close()
    return rows, staged


def comparable(run: Path) -> dict:
    """Everything a run produces, minus wall-clock times."""

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in ("seconds", "wall_seconds")}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    ckpt = run / "checkpoint"
    weights = load_file(
        ckpt / ("model.safetensors" if (ckpt / "model.safetensors").exists() else "adapter_model.safetensors")
    )
    return {
        "summary": strip(json.loads((run / "summary.json").read_text())),
        "metrics": strip(jsonl(run / "metrics.jsonl")),
        "eval_samples": jsonl(run / "eval_samples.jsonl"),
        "pool": pool(run),
        "weights": {k: v.numpy().tobytes() for k, v in weights.items()},
    }


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    base = tmp_path_factory.mktemp("crash")
    out = {}
    for mode in ("full", "lora"):
        run = base / f"straight-{mode}"
        r = altlm(["train", "--config", "smoke", f"output_dir={run}", f"training_mode={mode}", *CRASH], base)
        assert r.returncode == 0, r.stderr[-3000:]
        out[mode] = comparable(run)
    return base, out


@pytest.mark.parametrize("seed", [11])
def test_sigkill_in_every_phase_then_resume_equals_an_uninterrupted_run(uninterrupted, seed):
    base, expect = uninterrupted
    rng = random.Random(seed)
    run = base / f"killed-{seed}"
    # One process per kill, each resuming the last; counts are per process, from where it resumed.
    kills = [
        f"sample:{rng.randint(1, 3)}",  # iteration 1: after 1-3 of its 3 sampling batches
        "feedback:1",  # its scores staged, the pool commit not yet made
        f"train:{rng.randint(1, 3)}",  # after training step 1-3 (the step's snapshot not yet taken)
        "eval:1",  # iteration 1's evaluation written half
        "checkpoint:2",  # iteration 2's checkpoint between its two renames (only checkpoint.old on disk)
        f"sample:{rng.randint(1, 2)}",  # never reached: iteration 2 already sampled — this process finishes
    ]
    args = ["train", "--config", "smoke", f"output_dir={run}", "training_mode=full", *CRASH]
    for n, point in enumerate(kills):
        r = altlm(args if n == 0 else ["train", "--resume", str(run)], base, failpoint=point)
        if n < len(kills) - 1:
            assert r.returncode == -9, (point, r.returncode, r.stderr[-3000:])
        else:
            assert r.returncode == 0, (point, r.stderr[-3000:])
    got = comparable(run)
    assert got["pool"][1] == 0, "staged samples left behind"
    assert len(got["pool"][0]) == len(expect["full"]["pool"][0]) == 2 * 6 * 2
    for key in ("pool", "metrics", "eval_samples", "summary", "weights"):
        assert got[key] == expect["full"][key], key
    assert not (run / "resume").exists() and not (run / "checkpoint.old").exists()
    assert not list(run.glob(".checkpoint-*"))
    assert json.loads((run / "state.json").read_text())["finished"] is True


def test_lora_run_killed_mid_training_and_mid_sampling_resumes_exactly(uninterrupted):
    base, expect = uninterrupted
    run = base / "killed-lora"
    args = ["train", "--config", "smoke", f"output_dir={run}", "training_mode=lora", *CRASH]
    for n, point in enumerate(["sample:5", "train:2", None]):  # iteration 2's 2nd sampling batch; then its 2nd step
        r = altlm(args if n == 0 else ["train", "--resume", str(run)], base, failpoint=point)
        assert r.returncode == (0 if point is None else -9), (point, r.returncode, r.stderr[-3000:])
    got = comparable(run)
    for key in ("pool", "metrics", "eval_samples", "summary", "weights"):
        assert got[key] == expect["lora"][key], key


def test_sigkill_at_a_random_moment_from_outside(uninterrupted):
    """No hook: the parent kills the process at a random moment after its next commit and resumes it, four times;
    the fifth attempt runs to the end.

    The kill is aimed by progress, not by wall time: on a loaded machine start-up alone can outlast any fixed delay,
    and kills that all land before the run exists would compare a straight run with a straight run."""

    base, expect = uninterrupted
    run = base / "killed-outside"
    state = run / "state.json"
    rng = random.Random(3)
    args = ["train", "--config", "smoke", f"output_dir={run}", "training_mode=full", *CRASH]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    mid_run = 0  # kills that landed while the run existed and was not finished: without one, nothing was tested
    for attempt in range(5):
        before = state.read_text() if state.exists() else None
        # the same command each time: `--resume` starts the run when it does not exist yet
        cmd = [sys.executable, "-m", "altlm", *args, "--resume", str(run)]
        p = subprocess.Popen(cmd, cwd=base, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while p.poll() is None and (not state.exists() or state.read_text() == before):
            time.sleep(0.02)  # wait for this process's first commit, so every attempt moves the run forward
        try:
            p.wait(timeout=rng.uniform(0.0, 2.0) if attempt < 4 else None)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            mid_run += not json.loads(state.read_text()).get("finished")
            continue
        err = p.stderr.read()
        # (a kill that lands after the run's last commit leaves a finished run: resuming it is refused, rightly)
        assert p.returncode == 0 or (p.returncode == 2 and "already finished" in err), err[-3000:]
        break
    assert mid_run >= 1, "no kill landed inside the run: this compared a straight run with a straight run"
    got = comparable(run)
    for key in ("pool", "metrics", "eval_samples", "summary", "weights"):
        assert got[key] == expect["full"][key], key
