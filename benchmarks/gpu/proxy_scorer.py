"""A stand-in scorer for GPU timing runs (`scorer=callable reward_callable=proxy_scorer:score`, with
benchmarks/gpu on PYTHONPATH): the offline toxicity scorers need packages (h5py and the Jigsaw weights,
scikit-learn) a bare GPU machine lacks. It scores the share of letters among a completion's characters: a cheap
deterministic scalar that spreads over the quantile buckets like a real score. Not a toxicity measure."""

from __future__ import annotations


def score(prompts: list[str], completions: list[str]) -> list[float]:
    return [sum(ch.isalpha() for ch in c) / max(len(c), 1) for c in completions]
