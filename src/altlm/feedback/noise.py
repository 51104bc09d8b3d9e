"""Feedback ablations (docs/ablations.md): feedback noise and feedback frequency, decided per sample and seeded.

Every decision comes from its own stream, seeded by (seed, iteration, the sample's index in the iteration's request
list): it does not depend on which other samples exist, how they were batched, or whether the run was resumed.

Noise is stored as a cyclic offset (`Row.noise`): a noised sample is trained with the feedback `offset` places
further along a list, never its own.
- rm / lmc: the list is feedback_words. rm's quantiles are re-cut over the pool every iteration, so the offset is
  applied to whatever bucket the re-cut gives: the row stays noised, and its replacement stays uniform over the
  other strings.
- lmu: the list is the iteration's judged samples; the sample takes the sentence and score bucket of the one
  `offset` places further (feedback is free text, so "another string" is another sample's).
"""

from __future__ import annotations

import random
from typing import Sequence

from .base import Feedback


def _stream(seed: int, iteration: int, index: int, what: str) -> random.Random:
    # a string seed is hashed with SHA-512: the same stream on every platform and Python run
    return random.Random(f"{seed}/{iteration}/{index}/{what}")


def noise_offset(seed: int, iteration: int, index: int, p: float, choices: int) -> int | None:
    """The sample's offset in 1..choices-1 with probability p, else None. Both draws come from the sample's own
    stream, the first deciding whether, so the set of noised samples does not depend on `choices`."""
    if p <= 0 or choices < 2:
        return None
    rng = _stream(seed, iteration, index, "noise")
    noised = rng.random() < p
    offset = 1 + int(rng.random() * (choices - 1))
    return offset if noised else None


def noised_bucket(bucket: int, offset: int | None, k: int) -> int:
    """The bucket a row is trained with: its own, or the one `offset` places further (cyclically over k)."""
    return bucket if offset is None else (bucket + offset) % k


def labelled_indices(seed: int, iteration: int, n: int, fraction: float) -> list[int]:
    """feedback_fraction: which of the iteration's n samples get feedback, in request order. Exactly
    round(fraction · n) of them (at least one), chosen uniformly from the iteration's own stream."""
    if fraction >= 1.0:
        return list(range(n))
    keep = max(1, round(fraction * n)) if n else 0
    rng = random.Random(f"{seed}/{iteration}/fraction")
    return sorted(rng.sample(range(n), keep))


def noise_categories(
    fbs: Sequence[Feedback], indices: Sequence[int], vocabulary: list[str], seed: int, iteration: int, p: float
) -> tuple[list[Feedback], list[int | None]]:
    """lmc: each judged sample's category replaced, with probability p, by another of `vocabulary` (uniformly).
    `indices`: the samples' positions in the iteration's request list (their streams). The score stays the
    judge's (the measurement); text and bucket are what the row is trained with. Invalid samples are left alone."""
    out, offsets = [], []
    k = len(vocabulary)
    for f, index in zip(fbs, indices):
        offset = noise_offset(seed, iteration, index, p, k) if (f.valid and f.bucket is not None) else None
        if offset is not None:
            bucket = noised_bucket(f.bucket, offset, k)
            f = Feedback(vocabulary[bucket], f.score, bucket, f.valid, f.raw, f.agreement)
        out.append(f)
        offsets.append(offset)
    return out, offsets


def noise_sentences(
    fbs: Sequence[Feedback], indices: Sequence[int], seed: int, iteration: int, p: float
) -> tuple[list[Feedback], list[int | None]]:
    """lmu: each judged sample's sentence (and its score bucket) replaced, with probability p, by another judged
    sample's of the same iteration, drawn uniformly. The offset counts along the iteration's judged samples."""
    judged = [j for j, f in enumerate(fbs) if f.valid and f.text is not None]
    out, offsets = list(fbs), [None] * len(fbs)
    for position, j in enumerate(judged):
        offset = noise_offset(seed, iteration, indices[j], p, len(judged))
        if offset is None:
            continue
        donor = fbs[judged[(position + offset) % len(judged)]]
        f = fbs[j]
        out[j] = Feedback(donor.text, f.score, donor.bucket, f.valid, f.raw, f.agreement)
        offsets[j] = offset
    return out, offsets
