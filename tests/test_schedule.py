"""lr_schedule: one AdamW and one learning-rate schedule over the whole run (run / constant), against one per
iteration; the carried optimiser survives kills exactly."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file
from test_resume import CRASH, altlm, comparable
from test_train_smoke import jsonl


def lrs(run: Path) -> list[float]:
    return [r["lr"] for r in jsonl(run / "metrics.jsonl") if r["kind"] == "step"]


def test_schedules_follow_their_definition_and_the_run_schedule_carries_adamw(tmp_path):
    # 2 iterations x 3 steps, warmup_ratio 1/3: iteration schedule warms 1 of 3 steps, the run schedule 2 of 6
    common = ["train", "--config", "smoke", "training_mode=lora", "learning_rate=0.001", "warmup_ratio=0.34", *CRASH]
    got = {}
    for schedule in ("iteration", "run", "constant"):
        run = tmp_path / schedule
        r = altlm([*common, f"output_dir={run}", f"lr_schedule={schedule}"], tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        got[schedule] = lrs(run)
    # LambdaLR logs the rate of the *next* step: factor(i + 1) after step i
    assert got["iteration"] == [1e-3 * f for f in (2 / 2, 1 / 2, 0.0)] * 2
    assert got["run"] == [1e-3 * f for f in (2 / 2, 4 / 4, 3 / 4, 2 / 4, 1 / 4, 0.0)]
    assert got["constant"] == [1e-3] * 6
    # the carry holds AdamW's step count after iteration 1; the run schedule's moments are continued, not restarted
    carry = load_file(tmp_path / "run" / "optimizer" / "optimizer.safetensors")
    steps = {k: v for k, v in carry.items() if k.endswith(".step")}
    assert steps and all(float(v) == 6.0 for v in steps.values())  # the carry kept after the last iteration
    assert not (tmp_path / "iteration" / "optimizer").exists()


def test_run_schedule_killed_across_the_iteration_boundary_resumes_exactly(tmp_path):
    args = ["train", "--config", "smoke", "training_mode=lora", "lr_schedule=run", *CRASH]
    straight = tmp_path / "straight"
    r = altlm([*args, f"output_dir={straight}"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    killed = tmp_path / "killed"
    # iteration 1's evaluation (the 2nd, after the reference; its carry not yet kept), then iteration 2's first step
    for n, point in enumerate(["eval:2", "train:1", None]):
        r = altlm(
            [*args, f"output_dir={killed}"] if n == 0 else ["train", "--resume", str(killed)], tmp_path, failpoint=point
        )
        assert r.returncode == (0 if point is None else -9), (point, r.returncode, r.stderr[-3000:])
    a, b = comparable(straight), comparable(killed)
    for key in ("pool", "metrics", "eval_samples", "summary", "weights"):
        assert a[key] == b[key], key
    assert json.loads((killed / "state.json").read_text())["finished"] is True
