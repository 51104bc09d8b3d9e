"""The feedback-provider interface: what every scorer and feedback source returns."""

from __future__ import annotations

import threading
import time
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


class RateLimiter:
    """At most `per_second` calls of `wait()` per second across threads (0 = unlimited): each caller reserves the
    next free slot under a lock, then sleeps outside it until that slot comes."""

    def __init__(self, per_second: float):
        self.per_second, self._next, self._lock = per_second, 0.0, threading.Lock()

    def wait(self) -> None:
        if self.per_second <= 0:
            return
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next)
            self._next = slot + 1.0 / self.per_second
        time.sleep(max(0.0, slot - now))
