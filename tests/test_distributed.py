"""Two processes (torchrun, gloo on CPU) run the same ALT iterations as one process with the same global batch.

Sampling batches and feedback chunks are dealt out round-robin with per-batch seeds, so the samples, scores and
pool are identical; each optimiser step sees half the batch per process and DDP averages gradients of a loss
normalised by the global token count, so losses and weights agree to float rounding (the all-reduce sums in
another order). Losses: rtol 1e-4. Weights: relative L2 difference < 1e-3 and fewer than 1% of elements off by
more than 1e-5 — not elementwise, because Adam's update is ≈ lr·sign(g) for an element whose gradient is ~0, so
rounding noise in such a gradient can move that one element by up to lr (measured: 1 of 2048 elements off by
2e-5, all others within 1e-6).

`accelerate launch --cpu --num_processes 2` starts one process with accelerate 1.15 unless MPI is set up, so the
test launches with torchrun, which is also what `accelerate launch --multi_gpu` runs underneath.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_smoke import SMALL, jsonl

# One iteration: what follows training is sampling, where a 1e-6 weight difference can flip a drawn token now
# and then, and from there on the runs differ legitimately.
ARGS = ["train", "--config", "smoke", "training_mode=lora", *SMALL, "iterations=1", "sample_batch_size=4", "train_steps=6"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="this torch build has no gloo backend")
def test_two_processes_and_micro_batches_match_one_process(tmp_path):
    """Also gradient accumulation: one process in micro-batches of 3 + 1 rows, and two processes in micro-batches
    of 1 row (DDP's all-reduce skipped until the last one) give the whole-batch step."""
    one = tmp_path / "one"
    r = run([sys.executable, "-m", "altlm", *ARGS, f"output_dir={one}"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    def torchrun():
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(free_port())]

    for name, launcher, extra in [("two", torchrun(), []), ("one_micro", [sys.executable], ["micro_batch_size=3"]),
                                  ("two_micro", torchrun(), ["micro_batch_size=1"])]:
        r = run([*launcher, "-m", "altlm", *ARGS, *extra, f"output_dir={tmp_path / name}"], tmp_path)
        assert r.returncode == 0, (name, r.stderr[-5000:])
        assert_same_run(one, tmp_path / name)


def assert_same_run(one: Path, two: Path) -> None:
    import sqlite3

    cols = "iteration, prompt_id, completion, score, bucket, feedback, truncated"
    rows = [sqlite3.connect(d / "pool.sqlite").execute(f"SELECT {cols} FROM samples ORDER BY id").fetchall() for d in (one, two)]
    assert len(rows[0]) == 6 * 2 and rows[1] == rows[0]  # the same samples, scores and feedback

    steps = [[x for x in jsonl(d / "metrics.jsonl") if x["kind"] == "step"] for d in (one, two)]
    assert len(steps[0]) == len(steps[1]) == 6
    for a, b in zip(*steps):
        assert b["tokens"] == a["tokens"]
        for k in ("loss", "nll", "kl", "entropy"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["iteration"], a["step"], k)

    wa, wb = (load_file(d / "checkpoint" / "adapter_model.safetensors") for d in (one, two))
    assert wa.keys() == wb.keys() and len(wa) > 0
    moved = 0
    for k in wa:
        diff = (wb[k] - wa[k]).abs()
        assert (diff > 1e-5).float().mean() < 0.01, k
        assert diff.norm() <= 1e-3 * wa[k].norm() + 1e-6, k
        moved += int(not torch.equal(wa[k], torch.zeros_like(wa[k])))
    assert moved > 0  # LoRA B matrices start at zero: training changed them
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert sb["reference"] == sa["reference"]  # evaluation runs on the main process, same seeds
    assert sb["final"]["by_feedback"].keys() == sa["final"]["by_feedback"].keys()
