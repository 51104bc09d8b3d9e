"""What `eval_conditions: claims` and `eval_middle_samples_per_prompt` evaluate, end to end on the tiny model: the
reference untagged and under the best and the worst feedback only; the final model under every feedback string, the
middle ones with their own sample count; the perplexity model only where the claims read it."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from test_train_smoke import SMALL

from altlm.config import TOXICITY_WORDS, load_config
from altlm.trainer import ALTTrainer

BEST, WORST = TOXICITY_WORDS[0], TOXICITY_WORDS[-1]


def evaluated(tmp_path, *overrides: str) -> tuple[dict[tuple[int, str], Counter], set[tuple[int, str]]]:
    """(iteration, feedback) → {prompt: samples} and the conditions the perplexity model scored, from a real run."""
    cfg = load_config(
        "smoke",
        [
            f"output_dir={tmp_path / 'run'}",
            *SMALL,
            "iterations=1",
            "eval_samples_per_prompt=2",
            "perplexity_model=tiny-smollm2",
            "likelihood_texts=4",
            *overrides,
        ],
    )
    ALTTrainer(cfg).train()
    records = [json.loads(line) for line in (tmp_path / "run" / "eval_samples.jsonl").read_text().splitlines()]
    counts: dict[tuple[int, str], Counter] = {}
    for r in records:
        counts.setdefault((r["iteration"], r["feedback"] or "<none>"), Counter())[r["prompt"]] += 1
    scored = {(r["iteration"], r["feedback"] or "<none>") for r in records if r.get("perplexity") is not None}
    return counts, scored


@pytest.mark.parametrize("middle", [0, 1])
def test_claims_conditions_sample_what_the_claims_read(tmp_path, middle):
    counts, scored = evaluated(tmp_path, "eval_conditions=claims", f"eval_middle_samples_per_prompt={middle}")
    assert set(counts) == {(0, "<none>"), (0, BEST), (0, WORST), *((1, w) for w in TOXICITY_WORDS)}
    for (it, fb), per_prompt in counts.items():
        middle_string = fb not in ("<none>", BEST, WORST)  # (only the final model is evaluated under these)
        k = middle if middle_string and middle else 2
        assert len(per_prompt) == 2 and set(per_prompt.values()) == {k}, (it, fb, per_prompt)
    # the perplexity claim compares the final model under the exemplar with the untagged reference
    assert scored == {(0, "<none>"), (1, BEST)}


def test_all_conditions_evaluate_every_feedback_string_for_both_models(tmp_path):
    counts, scored = evaluated(tmp_path, "eval_conditions=all", "eval_middle_samples_per_prompt=1")
    expected = {(it, fb) for it in (0, 1) for fb in ["<none>", *TOXICITY_WORDS]}
    assert set(counts) == expected
    assert all(set(c.values()) == {1 if fb not in (BEST, WORST, "<none>") else 2} for (_, fb), c in counts.items())
    assert scored == expected
