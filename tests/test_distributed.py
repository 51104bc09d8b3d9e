"""Two processes (gloo on CPU) run the same ALT iterations as one process with the same global batch: DDP and FSDP,
launched by `accelerate launch` with the shipped configs and by torchrun.

Sampling batches and feedback chunks are dealt out round-robin with per-batch seeds, so the samples, scores and
pool are identical; each optimiser step sees half the batch per process and DDP (FSDP) averages (reduce-scatters)
gradients of a loss normalised by the global token count, so losses and weights agree to float rounding (the
reductions sum in another order). Losses: rtol 1e-4. Weights: relative L2 difference < 1e-3 and fewer than 1% of
elements off by more than 1e-5 — not elementwise, because Adam's update is ≈ lr·sign(g) for an element whose
gradient is ~0, so rounding noise in such a gradient can move that one element by up to lr (measured: 1 of 2048
elements off by 2e-5, all others within 1e-6).

`accelerate launch --cpu --num_processes 2` starts one process with accelerate 1.15 unless MPI is set up; a config
file with distributed_type MULTI_GPU or FSDP and `--num_processes 2` starts two through torchrun, and altlm asks for
the CPU (gloo) itself where there is no CUDA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_smoke import SMALL, jsonl

VARIANTS = {
    "lora": ["training_mode=lora"],
    "full": ["training_mode=full"],
    "quark": ["training_mode=lora", "template=quark"],
}
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
# One iteration: what follows training is sampling, where a 1e-6 weight difference can flip a drawn token now
# and then, and from there on the runs differ legitimately.
# batch_size=5: the 2 processes hold 3 and 2 rows of each step, so in micro-batches of 1 the second one needs a
# filler pass (weight 0) to make as many passes as the first — which FSDP, gathering weights in every pass, requires.
ARGS = [
    "train",
    "--config",
    "smoke",
    "training_mode=lora",
    *SMALL,
    "iterations=1",
    "sample_batch_size=4",
    "train_steps=6",
    "batch_size=5",
    # the reference cache runs with one process only; the one-process baseline must take the same (full KL) path
    "reference_cache=false",
]


def run(cmd: list[str], cwd: Path, failpoint: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env.pop("ALTLM_FAILPOINT", None)
    if failpoint:
        env["ALTLM_FAILPOINT"] = failpoint
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


needs_gloo = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="this torch build has no gloo backend",
)


def torchrun() -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # torchrun's own store on a port it binds itself: no port picked here, so none to race for
        "--nproc_per_node",
        "2",
    ]


def accelerate(config: str) -> list[str]:
    """`accelerate launch` with a shipped config, 2 processes on this CPU (gloo: altlm asks for cpu=True without CUDA)."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CONFIGS / f"{config}.yaml"),
        "--num_processes",
        "2",
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        "0",  # bound by torch's static rendezvous itself (a port picked here and released could be taken meanwhile)
    ]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict[str, Path]:
    """The reference runs: one process, LoRA, full fine-tuning, and LoRA with Quark's trainable reward tokens."""
    base, out = tmp_path_factory.mktemp("one"), {}
    for name, extra in VARIANTS.items():
        out[name] = base / name
        r = run([sys.executable, "-m", "altlm", *ARGS, *extra, f"output_dir={out[name]}"], base)
        assert r.returncode == 0, r.stderr[-3000:]
    return out


@needs_gloo
def test_two_processes_and_micro_batches_match_one_process(tmp_path, one_process):
    """DDP, and gradient accumulation: one process in micro-batches of 3 + 2 rows, and two processes in
    micro-batches of 1 row (DDP's all-reduce skipped until the last one) give the whole-batch step."""
    for name, launcher, extra in [
        ("two", accelerate("ddp"), []),
        ("one_micro", [sys.executable], ["micro_batch_size=3"]),
        ("two_micro", torchrun(), ["micro_batch_size=1"]),
    ]:
        r = run([*launcher, "-m", "altlm", *ARGS, *extra, f"output_dir={tmp_path / name}"], tmp_path)
        assert r.returncode == 0, (name, r.stderr[-5000:])
        assert ("2 processes (gloo), sharding: ddp" in r.stdout) == name.startswith("two"), r.stdout[-2000:]
        assert_same_run(one_process["lora"], tmp_path / name)


@needs_gloo
def test_fsdp_matches_one_process_and_resumes_after_a_kill(tmp_path, one_process):
    """FSDP2 shards the weights over the 2 processes; sampling, evaluation and the checkpoint gather them whole.
    LoRA with ZeRO-3-style sharding is killed (SIGKILL, both processes) after its 4th step, past the step-2
    snapshot, and resumed: it ends as one process does. Full fine-tuning with ZeRO-2-style sharding (the tied
    embedding/head sharded with the root) also matches, its micro-batches reduce-scattered one by one, and so does
    Quark's LoRA, whose reward-token rows train through peft's trainable-token wrapper."""
    killed = tmp_path / "fsdp_lora"
    r = run(
        [*accelerate("fsdp"), "-m", "altlm", *ARGS, "save_steps=2", f"output_dir={killed}"],
        tmp_path,
        failpoint="train:4",
    )
    assert r.returncode != 0 and not (killed / "checkpoint").exists(), r.stderr[-3000:]
    assert "2 processes (gloo), sharding: fsdp" in r.stdout  # (sharding=auto: what the accelerate config asks for)
    assert json.loads((killed / "state.json").read_text())["step"] == 2
    r = run([*accelerate("fsdp"), "-m", "altlm", "train", "--resume", str(killed)], tmp_path)
    assert r.returncode == 0, r.stderr[-5000:]
    assert_same_run(one_process["lora"], killed)

    for name, extra in [("full", ["sharding=fsdp_grad_op", "micro_batch_size=1"]), ("quark", ["sharding=fsdp"])]:
        r = run([*torchrun(), "-m", "altlm", *ARGS, *VARIANTS[name], *extra, f"output_dir={tmp_path / name}"], tmp_path)
        assert r.returncode == 0, (name, r.stderr[-5000:])
        assert f"2 processes (gloo), {extra[0].replace('=', ': ')}" in r.stdout
        assert_same_run(
            one_process[name],
            tmp_path / name,
            weights="model.safetensors" if name == "full" else "adapter_model.safetensors",
        )


def assert_same_run(one: Path, two: Path, weights: str = "adapter_model.safetensors") -> None:
    import sqlite3

    cols = "iteration, prompt_id, completion, score, bucket, feedback, truncated"
    rows = [
        sqlite3.connect(d / "pool.sqlite").execute(f"SELECT {cols} FROM samples ORDER BY id").fetchall()
        for d in (one, two)
    ]
    assert len(rows[0]) == 6 * 2 and rows[1] == rows[0]  # the same samples, scores and feedback

    steps = [[x for x in jsonl(d / "metrics.jsonl") if x["kind"] == "step"] for d in (one, two)]
    assert len(steps[0]) == len(steps[1]) == 6
    for a, b in zip(*steps):
        assert b["tokens"] == a["tokens"]
        for k in ("loss", "nll", "kl", "entropy"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["iteration"], a["step"], k)

    wa, wb = (load_file(d / "checkpoint" / weights) for d in (one, two))
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


@pytest.mark.parametrize(
    "env, sharding",
    [
        ({}, "ddp"),
        ({"ACCELERATE_USE_FSDP": "true"}, "fsdp"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_RESHARD_AFTER_FORWARD": "false"}, "fsdp_grad_op"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_RESHARD_AFTER_FORWARD": "shard_grad_op"}, "fsdp_grad_op"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_RESHARD_AFTER_FORWARD": "full_shard"}, "fsdp"),
    ],
)
def test_sharding_auto_reads_the_accelerate_config(monkeypatch, env, sharding):
    """What `accelerate launch` exports for FSDP2 configs (true/false) and FSDP1 ones (a strategy name)."""
    from altlm.distributed import _sharding_from_accelerate

    for k in ("ACCELERATE_USE_FSDP", "FSDP_RESHARD_AFTER_FORWARD", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert _sharding_from_accelerate() == sharding


def test_a_deepspeed_launch_stops_with_one_line_and_writes_nothing(tmp_path):
    env = dict(os.environ, ACCELERATE_USE_DEEPSPEED="true")
    r = subprocess.run(
        [sys.executable, "-m", "altlm", *ARGS, f"output_dir={tmp_path / 'ds'}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "DeepSpeed" in lines[0] and "configs/accelerate/fsdp.yaml" in lines[0], r.stderr
    assert not (tmp_path / "ds").exists()


@needs_gloo
def test_sharding_benchmark_shows_fsdp_halving_the_training_state(tmp_path):
    """benchmarks/sharding.py --quick (tiny model): under FSDP each of 2 processes holds half the weights,
    gradients and AdamW state that one process (or a DDP process) holds, and can still gather them whole."""
    out = tmp_path / "sharding.json"
    r = subprocess.run(
        [sys.executable, str(CONFIGS.parents[1] / "benchmarks" / "sharding.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    got = {(s["processes"], s["sharding"]): s for s in json.loads(out.read_text())["settings"]}
    assert got[(2, "ddp")]["state_vs_one_process"] == 1.0
    for sharding in ("fsdp", "fsdp_grad_op"):
        s = got[(2, sharding)]
        assert s["state_vs_one_process"] == pytest.approx(0.5, abs=0.01) and s["gather_s"] > 0, s
    assert "state_vs_one_process" in r.stdout
