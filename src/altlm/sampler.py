"""The sampler: batched HF `generate` over (feedback, prompt) requests, recording truncation and token counts.

Left padding with explicit masks, KV cache, temperature/top-p, min/max new tokens; the tokens added for
conditioning (separator, Quark tokens) are suppressed so the model never emits them. Requests are sorted by
length so a batch wastes little padding; results come back in request order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .template import Template, left_pad


@dataclass
class SampleSettings:
    temperature: float = 1.0
    top_p: float = 1.0
    min_new_tokens: int = 3
    max_new_tokens: int = 20
    batch_size: int = 64
    max_prompt_tokens: int = 64


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


@torch.no_grad()
def sample(model, tokenizer, template: Template, requests: list[tuple[str | None, str]], settings: SampleSettings,
           suppress: list[int] | None = None, seed: int | None = None, autocast_dtype=None, desc: str = "sampling") -> list[Sample]:
    """requests: (feedback or None, prompt). One Sample per request, in order."""
    if seed is not None:
        torch.manual_seed(seed)
    encoded = [template.input_ids(tokenizer, fb, p, settings.max_prompt_tokens) for fb, p in requests]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out: list[Sample | None] = [None] * len(encoded)
    eos = stop_ids(tokenizer)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(encoded), desc=desc, leave=False, disable=None)
    for start in range(0, len(order), settings.batch_size):
        idx = order[start:start + settings.batch_size]
        ids, attn, _ = left_pad([encoded[i] for i in idx], tokenizer.pad_token_id)
        ids, attn = ids.to(model.device), attn.to(model.device)
        with torch.autocast(model.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            gen = model.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=settings.temperature,
                                 top_p=settings.top_p, top_k=0, min_new_tokens=settings.min_new_tokens,
                                 max_new_tokens=settings.max_new_tokens, eos_token_id=eos,
                                 pad_token_id=tokenizer.pad_token_id, suppress_tokens=suppress or None,
                                 use_cache=True)
        new = gen[:, ids.shape[1]:].tolist()
        for i, toks in zip(idx, new):
            ended = next((j for j, t in enumerate(toks) if t in eos), None)
            body = toks if ended is None else toks[:ended]
            out[i] = Sample(completion=tokenizer.decode(body, skip_special_tokens=True), truncated=ended is None,
                            prompt_tokens=len(encoded[i]), completion_tokens=len(body))
        bar.update(len(idx))
    bar.close()
    model.train(was_training)
    return out  # type: ignore[return-value]
