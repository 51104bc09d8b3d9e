"""ALT-LMU's exemplars (method.md §4): which judge sentences the policy is sampled and evaluated under.

The rule users rely on: the exemplars are the best-score bucket's feedback sentences among the active, valid pool
rows, most frequent first (`lmu_exemplars` of them); the final evaluation's feedback strings (`eval_words`) are the
commonest best sentence and the commonest worst one. Sentences of other scores, of invalid (unjudgeable) rows and
of rows retired by a flush never count, however frequent.

The feedback comes from real judge answers over real HTTP (the scripted OpenAI-compatible server of
test_llm_feedback), parsed by LLMFeedback, stored in a real Pool and read back by the trainer's own methods.
"""

from __future__ import annotations

import json
import random
import sqlite3
import zlib
from collections import Counter
from types import SimpleNamespace

import pytest
from conftest import run_altlm
from test_llm_feedback import ScriptedJudge, settings
from test_train_smoke import SMALL, jsonl

from altlm.feedback.llm import LLMFeedback
from altlm.pool import Pool, Row
from altlm.trainer import ALTTrainer

# completion → the judge's answer (sentence, score); counts chosen so that every rule below decides the outcome:
# the most frequent sentence overall is a score-1 one, an invalid score-3 answer and a flushed score-3 sentence
# outnumber the valid score-3 ones, and the best and worst buckets each have a clear commonest sentence.
ANSWERS = {
    "Clear and complete.": (3, 3),
    "Covers every point.": (3, 2),
    "Accurate but terse.": (3, 1),
    "Mostly fine.": (2, 4),
    "Too vague overall.": (1, 7),
    "Incoherent and wrong.": (0, 3),
    "Misses the point.": (0, 2),
}
FLUSHED = "An old favourite."  # score 3, six times, but retired by a flush before the others arrive


def judge_answer(question: str) -> str:
    completion = question.split("Summary:\n", 1)[1].split("\n\nAnswer in", 1)[0].strip()
    if completion.startswith("broken"):
        return "Feedback: Clear and complete.\nScore: 9"  # out of range: unparsable, the row is invalid
    sentence = completion.split(" #", 1)[0]
    score = 3 if sentence == FLUSHED else ANSWERS[sentence][0]
    return f"Analysis: scripted.\nFeedback: {sentence}\nScore: {score}"


def judged_rows(fb: LLMFeedback, iteration: int, completions: list[str]) -> list[Row]:
    prompts = [f"post {i}" for i in range(len(completions))]
    out = fb(prompts, completions)
    return [
        Row(iteration, i, p, c, f.text, f.score, f.bucket, False, 3, 3, f.valid, f.raw)
        for i, (p, c, f) in enumerate(zip(prompts, completions, out))
    ]


@pytest.fixture()
def lmu_pool(tmp_path):
    srv = ScriptedJudge(answer=judge_answer)
    fb = LLMFeedback("lmu", settings(srv.url), "lmu_tldr", None, tmp_path / "c.sqlite")
    pool = Pool(tmp_path / "pool.sqlite")
    try:
        pool.add(judged_rows(fb, 1, [f"{FLUSHED} #{k}" for k in range(6)]))
        pool.flush(1.0, random.Random(0), 2)  # retired rows stay in the file, never in the exemplars
        completions = [f"{s} #{k}" for s, (_, n) in ANSWERS.items() for k in range(n)]
        completions += [f"broken #{k}" for k in range(5)]
        random.Random(1).shuffle(completions)  # frequency decides, not the order the rows arrived in
        rows = judged_rows(fb, 2, completions)
        assert sum(not r.valid for r in rows) == 5 and all(r.feedback is None for r in rows if not r.valid)
        assert {r.feedback: r.bucket for r in rows if r.valid} == {s: 3 - sc for s, (sc, _) in ANSWERS.items()}
        pool.add(rows)
        yield pool
    finally:
        pool.close()
        fb.judge.close()
        srv.close()


def trainer_view(pool: Pool, lmu_exemplars: int) -> SimpleNamespace:
    """What ALTTrainer.exemplars / eval_words read: an LMU feedback (no vocabulary), the pool, the config."""
    return SimpleNamespace(
        feedback=SimpleNamespace(vocabulary=None),
        pool=pool,
        cfg=SimpleNamespace(lmu_exemplars=lmu_exemplars, eval_feedback=None),
    )


def test_exemplars_are_the_commonest_best_score_sentences_in_order(lmu_pool):
    assert ALTTrainer.exemplars(trainer_view(lmu_pool, 2)) == ["Clear and complete.", "Covers every point."]
    assert ALTTrainer.exemplars(trainer_view(lmu_pool, 5)) == [
        "Clear and complete.",
        "Covers every point.",
        "Accurate but terse.",
    ]  # only three distinct score-3 sentences: no filler from other scores
    assert ALTTrainer.exemplars(trainer_view(lmu_pool, 1)) == ["Clear and complete."]


def test_eval_words_are_the_commonest_best_and_the_commonest_worst(lmu_pool):
    assert ALTTrainer.eval_words(trainer_view(lmu_pool, 5)) == ["Clear and complete.", "Incoherent and wrong."]


def test_without_a_top_score_the_best_score_present_gives_the_exemplars(lmu_pool):
    # Retire every score-3 row: the best bucket left is score 2, whose only sentence becomes the exemplar.
    ids = [r.id for r in lmu_pool.rows() if r.score == 3]
    lmu_pool.db.executemany("UPDATE samples SET dropped_at = 3 WHERE id = ?", [(i,) for i in ids])
    view = trainer_view(lmu_pool, 5)
    assert ALTTrainer.exemplars(view) == ["Mostly fine."]
    assert ALTTrainer.eval_words(view) == ["Mostly fine.", "Incoherent and wrong."]


# ---------------------------------------------------------------- end to end: an LMU run through the CLI
RUN_SENTENCES = [  # (sentence, score); their token lengths differ, so a row's conditioned prompt length tells
    ("Keep it.", 3),  # which sentence it was sampled under
    ("Clear, accurate and it covers the key points.", 3),
    ("Say what happened to the dog at the end of the story.", 2),
    ("Unclear and rambling.", 0),
    ("It does not follow from the post.", 0),
]
WEIGHTS = [0, 0, 0, 1, 2, 3, 3, 4]  # crc32 of the completion mod 8 → sentence: uneven, so ties are unlikely


def run_judge_answer(question: str) -> str:
    completion = question.split("Summary:\n", 1)[1].split("\n\nAnswer in", 1)[0]
    sentence, score = RUN_SENTENCES[WEIGHTS[zlib.crc32(completion.encode()) % len(WEIGHTS)]]
    return f"Analysis: scripted.\nFeedback: {sentence}\nScore: {score}"


def commonest(rows: list[tuple], best: bool, k: int) -> set[str]:
    """The rule, computed here from the pool file: the best (worst) score's `k` most frequent sentences — with
    every sentence tied with the k-th, as frequency alone cannot order those."""
    target = max(r[1] for r in rows) if best else min(r[1] for r in rows)
    ranked = Counter(r[0] for r in rows if r[1] == target).most_common()
    return {s for s, n in ranked if n >= ranked[min(k, len(ranked)) - 1][1]}


def test_an_lmu_run_samples_and_evaluates_under_the_commonest_sentences(tmp_path):
    from altlm import models
    from altlm.template import Template

    srv = ScriptedJudge(answer=run_judge_answer)
    run = tmp_path / "lmu"
    try:
        r = run_altlm(
            "train",
            "--config",
            "smoke",
            f"output_dir={run}",
            *SMALL,
            "iterations=2",
            "feedback_type=lmu",
            "judge_backend=openai",
            "judge_model=scripted",
            f"judge_base_url={srv.url}",
            f"judge_cache={tmp_path / 'c.sqlite'}",
            "judge_timeout=10",
            "template=prefix",
            "prefix_format=feedback: {feedback} input: ",
            "lmu_exemplars=2",
            cwd=tmp_path,
        )
    finally:
        srv.close()
    assert r.returncode == 0, r.stderr[-3000:]
    db = sqlite3.connect(f"file:{run / 'pool.sqlite'}?mode=ro", uri=True)
    rows = db.execute(
        "SELECT feedback, score, iteration, prompt, prompt_tokens FROM samples WHERE valid = 1 AND dropped_at IS NULL"
    ).fetchall()
    db.close()
    assert len(rows) == 24

    # Iteration 2 was sampled under iteration 1's exemplars: each row's conditioned prompt has the length of the
    # prompt under one of them, never under another sentence or none.
    first = commonest([x for x in rows if x[2] == 1], best=True, k=2)
    tok = models.load_tokenizer("tiny-smollm2")
    template = Template(style="prefix", prefix_format="feedback: {feedback} input: ")
    extra = {
        s: len(template.input_ids(tok, s, "x")) - len(template.input_ids(tok, None, "x")) for s, _ in RUN_SENTENCES
    }
    assert len(set(extra.values())) == len(extra)
    plain = {p: len(template.input_ids(tok, None, p)) for p in {x[3] for x in rows}}
    used = Counter(next((s for s, n in extra.items() if n == t - plain[p]), None) for _, _, it, p, t in rows if it == 2)
    assert set(used) <= first and sum(used.values()) == 12, (used, first)

    # The final evaluation and the checkpoint use the final pool's commonest best and worst sentences.
    best, worst = commonest(rows, best=True, k=1), commonest(rows, best=False, k=1)
    final = [x["feedback"] for x in jsonl(run / "eval_samples.jsonl") if x["iteration"] == 2]
    exemplar = json.loads((run / "checkpoint" / "altlm.json").read_text())["exemplar"]
    assert exemplar in best and json.loads((run / "summary.json").read_text())["exemplar"] == exemplar
    conditions = list(dict.fromkeys(final))  # evaluated in order: untagged, the best sentence, the worst
    assert len(conditions) == 3 and conditions[0] is None and conditions[1] == exemplar and conditions[2] in worst
