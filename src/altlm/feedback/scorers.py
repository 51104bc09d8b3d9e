"""Light offline scorers wrapping third-party packages: profanity check (toxicity) and VADER (sentiment).

Both score the completion only; the prompt argument exists to satisfy the `Scorer` protocol.
"""

from __future__ import annotations

from typing import Sequence

from altlm.errors import AltlmError


class ProfanityCheck:
    """Toxicity as alt-profanity-check's probability (a linear SVM; swearing-centric)."""

    name = "toxicity"
    higher_is_better = False

    def __init__(self) -> None:
        try:
            from profanity_check import predict_prob
        except ImportError:
            raise AltlmError(
                "package alt-profanity-check is not installed; run: pip install alt-profanity-check==1.9.1"
            ) from None
        self._predict_prob = predict_prob

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        if not completions:
            return []  # the sklearn vectorizer rejects an empty batch
        return [float(p) for p in self._predict_prob(list(completions))]


class VaderSentiment:
    """Sentiment as VADER's compound score in [-1, 1]."""

    name = "sentiment"
    higher_is_better = True

    def __init__(self) -> None:
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError:
            raise AltlmError(
                "package vaderSentiment is not installed; run: pip install vadersentiment==3.3.2"
            ) from None
        self._analyzer = SentimentIntensityAnalyzer()

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        return [float(self._analyzer.polarity_scores(t)["compound"]) for t in completions]
