"""Exact nucleus (top-p) sampling by rejection (sampler.draw, method=reject) against the sorted definition."""

from __future__ import annotations

import pytest
import torch

from altlm.sampler import draw


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The definition: sort descending, keep a token while the mass ranked above it is below top_p, renormalise."""
    top, idx = probs.sort(descending=True)
    keep = (top.cumsum(-1) - top) < top_p
    out = torch.zeros_like(probs)
    out.scatter_(-1, idx, top * keep)
    return out / out.sum(-1, keepdim=True)


@pytest.mark.parametrize("top_p", [0.5, 0.9])
def test_rejection_draws_follow_the_nucleus_distribution(top_p):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 40, generator=g) * 2.0
    target = nucleus(torch.softmax(logits, -1), top_p)
    n = 20_000
    torch.manual_seed(1)
    counts = torch.zeros_like(target)
    rows = logits.repeat_interleave(n // 10, 0)  # 2,000 copies of each row per call, 10 calls
    for _ in range(10):
        got = draw(rows, 1.0, top_p, method="reject").view(3, -1)
        for r in range(3):
            counts[r] += torch.bincount(got[r], minlength=40)
    freq = counts / n
    assert (counts[target == 0] == 0).all()  # never outside the nucleus
    # each frequency within 5 binomial standard errors of its nucleus probability
    se = (target * (1 - target) / n).sqrt()
    assert ((freq - target).abs() <= 5 * se + 1e-9).all(), (freq - target).abs().max()


def test_rejection_and_sort_agree_on_the_nucleus_and_top_p_one_is_unchanged():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 500, generator=g) * 3.0
    torch.manual_seed(0)
    a = draw(logits, 0.7, 0.9, method="reject")
    torch.manual_seed(0)
    b = draw(logits, 0.7, 0.9, method="sort")
    support = nucleus(torch.softmax(logits / 0.7, -1), 0.9) > 0
    assert support.gather(-1, a[:, None]).all() and support.gather(-1, b[:, None]).all()
    # top_p = 1: no nucleus, both methods are the same draw from the same random numbers
    torch.manual_seed(0)
    c = draw(logits, 1.0, 1.0, method="reject")
    torch.manual_seed(0)
    d = draw(logits, 1.0, 1.0, method="sort")
    assert torch.equal(c, d)


def test_decode_of_zero_new_tokens_returns_none(tiny):
    from altlm.sampler import SampleSettings, decode
    from altlm.template import left_pad

    model, tok = tiny
    ids, attn, _ = left_pad([[5, 6, 7], [8, 9]], tok.pad_token_id)
    out = decode(model, ids, attn, SampleSettings(1.0, 1.0, 0, 0, 2, 8), [tok.eos_token_id], [], tok.pad_token_id)
    assert out.shape == (2, 0)
