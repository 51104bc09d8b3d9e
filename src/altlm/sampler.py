"""The sampler: batched, KV-cached sampling over (feedback, prompt) requests, recording truncation and token counts.

Left padding with explicit masks, KV cache, temperature/top-p, min/max new tokens; the tokens added for
conditioning (separator, Quark tokens) are suppressed so the model never emits them. Requests are sorted by
length so a batch wastes little padding; results come back in request order.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .models import contiguous_lm_head
from .template import Template, left_pad


@dataclass
class SampleSettings:
    temperature: float = 1.0
    top_p: float = 1.0
    min_new_tokens: int = 3
    max_new_tokens: int = 20
    batch_size: int = 64
    max_prompt_tokens: int = 64
    top_p_method: str = "reject"  # how the nucleus is drawn (draw()): reject, or sort (the earlier path)
    share_prefill: bool = True  # identical rows of a batch (k samples of a prompt) run the prompt's forward once


@dataclass
class Sample:
    completion: str
    truncated: bool  # hit max_new_tokens without emitting EOS
    prompt_tokens: int
    completion_tokens: int


def stop_ids(tokenizer) -> list[int]:
    """EOS plus `<|endoftext|>` where the vocabulary has both (instruct GGUFs end turns with <|im_end|>)."""
    vocab = tokenizer.get_vocab()
    ids = {tokenizer.eos_token_id} | {vocab[t] for t in ("<|endoftext|>",) if t in vocab}
    return sorted(i for i in ids if i is not None)


def inference_model(model, dtype=None, owned: bool = False):
    """A frozen copy for sampling: LoRA merged in, weights cast once to `dtype` (bf16 where fast). Autocast
    would re-cast every weight at every decoding step; a cast copy costs one deepcopy per sampling phase.
    owned=True: `model` is already a copy the caller hands over (FSDP's gathered weights): changed in place."""
    m = model if owned else copy.deepcopy(model)
    if hasattr(m, "merge_and_unload"):
        m = m.float().merge_and_unload()  # merge in fp32 (frozen weights may be stored in bf16), then cast once
    if dtype is not None:
        m = m.to(dtype)
    contiguous_lm_head(m)
    return m.eval().requires_grad_(False)


def _inverse_cdf(weights: torch.Tensor) -> torch.Tensor:
    """Index drawn ∝ weights per row. One uniform per row instead of multinomial's one random per entry,
    which on CPU costs more than the decoding step's matmuls over a 49k vocabulary."""
    cdf = weights.cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(-1).clamp(max=cdf.shape[-1] - 1)


def _nucleus(top: torch.Tensor, idx: torch.Tensor, top_p: float) -> torch.Tensor:
    keep = (top.cumsum(-1) - top) < top_p  # a token stays if the mass ranked above it is below top_p
    return idx.gather(-1, _inverse_cdf(top * keep)[:, None]).squeeze(-1)


def _nucleus_by_rejection(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Exact nucleus sampling without sorting: draw from the whole distribution, keep the draw if the mass of the
    tokens likelier than it is below top_p (it is then in the nucleus), else draw that row again. A kept draw has
    the nucleus distribution (p restricted to the nucleus, renormalised); a row is redrawn with probability
    1 − (its nucleus mass) ≤ 1 − top_p. Each round costs two passes over the vocabulary, where the sort of a wide
    nucleus cost 18% of a decoding run (49k-word vocabulary, top-p 0.9: benchmarks/results/throughput_profile.txt)."""
    cdf = probs.cumsum(-1)
    out = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    todo = torch.arange(probs.shape[0], device=probs.device)
    while todo.numel():
        rows_cdf = cdf if todo.numel() == probs.shape[0] else cdf[todo]
        rows = probs if todo.numel() == probs.shape[0] else probs[todo]
        u = torch.rand(todo.numel(), 1, device=probs.device, dtype=cdf.dtype) * rows_cdf[:, -1:]
        x = torch.searchsorted(rows_cdf, u).squeeze(-1).clamp(max=probs.shape[-1] - 1)
        p_x = rows.gather(-1, x[:, None])
        above = torch.where(rows > p_x, rows, 0.0).sum(-1)  # the mass ranked above the draw (ties: not above)
        keep = above < top_p
        out[todo[keep]] = x[keep]
        todo = todo[~keep]
    return out


def draw(
    logits: torch.Tensor, temperature: float, top_p: float, k_first: int = 1024, method: str = "reject"
) -> torch.Tensor:
    """One token per row from softmax(logits / T) restricted to the top-p nucleus, exactly. method=reject:
    _nucleus_by_rejection. method=sort: the nucleus searched among the top `k_first` entries (a partial sort);
    rows whose nucleus is wider pay for a full sort."""
    scaled = logits.float() if temperature == 1.0 else logits.float() / max(temperature, 1e-6)
    probs = torch.softmax(scaled, -1)
    if top_p >= 1.0:
        return _inverse_cdf(probs)
    if method == "reject":
        return _nucleus_by_rejection(probs, top_p)
    top, idx = probs.topk(min(k_first, probs.shape[-1]), -1)
    out = _nucleus(top, idx, top_p)
    wide = top.sum(-1) < top_p
    if wide.any():
        out[wide] = _nucleus(*probs[wide].sort(-1, descending=True), top_p)
    return out


@torch.no_grad()
def decode(
    model, ids, attn, settings: SampleSettings, eos: list[int], suppress: list[int], pad_id: int
) -> torch.Tensor:
    """KV-cached ancestral sampling of up to max_new_tokens per row; rows that emitted EOS are padded after it.
    A plain loop instead of `generate`: on CPU, generate's per-step processors cost several times the forward."""
    # transformers 5.x renamed `past_key_values` to `cache` (the old name warns, then goes away).
    if settings.max_new_tokens < 1:  # nothing to generate (torch.stack of no steps would fail)
        return ids.new_empty((ids.shape[0], 0))
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    pick, copies = _distinct_rows(ids, attn) if settings.share_prefill else (None, None)
    if pick is not None and len(pick) < ids.shape[0]:
        # k samples of one prompt: the prompt's forward runs once, its cache and logits are copied to each sample
        out = model(
            input_ids=ids[pick], attention_mask=attn[pick], position_ids=pos[pick], use_cache=True, logits_to_keep=1
        )
        out[cache_kw].reorder_cache(copies)
        next_logits = out.logits[copies, -1]
    else:
        out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1)
        next_logits = out.logits[:, -1]
    eos_t = torch.tensor(eos, device=ids.device)
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    pos, toks = pos[:, -1:], []
    for step in range(settings.max_new_tokens):
        logits = next_logits.float()
        if suppress:
            logits[:, suppress] = float("-inf")
        if step < settings.min_new_tokens:
            logits[:, eos] = float("-inf")
        nxt = draw(logits, settings.temperature, settings.top_p, method=settings.top_p_method)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        toks.append(nxt)
        done |= torch.isin(nxt, eos_t)
        if done.all():
            break
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], 1)
        pos = pos + 1
        out = model(
            input_ids=nxt[:, None], attention_mask=attn, position_ids=pos, use_cache=True, **{cache_kw: out[cache_kw]}
        )
        next_logits = out.logits[:, -1]
    return torch.stack(toks, 1)


def _distinct_rows(ids: torch.Tensor, attn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the first row of each distinct (ids, mask) row, and for every row the position of its own among them)."""
    seen: dict[tuple, int] = {}
    pick, copies = [], []
    for i, row in enumerate(torch.cat([ids, attn], 1).tolist()):
        key = tuple(row)
        if key not in seen:
            seen[key] = len(pick)
            pick.append(i)
        copies.append(seen[key])
    return torch.tensor(pick, device=ids.device), torch.tensor(copies, device=ids.device)


# torch < 2.5 only has the CUDA-specific class
OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def _decode_halving(model, rows: list[list[int]], settings, eos, suppress, pad_id) -> list[list[int]]:
    """decode(), splitting the batch in two (recursively) when the accelerator runs out of memory."""
    ids, attn, _ = left_pad(rows, pad_id)
    try:
        return decode(model, ids.to(model.device), attn.to(model.device), settings, eos, suppress, pad_id).tolist()
    except OOM:
        if len(rows) == 1:
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(rows) // 2
        print(
            f"warning: out of memory sampling {len(rows)} sequences at once; going on in batches of {half} and {len(rows) - half}"
        )
        return _decode_halving(model, rows[:half], settings, eos, suppress, pad_id) + _decode_halving(
            model, rows[half:], settings, eos, suppress, pad_id
        )


@torch.no_grad()
def sample(
    model,
    tokenizer,
    template: Template,
    requests: list[tuple[str | None, str]],
    settings: SampleSettings,
    suppress: list[int] | None = None,
    seed: int | None = None,
    desc: str = "sampling",
    done: dict[int, Sample] | None = None,
    on_batch=None,
    shard: tuple[int, int] = (0, 1),
) -> list[Sample]:
    """requests: (feedback or None, prompt). One Sample per request, in order.

    With a seed, batch b draws from torch's RNG seeded by (seed, b), so a batch can be redone on its own: a resumed
    run passes the Samples it already has (`done`, by request index) and gets what an uninterrupted run got.
    Completions depend on (seed, batch_size): the batching is part of the draw.
    `on_batch` receives each newly sampled batch as [(request index, Sample)] (the trainer stages them).
    `shard=(rank, world)`: only batches b with b mod world == rank are sampled; the others stay None."""
    encoded = [template.input_ids(tokenizer, fb, p, settings.max_prompt_tokens) for fb, p in requests]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out: list[Sample | None] = [None] * len(encoded)
    for i, s in (done or {}).items():
        out[i] = s
    eos = stop_ids(tokenizer)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(encoded), desc=desc, leave=False, disable=None)
    for b, start in enumerate(range(0, len(order), settings.batch_size)):
        idx = order[start : start + settings.batch_size]
        if b % shard[1] != shard[0] or all(out[i] is not None for i in idx):
            bar.update(len(idx))
            continue
        if seed is not None:
            torch.manual_seed(seed * 1_000_003 + b)
        new = _decode_halving(model, [encoded[i] for i in idx], settings, eos, suppress or [], tokenizer.pad_token_id)
        for i, toks in zip(idx, new):
            ended = next((j for j, t in enumerate(toks) if t in eos), None)
            body = toks if ended is None else toks[:ended]
            out[i] = Sample(
                completion=tokenizer.decode(body, skip_special_tokens=True),
                truncated=ended is None,
                prompt_tokens=len(encoded[i]),
                completion_tokens=len(body),
            )
        if on_batch is not None:
            on_batch([(i, out[i]) for i in idx])
        bar.update(len(idx))
    bar.close()
    model.train(was_training)
    return out  # type: ignore[return-value]
