"""Throughput against the roofline on this machine: matmul GFLOP/s (fp32 and bf16), sampling and training
tokens/s with the offline SmolLM2-135M, feedback scoring texts/s, and pool draw time against pool size.

    .venv/bin/python benchmarks/throughput.py            # ≈ 6–9 min on 2 cores; --quick for a 1-minute check

Writes benchmarks/results/throughput.json and prints a table. FLOPs are counted the usual way for a dense
decoder: 2·N per token for a forward pass (N = parameters outside the embedding), 6·N for forward + backward
with weight gradients (full), 4·N for LoRA (activation gradients only, adapters are negligible) plus 2·N for
the reference forward when KL is on; the LM head is a matmul and counts (tied embeddings: once as the head).
Attention's quadratic term is left out (sequences here are < 100 tokens). "roofline" is the faster of the
fp32 and bf16 matmul peaks measured at the model's own shapes and at a large square.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))
sys.path.insert(0, str(ROOT))  # common.py, beside this script

from altlm import models, refcache  # noqa: E402
from altlm.loss import (  # noqa: E402
    alt_loss,
    block_inputs,
    head_logits,
    head_loss,
    layer_input,
    tail_target_hidden,
    target_hidden,
    target_hidden_from,
    target_logits,
)
from altlm.pool import Pool, Row  # noqa: E402
from altlm.sampler import SampleSettings, inference_model, sample  # noqa: E402
from altlm.template import Template  # noqa: E402
from common import write_atomic  # noqa: E402


def best_of(fn, reps: int) -> float:
    fn()  # warm-up: allocators, oneDNN kernel selection
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def interleaved(paths: dict, reps: int) -> dict[str, list[float]]:
    """Seconds per call of each path: one warm-up call each, then `reps` rounds calling every path in turn, so a
    change in the machine's load hits every path alike."""
    for f in paths.values():
        f()
    times = {name: [] for name in paths}
    for _ in range(reps):
        for name, f in paths.items():
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
    return times


def matmul_gflops(m: int, k: int, n: int, dtype, reps: int = 5) -> float:
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    return 2 * m * k * n / best_of(lambda: a @ b, reps) / 1e9


def roofline(quick: bool) -> dict:
    # the shapes the model runs: [tokens, 576] @ [576, 1536] (MLP) and [tokens, 576] @ [576, 49152] (head)
    shapes = (
        [(2048, 2048, 2048), (1024, 576, 1536), (512, 576, 49152)]
        if not quick
        else [(1024, 1024, 1024), (512, 576, 1536)]
    )
    out = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        out[name] = {f"{m}x{k}x{n}": round(matmul_gflops(m, k, n, dt), 1) for m, k, n in shapes}
    out["peak_fp32"] = max(out["fp32"].values())
    out["peak_bf16"] = max(out["bf16"].values())
    out["roofline_gflops"] = max(out["peak_fp32"], out["peak_bf16"])
    out["roofline_dtype"] = "bf16" if out["peak_bf16"] >= out["peak_fp32"] else "fp32"
    return out


def dense_params(model) -> int:
    """Parameters that do matmul work per token: everything but the input embedding, plus the LM head (tied)."""
    emb = model.get_input_embeddings().weight.numel()
    return sum(p.numel() for p in model.parameters()) - emb + model.get_output_embeddings().weight.numel()


def prompts(n: int) -> list[str]:
    from altlm.data import fortune_items

    items = [x for x in fortune_items(False) if len(x.split()) > 10]
    rng = random.Random(0)
    return [" ".join(x.split()[: rng.randint(4, 8)]) for x in rng.sample(items, n)]


def bench_sampling(model, tok, amp, batches: list[int], new_tokens: int, n_params: int) -> list[dict]:
    inf = inference_model(model, amp)
    rows = []
    for b in batches:
        reqs = [(None, p) for p in prompts(b)]
        settings = SampleSettings(1.0, 1.0, new_tokens, new_tokens, b, 64)  # min = max: every row runs the full length
        sample(inf, tok, Template(), reqs[: min(b, 8)], settings, seed=0)  # warm-up
        t = time.perf_counter()
        out = sample(inf, tok, Template(), reqs, settings, seed=0)
        dt = time.perf_counter() - t
        toks = sum(s.completion_tokens for s in out)
        ctx = sum(s.prompt_tokens for s in out)
        flops = 2 * n_params * (toks + ctx)  # prefill + one token per step
        rows.append(
            {
                "batch": b,
                "tokens": toks,
                "seconds": round(dt, 2),
                "tokens_per_s": round(toks / dt, 1),
                "gflops": round(flops / dt / 1e9, 1),
            }
        )
    return rows


def bench_training(model, tok, amp, mode: str, batches: list[int], steps: int, n_params: int, kl: bool) -> list[dict]:
    lora = dict(
        r=16,
        alpha=32,
        dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        layers=1.0,
        train_new_tokens=False,
    )
    import copy

    m = models.prepare_for_training(copy.deepcopy(model), mode, 0.3, lora, [])
    models.contiguous_lm_head(m)
    models.cast_frozen_linears(m, amp if mode == "lora" else None)  # as the trainer does
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    texts = prompts(max(batches))
    rows = []
    for b in batches:
        inputs = [tok(t, add_special_tokens=False).input_ids for t in texts[:b]]
        targets = [
            tok(
                " and then the rest of a twenty token completion goes on and on until it stops here.",
                add_special_tokens=False,
            ).input_ids
            for _ in range(b)
        ]

        def step():
            with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
                logits, tgt, mask = target_logits(m, inputs, targets, tok.pad_token_id)
                ref = None
                if kl:
                    with torch.no_grad():
                        if mode == "lora":
                            with m.disable_adapter():
                                ref = target_logits(m, inputs, targets, tok.pad_token_id)[0]
                        else:
                            ref = target_logits(m, inputs, targets, tok.pad_token_id)[0]
            loss, _ = alt_loss(logits, tgt, mask, ref, 0.05 if kl else 0.0, 0.06)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()  # warm-up
        t = time.perf_counter()
        for _ in range(steps):
            step()
        dt = (time.perf_counter() - t) / steps
        toks = sum(len(i) + len(t) for i, t in zip(inputs, targets))
        per_token = (4 if mode == "lora" else 6) * n_params + (2 * n_params if kl else 0)
        rows.append(
            {
                "batch": b,
                "tokens_per_step": toks,
                "seconds_per_step": round(dt, 3),
                "tokens_per_s": round(toks / dt, 1),
                "gflops": round(per_token * toks / dt / 1e9, 1),
            }
        )
    return rows


def demo_batch(tok, b: int, seed: int = 0) -> tuple[list, list, list]:
    """A batch shaped as the demo's: `[tag][<|separator|>]` + a 4-8 word fortune prefix, ≤ 20 completion tokens,
    and the same prompt without the tag (the reference's input). Completions are real fortune text."""
    from altlm.data import fortune_items

    rng = random.Random(seed)
    items = [x.split() for x in fortune_items(False) if len(x.split()) > 24]
    picked = rng.sample(items, b)
    tag = tok("Most Positive", add_special_tokens=False).input_ids + [tok.eos_token_id]  # the separator copies EOS
    prompts = [tok(" ".join(w[: rng.randint(4, 8)]), add_special_tokens=False).input_ids for w in picked]
    targets = [tok(" " + " ".join(w[8:24]), add_special_tokens=False).input_ids[: rng.randint(12, 20)] for w in picked]
    return [tag + p for p in prompts], prompts, targets


def alt_loss_before(policy_logits, targets, mask, ref_logits, kl_coef, entropy_coef, vocab_size):
    """loss.alt_loss as it was before the one-softmax rewrite (reference logits, KL(reference‖policy)): a log-softmax
    for the NLL, another for the entropy and KL, and the entropy's graph even at coefficient 0. The old path."""
    lp_all = policy_logits[mask].float()
    nll = -torch.log_softmax(lp_all, -1).gather(-1, targets[mask].unsqueeze(-1)).squeeze(-1)
    logp = torch.log_softmax(lp_all[:, :vocab_size], -1)
    p = logp.exp()
    entropy = -(p * logp).sum(-1)
    ref_logp = torch.log_softmax(ref_logits[mask].float()[:, :vocab_size], -1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    return (nll - entropy_coef * entropy + kl_coef * kl).mean()


# the LoRA paths the batch sweep compares; new_staged_first_draw is derived (bench_lora_paths)
BEST_BATCH_PATHS = (
    "old",
    "new_hit_blocks",
    "new_staged_first_draw_padded",
    "new_hit_packed",
    "new_miss_shared_packed",
    "new_staged_first_draw",
)
STAGE_OPS = ("stage_64_rows", "stage_64_rows_padded")  # (measured per 64 rows, not per training batch)
STAGE_ROWS = 64  # the trainer's default stage_first_draws
PHASE_FIRST_DRAWS = 256  # what a demo phase stages: 2,254 and 2,301 first draws over 9 phases (make demo, two runs)


def bench_lora_paths(model, tok, amp, batches: list[int], steps: int, n_params: int, lora_layers: float) -> list[dict]:
    """The LoRA training step at the demo's shapes and loss (KL 0.1, no entropy bonus), old path against new, side
    by side in one process: old = the step as it was (a reference forward at every step, reference_cache=false;
    SDPA attention; peft's input casts; alt_loss_before);
    new = the cached reference statistics (reference_cache=true, loss.alt_loss ref_stats) — `new_hit` when every
    row of the batch is cached (steady state), `new_miss` when none is (the step that first draws the rows pays one
    reference forward for them) — with SDPA, and `_eager` the same with eager attention (attn_implementation=auto
    on CPU). The demo's reference reads the tag (reference_input: conditioned): `new_miss_conditioned_eager` is its
    first draw with a whole reference forward, `new_miss_shared_eager` with the forward starting at the lowest
    adapted block from the policy's activations (share_frozen_layers). `_grouped`: the same with grouped attention
    (eager without repeat_kv's copies; attn_implementation=auto on CPU for SmolLM2). `_fused`: grouped, and the head
    inside the loss (fused_loss, loss.head_loss). `_blocks`: fused, and the rows' inputs to the lowest
    adapted block cached (cache_frozen_layers): a cached row runs the adapted blocks only; its first draw runs the
    frozen blocks once, without gradient, and the reference from their output. `_packed` (the default): `_blocks`
    with the rows packed end to end, no padding (pack_rows, models.PackedRows). `stage_64_rows`: what
    stage_first_draws does before a phase's first step (the frozen blocks and the reference statistics, no
    gradient) for the 256 first draws of a demo phase, sorted by length, 64 rows a batch; reported per 64 rows,
    packed, and `_padded` left-padded. `new_staged_first_draw` is derived from the same run's medians: a packed
    cached step plus the staging of its rows (batch × stage_64_rows / 64), a first draw's whole cost when staged;
    `_padded`: both padded (the previous default)."""
    import copy

    lora = dict(
        r=16,
        alpha=32,
        dropout=0.0,
        layers=lora_layers,
        train_new_tokens=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    kl, entropy = 0.1, 0.0  # the demo's coefficients
    n_layers = model.config.num_hidden_layers
    shared = n_layers - max(1, round(n_layers * lora_layers))  # models.prepare_for_training's lowest adapted block
    v = len(tok)
    autocast = lambda: torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None)  # noqa: E731
    nets = {}
    for attn in ("old", "sdpa", "eager", "grouped"):
        m = models.prepare_for_training(copy.deepcopy(model), "lora", 0.3, lora, [])
        models.set_attention(m.get_base_model(), "sdpa" if attn == "old" else attn, torch.device("cpu"))
        models.contiguous_lm_head(m)
        models.cast_frozen_linears(m, amp)
        if (
            attn == "old"
        ):  # peft's cast of every adapter input to fp32 and back, as before cast_frozen_linears stopped it
            for layer in m.modules():
                if hasattr(layer, "cast_input_dtype_enabled"):
                    layer.cast_input_dtype_enabled = True
        nets[attn] = (m, torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5))
    head_weights = {}  # each net's frozen head: in the matmul's dtype (as the trainer keeps it) and as stored
    for m, _ in nets.values():
        head = m.get_output_embeddings().weight.detach()
        head_weights[m] = (head.to(amp) if amp is not None else head, head)
    rows = []
    stage_inputs, _, stage_targets = demo_batch(tok, PHASE_FIRST_DRAWS, seed=1)
    stage_order = sorted(range(PHASE_FIRST_DRAWS), key=lambda i: len(stage_inputs[i]) + len(stage_targets[i]))
    stage_inputs = [stage_inputs[i] for i in stage_order]
    stage_targets = [stage_targets[i] for i in stage_order]

    def reference_from_blocks(m, acts, inputs, targets, pack):  # the statistics of the reference reading the tag,
        # from the rows' inputs to the lowest adapted block (trainer.fill_reference_cache under cache_frozen_layers)
        with torch.no_grad(), m.disable_adapter(), autocast():
            hidden = target_hidden_from(m, acts, inputs, targets, tok.pad_token_id, shared, pack)[0]
        return refcache.statistics(hidden, *head_weights[m], v)

    def stage(pack):  # trainer.stage_first_draws for a phase's first draws: sorted by length, STAGE_ROWS a batch,
        # the frozen blocks, then the reference from their output
        m = nets["grouped"][0]
        for start in range(0, PHASE_FIRST_DRAWS, STAGE_ROWS):
            inputs = stage_inputs[start : start + STAGE_ROWS]
            targets = stage_targets[start : start + STAGE_ROWS]
            with autocast():
                acts = block_inputs(m, inputs, targets, tok.pad_token_id, shared, pack)
            reference_from_blocks(m, acts, inputs, targets, pack)

    stage_toks = sum(len(i) + len(t) for i, t in zip(stage_inputs, stage_targets))
    for b in batches:
        inputs, ref_inputs, targets = demo_batch(tok, b)

        def reference_stats(m, ref_in, record=None):
            with torch.no_grad(), m.disable_adapter(), autocast():
                if record:
                    hidden = tail_target_hidden(m, record, shared, list(range(b)), targets, tok.pad_token_id)
                else:
                    hidden = target_hidden(m, ref_in, targets, tok.pad_token_id)[0]
            return refcache.statistics(hidden, head_weights[m][0], head_weights[m][1], v)

        cached = {attn: reference_stats(m, ref_inputs) for attn, (m, _) in nets.items() if attn != "old"}
        with autocast():
            cached_acts = block_inputs(nets["grouped"][0], inputs, targets, tok.pad_token_id, shared)

        def old_step():
            m, opt = nets["old"]
            with autocast():
                logits, tgt, mask = target_logits(m, inputs, targets, tok.pad_token_id)
                with torch.no_grad(), m.disable_adapter():
                    ref = target_logits(m, ref_inputs, targets, tok.pad_token_id)[0]
            loss = alt_loss_before(logits, tgt, mask, ref, kl, entropy, v)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def new_step(attn, hit, reference="prompt", fused=False, blocks=False, pack=False):
            m, opt = nets[attn]
            if hit:
                stats = cached[attn]
            elif reference != "shared":
                stats = reference_stats(m, ref_inputs if reference == "prompt" else inputs)
            record_input = (
                layer_input(m, shared) if reference == "shared" and not blocks else contextlib.nullcontext({})
            )
            with autocast(), record_input as record:
                if blocks:  # cache_frozen_layers: the frozen blocks' output, stored (hit) or computed now (first draw)
                    acts = cached_acts if hit else block_inputs(m, inputs, targets, tok.pad_token_id, shared, pack)
                    hidden, tgt = target_hidden_from(m, acts, inputs, targets, tok.pad_token_id, shared, pack)
                else:
                    hidden, tgt = target_hidden(m, inputs, targets, tok.pad_token_id)
            if reference == "shared" and blocks:
                stats = reference_from_blocks(m, acts, inputs, targets, pack)
            elif reference == "shared":
                stats = reference_stats(m, None, record)
            if fused:
                loss, _ = head_loss(hidden, head_weights[m][0], tgt, kl, entropy, vocab_size=v, ref_stats=stats)
            else:
                with autocast():
                    logits = head_logits(m, hidden)
                loss, _ = alt_loss(logits, tgt, None, None, kl, entropy, vocab_size=v, ref_stats=(hidden, *stats))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        paths = {
            "old": old_step,
            "new_hit": lambda: new_step("sdpa", True),
            "new_miss": lambda: new_step("sdpa", False),
            "new_hit_eager": lambda: new_step("eager", True),
            "new_miss_eager": lambda: new_step("eager", False),
            "new_miss_conditioned_eager": lambda: new_step("eager", False, "conditioned"),
            "new_miss_shared_eager": lambda: new_step("eager", False, "shared"),
            "new_hit_grouped": lambda: new_step("grouped", True),
            "new_miss_shared_grouped": lambda: new_step("grouped", False, "shared"),
            "new_hit_fused": lambda: new_step("grouped", True, fused=True),
            "new_miss_shared_fused": lambda: new_step("grouped", False, "shared", fused=True),
            "new_hit_blocks": lambda: new_step("grouped", True, fused=True, blocks=True),
            "new_miss_shared_blocks": lambda: new_step("grouped", False, "shared", fused=True, blocks=True),
            "new_hit_packed": lambda: new_step("grouped", True, fused=True, blocks=True, pack=True),
            "new_miss_shared_packed": lambda: new_step("grouped", False, "shared", fused=True, blocks=True, pack=True),
            "stage_64_rows": lambda: stage(True),
            "stage_64_rows_padded": lambda: stage(False),
        }
        if b > 32:  # the batch sweep's larger sizes: the old path against the defaults only (an old step takes ~9 s)
            paths = {k: v for k, v in paths.items() if k in BEST_BATCH_PATHS or k in STAGE_OPS}
        times = interleaved(paths, steps)
        per_row = {}
        for op in STAGE_OPS:
            per_row[op] = sorted(times.pop(op))[steps // 2] / PHASE_FIRST_DRAWS  # the median staging, per row
            rows.append(  # (measured beside batch b's steps; its own batch is STAGE_ROWS)
                {
                    "path": op,
                    "batch": b,
                    "seconds_per_step": round(per_row[op] * STAGE_ROWS, 3),
                    "examples_per_s": round(1 / per_row[op], 2),
                    "tokens_per_s": round(stage_toks / (per_row[op] * PHASE_FIRST_DRAWS), 1),
                    "gflops": round(2 * n_params * stage_toks / (per_row[op] * PHASE_FIRST_DRAWS) / 1e9, 1),
                }
            )
        for derived, step, op in (
            ("new_staged_first_draw", "new_hit_packed", "stage_64_rows"),
            ("new_staged_first_draw_padded", "new_hit_blocks", "stage_64_rows_padded"),
        ):  # a cached step and the staging of its b rows
            times[derived] = [t + b * per_row[op] for t in times[step]]
        toks = sum(len(i) + len(t) for i, t in zip(inputs, targets))
        ref_toks = sum(len(i) + len(t) for i, t in zip(ref_inputs, targets))
        for k, ts in times.items():
            dt = sorted(ts)[len(ts) // 2]  # the median step
            # FLOPs: 2N per token forward, 2N per token backward through the adapted top blocks (activation
            # gradients; lora_layers of them), + 2N per reference token when the reference forward runs
            ref_flops = 2 * n_params * (toks if "conditioned" in k else ref_toks)
            if "shared" in k:  # the reference runs the adapted blocks only
                ref_flops = 2 * lora_layers * n_params * toks
            cached = k in ("new_hit_blocks", "new_hit_packed")
            policy_forward = 2 * lora_layers if cached else 2  # cached: the adapted blocks only
            flops = (policy_forward + 2 * lora_layers) * n_params * toks + (0 if "hit" in k else ref_flops)
            if k.startswith("new_staged_first_draw"):  # a cached step, and the staging: frozen + reference's adapted
                flops = (2 * lora_layers + 2 * lora_layers) * n_params * toks + 2 * n_params * toks
            rows.append(
                {
                    "path": k,
                    "batch": b,
                    "seconds_per_step": round(dt, 3),
                    "examples_per_s": round(b / dt, 2),
                    "tokens_per_s": round(toks / dt, 1),
                    "gflops": round(flops / dt / 1e9, 1),
                }
            )
    return rows


def bench_sampler_vs_generate(model, tok, amp, b: int, new_tokens: int, reps: int) -> list[dict]:
    """altlm's sampler (top-p by rejection, and by sort) against HF `generate` on the same weights and dtype:
    the same requests, top-p 0.9, T 1.0, a fixed number of new tokens (min = max), interleaved repetitions."""
    import dataclasses

    inf = inference_model(model, amp)
    reqs = [(None, p) for p in prompts(b)]
    settings = SampleSettings(1.0, 0.9, new_tokens, new_tokens, b, 64)
    ids = [tok(p, add_special_tokens=False).input_ids for _, p in reqs]
    from altlm.template import left_pad

    pad_ids, attn, _ = left_pad(ids, tok.pad_token_id)

    def generate():
        with torch.no_grad():
            inf.generate(
                input_ids=pad_ids,
                attention_mask=attn,
                do_sample=True,
                top_p=0.9,
                temperature=1.0,
                top_k=0,
                min_new_tokens=new_tokens,
                max_new_tokens=new_tokens,
                pad_token_id=tok.pad_token_id,
            )

    paths = {
        "altlm_reject": lambda: sample(inf, tok, Template(), reqs, settings, seed=0),
        "altlm_sort": lambda: sample(
            inf, tok, Template(), reqs, dataclasses.replace(settings, top_p_method="sort"), seed=0
        ),
        "hf_generate": generate,
    }
    times = interleaved(paths, reps)
    out = []
    for k, ts in times.items():
        dt = min(ts)
        out.append(
            {
                "path": k,
                "batch": b,
                "new_tokens": new_tokens,
                "seconds": round(dt, 2),
                "tokens_per_s": round(b * new_tokens / dt, 1),
            }
        )
    return out


def bench_sampling_paths(
    model, tok, amp, n_prompts: int, k: int, new_tokens: int, reps: int, n_params: int, sweep: list[int]
) -> list[dict]:
    """The sampler at the demo's shape: k samples of each prompt in one batch, as training rounds and evaluation
    draw them, a fixed number of new tokens (min = max). old = top-p by sort, every row runs its prompt's forward,
    SDPA attention; new_eager = top-p by rejection, one prefill per distinct prompt (share_prefill), eager
    attention; new = the same with grouped attention (attn_implementation=auto on CPU). Side by side, interleaved,
    the best of `reps`: n_prompts prompts at top-p 1.0, 0.95 and 0.9, then at top-p 0.9 the prompt counts in `sweep`
    (each path's best batch). GFLOP/s counts 2·N per prompt token and new token of every row (the old path's work;
    the shared prefill does less for the same samples)."""
    import copy
    import dataclasses

    nets = {}
    for attn in ("sdpa", "eager", "grouped"):
        m = copy.deepcopy(model)
        models.set_attention(m, attn, torch.device("cpu"))
        nets[attn] = inference_model(m, amp)
    out = []
    shapes = [(n_prompts, 1.0), (n_prompts, 0.95), (n_prompts, 0.9)] + [(n, 0.9) for n in sweep]
    for n, top_p in shapes:  # the demo's training rounds sample at 0.95, its evaluation at 0.9
        reqs = [(None, p) for p in prompts(n) for _ in range(k)]
        new = SampleSettings(1.0, top_p, new_tokens, new_tokens, len(reqs), 64)
        old = dataclasses.replace(new, top_p_method="sort", share_prefill=False)
        paths = {
            "old": lambda: sample(nets["sdpa"], tok, Template(), reqs, old, seed=0),
            "new_eager": lambda: sample(nets["eager"], tok, Template(), reqs, new, seed=0),
            "new": lambda: sample(nets["grouped"], tok, Template(), reqs, new, seed=0),
        }
        ctx = sum(len(Template().input_ids(tok, None, p, 64)) for _, p in reqs)
        times = interleaved(paths, reps)
        for name, ts in times.items():
            dt = min(ts)
            out.append(
                {
                    "path": name,
                    "top_p": top_p,
                    "rows": len(reqs),
                    "samples_per_prompt": k,
                    "new_tokens": new_tokens,
                    "seconds": round(dt, 2),
                    "tokens_per_s": round(len(reqs) * new_tokens / dt, 1),
                    "gflops": round(2 * n_params * (ctx + len(reqs) * new_tokens) / dt / 1e9, 1),
                }
            )
    return out


def bench_compiled_decode(model, tok, amp, n_prompts: int, k: int, new_tokens: int, reps: int) -> dict:
    """torch.compile (inductor, dynamic shapes: the KV cache grows every step) of the decoding forward against the
    eager one, at the demo's sampling shape and top-p 0.9, interleaved; the compile time is the first call's."""
    import copy

    m = copy.deepcopy(model)
    m.set_attn_implementation("eager")
    eager = inference_model(m, amp)
    compiled = inference_model(m, amp)
    compiled.forward = torch.compile(compiled.forward, dynamic=True)
    reqs = [(None, p) for p in prompts(n_prompts) for _ in range(k)]
    settings = SampleSettings(1.0, 0.9, new_tokens, new_tokens, len(reqs), 64)
    t = time.perf_counter()
    sample(compiled, tok, Template(), reqs, settings, seed=0)
    first_call = time.perf_counter() - t
    paths = {
        "eager": lambda: sample(eager, tok, Template(), reqs, settings, seed=0),
        "compiled": lambda: sample(compiled, tok, Template(), reqs, settings, seed=0),
    }
    times = interleaved(paths, reps)
    rates = {name: round(len(reqs) * new_tokens / min(ts), 1) for name, ts in times.items()}
    return {
        "rows": len(reqs),
        "new_tokens": new_tokens,
        "first_call_with_compile_s": round(first_call, 1),
        "tokens_per_s": rates,
        "compiled_vs_eager": round(rates["compiled"] / rates["eager"], 3),
    }


def bench_scoring(n: int) -> dict:
    from altlm.feedback import build_scorer

    out = {}
    texts = prompts(n)
    for name in ("jigsaw", "vader", "profanity"):
        try:
            s = build_scorer(name)
        except Exception as e:  # noqa: BLE001 — a missing optional scorer is reported, not fatal
            out[name] = {"error": str(e)[:100]}
            continue
        s.score(texts[:8], texts[:8])
        t = time.perf_counter()
        s.score(texts, texts)
        dt = time.perf_counter() - t
        out[name] = {"texts": n, "seconds": round(dt, 3), "texts_per_s": round(n / dt, 1)}
    return out


def bench_pool(sizes: list[int], draw: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as d:
        pool, have = Pool(Path(d) / "pool.sqlite"), 0
        for size in sizes:
            add = size - have
            for start in range(0, add, 100_000):
                k = min(100_000, add - start)
                pool.add(
                    [
                        Row(
                            1,
                            i % 5000,
                            f"prompt {i % 5000}",
                            f"completion {i}",
                            "Lowest Toxicity",
                            0.1,
                            0,
                            False,
                            8,
                            20,
                        )
                        for i in range(have + start, have + start + k)
                    ]
                )
            have = size
            rng = random.Random(0)
            dt = best_of(lambda: pool.draw_uniform(draw, rng), 3)
            rows.append({"pool_rows": size, "draw": draw, "ms": round(dt * 1000, 2)})
        pool.close()
    return rows


def profile(model, tok, amp, out: Path) -> dict:
    """What bounds sampling and training: torch.profiler's top operators for one sampling batch (64 rows) and one
    LoRA training step (32 rows), and the bf16/fp32 matmul rate at the shapes a decoding step actually runs."""
    from torch.profiler import ProfilerActivity, profile as tprofile

    inf = inference_model(model, amp)
    reqs = [(None, p) for p in prompts(64)]
    settings = SampleSettings(1.0, 1.0, 16, 16, 64, 64)
    sample(inf, tok, Template(), reqs[:8], settings, seed=0)
    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        sample(inf, tok, Template(), reqs, settings, seed=0)
    text = "## sampling: 64 rows x 16 new tokens\n" + prof.key_averages().table(
        sort_by="self_cpu_time_total", row_limit=15
    )
    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        bench_training(model, tok, amp, "lora", [16], 1, dense_params(model), kl=True)
    text += "\n## one LoRA training run: 16 rows, warm-up step + 1 timed step, KL on\n" + prof.key_averages().table(
        sort_by="self_cpu_time_total", row_limit=20
    )
    dt = torch.bfloat16 if amp is not None else torch.float32
    shapes = {
        "decode MLP [64x576]@[576x1536]": (64, 576, 1536),
        "decode head [64x576]@[576x49152]": (64, 576, 49152),
        "decode attention proj [64x576]@[576x576]": (64, 576, 576),
        "training MLP [2048x576]@[576x1536]": (2048, 576, 1536),
    }
    rates = {k: round(matmul_gflops(*v, dt), 1) for k, v in shapes.items()}
    text += (
        "\n## matmul GFLOP/s at the model's shapes ("
        + str(dt)
        + ")\n"
        + "\n".join(f"{k}: {v}" for k, v in rates.items())
    )
    out.write_text(text + "\n")
    return rates


def best_batch_table(what: str, rows: list[dict], size: str, rate: str, paths) -> list[str]:
    """Markdown lines: each of `paths` at the batch size (`size`) where its `rate` is highest, against old's best."""
    best = {}
    for r in rows:
        if r["path"] in paths and r[rate] > best.get(r["path"], {}).get(rate, 0):
            best[r["path"]] = r
    lines = ["", f"| {what}, each path at its best batch | {size} | {rate} | vs old at its best |", "|---|---|---|---|"]
    for name, r in best.items():
        lines.append(f"| {name} | {r[size]} | {r[rate]} | {r[rate] / best['old'][rate]:.2f}x |")
    return lines


def mix_table(rows: list[dict], share: float) -> list[str]:
    """Markdown lines: examples/s when a `share` of the rows are first draws and the rest cached, as in a run (the
    demo's share: its `first draws` over its examples). Per batch, first draws in their step
    (stage_first_draws: 0) and staged (the default), both packed (pack_rows), and staged padded (the previous
    default), each against old, where every row costs the same; then each at its best batch against old at its
    best."""
    rate = {(r["path"], r["batch"]): r["examples_per_s"] for r in rows}
    batches = sorted({r["batch"] for r in rows})
    lines = [
        "",
        f"| LoRA training, {share:.0%} of rows first draws | batch | examples/s | vs old |",
        "|---|---|---|---|",
    ]
    best = {}
    for b in batches:
        lines.append(f"| old | {b} | {rate['old', b]} | 1.00x |")
        for name, hit, first in (
            ("staged, padded", "new_hit_blocks", "new_staged_first_draw_padded"),
            ("first draws in their step, packed", "new_hit_packed", "new_miss_shared_packed"),
            ("staged, packed", "new_hit_packed", "new_staged_first_draw"),
        ):
            mixed = 1 / ((1 - share) / rate[hit, b] + share / rate[first, b])
            lines.append(f"| {name} | {b} | {mixed:.2f} | {mixed / rate['old', b]:.2f}x |")
            best[name] = max(best.get(name, (0.0, 0)), (mixed, b))
    old_best = max(rate["old", b] for b in batches)
    for name, (mixed, b) in best.items():
        lines.append(
            f"| {name}, at its best batch, against old at its best | {b} | {mixed:.2f} | {mixed / old_best:.2f}x |"
        )
    return lines


def write_paths(res: dict, args, roof: dict) -> int:
    """The side-by-side tables (old vs new training path; altlm's sampler vs HF generate) as JSON and markdown."""
    R = roof["roofline_gflops"]
    lines = [
        f"# Throughput, old vs new path (SmolLM2-135M, {res['compute_dtype']}, {res['machine']['threads']} threads)",
        "",
        f"Roofline {R} GFLOP/s ({roof['roofline_dtype']}). `python benchmarks/throughput.py --paths-only --threads "
        f"{res['machine']['threads']} --first-draw-share {args.first_draw_share}`.",
        "",
        "| LoRA step path | batch | s/step | examples/s | vs old | GFLOP/s | of roofline |",
        "|---|---|---|---|---|---|---|",
    ]
    old = {r["batch"]: r["examples_per_s"] for r in res["lora_paths"] if r["path"] == "old"}
    for r in res["lora_paths"]:
        ratio = "—" if r["path"] in STAGE_OPS else f"{r['examples_per_s'] / old[r['batch']]:.2f}x"
        lines.append(
            f"| {r['path']} | {r['batch']} | {r['seconds_per_step']} | {r['examples_per_s']} | {ratio} | "
            f"{r['gflops']} | {r['gflops'] / R:.0%} |"
        )
    lines += best_batch_table("LoRA step", res["lora_paths"], "batch", "examples_per_s", BEST_BATCH_PATHS)
    lines += mix_table(res["lora_paths"], args.first_draw_share)
    lines += [
        "",
        "| sampler (k samples per prompt) | top-p | rows | k | new tokens | tokens/s | vs old, same rows | GFLOP/s "
        "| of roofline |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    sp = res["sampling_paths"]
    old_rate = {(r["top_p"], r["rows"]): r["tokens_per_s"] for r in sp if r["path"] == "old"}
    for r in sp:
        lines.append(
            f"| {r['path']} | {r['top_p']} | {r['rows']} | {r['samples_per_prompt']} | {r['new_tokens']} | "
            f"{r['tokens_per_s']} | {r['tokens_per_s'] / old_rate[r['top_p'], r['rows']]:.2f}x | {r['gflops']} | "
            f"{r['gflops'] / R:.0%} |"
        )
    at_09 = [r for r in sp if r["top_p"] == 0.9]
    lines += best_batch_table("sampler (top-p 0.9)", at_09, "rows", "tokens_per_s", ("old", "new_eager", "new"))
    lines += [
        "",
        "| sampler (top-p 0.9, same bf16 weights) | batch | new tokens | tokens/s | vs HF generate |",
        "|---|---|---|---|---|",
    ]
    hf = next(r["tokens_per_s"] for r in res["sampler_vs_generate"] if r["path"] == "hf_generate")
    for r in res["sampler_vs_generate"]:
        lines.append(
            f"| {r['path']} | {r['batch']} | {r['new_tokens']} | {r['tokens_per_s']} | {r['tokens_per_s'] / hf:.2f}x |"
        )
    out = Path(args.out).with_name("throughput_paths.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps(res, indent=2))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: a one-minute check that everything runs")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default=str(ROOT / "results" / "throughput.json"))
    ap.add_argument(
        "--threads", type=int, default=0, help="torch threads (0: torch's default); roofline and workloads use the same"
    )
    ap.add_argument(
        "--paths-only",
        action="store_true",
        help="only the side-by-side tables (old vs new LoRA step, sampler vs HF generate): throughput_paths.{json,md}",
    )
    ap.add_argument(
        "--first-draw-share",
        type=float,
        default=0.522,
        help="--paths-only: the share of a run's drawn rows that are first draws, for the mixed table (default: the "
        "demo's, 2,254 `first draws` over its 9 x 480 examples, make demo 2026-12-01)",
    )
    ap.add_argument(
        "--profile", action="store_true", help="only profile sampling and write results/throughput_profile.txt"
    )
    ap.add_argument(
        "--compile-decode",
        action="store_true",
        help="only torch.compile of the decoding forward against eager (several minutes of compiling): "
        "results/compile_decode.json",
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.time()
    res = {
        "machine": {
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "load_average_at_start": os.getloadavg()[0],
        },
        "model": args.model,
    }
    model, tok = models.load_model(args.model), models.load_tokenizer(args.model)
    tok.padding_side = "left"
    if args.profile:
        rates = profile(
            model, tok, models.autocast_dtype("auto", torch.device("cpu")), ROOT / "results" / "throughput_profile.txt"
        )
        print(json.dumps(rates, indent=1))
        return 0
    if args.compile_decode:
        amp = models.autocast_dtype("auto", torch.device("cpu"))
        res["compiled_decode"] = bench_compiled_decode(model, tok, amp, 32, 4, 16, 3)
        write_atomic(ROOT / "results" / "compile_decode.json", json.dumps(res, indent=2))
        print(json.dumps(res["compiled_decode"], indent=1))
        return 0
    res["roofline"] = roof = roofline(args.quick)
    n = dense_params(model)
    res["dense_params"] = n
    amp = models.autocast_dtype("auto", torch.device("cpu"))
    res["compute_dtype"] = "bf16" if amp is not None else "fp32"
    q = args.quick
    res["sampling_sweep"] = bench_sampling(model, tok, amp, [8, 32] if q else [16, 64, 128, 256], 8 if q else 32, n)
    res["lora_paths"] = bench_lora_paths(model, tok, amp, [12] if q else [12, 32, 64], 1 if q else 5, n, 0.5)
    res["sampling_paths"] = bench_sampling_paths(
        model, tok, amp, 8 if q else 32, 4, 8 if q else 16, 1 if q else 3, n, [16] if q else [64, 128]
    )
    res["sampler_vs_generate"] = bench_sampler_vs_generate(
        model, tok, amp, 16 if q else 128, 8 if q else 20, 1 if q else 2
    )
    if args.paths_only:
        res["roofline_gflops"] = roof["roofline_gflops"]
        res["first_draw_share"] = args.first_draw_share
        return write_paths(res, args, roof)
    res["training_lora_sweep"] = bench_training(
        model, tok, amp, "lora", [8] if q else [8, 16, 32], 1 if q else 3, n, kl=True
    )
    res["training_full_sweep"] = bench_training(
        model, tok, amp, "full", [8] if q else [8, 16, 32], 1 if q else 3, n, kl=True
    )
    res["scoring"] = bench_scoring(64 if q else 512)
    res["pool_draw"] = bench_pool([1_000, 10_000] if q else [1_000, 10_000, 100_000, 1_000_000], 640)
    R = roof["roofline_gflops"]
    for key, sweep in (
        ("sampling", "sampling_sweep"),
        ("training_lora", "training_lora_sweep"),
        ("training_full", "training_full_sweep"),
    ):
        best = max(res[sweep], key=lambda r: r["gflops"])
        res[key] = {
            "tokens_per_s": best["tokens_per_s"],
            "gflops": best["gflops"],
            "batch": best["batch"],
            "roofline_ratio": round(best["gflops"] / R, 3),
        }
    res["roofline_gflops"] = R
    res["seconds"] = round(time.time() - t0, 1)
    res["machine"]["load_average_at_end"] = os.getloadavg()[0]

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps(res, indent=2))

    print(
        f"roofline: fp32 {roof['peak_fp32']} GFLOP/s, bf16 {roof['peak_bf16']} GFLOP/s → {R} ({roof['roofline_dtype']}); "
        f"model compute in {res['compute_dtype']}"
    )
    print(f"{'workload':<16}{'batch':>7}{'tokens/s':>12}{'GFLOP/s':>10}{'of roofline':>13}")
    for key in ("sampling", "training_lora", "training_full"):
        r = res[key]
        print(f"{key:<16}{r['batch']:>7}{r['tokens_per_s']:>12}{r['gflops']:>10}{r['roofline_ratio']:>12.0%}")
    for name, s in res["scoring"].items():
        print(f"scoring {name:<10} {s.get('texts_per_s', s.get('error'))} texts/s")
    print("pool draw of 640 rows: " + ", ".join(f"{r['pool_rows']:,} rows {r['ms']} ms" for r in res["pool_draw"]))
    print(f"({res['seconds']} s; wrote {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
