"""Bad input never costs data: each case below gets one clear line and exit code 2, and the run folder it points
at is left as it was. Plus the guards: a diverging loss stops the run with a message, an out-of-memory sampling
batch is split and retried.

"As it was": every file's bytes, except pool.sqlite, which is compared by its SQL dump — reading a pool that a
kill left with a write-ahead log folds the log into the file (same rows, other bytes) and removes -wal/-shm.
"""

from __future__ import annotations

import re
import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_resume import CRASH

from conftest import run_altlm


def killed_run(base: Path, name: str, failpoint: str) -> Path:
    run = base / name
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", ALTLM_FAILPOINT=failpoint)
    r = subprocess.run(
        [sys.executable, "-m", "altlm", "train", "--config", "smoke", f"output_dir={run}", *CRASH],
        cwd=base,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == -9, r.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad")
    done = base / "done"
    r = run_altlm("train", "--config", "smoke", f"output_dir={done}", *CRASH, "iterations=1", cwd=base)
    assert r.returncode == 0, r.stderr[-3000:]
    return {
        "base": base,
        "done": done,
        "between": killed_run(base, "between", "sample:4"),  # iteration 1 done, iteration 2 half sampled
        "midtrain": killed_run(base, "midtrain", "train:2"),
    }  # iteration 1 step 2: snapshot resume/step-1


def fingerprint(folder: Path) -> dict:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_dir() or p.name.endswith(("-wal", "-shm")):
            continue
        if p.name == "pool.sqlite":
            db = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
            try:
                out[str(p.relative_to(folder))] = "\n".join(db.iterdump())
            except sqlite3.DatabaseError:
                out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
            db.close()
        else:
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def copy_run(runs, which: str, name: str) -> Path:
    dst = runs["base"] / name
    shutil.copytree(runs[which], dst)
    return dst


def garble(path: Path) -> None:
    path.write_bytes(b"\x00garbage\xff" * 64)


def setup_case(runs, case: str, tmp: Path) -> tuple[list[str], Path | None, str]:
    """(altlm arguments, run folder that must stay untouched or None, expected words in the error line)."""
    if case == "resume with another config":
        d = copy_run(runs, "between", case)
        return ["train", "--resume", str(d), "learning_rate=0.5"], d, "different config"
    if case == "resume a finished run":
        d = copy_run(runs, "done", case)
        return ["train", "--resume", str(d)], d, "already finished"
    if case == "fresh start over an existing run":
        d = copy_run(runs, "between", case)
        return ["train", "--config", "smoke", f"output_dir={d}"], d, "already holds a run"
    if case == "corrupt pool file":
        d = copy_run(runs, "between", case)
        for side in ("pool.sqlite-wal", "pool.sqlite-shm"):
            (d / side).unlink(missing_ok=True)
        garble(d / "pool.sqlite")
        return ["train", "--resume", str(d)], d, "cannot be read"
    if case == "missing pool file":
        d = copy_run(runs, "between", case)
        for side in ("pool.sqlite", "pool.sqlite-wal", "pool.sqlite-shm"):
            (d / side).unlink(missing_ok=True)
        return ["train", "--resume", str(d)], d, "cannot be read"
    if case == "corrupt checkpoint on resume":
        d = copy_run(runs, "between", case)
        garble(d / "checkpoint" / "model.safetensors")
        return ["train", "--resume", str(d)], d, "cannot be loaded"
    if case == "corrupt training snapshot":
        d = copy_run(runs, "midtrain", case)
        garble(d / "resume" / "step-1" / "optimizer.safetensors")
        return ["train", "--resume", str(d)], d, "snapshot"
    if case == "corrupt config.yaml in the run":
        d = copy_run(runs, "between", case)
        (d / "config.yaml").write_text("iterations: [2\n")
        return ["train", "--resume", str(d)], d, "malformed YAML"
    if case == "generate from a corrupt checkpoint":
        d = copy_run(runs, "done", case)
        garble(d / "checkpoint" / "model.safetensors")
        return ["generate", "--run", str(d), "hello"], d, "cannot be loaded"
    if case == "generate from a checkpoint with corrupt metadata":
        d = copy_run(runs, "done", case)
        (d / "checkpoint" / "altlm.json").write_text("{not json")
        return ["generate", "--run", str(d), "hello"], d, "corrupt"
    if case == "eval of a corrupt checkpoint":
        d = copy_run(runs, "done", case)
        garble(d / "checkpoint" / "model.safetensors")
        return ["eval", "--run", str(d), "--num-prompts", "2", "--out", str(tmp / "e.json")], d, "cannot be loaded"
    if case == "prompt longer than the model's context":
        return ["train", "--config", "smoke", f"output_dir={tmp / 'o'}", "max_prompt_tokens=100000"], None, "context"
    if case == "prompt file with a broken JSON line":
        f = tmp / "p.jsonl"
        f.write_text('{"prompt": "a"}\n{"prompt": \n')
        return (
            ["train", "--config", "smoke", f"output_dir={tmp / 'o'}", f"prompts={f}"],
            None,
            "cannot be read as jsonl",
        )
    if case == "prompt file records without the field":
        f = tmp / "p.jsonl"
        f.write_text('{"text": "a b c"}\n{"text": "d e f"}\n')
        return ["train", "--config", "smoke", f"output_dir={tmp / 'o'}", f"prompts={f}"], None, "text"
    if case == "prompt file that is a directory":
        return ["train", "--config", "smoke", f"output_dir={tmp / 'o'}", f"prompts={tmp}"], None, "does not exist"
    if case == "recipe that is a YAML list":
        f = tmp / "r.yaml"
        f.write_text("- iterations: 2\n")
        return ["train", "--config", str(f), f"output_dir={tmp / 'o'}"], None, "mapping"
    if case == "recipe that is not UTF-8":
        f = tmp / "r.yaml"
        f.write_bytes("description: caf\xe9\n".encode("latin-1"))
        return ["train", "--config", str(f), f"output_dir={tmp / 'o'}"], None, "UTF-8"
    if case == "recipe with a wrong type":
        f = tmp / "r.yaml"
        f.write_text(yaml.safe_dump({"model": "tiny-smollm2", "batch_size": "big"}))
        return ["train", "--config", str(f), f"output_dir={tmp / 'o'}"], None, "'batch_size' must be int"
    if case == "zero iterations":
        return (
            ["train", "--config", "smoke", f"output_dir={tmp / 'o'}", "iterations=0"],
            None,
            "'iterations' must be >= 1",
        )
    if case == "negative save_steps":
        return ["train", "--config", "smoke", f"output_dir={tmp / 'o'}", "save_steps=-1"], None, "save_steps"
    if case == "exemplar outside the feedback words":
        return ["train", "--config", "smoke", f"output_dir={tmp / 'o'}", "exemplar=Nice"], None, "exemplar"
    if case == "resume of a folder that is a file":
        f = tmp / "afile"
        f.write_text("x")
        return ["train", "--resume", str(f)], None, "no config.yaml"
    raise AssertionError(case)


CASES = [
    "resume with another config",
    "resume a finished run",
    "fresh start over an existing run",
    "corrupt pool file",
    "missing pool file",
    "corrupt checkpoint on resume",
    "corrupt training snapshot",
    "corrupt config.yaml in the run",
    "generate from a corrupt checkpoint",
    "generate from a checkpoint with corrupt metadata",
    "eval of a corrupt checkpoint",
    "prompt longer than the model's context",
    "prompt file with a broken JSON line",
    "prompt file records without the field",
    "prompt file that is a directory",
    "recipe that is a YAML list",
    "recipe that is not UTF-8",
    "recipe with a wrong type",
    "zero iterations",
    "negative save_steps",
    "exemplar outside the feedback words",
    "resume of a folder that is a file",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_and_leaves_the_run_as_it_was(runs, case, tmp_path):
    args, folder, needle = setup_case(runs, case, tmp_path)
    before = fingerprint(folder) if folder else None
    r = run_altlm(*args, cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("altlm: ") and "Traceback" not in r.stderr + r.stdout, r.stderr
    assert needle.lower() in lines[0].lower(), lines[0]
    if folder:
        assert fingerprint(folder) == before
    else:
        assert not (tmp_path / "o").exists()


def test_the_killed_runs_do_resume(runs, tmp_path):
    """The folders the bad cases copied are good runs: resumed untouched, they finish. Each is resumed from a copy:
    the shared folders stay killed for the cases that run after this test (in any order)."""
    for which in ("between", "midtrain"):
        before = fingerprint(runs[which])
        run = shutil.copytree(runs[which], tmp_path / which)
        r = run_altlm("train", "--resume", str(run), cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        assert fingerprint(runs[which]) == before


def test_diverging_loss_stops_with_one_line(tmp_path):
    r = run_altlm(
        "train",
        "--config",
        "smoke",
        f"output_dir={tmp_path / 'o'}",
        *CRASH,
        "train_steps=8",
        "learning_rate=1e30",
        "max_nonfinite_steps=2",
        cwd=tmp_path,
    )
    assert r.returncode == 2, r.stderr[-3000:]
    assert "non-finite loss, batch skipped" in r.stdout
    # one line for the error; the others are the phase lines a log gets (stderr is not a terminal here)
    lines = [ln for ln in r.stderr.strip().splitlines() if not re.match(r"altlm: (evaluation|iteration) ", ln)]
    assert len(lines) == 1 and lines[0].startswith("altlm: training diverged: 2 non-finite losses in a row"), r.stderr[
        -2000:
    ]


def test_a_skipped_last_step_still_leaves_a_snapshot_to_resume_from(tmp_path):
    """lr=1e30: step 2 of 3, the phase's last, is non-finite and skipped; a kill in the evaluation that follows
    resumes from the phase's end snapshot (it used to be missing: the skip jumped past it)."""
    from test_resume import altlm

    run = tmp_path / "o"
    args = [
        "train",
        "--config",
        "smoke",
        f"output_dir={run}",
        *CRASH,
        "iterations=1",
        "train_steps=3",
        "learning_rate=1e30",
        "max_nonfinite_steps=3",
    ]
    r = altlm(args, tmp_path, failpoint="eval:2")  # eval 1 is the reference's, 2 the trained model's
    assert r.returncode == -9 and "step 2: non-finite loss, batch skipped" in r.stdout, (r.returncode, r.stdout[-2000:])
    assert (run / "resume" / "step-3").is_dir()
    r = altlm(["train", "--resume", str(run)], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (run / "summary.json").exists() and not (run / "resume").exists()


def test_out_of_memory_in_sampling_halves_the_batch(tiny, monkeypatch, capsys):
    from altlm import sampler
    from altlm.template import Template

    model, tok = tiny
    real, sizes = sampler.decode, []

    def tight(m, ids, *a, **kw):  # a device that fits 2 sequences at once
        sizes.append(ids.shape[0])
        if ids.shape[0] > 2:
            raise sampler.OOM("CUDA out of memory (simulated)")
        return real(m, ids, *a, **kw)

    monkeypatch.setattr(sampler, "decode", tight)
    requests = [(None, f"prompt number {i}") for i in range(7)]
    out = sampler.sample(
        model, tok, Template(), requests, sampler.SampleSettings(max_new_tokens=4, batch_size=7), seed=0
    )
    assert len(out) == 7 and all(s is not None and s.completion_tokens >= 1 for s in out)
    assert sizes[0] == 7 and sum(s for s in sizes if s <= 2) == 7  # 7 → 3 + 4 → (1 + 2) + (2 + 2)
    assert "out of memory sampling 7 sequences" in capsys.readouterr().out


def test_resume_of_a_run_made_before_a_config_key_existed(runs):
    """A key added to altlm after a run was made (its config.yaml lacks it) counts at its default: the run resumes
    with the default, and only a non-default value is a changed config."""
    from altlm import runfolder

    d = copy_run(runs, "between", "made before the ablation keys")
    now = yaml.safe_load((d / "config.yaml").read_text())
    older = {k: v for k, v in now.items() if k not in ("feedback_noise", "feedback_fraction")}
    (d / "config.yaml").write_text(yaml.safe_dump(older))
    progress = runfolder.check(d, now, resume=True)
    assert progress.iteration_done >= 1 and not progress.finished
    with pytest.raises(runfolder.AltlmError, match="keys differ: feedback_noise"):
        runfolder.check(d, {**now, "feedback_noise": 0.3}, resume=True)
