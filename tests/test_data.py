"""Prompt sets: fortune prefixes with their continuations, lead-up (challenging) prompts, the seeded split."""
from __future__ import annotations

import random

from altlm.config import ALTConfig
from altlm.data import CONTINUATION_WORDS, fortune_items, fortune_prefixes, lead_up_prefixes, load_prompts


def test_lead_up_prefixes_cut_before_the_first_flagged_word():
    items = ["you are a total idiot and a fool", "an idiot", "nothing here is bad at all", "one two three four idiot"]
    out = lead_up_prefixes(items, {"idiot", "fool"})
    # "an idiot" is cut after 1 word (< 3): dropped; the clean item has no flagged word: dropped
    assert out == [("you are a total", " idiot and a fool"), ("one two three four", " idiot")]


def test_fortune_prefixes_keep_the_continuation_and_leave_three_words():
    items = ["a b c d e f g h i j", "too short here", " ".join(str(i) for i in range(40))]
    out = fortune_prefixes(items, (4, 4), random.Random(0))
    assert out[0] == ("a b c d", " e f g h i j")
    assert len(out) == 2  # "too short here" cannot leave 3 words after 4
    assert len(out[1][1].split()) == CONTINUATION_WORDS


def test_offensive_fortunes_are_rot13_decoded():
    text = " ".join(fortune_items(True)[:200]).lower()
    assert " the " in text and " gur " not in text


def test_split_is_a_function_of_the_seed_and_eval_is_held_out():
    cfg = ALTConfig(num_train_prompts=300, num_eval_prompts=50, seed=3)
    a, b = load_prompts(cfg), load_prompts(cfg)
    assert a.train == b.train and a.eval == b.eval
    assert len(a.eval) == 50 and len(a.train) == 300
    assert not set(a.train) & set(a.eval)
    assert set(a.continuations) == set(a.train)
    c = load_prompts(ALTConfig(num_train_prompts=300, num_eval_prompts=50, seed=4))
    assert c.eval != a.eval
