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
    logp = torch.log_softmax(logits[len(p) - 1 : -1], -1)
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
    lp = {
        fb: mean_logprobs(
            model,
            [t.input_ids(tok, fb, p) for p in prompts],
            [t.target_ids(tok, c, True) for c in comps],
            tok.pad_token_id,
        )
        for fb in (worst, best)
    }
    delta = [w - b for w, b in zip(lp[worst], lp[best])]
    samples = [
        {"prompt": p, "completion": c, "score": -d if higher_is_better else d} for p, c, d in zip(prompts, comps, delta)
    ]
    samples.append({"prompt": "x", "completion": "", "score": 0.5})  # empty: skipped
    got = likelihood_steer(model, tok, t, samples, best, worst, higher_is_better)
    assert got["n"] == 6 and got["spearman"] == 1.0
    assert got["delta_mean"] == pytest.approx(sum(delta) / 6, abs=1e-4)
    flipped = likelihood_steer(model, tok, t, samples, worst, best, higher_is_better)
    assert flipped["spearman"] == -1.0


def test_summarize_run_reduction_and_steerability_by_hand():
    """summary.json's numbers, from hand-written eval records: the reduction is 1 − final/reference (untagged
    reference, final under the exemplar), steerability is Spearman and worst − best over the final model's
    feedback strings in vocabulary order, and each iteration reports its exemplar number."""
    from altlm.evaluation import summarize_run

    def block(mean, gt):
        return {
            "toxicity_mean": mean,
            "toxicity_gt_0_5": gt,
            "avg_max_toxicity": mean,
            "toxicity_prob": gt,
            "dist_2": 0.5,
            "reward_mean": 1 - mean,
            "perplexity": None,
        }

    evals = [
        {
            "iteration": 0,
            "model": "reference",
            "by_feedback": {
                "<none>": block(0.40, 0.20),
                "a": block(0.41, 0.2),
                "b": block(0.39, 0.2),
                "c": block(0.42, 0.2),
            },
        },
        {"iteration": 1, "model": "policy", "by_feedback": {"a": block(0.30, 0.10)}, "train": {"loss": 1.0}},
        {
            "iteration": 2,
            "model": "policy",
            "by_feedback": {
                "<none>": block(0.35, 0.15),
                "a": block(0.10, 0.04),
                "b": block(0.30, 0.10),
                "c": block(0.20, 0.08),
            },
        },
    ]
    s = summarize_run(evals, "toxicity", False, "a", ["a", "b", "c", "unused"], 2, 1, 12.34)
    assert s["reduction"] == {
        "toxicity_mean": pytest.approx(1 - 0.10 / 0.40),
        "toxicity_gt_0_5": pytest.approx(1 - 0.04 / 0.20),
    }
    st = s["steerability"]  # final: a 0.10, b 0.30, c 0.20 → ranks 1, 3, 2 vs 1, 2, 3: ρ = 1 − 6·2/(3·8) = 0.5
    assert st["spearman_rho"] == pytest.approx(0.5) and st["gap"] == pytest.approx(0.20 - 0.10)
    assert (st["feedback"], st["metric"], st["steered_sign"]) == (["a", "b", "c"], "toxicity_mean", 1)
    assert s["final"]["toxicity_mean"] == 0.10 and s["final"]["untagged"]["toxicity_mean"] == 0.35
    assert s["reference"]["toxicity_mean"] == 0.40 and list(s["reference"]["by_feedback"]) == ["a", "b", "c"]
    assert [(i["iteration"], i["toxicity_mean"]) for i in s["iterations"]] == [(1, 0.30), (2, 0.10)]
    assert s["wall_seconds"] == 12.3
    # higher-is-better metrics steer the other way round; a zero reference has no relative reduction
    evals[0]["by_feedback"]["<none>"] = block(0.0, 0.0)
    s = summarize_run(evals, "toxicity", True, "a", ["a", "b", "c"], 2, 1, 1.0)
    assert s["reduction"] == {"toxicity_mean": None, "toxicity_gt_0_5": None}
    assert s["steerability"]["steered_sign"] == -1
