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


# ------------------------------------------------------------------------------ datasets: hub ids and local files
import json  # noqa: E402

import pytest  # noqa: E402

# (conftest points HF_DATASETS_CACHE and HF_HOME at the test run's own folder before datasets is imported)
from test_paper_recipes import hh_dialogue, tldr_prompt, write_hh, write_jsonl, write_rtp  # noqa: E402

from altlm.data import load_dataset_prompts, read_dataset  # noqa: E402
from altlm.errors import AltlmError  # noqa: E402

TINY = dict(model="tiny-smollm2")


def test_rtp_split_nontoxic_eval_validation_and_rest_train(tmp_path):
    path = write_rtp(tmp_path / "rtp.jsonl", n=60)
    cfg = ALTConfig(
        prompts=str(path),
        prompt_formatter="rtp",
        num_eval_prompts=10,
        num_val_prompts=5,
        num_train_prompts=10_000,
        eval_max_prompt_toxicity=0.5,
        **TINY,
    )
    a, b = load_prompts(cfg), load_prompts(cfg)
    assert (a.train, a.val, a.eval) == (b.train, b.val, b.eval)  # a function of the seed
    tox = {json.loads(x)["prompt"]["text"]: json.loads(x)["prompt"]["toxicity"] for x in path.read_text().splitlines()}
    assert len(a.eval) == 10 and all(tox[p] < 0.5 for p in a.eval)
    assert len(a.val) == 5 and len(a.train) == 60 - 15  # "the rest" (the long prompt is kept: truncate)
    assert not (set(a.train) & set(a.eval)) and not (set(a.train) & set(a.val)) and not (set(a.val) & set(a.eval))
    c = load_prompts(ALTConfig(**{**cfg.to_dict(), "seed": 1}))
    assert c.eval != a.eval


def test_tldr_formatter_from_csv_and_parquet(tmp_path):
    import pandas as pd

    df = pd.DataFrame(
        {
            "subreddit": ["relationships", "AskReddit", "pets"],
            "title": ["T1", "T2", "T3"],
            "post": ["My post one.", "Post two here.", "A third post."],
            "summary": ["a", "b", "c"],
        }
    )
    df.to_csv(tmp_path / "tldr.csv", index=False)
    df.to_parquet(tmp_path / "tldr.parquet")
    for name in ("tldr.csv", "tldr.parquet"):
        cfg = ALTConfig(prompts=str(tmp_path / name), prompt_formatter="tldr", num_eval_prompts=1, **TINY)
        s = load_prompts(cfg)
        assert sorted(s.train + s.eval) == sorted(tldr_prompt(r.subreddit, r.title, r.post) for r in df.itertuples())
    assert tldr_prompt("pets", "T3", "A third post.") == "SUBREDDIT: r/pets\nTITLE: T3\nPOST: A third post.\nTL;DR:"


def test_hh_formatter_keeps_the_dialogue_up_to_the_last_assistant_turn(tmp_path):
    train, test = write_hh(tmp_path, n_train=6, n_test=3)
    cfg = ALTConfig(prompts=str(train), prompt_formatter="hh", eval_split=str(test), num_eval_prompts=2, **TINY)
    s = load_prompts(cfg)
    assert sorted(s.train) == sorted(
        hh_dialogue(i).strip()[: hh_dialogue(i).strip().rindex("Final")].rstrip(" ") for i in range(6)
    )
    assert all(p.endswith("\n\nAssistant:") and p.count("Human:") == 2 for p in s.train)
    assert len(s.eval) == 2 and all("Question 100" in p for p in s.eval)  # from the eval_split file


def test_dotted_field_and_missing_fields(tmp_path):
    path = write_jsonl(tmp_path / "n.jsonl", [{"meta": {"text": f"prompt {i}"}, "id": i} for i in range(6)])
    s = load_prompts(ALTConfig(prompts=str(path), prompt_field="meta.text", num_eval_prompts=2, **TINY))
    assert sorted(s.train + s.eval) == [f"prompt {i}" for i in range(6)]
    with pytest.raises(AltlmError, match=r"no field 'meta.body' \(it has: id, meta.text\)"):
        load_prompts(ALTConfig(prompts=str(path), prompt_field="meta.body", **TINY))
    with pytest.raises(AltlmError, match=r"no field 'text' \(it has: id, meta\)"):
        load_prompts(ALTConfig(prompts=str(path), prompt_field="text", **TINY))
    with pytest.raises(AltlmError, match=r"subreddit, title, post that prompt_formatter=tldr reads \(it has: id, meta"):
        load_prompts(ALTConfig(prompts=str(path), prompt_formatter="tldr", **TINY))
    with pytest.raises(AltlmError, match="has one split, 'train'"):
        load_prompts(ALTConfig(prompts=str(path), prompt_split="test", **TINY))


def test_long_prompts_truncate_or_drop_with_a_count(tmp_path, capsys):
    path = write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": f"short prompt {i}"} for i in range(8)] + [{"prompt": "long " * 200}]
    )
    kept = load_prompts(
        ALTConfig(prompts=str(path), max_prompt_tokens=32, long_prompts="truncate", num_eval_prompts=2, **TINY)
    )
    assert "1 of 9 are longer than max_prompt_tokens=32: truncated from the left" in capsys.readouterr().out
    assert any(p.startswith("long") for p in kept.train + kept.eval)
    dropped = load_prompts(
        ALTConfig(prompts=str(path), max_prompt_tokens=32, long_prompts="drop", num_eval_prompts=2, **TINY)
    )
    assert "1 of 9 are longer than max_prompt_tokens=32: dropped" in capsys.readouterr().out
    assert len(dropped.train + dropped.eval) == 8 and not any(
        p.startswith("long") for p in dropped.train + dropped.eval
    )


def test_unreachable_hub_fails_fast_in_one_line(monkeypatch):
    """No HF_HUB_OFFLINE set: the 3-second probe finds no hub and loads cache-only instead of retrying for ~25 s.
    Checked by what happens, not by the clock: one connection attempt (the probe), and the load itself runs with
    the hub switched off (offline: datasets and huggingface_hub make no request to retry)."""
    import socket

    import datasets
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)

    attempts, offline_at_load = [], []

    def no_network(*a, **kw):
        attempts.append(a)
        raise OSError("network unreachable")

    real_load = datasets.load_dataset

    def load(*a, **kw):
        offline_at_load.append((datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE))
        return real_load(*a, **kw)

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(datasets, "load_dataset", load)
    with pytest.raises(
        AltlmError, match=r"hub is unreachable .* pass a local file instead: prompts=path/to/no-such-corpus-xyz\.jsonl"
    ):
        read_dataset("altlm-tests/no-such-corpus-xyz", "train")
    assert len(attempts) == 1 and offline_at_load == [(True, True)]
    assert datasets.config.HF_HUB_OFFLINE is False  # offline mode was only for that load


def test_bad_local_files_are_one_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\nnot json at all\n')
    with pytest.raises(AltlmError, match="cannot be read as jsonl"):
        read_dataset(str(tmp_path / "bad.jsonl"), "train")
    with pytest.raises(AltlmError, match="does not exist"):
        read_dataset(str(tmp_path / "missing.parquet"), "train")
    with pytest.raises(AltlmError, match="no evaluation prompt with prompt toxicity < 0.5"):
        path = write_jsonl(
            tmp_path / "toxic.jsonl", [{"prompt": {"text": f"p {i}", "toxicity": 0.9}} for i in range(4)]
        )
        load_dataset_prompts(
            ALTConfig(prompts=str(path), prompt_formatter="rtp", eval_max_prompt_toxicity=0.5, **TINY), random.Random(0)
        )
