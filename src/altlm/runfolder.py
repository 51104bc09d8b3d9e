"""The run folder's durable progress: what `--resume` reads, and how each write survives a kill -9.

Each iteration goes through three phases — sample (with feedback), train, eval — and the run's progress record
(`Progress`) lives in pool.sqlite, written in the same transaction as the pool writes it describes (state.json
mirrors it for people and scripts). What a kill can leave half-done, and what a resume does with it:
  - sampling and feedback: finished batches sit in the pool's `staged` table and are not redone;
  - the pool commit (flush, add, re-cut quantiles, progress) is one transaction: all or nothing;
  - training: every `save_steps` steps a snapshot (trainable weights, AdamW state, torch RNG, running totals)
    is written to `resume/step-N` (a temp folder, then one rename), then the progress record names it;
  - metrics.jsonl and eval_samples.jsonl are cut back to the sizes the progress record holds, so the lines of
    work that is redone appear once;
  - checkpoint/ is replaced by two renames (checkpoint.save); `recover_checkpoint` undoes a kill between them.
All randomness derives from (seed, iteration, phase, batch), so redone work repeats the uninterrupted run's
bit for bit on CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import yaml

from .errors import AltlmError
from .evaluation import write_json

LOGS = ("metrics.jsonl", "eval_samples.jsonl")
PHASES = ("reference", "sample", "train", "eval")


@dataclass
class Progress:
    iteration_done: int = 0
    phase: str = "reference"  # the next phase to run, of iteration iteration_done + 1 ("reference": iteration 0's eval)
    step: int = 0  # train phase: optimiser steps done (a snapshot resume/step-<step> holds them when > 0)
    finished: bool = False
    files: dict = field(default_factory=dict)  # log file → size in bytes when this record was written
    record: dict = field(default_factory=dict)  # the iteration's pool (and, once trained, training) statistics

    def to_dict(self) -> dict:
        return asdict(self)


def check(run: Path, cfg: dict, resume: bool) -> Progress:
    """Read-only: the progress a run starts from. Refuses a folder holding another run, a resume of a folder that
    is not a run, was made with another config, is corrupt or is finished — before anything is written."""
    state_path, cfg_path, pool_path = run / "state.json", run / "config.yaml", run / "pool.sqlite"
    if not resume:
        if state_path.exists():
            raise AltlmError(
                f"run folder '{run}' already holds a run; pass --resume {run} to continue it, or set output_dir= to a new folder"
            )
        return Progress()
    if not state_path.exists() or not cfg_path.exists():
        raise AltlmError(
            f"--resume: '{run}' is not an altlm run folder (no state.json/config.yaml); start it without --resume"
        )
    try:
        old = yaml.safe_load(cfg_path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        raise AltlmError(
            f"--resume: '{cfg_path}' is corrupt (not YAML); restore it or start a new run folder"
        ) from None
    if not isinstance(old, dict):
        raise AltlmError(f"--resume: '{cfg_path}' is not a config mapping; restore it or start a new run folder")
    from .config import ALTConfig

    defaults = ALTConfig().to_dict()  # a key added after the run was made counts at its default (it did not exist)
    diff = sorted(k for k in cfg if k != "output_dir" and old.get(k, defaults.get(k)) != cfg[k])
    if diff:
        raise AltlmError(
            f"--resume: '{run}' was made with a different config (keys differ: {', '.join(diff)}); resume with the same config or pick another output_dir"
        )
    # A plain connection, not Pool(): reading a cleanly closed pool changes no byte of it.
    try:
        db = sqlite3.connect(f"file:{pool_path}?mode=rw", uri=True)
        try:
            row = db.execute("SELECT state FROM progress WHERE id = 1").fetchone()
        finally:
            db.close()
        saved = json.loads(row[0]) if row else None
    except (sqlite3.Error, json.JSONDecodeError) as e:
        raise AltlmError(
            f"--resume: the pool '{pool_path}' cannot be read ({e}); restore it or start a new run folder"
        ) from None
    names = {f.name for f in fields(Progress)}
    if not isinstance(saved, dict) or set(saved) - names:
        raise AltlmError(f"--resume: the pool '{pool_path}' holds no usable progress record; start a new run folder")
    progress = Progress(**saved)
    if progress.finished:
        raise AltlmError(f"--resume: '{run}' already finished all its iterations; see summary.json")
    return progress


def open_run(run: Path, config: dict, progress: Progress, resume: bool):
    """The run's Pool, ready to go on (main process). Fresh run: create the folder, the pool with its progress
    record, config.yaml, and state.json last (its presence marks a run). Resume: cut the logs back to the
    progress record and undo pool rows of an iteration whose commit the record does not include."""
    from .pool import Pool

    if not resume:
        run.mkdir(parents=True, exist_ok=True)
        pool = Pool(run / "pool.sqlite")
        pool.rollback(0)  # a fresh start in a folder that a failed start left behind
        pool.set_progress(progress.to_dict())
        tmp = run / "config.yaml.tmp"
        tmp.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
        os.replace(tmp, run / "config.yaml")
    else:
        cut_logs(run, progress.files)
        pool = Pool(run / "pool.sqlite")
        pool.rollback(progress.iteration_done + (progress.phase in ("train", "eval")) + 1)
    write_json(run / "state.json", progress.to_dict())  # a readable copy; pool.sqlite's is the one resume trusts
    return pool


def log_sizes(run: Path) -> dict:
    return {name: (run / name).stat().st_size if (run / name).exists() else 0 for name in LOGS}


def cut_logs(run: Path, sizes: dict) -> None:
    """Drop what was appended after the progress record was written: the lines of work a resume redoes."""
    for name in LOGS:
        path = run / name
        if path.exists() and path.stat().st_size > sizes.get(name, 0):
            with open(path, "r+b") as f:
                f.truncate(sizes.get(name, 0))


def failpoint(name: str) -> None:
    """Test hook for crash tests: ALTLM_FAILPOINT=<name>:<n> sends this process SIGKILL the n-th time it passes
    `name`. A no-op otherwise; the kill is real, so the test sees exactly what a power cut leaves on disk."""
    want = os.environ.get("ALTLM_FAILPOINT")
    if not want or want.rsplit(":", 1)[0] != name:
        return
    hits = failpoint.hits = getattr(failpoint, "hits", 0) + 1
    if hits >= int(want.rsplit(":", 1)[1]):
        os.kill(os.getpid(), signal.SIGKILL)


def recover_checkpoint(folder: Path) -> None:
    """A kill between checkpoint.save's two renames leaves only `<folder>.old`: that is the last complete one.
    Temp folders of a killed save are removed."""
    old = folder.with_name(folder.name + ".old")
    if not folder.exists() and old.exists():
        os.replace(old, folder)
    for tmp in folder.parent.glob(f".{folder.name}-*"):
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------ training snapshots
def _snapshot_dir(run: Path, step: int) -> Path:
    return run / "resume" / f"step-{step}"


def save_snapshot(run: Path, step: int, model, opt: torch.optim.Optimizer, extra: dict, write: bool = True) -> None:
    """Trainable weights, AdamW moments and torch's RNG after `step` steps, as safetensors (no pickle), plus
    `extra` (running loss totals) as JSON. Written to a temp folder and renamed into place. The state comes
    whole, keyed by parameter name, however the model is sharded: every process calls this (FSDP gathers the
    shards), the one with `write` writes."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    weights, state = get_state_dict(
        model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    )
    if not write:
        return
    final = _snapshot_dir(run, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".step-", dir=final.parent))
    names = {n for n, _ in model.named_parameters()}  # a tied head once, under its first name (as it is loaded)
    save_file({n: w.contiguous() for n, w in weights.items() if n in names}, tmp / "trainable.safetensors")
    moments = {f"{name}.{k}": v.contiguous() for name, s in state["state"].items() for k, v in s.items()}
    moments["rng"] = torch.get_rng_state()
    save_file(moments, tmp / "optimizer.safetensors")
    (tmp / "snapshot.json").write_text(json.dumps({"step": step, "param_groups": state["param_groups"], **extra}))
    shutil.rmtree(final, ignore_errors=True)  # a leftover of a run killed after this rename, before its progress
    os.replace(tmp, final)


def load_snapshot(run: Path, step: int, model, opt: torch.optim.Optimizer | None, folder: Path | None = None) -> dict:
    """Restore a snapshot into `model` (and `opt` and torch's RNG, unless opt is None); returns its `extra`.
    Every process reads the whole snapshot; an FSDP model keeps its shard of it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict

    folder = folder or _snapshot_dir(run, step)
    try:
        weights = load_file(folder / "trainable.safetensors")
        meta = json.loads((folder / "snapshot.json").read_text())
        moments = load_file(folder / "optimizer.safetensors")  # read even when not needed: a resume checks it early
    except (OSError, SafetensorError, json.JSONDecodeError) as e:
        raise AltlmError(
            f"--resume: training snapshot '{folder}' cannot be read ({str(e).splitlines()[0][:120]}); "
            "delete the run's resume/ folder and state to restart the iteration, or start a new run"
        ) from None
    known = {n for n, _ in model.named_parameters()}
    unknown = [n for n in weights if n not in known]
    if unknown:
        raise AltlmError(
            f"--resume: training snapshot '{folder}' holds weights this model lacks ({unknown[0]}, ...); it belongs to another run"
        )
    options = StateDictOptions(full_state_dict=True, strict=False)
    if opt is None:  # the trained weights only (a resume at the eval phase)
        set_model_state_dict(model, weights, options=options)
        return meta
    torch.set_rng_state(moments.pop("rng"))
    state: dict = {}
    for key, value in moments.items():
        name, k = key.rsplit(".", 1)  # AdamW's keys (step, exp_avg, exp_avg_sq) have no dot; parameter names do
        state.setdefault(name, {})[k] = value
    groups = meta.pop("param_groups")
    for mine, saved in zip(
        opt.param_groups, groups
    ):  # set_state_dict raises KeyError on a key opt lacks: the scheduler's initial_lr
        mine.update({k: v for k, v in saved.items() if k not in mine})
    set_state_dict(
        model, opt, model_state_dict=weights, optim_state_dict={"state": state, "param_groups": groups}, options=options
    )
    return meta


def keep_optimizer_carry(run: Path, step: int) -> None:
    """lr_schedule run/constant: keep the finished phase's snapshot (its AdamW moments) as `optimizer/`, which the
    next iteration's phase starts from. A copy, then one rename: a kill leaves the old carry or the new one; the
    progress record moves past the iteration only after this, so a resume redoes it from the same snapshot."""
    source = _snapshot_dir(run, step)
    if not source.exists():  # resumed after the rename and the prune, before the progress record: already kept
        return
    final = run / "optimizer"
    for leftover in run.glob(".optimizer-*"):  # a copy a kill interrupted
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=".optimizer-", dir=run))
    for f in source.iterdir():
        shutil.copy2(f, tmp / f.name)
    old = run / ".optimizer-old"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def load_optimizer_carry(run: Path, model, opt: torch.optim.Optimizer) -> None:
    """Restore the previous iteration's AdamW moments (and the trainable weights, equal to the checkpoint's)."""
    load_snapshot(run, 0, model, opt, folder=run / "optimizer")


def prune_snapshots(run: Path, keep: int | None) -> None:
    """Remove every snapshot but `keep` (None: all, once the iteration's checkpoint is saved)."""
    folder = run / "resume"
    if keep is None:
        shutil.rmtree(folder, ignore_errors=True)
    for p in folder.glob("*") if folder.exists() else []:
        if p.name != f"step-{keep}":
            shutil.rmtree(p, ignore_errors=True)
