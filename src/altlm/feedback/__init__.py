"""Feedback providers: scorers (toxicity, sentiment) and the ALT-RM quantile provider built on them."""
from __future__ import annotations

from ..errors import AltlmError
from .base import Feedback, FeedbackProvider, Scorer
from .quantile import QuantileFeedback, grouped_buckets, quantile_buckets

__all__ = ["Feedback", "FeedbackProvider", "Scorer", "QuantileFeedback", "quantile_buckets", "grouped_buckets", "build_scorer"]


def build_scorer(name: str) -> Scorer:
    if name == "jigsaw":
        from .jigsaw import JigsawToxicity

        return JigsawToxicity()
    if name == "profanity":
        from .scorers import ProfanityCheck

        return ProfanityCheck()
    if name == "vader":
        from .scorers import VaderSentiment

        return VaderSentiment()
    raise AltlmError(f"unknown scorer '{name}'; use jigsaw, profanity or vader")
