"""ALT-RM: turn any scalar scorer into quantile buckets and feedback words (method.md §3–4).

Quantiles are *relative*: a sample's words depend on the other samples, so the trainer re-buckets the active
pool after every sampling round — over the whole pool (`global`, the toxicity/Quark regime) or within each
prompt's samples (`per_prompt`, the TL;DR regime).
"""

from __future__ import annotations

from typing import Sequence

from .base import Feedback, Scorer
from .noise import noised_bucket


def quantile_buckets(scores: Sequence[float], k: int, higher_is_better: bool, ties: str = "middle") -> list[int]:
    """Bucket 0 = best. Sort best-first and cut into k equal quantiles; the remainder of n/k goes to the worst
    bucket (Quark's rule). Tied scores share one bucket, so identical scores never get contradictory feedback
    (bucket sizes may then differ):
    - `middle`: the bucket of the tie group's middle position.
    - `first`: the bucket where the group begins (rank method "min"); when a group runs past its bucket's end, the
      positions after it are cut again into equal quantiles over the buckets left, so those buckets still get rows.
      A scorer with a mass point inside its range (VADER's exact 0 for text without sentiment words, about a third
      of the samples) then puts the mass point in the bucket where it begins (the middle tag) instead of the one
      below it."""
    n = len(scores)
    if n == 0:
        return []
    size = n // k
    order = sorted(range(n), key=lambda i: (-scores[i] if higher_is_better else scores[i], i))
    if size:
        pos_bucket = [min(p // size, k - 1) for p in range(n)]
    else:  # fewer samples than buckets: spread them best-to-worst over the k buckets
        pos_bucket = [round(p * (k - 1) / max(n - 1, 1)) for p in range(n)]
    out = [0] * n
    bucket, end = 0, size  # ties=first: the current bucket and the position where it ends
    p = 0
    while p < n:
        q = p
        while q + 1 < n and scores[order[q + 1]] == scores[order[p]]:
            q += 1
        if ties == "middle" or not size:
            b = pos_bucket[(p + q) // 2]
        else:
            if p >= end and bucket < k - 1:
                overran = p > end  # the group before ran past the end: cut what is left again
                bucket += 1
                end = p + (n - p) // (k - bucket) if overran else end + size
            b = bucket
        for j in range(p, q + 1):
            out[order[j]] = b
        p = q + 1
    return out


def grouped_buckets(
    scores: Sequence[float], groups: Sequence[int], k: int, higher_is_better: bool, ties: str = "middle"
) -> list[int]:
    """quantile_buckets within each group (per-prompt quantiles)."""
    idx: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        idx.setdefault(g, []).append(i)
    out = [0] * len(scores)
    for members in idx.values():
        for i, b in zip(members, quantile_buckets([scores[i] for i in members], k, higher_is_better, ties)):
            out[i] = b
    return out


class QuantileFeedback:
    """ALT-RM provider: scores from any Scorer; words assigned by `rebucket` over the pool."""

    relative = True

    def __init__(self, scorer: Scorer, words: list[str], mode: str = "global", ties: str = "middle"):
        self.scorer, self.vocabulary, self.mode, self.ties = scorer, list(words), mode, ties

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> list[Feedback]:
        # NaN: the scorer could not score this text (e.g. an API error): kept in the pool as invalid, never trained on
        return [Feedback(text=None, score=s, valid=s == s) for s in self.scorer.score(prompts, completions)]

    def rebucket(
        self, scores: Sequence[float], prompt_ids: Sequence[int], noise: Sequence[int | None] | None = None
    ) -> tuple[list[int], list[str]]:
        """Buckets and words over the pool, one per row. `noise`: each row's feedback_noise offset (None: its own
        bucket); the quantiles are cut on the true scores, the offset then moves a noised row off its bucket."""
        k, hib = len(self.vocabulary), self.scorer.higher_is_better
        if self.mode == "global":
            buckets = quantile_buckets(scores, k, hib, self.ties)
        else:
            buckets = grouped_buckets(scores, prompt_ids, k, hib, self.ties)
        if noise is not None:
            buckets = [noised_bucket(b, offset, k) for b, offset in zip(buckets, noise)]
        return buckets, [self.vocabulary[b] for b in buckets]
