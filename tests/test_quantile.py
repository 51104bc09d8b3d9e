"""Quantile buckets (method.md §3–4): K equal quantiles, best first, remainder to the worst bucket."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from altlm.config import TOXICITY_WORDS
from altlm.feedback import QuantileFeedback, grouped_buckets, quantile_buckets
from altlm.feedback.base import Feedback
from altlm.feedback.scorers import ProfanityCheck, VaderSentiment


def hand_buckets(scores, k, higher_is_better):
    """Reference: rank best-first (distinct scores), cut into k runs of n//k, surplus to the last bucket."""
    n = len(scores)
    ranked = sorted(range(n), key=lambda i: scores[i], reverse=higher_is_better)
    size = n // k
    out = [None] * n
    for pos, i in enumerate(ranked):
        out[i] = min(pos // size, k - 1)
    return out


def test_ten_scores_lower_is_better():
    tox = [0.91, 0.05, 0.33, 0.02, 0.74, 0.51, 0.12, 0.68, 0.27, 0.44]
    # sorted ascending: .02 .05 | .12 .27 | .33 .44 | .51 .68 | .74 .91
    expected = [4, 0, 2, 0, 4, 3, 1, 3, 1, 2]
    assert quantile_buckets(tox, 5, higher_is_better=False) == expected
    assert Counter(expected) == {b: 2 for b in range(5)}


def test_ten_scores_higher_is_better():
    reward = [0.91, 0.05, 0.33, 0.02, 0.74, 0.51, 0.12, 0.68, 0.27, 0.44]
    expected = [0, 4, 2, 4, 0, 1, 3, 1, 3, 2]
    assert quantile_buckets(reward, 5, higher_is_better=True) == expected


def test_remainder_goes_to_worst_bucket():
    scores = [i / 12 for i in range(12)]
    random.Random(3).shuffle(scores)
    for hib in (False, True):
        b = quantile_buckets(scores, 5, hib)
        assert [Counter(b)[i] for i in range(5)] == [2, 2, 2, 2, 4]
        # the four worst scores are the worst bucket
        worst = sorted(range(12), key=lambda i: scores[i], reverse=not hib)[:4]
        assert {b[i] for i in worst} == {4}
    assert [Counter(quantile_buckets(list(range(14)), 5, False))[i] for i in range(5)] == [2, 2, 2, 2, 6]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n", [5, 10, 17, 23, 50])
def test_matches_hand_computation(seed, n):
    rng = random.Random(seed)
    scores = rng.sample(range(1000), n)  # distinct
    scores = [s / 1000 for s in scores]
    for hib in (False, True):
        assert quantile_buckets(scores, 5, hib) == hand_buckets(scores, 5, hib)
    assert quantile_buckets(scores, 3, False) == hand_buckets(scores, 3, False)


def test_ties_share_a_bucket():
    # 10 items; the tie group .5 spans sorted positions 3..6 (buckets 1,1,2,2 by position) → one bucket
    scores = [0.1, 0.2, 0.3, 0.5, 0.5, 0.5, 0.5, 0.8, 0.9, 1.0]
    b = quantile_buckets(scores, 5, higher_is_better=False)
    assert len({b[i] for i in (3, 4, 5, 6)}) == 1
    assert b[3] == 2  # the bucket of the group's middle position ((3+6)//2 = 4 → bucket 2)
    assert b[:3] == [0, 0, 1] and b[7:] == [3, 4, 4]
    # all equal: everybody gets the same (middle) bucket
    same = quantile_buckets([0.7] * 10, 5, False)
    assert len(set(same)) == 1
    # ties never depend on input order
    perm = [6, 2, 9, 0, 4, 1, 8, 3, 7, 5]
    b2 = quantile_buckets([scores[i] for i in perm], 5, False)
    assert b2 == [b[i] for i in perm]


@pytest.mark.parametrize("seed", range(3))
def test_ties_first_without_ties_is_the_plain_cut(seed):
    rng = random.Random(seed)
    for n in (5, 9, 10, 14, 23, 50):
        scores = [s / 1000 for s in rng.sample(range(1000), n)]  # distinct
        for hib in (False, True):
            assert quantile_buckets(scores, 5, hib, ties="first") == hand_buckets(scores, 5, hib)


def test_ties_first_gives_a_mass_point_the_bucket_where_it_begins():
    # VADER's shape: strong and mild positives, one mildly positive text, a mass point at 0, then negatives.
    # Best first, 20 items, 5 buckets of 4: positions 0-3 | 4-7 | 8 (0.1) and the zeros at 9-15 | 16-19.
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1] + [0.0] * 7 + [-0.1, -0.2, -0.5, -0.9]
    middle = quantile_buckets(scores, 5, higher_is_better=True)
    first = quantile_buckets(scores, 5, higher_is_better=True, ties="first")
    # middle: the zeros' middle position (12) is in bucket 3, so the middle bucket holds one text and every
    # negative text shares the worst bucket
    assert middle == [0] * 4 + [1] * 4 + [2] + [3] * 7 + [4] * 4
    # first: the zeros join the bucket they begin in (2); the four positions after them are cut again over the
    # two buckets left, so the milder negatives and the worst ones get different words
    assert first == [0] * 4 + [1] * 4 + [2] + [2] * 7 + [3, 3, 4, 4]
    # the same with lower-is-better scores (toxicity's direction), and whatever the input order
    assert quantile_buckets([-s for s in scores], 5, higher_is_better=False, ties="first") == first
    perm = list(range(20))
    random.Random(4).shuffle(perm)
    shuffled = quantile_buckets([scores[i] for i in perm], 5, True, ties="first")
    assert shuffled == [first[i] for i in perm]
    # per prompt: the same rule inside each group
    assert grouped_buckets(scores * 2, [1] * 20 + [2] * 20, 5, True, ties="first") == first * 2


@pytest.mark.parametrize("ties", ["middle", "first"])
def test_buckets_are_monotone_in_score(ties):
    rng = random.Random(0)
    scores = [round(rng.random(), 1) for _ in range(40)]  # many ties
    for hib in (False, True):
        b = quantile_buckets(scores, 5, hib, ties)
        for i in range(40):
            for j in range(40):
                better = scores[i] > scores[j] if hib else scores[i] < scores[j]
                if better:
                    assert b[i] <= b[j]
                if scores[i] == scores[j]:
                    assert b[i] == b[j]


def test_fewer_items_than_buckets():
    assert quantile_buckets([0.3], 5, False) == [0]
    # spread best → worst over the k buckets
    assert quantile_buckets([0.9, 0.1, 0.5], 5, False) == [4, 0, 2]
    assert quantile_buckets([0.9, 0.1, 0.5], 5, True) == [0, 4, 2]
    assert quantile_buckets([0.2, 0.4], 5, False) == [0, 4]


def test_empty():
    assert quantile_buckets([], 5, False) == []
    assert grouped_buckets([], [], 5, True) == []


def test_grouped_buckets_per_prompt():
    scores = [
        0.1,
        0.9,
        0.5,
        0.3,
        0.7,  # prompt 7
        10,
        50,
        30,
        40,
        20,  # prompt 3: a different scale, cut on its own
        0.2,
        0.2,
    ]  # prompt 9: two tied samples
    groups = [7] * 5 + [3] * 5 + [9] * 2
    b = grouped_buckets(scores, groups, 5, higher_is_better=True)
    assert b[:5] == [4, 0, 2, 3, 1]
    assert b[5:10] == [4, 0, 2, 1, 3]
    assert b[10] == b[11]
    # a global cut would have put all of prompt 3 in the best bucket
    assert set(quantile_buckets(scores, 5, True)[5:10]) == {0, 1, 2}
    # interleaved groups give the same buckets as contiguous ones
    order = list(range(12))
    random.Random(1).shuffle(order)
    b_shuf = grouped_buckets([scores[i] for i in order], [groups[i] for i in order], 5, True)
    assert b_shuf == [b[i] for i in order]


def test_quantile_feedback_words_global():
    qf = QuantileFeedback(ProfanityCheck(), TOXICITY_WORDS, "global")  # a real lower-is-better scorer
    tox = [0.91, 0.05, 0.33, 0.02, 0.74, 0.51, 0.12, 0.68, 0.27, 0.44]
    buckets, words = qf.rebucket(tox, [0] * 10)
    assert buckets == [4, 0, 2, 0, 4, 3, 1, 3, 1, 2]
    assert words == [TOXICITY_WORDS[b] for b in buckets]
    assert words[3] == "Lowest Toxicity" and words[0] == "Maximum Toxicity"


def test_quantile_feedback_per_prompt_and_call():
    words = ["Excellent.", "Good.", "Mediocre.", "Bad.", "Horrible."]
    vader = VaderSentiment()  # a real higher-is-better scorer
    qf = QuantileFeedback(vader, words, "per_prompt")
    comps = ["I hate this, it is awful", "it is bad", "it is a table", "it is good", "I love it, wonderful and great"]
    fbs = qf(["p"] * 5, comps)
    scores = vader.score(["p"] * 5, comps)
    assert scores == sorted(scores)  # the texts really go from worst to best sentiment
    assert fbs == [Feedback(text=None, score=s) for s in scores]
    buckets, texts = qf.rebucket(scores * 2, [0] * 5 + [1] * 5)
    assert buckets == [4, 3, 2, 1, 0] * 2
    assert texts == ["Horrible.", "Bad.", "Mediocre.", "Good.", "Excellent."] * 2
    # global mode on the same scores: the duplicates tie, so each pair shares a bucket
    gb, _ = QuantileFeedback(vader, words, "global").rebucket(scores * 2, [0] * 5 + [1] * 5)
    assert gb[:5] == gb[5:]


def test_quantile_ties_reaches_the_trainers_feedback(tmp_path):
    """The config key goes through build_feedback, the call the trainer makes, into the pool's re-cut."""
    from altlm.config import load_config
    from altlm.feedback import build_feedback

    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1] + [0.0] * 7 + [-0.1, -0.2, -0.5, -0.9]
    got = {}
    for ties in ("middle", "first"):
        cfg = load_config("sentiment-demo", [f"quantile_ties={ties}"])
        provider, _ = build_feedback(cfg, tmp_path)
        got[ties], words = provider.rebucket(scores, [0] * 20)
        assert words[15] == cfg.feedback_words[got[ties][15]]
    assert got["middle"][9:16] == [3] * 7 and got["first"][9:16] == [2] * 7
