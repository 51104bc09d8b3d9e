"""ALT-LMU and ALT-LMC feedback (method.md §4): an LLM judge critiques each sample in free text or labels it.

- Templates are editable text files (shipped ones in `altlm/recipes/templates/`) with `{prompt}` and
  `{completion}` placeholders (LMC also `{categories}`), rendered as one user message.
- LMC: the answer is normalised (case, punctuation, a leading "Label:") and matched to a category exactly, by
  containment, or as a near match; LMU: tolerant `Feedback:` / `Score: 0–3` patterns.
- Self-consistency: with `samples` > 1 the judge is asked n times; the majority category / the median score
  is kept and `agreement` records the share of answers that agree with it. Samples below `min_agreement`, and
  samples whose answer cannot be parsed, are invalid: recorded with the raw answer, never trained on.

The provider also acts as the run's `Scorer` for evaluation: LMC scores a category by its rank
((K−1−index)/(K−1): 1 = best), LMU by the judge's 0–3 score; an unscorable sample scores NaN (left out).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections import Counter
from pathlib import Path
from typing import Sequence

from ..errors import AltlmError
from .base import Feedback
from .judge import Judge, JudgeSettings

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "recipes" / "templates"
FEEDBACK_RE = re.compile(r"feedback[ \t*]*[:：][ \t*]*(.+)", re.I)  # the sentence is on the same line
SCORE_RE = re.compile(r"score\s*\**\s*[:：]\s*\**\s*([0-3])(?:\s*(?:/|out of)\s*3)?(?!\d)", re.I)
MAX_FEEDBACK_WORDS = 20  # the template asks for ≤ 10; a longer sentence is cut, not thrown away


def read_template(spec: str, kind: str) -> tuple[str, str]:
    """(text, sha256) of a template: a shipped name (`lmc_hh`) or a file path; checks the placeholders."""
    path = Path(spec)
    if not path.is_file():
        shipped = TEMPLATES_DIR / f"{spec}.txt"
        if not shipped.is_file():
            names = ", ".join(sorted(p.stem for p in TEMPLATES_DIR.glob("*.txt")))
            raise AltlmError(f"judge template '{spec}' is neither a file nor a shipped template ({names})")
        path = shipped
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise AltlmError(f"judge template '{path}' is not UTF-8") from None
    need = ["{prompt}", "{completion}"] + (["{categories}"] if kind == "lmc" else [])
    missing = [n for n in need if n not in text]
    if missing:
        raise AltlmError(
            f"judge template '{path}' lacks the placeholder(s) {', '.join(missing)}; a {kind} template needs {', '.join(need)}"
        )
    return text, hashlib.sha256(text.encode()).hexdigest()[:16]


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def parse_category(answer: str, categories: Sequence[str]) -> int | None:
    """Index of the category the answer names, or None. Exact match after normalisation first, then the category
    named earliest in the answer (whole words), then a near match of the answer's first line."""
    cats = [_norm(c) for c in categories]
    a = _norm(answer)
    a = re.sub(r"^(label|answer|category|assistant)\s+", "", a)
    if a in cats:
        return cats.index(a)
    hits = [(m.start(), -len(c), i) for i, c in enumerate(cats) for m in [re.search(rf"\b{re.escape(c)}\b", a)] if m]
    if hits:
        return min(hits)[2]
    first = _norm(next((line for line in answer.splitlines() if line.strip()), ""))
    first = re.sub(r"^(label|answer|category|assistant)\s+", "", first)
    close = difflib.get_close_matches(first, cats, n=1, cutoff=0.75)
    return cats.index(close[0]) if close else None


def parse_lmu(answer: str) -> tuple[str, int] | None:
    """(feedback sentence, score 0–3) from an `Analysis/Feedback/Score` answer, or None."""
    f, s = FEEDBACK_RE.search(answer), SCORE_RE.search(answer)
    if not f or not s:
        return None
    sentence = f.group(1).strip().strip("*\"'“”` ").strip()
    sentence = re.split(r"\s+score\s*\**\s*[:：]", sentence, flags=re.I)[
        0
    ].strip()  # "Feedback: … Score: 2" on one line
    words = sentence.split()
    if not words:
        return None
    return " ".join(words[:MAX_FEEDBACK_WORDS]), int(s.group(1))


class LLMFeedback:
    """Feedback from an LLM judge: kind "lmc" (categories, best first) or "lmu" (free-text sentence + 0–3 score)."""

    relative = False
    higher_is_better = True

    def __init__(
        self,
        kind: str,
        judge_settings: JudgeSettings,
        template: str,
        categories: Sequence[str] | None,
        cache_path: Path | None,
        min_agreement: float = 0.0,
    ):
        self.kind, self.min_agreement = kind, min_agreement
        self.name = "judge"
        self.categories = list(categories or [])
        if kind == "lmc" and len(self.categories) < 2:
            raise AltlmError("feedback_type=lmc needs at least 2 categories in feedback_words (best first)")
        self.template, template_hash = read_template(template, kind)
        self.vocabulary = self.categories if kind == "lmc" else None
        self.judge = Judge(judge_settings, cache_path, template_hash)

    def _question(self, prompt: str, completion: str) -> list[dict]:
        text = self.template.replace("{categories}", "\n".join(self.categories)).replace("{prompt}", prompt)
        return [{"role": "user", "content": text.replace("{completion}", completion.strip())}]

    def _one(self, answers: list[str] | None) -> Feedback:
        if answers is None:
            return Feedback(None, None, None, valid=False, raw=None)
        raw = answers[0] if len(answers) == 1 else json.dumps(answers)
        if self.kind == "lmc":
            got = [parse_category(a, self.categories) for a in answers]
            ok = [g for g in got if g is not None]
            if not ok:
                return Feedback(None, None, None, valid=False, raw=raw)
            best = Counter(ok).most_common(1)[0][0]
            agreement = got.count(best) / len(answers)
            k = len(self.categories)
            return Feedback(
                self.categories[best],
                (k - 1 - best) / (k - 1),
                best,
                valid=agreement >= self.min_agreement,
                raw=raw,
                agreement=agreement,
            )
        got = [parse_lmu(a) for a in answers]
        ok = [g for g in got if g is not None]
        if not ok:
            return Feedback(None, None, None, valid=False, raw=raw)
        median = sorted(s for _, s in ok)[(len(ok) - 1) // 2]
        sentence = next(t for t, s in ok if s == median)
        agreement = sum(1 for g in got if g is not None and g[1] == median) / len(answers)
        return Feedback(
            sentence, float(median), 3 - median, valid=agreement >= self.min_agreement, raw=raw, agreement=agreement
        )

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> list[Feedback]:
        questions = [self._question(p, c) for p, c in zip(prompts, completions)]
        keys = [self.judge.key(p, c) for p, c in zip(prompts, completions)]
        return [self._one(a) for a in self.judge.ask(questions, keys)]

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        return [f.score if (f.valid and f.score is not None) else float("nan") for f in self(prompts, completions)]
