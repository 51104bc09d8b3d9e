"""The feedback-provider interface: what every scorer and feedback source returns."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence


@dataclass
class Feedback:
    """Feedback for one (prompt, completion).

    `text` is what conditions the model (None until a relative provider, e.g. quantiles, assigns it);
    `score` is an optional scalar (reward, toxicity...); `bucket` an optional category index (0 = best).
    """

    text: str | None
    score: float | None = None
    bucket: int | None = None
    valid: bool = True
    raw: str | None = None  # what an LLM judge answered, verbatim (JSON list when asked several times)
    agreement: float | None = None  # self-consistency: share of the judge's answers agreeing with the kept one


class Scorer(Protocol):
    """A scalar scorer of completions, e.g. a toxicity classifier or a reward model."""

    name: str  # metric name used in reports, e.g. "toxicity" or "sentiment"
    higher_is_better: bool  # False for toxicity

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]: ...


class FeedbackProvider(Protocol):
    """Gives every (prompt, completion) a Feedback. `vocabulary` lists the feedback strings best→worst
    (None for free text); `relative` providers assign text from the whole pool (see QuantileFeedback)."""

    vocabulary: list[str] | None
    relative: bool

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> list[Feedback]: ...
