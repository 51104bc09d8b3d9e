"""Fluency (perplexity under a scoring LM) against unpadded forward passes of the tiny model; the likelihood steer check."""
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


@pytest.mark.parametrize("higher_is_better", [False, True])
def test_likelihood_steer_sign_and_pairing(tiny, higher_is_better):
    """Scores built from the Δ the function must compute: ρ = +1 exactly when it subtracts best from worst on the
    right texts and orients badness by the metric's direction; a swap of any of these gives −1."""
    from altlm.evaluation import likelihood_steer
    from altlm.loss import mean_logprobs
    from altlm.template import Template

    model, tok = tiny
    t = Template(style="prefix", prefix_format="{feedback}: ")
    prompts = ["The cat", "A dog said", "Why is the", "Hello there", "I think", "No way"]
    comps = [" sat on the mat", " hello", " sky blue?", " friend of mine", " so too", " back home"]
    worst, best = "Bad", "Good"
    lp = {fb: mean_logprobs(model, [t.input_ids(tok, fb, p) for p in prompts], [t.target_ids(tok, c, True) for c in comps],
                            tok.pad_token_id) for fb in (worst, best)}
    delta = [w - b for w, b in zip(lp[worst], lp[best])]
    samples = [{"prompt": p, "completion": c, "score": -d if higher_is_better else d} for p, c, d in zip(prompts, comps, delta)]
    samples.append({"prompt": "x", "completion": "", "score": 0.5})  # empty: skipped
    got = likelihood_steer(model, tok, t, samples, best, worst, higher_is_better)
    assert got["n"] == 6 and got["spearman"] == 1.0
    assert got["delta_mean"] == pytest.approx(sum(delta) / 6, abs=1e-4)
    flipped = likelihood_steer(model, tok, t, samples, worst, best, higher_is_better)
    assert flipped["spearman"] == -1.0
