"""summary.json's claims: estimates checked against a hand computation, intervals against their definition."""

from __future__ import annotations

import math
import random

import pytest

from altlm.claims import run_claims

WORDS = ["Most Positive", "Neutral", "Most Negative"]
GAP_BEYOND = "beyond priming: final gap - reference gap (same feedback)"
EXEMPLAR_BEYOND = "beyond priming: final - reference, both under the exemplar"


def records(shift: dict, n_prompts: int = 40, k: int = 2, seed: int = 0) -> list[dict]:
    """Reference (iteration 0) and final (iteration 3) samples: score = prompt effect + condition shift + noise."""
    rng = random.Random(seed)
    out = []
    effects = [rng.gauss(0, 0.2) for _ in range(n_prompts)]
    for it, model in ((0, "reference"), (3, "final")):
        for fb in [None, *WORDS]:
            for p in range(n_prompts):
                for j in range(k):
                    score = effects[p] + shift.get((model, fb), 0.0) + rng.gauss(0, 0.05)
                    out.append(
                        {
                            "iteration": it,
                            "model": model,
                            "feedback": fb,
                            "prompt": f"prompt {p}",
                            "completion": f"word{p} w{j} x{it}",
                            "score": score,
                            "perplexity": 10.0 + it,
                        }
                    )
    return out


def by_name(result: dict) -> dict:
    """Claims by a short name: the text before ':' or ' (', or the whole text for the two beyond-priming ones."""
    out = {}
    for c in result["claims"]:
        name = c["claim"] if c["claim"].startswith("beyond") else c["claim"].split(":")[0].split(" (")[0]
        out[name] = c
    return out


def test_claims_match_a_hand_computation_and_hold_only_when_true():
    shift = {
        ("final", "Most Positive"): 0.3,
        ("final", "Neutral"): 0.1,
        ("final", "Most Negative"): -0.2,
        ("reference", "Most Positive"): 0.05,
        ("reference", "Most Negative"): -0.05,
    }
    recs = records(shift)
    got = run_claims(recs, WORDS, "Most Positive", higher_is_better=True, seed=1, n_boot=500)
    assert got["prompts"] == 40

    def mean(model, fb):
        xs = [r["score"] for r in recs if r["model"] == model and r["feedback"] == fb]
        return sum(xs) / len(xs)  # equal samples per prompt: the mean of prompt means

    c = by_name(got)
    gap_final = mean("final", "Most Positive") - mean("final", "Most Negative")
    gap_ref = mean("reference", "Most Positive") - mean("reference", "Most Negative")
    assert abs(c["best - worst feedback"]["estimate"] - gap_final) < 1e-9
    assert abs(c[GAP_BEYOND]["estimate"] - (gap_final - gap_ref)) < 1e-9
    exemplar_beyond = mean("final", "Most Positive") - mean("reference", "Most Positive")
    assert abs(c[EXEMPLAR_BEYOND]["estimate"] - exemplar_beyond) < 1e-9
    exemplar_vs_ref = mean("final", "Most Positive") - mean("reference", None)
    assert abs(c["final under the exemplar - untagged reference"]["estimate"] - exemplar_vs_ref) < 1e-9
    assert c["Spearman(feedback rank, score), final"]["estimate"] == 1.0
    ppl = c["perplexity ratio"]
    assert abs(ppl["estimate"] - 13.0 / 10.0) < 1e-9 and ppl["holds"]
    for claim in got["claims"]:
        lo, hi = claim["interval"]
        inside = lo - 1e-9 <= claim["estimate"] <= hi + 1e-9  # (a constant ratio's interval is one float wide)
        assert inside or claim["claim"].startswith("Spearman"), claim
        if claim["target"].endswith("interval > 0"):
            assert claim["holds"] == (lo > 0), claim
    assert all(claim["holds"] for claim in got["claims"])
    assert got["means"]["final"]["Most Positive"]["mean"] == mean("final", "Most Positive")


def test_a_model_that_only_inherits_the_reference_priming_fails_the_beyond_priming_claims():
    # the final model equals the reference: tags order the scores (priming), but nothing was learned
    prime = {"Most Positive": 0.1, "Neutral": 0.0, "Most Negative": -0.1}
    shift = {(m, fb): v for m in ("reference", "final") for fb, v in prime.items()}
    got = by_name(run_claims(records(shift, seed=2), WORDS, "Most Positive", higher_is_better=True, seed=1, n_boot=500))
    assert got["best - worst feedback"]["holds"]  # the gap is there ...
    assert not got[GAP_BEYOND]["holds"]  # ... but not beyond the reference's own
    assert not got[EXEMPLAR_BEYOND]["holds"]
    lo, hi = got[GAP_BEYOND]["interval"]
    assert lo < 0 < hi


def test_lower_is_better_scores_are_turned_good_side_up():
    shift = {("final", "Most Positive"): -0.3, ("final", "Most Negative"): 0.3}  # read as toxicity: best = lowest
    got = by_name(run_claims(records(shift), WORDS, "Most Positive", higher_is_better=False, seed=1, n_boot=300))
    assert got["best - worst feedback"]["estimate"] > 0.5
    assert got["Spearman(feedback rank, score), final"]["estimate"] == 1.0


def test_undefined_claims_are_printed_and_reported_as_not_available(tmp_path, capsys):
    """A constant score leaves Spearman undefined (NaN, null in summary.json): printing must not fail on it."""
    import json

    from altlm.cli import print_claims
    from altlm.evaluation import write_json

    recs = records({})
    for r in recs:
        r["score"] = 0.5
    got = run_claims(recs, WORDS, "Most Positive", higher_is_better=True, seed=1, n_boot=50)
    write_json(tmp_path / "s.json", {"claims": got})
    back = json.loads((tmp_path / "s.json").read_text())["claims"]
    spearman = by_name(back)["Spearman(feedback rank, score), final"]
    assert spearman["estimate"] is None and spearman["holds"] is False
    print_claims(back)
    assert "n/a" in capsys.readouterr().out


def test_perplexity_ratio_is_a_ratio_of_geometric_means():
    """One degenerate final completion (perplexity 9,000, under the arithmetic mean's 1e4 cap) must not flip the
    fluency claim: the ratio is exp(mean log final − mean log reference) over prompts."""
    recs = records({})
    finals = [r for r in recs if r["iteration"] == 3 and r["feedback"] == "Most Positive"]
    finals[0]["perplexity"] = 9000.0
    got = by_name(run_claims(recs, WORDS, "Most Positive", higher_is_better=True, seed=1, n_boot=300))
    ppl = got["perplexity ratio"]
    by_prompt: dict = {}
    for r in finals:
        by_prompt.setdefault(r["prompt"], []).append(math.log(r["perplexity"]))
    final_log = sum(sum(v) / len(v) for v in by_prompt.values()) / len(by_prompt)
    assert ppl["estimate"] == pytest.approx(math.exp(final_log - math.log(10.0)))
    assert ppl["estimate"] > 13.0 / 10.0  # the outlier counts, within reason
    assert ppl["estimate"] < 1.5 and ppl["holds"]  # arithmetic means: (13 × 79 + 9000) / 80 / 10 ≈ 12.5
