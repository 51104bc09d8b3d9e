"""Each metric against small hand-computed cases, including one sample, empty completions and identical samples."""

import math

import pytest

from altlm import metrics
from altlm.evaluation import clean


def nan(x):
    return isinstance(x, float) and math.isnan(x)


def test_avg_max_and_probability_over_k():
    # two prompts × k=3: maxima 0.9 and 0.2
    scores = [0.1, 0.9, 0.3, 0.2, 0.0, 0.1]
    assert metrics.avg_max(scores, 3) == pytest.approx((0.9 + 0.2) / 2)
    assert metrics.prob_any_above(scores, 3) == 0.5
    assert metrics.share_above(scores) == pytest.approx(1 / 6)
    # threshold is strict: exactly 0.5 is not toxic
    assert metrics.prob_any_above([0.5, 0.5], 2) == 0.0


def test_one_sample_per_prompt():
    assert metrics.avg_max([0.7, 0.1], 1) == pytest.approx(0.4)
    assert metrics.prob_any_above([0.7, 0.1], 1) == 0.5
    assert metrics.dist_n(["a b", "c c"], 1, 1) == pytest.approx((1.0 + 0.5) / 2)


def test_dist_n_per_prompt_then_averaged():
    # prompt 1: "a b a" + "a b" → unigrams a,b,a,a,b: 2 unique / 5; bigrams (a b),(b a),(a b): 2/3
    # prompt 2: "x y" + "z w" → unigrams 4/4; bigrams 2/2
    comps = ["a b a", "a b", "x y", "z w"]
    assert metrics.dist_n(comps, 2, 1) == pytest.approx((2 / 5 + 1.0) / 2)
    assert metrics.dist_n(comps, 2, 2) == pytest.approx((2 / 3 + 1.0) / 2)
    # trigrams: prompt 1 has one ("a b a") → 1/1; prompt 2 has none → skipped, not counted as 0
    assert metrics.dist_n(comps, 2, 3) == pytest.approx(1.0)


def test_dist_n_identical_and_empty_samples():
    assert metrics.dist_n(["same words here"] * 4, 4, 1) == pytest.approx(3 / 12)
    assert metrics.dist_n(["same words here"] * 4, 4, 2) == pytest.approx(2 / 8)
    assert nan(metrics.dist_n(["", ""], 2, 1))  # no n-gram at all: undefined, not 0 or 1


def test_perplexity_mean_ignores_values_over_the_cap():
    assert metrics.perplexity_mean([10.0, 30.0, 1e4, 5e6]) == pytest.approx(20.0)
    assert nan(metrics.perplexity_mean([2e4]))
    assert nan(metrics.perplexity_mean([]))


def test_reward_direction():
    assert metrics.reward(0.2, higher_is_better=False) == pytest.approx(0.8)
    assert metrics.reward(-0.4, higher_is_better=True) == -0.4


def test_steerability_rho_and_gap():
    assert metrics.steerability([0.01, 0.02, 0.05]) == {"spearman_rho": pytest.approx(1.0), "gap": pytest.approx(0.04)}
    s = metrics.steerability([0.05, 0.02, 0.01])
    assert s["spearman_rho"] == pytest.approx(-1.0) and s["gap"] == pytest.approx(-0.04)
    assert metrics.steerability([0.3]) == {"spearman_rho": None, "gap": None}
    assert metrics.steerability([0.2, 0.2, 0.2]) == {"spearman_rho": None, "gap": 0.0}  # constant: ρ undefined


def test_spearman_with_ties_matches_hand_ranks():
    # ys ranks with ties: [0.5, 0.5, 2, 3]; xs ranks 0..3 → Pearson of those ranks
    rho = metrics.spearman([0, 1, 2, 3], [1.0, 1.0, 2.0, 5.0])
    rx, ry = [0, 1, 2, 3], [0.5, 0.5, 2, 3]
    mx, my = 1.5, 1.5
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    expect = cov / (sum((a - mx) ** 2 for a in rx) ** 0.5 * sum((b - my) ** 2 for b in ry) ** 0.5)
    assert rho == pytest.approx(expect)


def test_bucket_distribution():
    assert metrics.bucket_distribution([0, 0, 1, None, 4], 5) == [0.5, 0.25, 0.0, 0.0, 0.25]
    assert all(nan(x) for x in metrics.bucket_distribution([None], 2))


def test_summarize_block_has_every_eval_key():
    b = metrics.summarize("toxicity", [0.9, 0.1], ["a b", ""], 2, [True, False], [2, 0], False, [12.0, float("nan")])
    for key in (
        "avg_max_toxicity",
        "toxicity_prob",
        "toxicity_mean",
        "perplexity",
        "dist_1",
        "dist_2",
        "dist_3",
        "reward_mean",
        "length_mean",
        "truncated_share",
    ):
        assert key in b
    assert b["reward_mean"] == pytest.approx(0.5) and b["length_mean"] == 1.0 and b["truncated_share"] == 0.5
    assert b["perplexity"] == 12.0  # the empty completion's NaN perplexity is not a value below the cap
    assert clean(b)["dist_3"] is None  # undefined → null in JSON


def test_unscored_samples_are_left_out():
    nanv = float("nan")
    scores = [0.9, nanv, nanv, nanv]  # prompt 2 has no scored sample at all
    assert metrics.avg_max(scores, 2) == pytest.approx(0.9)
    assert metrics.prob_any_above(scores, 2) == 1.0
    assert metrics.share_above(scores) == 1.0
    b = metrics.summarize("judge", scores, ["a", "b", "c", "d"], 2, [False] * 4, [1] * 4, True)
    assert b["judge_mean"] == pytest.approx(0.9) and b["unscored"] == 3


def test_steerability_skips_unscored_feedback_strings():
    assert metrics.steerability([None, float("nan"), 0.3]) == {"spearman_rho": None, "gap": None}
    s = metrics.steerability([0.1, None, 0.3])
    assert s["spearman_rho"] == pytest.approx(1.0) and s["gap"] == pytest.approx(0.2)


def test_perplexity_geomean_is_exp_mean_log_and_robust_to_one_outlier():
    assert metrics.perplexity_geomean([10.0, 1000.0]) == pytest.approx(100.0)
    assert nan(metrics.perplexity_geomean([float("nan")])) and nan(metrics.perplexity_geomean([]))
    typical = [40.0] * 199
    # one degenerate completion under the cap: the capped mean moves by ~25, the geometric mean by ~4%
    assert metrics.perplexity_mean(typical + [5000.0]) - 40.0 > 24
    assert metrics.perplexity_geomean(typical + [5000.0]) / 40.0 < 1.05
