"""Fluency (perplexity under a scoring LM) against unpadded forward passes of the tiny model."""
import math

import pytest
import torch

from altlm.evaluation import Fluency


@pytest.fixture(scope="module")
def fluency():
    return Fluency("tiny-smollm2", batch_size=2)


def hand_ppl(fl: Fluency, prompt: str, completion: str) -> float:
    tok = fl.tokenizer
    p = [tok.bos_token_id] if tok.bos_token_id is not None else []
    p += tok(prompt, add_special_tokens=False).input_ids
    c = tok(completion, add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = fl.model(input_ids=torch.tensor([p + c])).logits[0].float()
    logp = torch.log_softmax(logits[len(p) - 1:-1], -1)
    nll = -logp[range(len(c)), c].mean().item()
    return math.exp(nll)


def test_perplexity_matches_unpadded_forward_in_mixed_batches(fluency):
    prompts = ["Hello", "A much longer prompt that needs padding in a batch", "x", "Two words"]
    comps = [" world and more", " ok", " a completion of several tokens here", ""]
    got = fluency.perplexities(prompts, comps)
    for p, c, g in zip(prompts[:3], comps[:3], got[:3]):
        assert g == pytest.approx(hand_ppl(fluency, p, c), rel=1e-3)
    assert math.isnan(got[3])  # an empty completion has no perplexity
    assert got[0] > 1.0
