"""What each `sharding` costs and saves per process: training state (weights, gradients, AdamW moments) held, resident
memory, optimiser-step time and the time to gather whole weights for sampling, on the offline SmolLM2-135M with full
fine-tuning — one process, then 2 processes under DDP, FSDP (ZeRO-3-style) and FSDP grad-op (ZeRO-2-style).

    .venv/bin/python benchmarks/sharding.py          # ≈ 3 min on 2 cores (gloo); --quick: the tiny model, 1 step

Writes benchmarks/results/sharding.json and prints a table. Each setting runs under torchrun through altlm's own
`Processes.wrap` / `Processes.full` (distributed.py), on a fixed batch of `--batch` sequences × `--seq` tokens
split over the processes. State bytes are exact (local shards of parameters, gradients and optimiser state, after
a step); RSS is the process's resident memory after the steps (freed memory handed back with malloc_trim, before
the gather), which also holds the libraries, DDP's gradient buckets and the allocator's cache; gather_s is the time
to build the whole copy that sampling uses. On 2 CPU cores two processes share the cores, so step time measures
communication overhead, not speed-up.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))


def local_bytes(t) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def worker(args) -> None:
    import resource

    import torch

    from altlm import models
    from altlm.distributed import Processes

    torch.set_num_threads(1)
    procs = Processes(args.sharding)
    model = models.prepare_for_training(models.load_model(args.model, seed=0), "full", 1.0, {}, [])
    model.to(procs.device)
    n_params = sum(p.numel() for p in model.parameters())
    amp = models.autocast_dtype("auto", procs.device)
    train = procs.wrap(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g)[procs.rank :: procs.world].to(
        procs.device
    )
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        with torch.autocast(procs.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = train(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)  # keep the gradients: they are part of the state being measured
        times.append(time.perf_counter() - t)
    state = {
        "weights": sum(local_bytes(p) for p in model.parameters()),
        "gradients": sum(local_bytes(p.grad) for p in params if p.grad is not None),
        "optimizer": sum(local_bytes(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v)),
    }
    del loss
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed memory back, or RSS keeps the model as it was loaded whole
    with open(
        "/proc/self/statm"
    ) as f:  # before the gather below, whose whole copy sampling holds only while it samples
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    t = time.perf_counter()
    whole = procs.full(model)  # what sampling gets: a plain module with every weight
    gather_s = time.perf_counter() - t
    assert sum(p.numel() for p in whole.parameters()) == n_params
    mine = {
        "rank": procs.rank,
        "compute": "bf16" if amp is not None else "fp32",
        **{f"{k}_mb": v / 2**20 for k, v in state.items()},
        "state_mb": sum(state.values()) / 2**20,
        "rss_mb": rss / 2**20,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "step_s": min(times[1:] or times),
        "gather_s": gather_s,
    }
    rows = procs.merge({procs.rank: mine})
    if procs.main:
        Path(args.out).write_text(json.dumps([rows[r] for r in sorted(rows)]))
    procs.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the tiny random model, 2 steps: a check that it runs")
    ap.add_argument("--out", default=str(ROOT / "results" / "sharding.json"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--sharding", default="ddp", help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=8, help="sequences per optimiser step (all processes)")
    ap.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    ap.add_argument("--steps", type=int, default=3, help="optimiser steps (the fastest after the first is reported)")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    model = "tiny-smollm2" if args.quick else "smollm2-135m"
    steps = 2 if args.quick else args.steps
    settings = [(1, "ddp"), (2, "ddp"), (2, "fsdp"), (2, "fsdp_grad_op")]
    results = []
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    for n, sharding in settings:
        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                str(n),
                __file__,
                "--worker",
                "--sharding",
                sharding,
                "--model",
                model,
                "--batch",
                str(args.batch),
                "--seq",
                str(args.seq),
                "--steps",
                str(steps),
                "--out",
                tmp.name,
            ]
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"{n} process(es), {sharding}: failed\n{r.stderr[-3000:]}")
            per_rank = json.loads(Path(tmp.name).read_text())
        worst = max(per_rank, key=lambda x: x["state_mb"])
        results.append(
            {
                "processes": n,
                "sharding": sharding if n > 1 else "none",
                **{k: round(v, 3) if isinstance(v, float) else v for k, v in worst.items() if k != "rank"},
            }
        )
    base = results[0]["state_mb"]
    for r in results:
        r["state_vs_one_process"] = round(r["state_mb"] / base, 3)
    out = {
        "model": model,
        "training_mode": "full",
        "batch": args.batch,
        "seq": args.seq,
        "steps": steps,
        "cpu_threads_per_process": 1,
        "settings": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    cols = [
        "processes",
        "sharding",
        "compute",
        "weights_mb",
        "gradients_mb",
        "optimizer_mb",
        "state_mb",
        "state_vs_one_process",
        "rss_mb",
        "step_s",
        "gather_s",
    ]
    print(" | ".join(cols))
    for r in results:
        print(" | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
