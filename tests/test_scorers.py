"""Tests for the offline scorers: they run the real Jigsaw port, profanity check and VADER (no mocks)."""

from __future__ import annotations

import io
import math
import os
import pickle

import pytest
import torch

from altlm.errors import AltlmError
from altlm.feedback import jigsaw
from altlm.feedback.jigsaw import JigsawToxicity, KerasTokenizer, TokenizerUnpickler
from altlm.feedback.scorers import ProfanityCheck, VaderSentiment

TOXIC = ["you are a stupid idiot", "fuck you"]
CLEAN = ["have a nice day", "the weather is sunny"]


@pytest.fixture(scope="module")
def jig(tmp_path_factory: pytest.TempPathFactory) -> JigsawToxicity:
    # Keep the shared instance's tokenizer cache out of ~/.cache.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ALTLM_CACHE", str(tmp_path_factory.mktemp("cache")))
        return JigsawToxicity()


def test_jigsaw_sanity_ordering(jig: JigsawToxicity) -> None:
    toxic = jig.score([""] * 2, TOXIC)
    clean = jig.score([""] * 2, CLEAN)
    assert all(s > 0.8 for s in toxic), toxic
    assert all(s < 0.1 for s in clean), clean
    assert min(toxic) - max(clean) > 0.7


def test_jigsaw_ignores_prompt_and_scores_label(jig: JigsawToxicity) -> None:
    assert jig.score(["fuck you"], ["have a nice day"]) == jig.score(["hello"], ["have a nice day"])
    probs = jig.predict_all(TOXIC + CLEAN)
    assert probs.shape == (4, 6) and probs.dtype == torch.float32
    assert ((probs >= 0) & (probs <= 1)).all()
    assert jig.score([""] * 4, TOXIC + CLEAN) == pytest.approx(probs[:, 0].tolist())


def test_jigsaw_deterministic_and_batch_independent(jig: JigsawToxicity) -> None:
    texts = TOXIC + CLEAN + ["I will kill you", "thanks for the edit"]
    a = jig.predict_all(texts)
    assert torch.equal(a, jig.predict_all(texts))
    small = JigsawToxicity.__new__(JigsawToxicity)
    small.__dict__.update(jig.__dict__, batch_size=2)
    assert torch.allclose(a, small.predict_all(texts), atol=1e-6)


def test_jigsaw_empty_inputs(jig: JigsawToxicity) -> None:
    (s,) = jig.score([""], [""])
    assert math.isfinite(s) and 0 <= s <= 1
    assert jig.score([], []) == []
    assert jig.predict_all([]).shape == (0, 6)


def test_other_label(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("ALTLM_CACHE", str(tmp_path))
    obscene = JigsawToxicity(label="obscene")
    assert obscene.score([""], ["fuck you"])[0] > obscene.score([""], ["have a nice day"])[0]
    with pytest.raises(AltlmError, match="identity_hate"):
        JigsawToxicity(label="rude")


def test_encoding_lower_filters_oov(jig: JigsawToxicity) -> None:
    tok = jig.tokenizer
    wi = tok.word_index
    assert wi["the"] == 1 and wi["to"] == 2 and wi["of"] == 3
    assert tok.num_words == 20000 and max(wi.values()) < 20000
    # Lowercased; filter characters (punctuation, tab, newline) split words; the apostrophe is kept.
    assert tok.texts_to_sequences(["THE To"]) == [[1, 2]]
    assert tok.texts_to_sequences(["the,to!of\tthe\n(to)"]) == [[1, 2, 3, 1, 2]]
    assert tok.words("Don't  STOP--now") == ["don't", "stop", "now"]
    # Unknown words are dropped (oov_token is None).
    assert tok.texts_to_sequences(["the qzxqzxunknownword to"]) == [[1, 2]]


def test_encoding_drops_ids_at_or_above_num_words() -> None:
    cfg = {
        "word_index": {"a": 1, "b": 2, "rare": 3},
        "filters": "!",
        "lower": True,
        "split": " ",
        "num_words": 3,
        "oov_token": None,
    }
    assert KerasTokenizer(cfg).texts_to_sequences(["a rare b!"]) == [[1, 2]]
    with_oov = dict(cfg, word_index={"<oov>": 1, "a": 2, "rare": 3}, oov_token="<oov>")
    assert KerasTokenizer(with_oov).texts_to_sequences(["a rare zzz"]) == [[2, 1, 1]]


def test_encoding_pre_pads_and_keeps_last_100(jig: JigsawToxicity) -> None:
    tok = jig.tokenizer
    by_id = {i: w for w, i in tok.word_index.items()}
    words = [by_id[i] for i in range(1, 131)]
    ids = jig.encode([" ".join(words), "the to"])
    assert ids.shape == (2, 100) and ids.dtype == torch.long
    assert ids[0].tolist() == list(range(31, 131))  # pre-truncation keeps the LAST 100 tokens
    assert ids[1].tolist() == [0] * 98 + [1, 2]  # pre-padding with 0
    assert jig.encode([""]).tolist() == [[0] * 100]


def test_tokenizer_json_cache(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("ALTLM_CACHE", str(tmp_path))
    first = JigsawToxicity()
    cache = tmp_path / "jigsaw" / "tokenizer.json"
    assert cache.is_file()
    assert not [p for p in cache.parent.iterdir() if p.name != "tokenizer.json"]  # no temp files left

    class Forbidden(TokenizerUnpickler):
        def __init__(self, *a, **k):
            raise AssertionError("unpickled although the JSON cache exists")

    monkeypatch.setattr(jigsaw, "TokenizerUnpickler", Forbidden)
    second = JigsawToxicity()
    assert second.tokenizer.word_index == first.tokenizer.word_index
    assert second.tokenizer.filters == first.tokenizer.filters
    assert second.score([""], ["fuck you"]) == first.score([""], ["fuck you"])

    # The patch is effective: with an empty cache the loader does reach the unpickler.
    monkeypatch.setenv("ALTLM_CACHE", str(tmp_path / "empty"))
    with pytest.raises(AssertionError, match="unpickled"):
        JigsawToxicity()


def test_unpickler_refuses_other_globals(tmp_path) -> None:
    with pytest.raises(pickle.UnpicklingError, match="os.system|posix.system"):
        TokenizerUnpickler(io.BytesIO(pickle.dumps(os.system))).load()

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with pytest.raises(pickle.UnpicklingError):
        TokenizerUnpickler(io.BytesIO(pickle.dumps(Evil()))).load()
    assert not marker.exists()


def test_missing_package_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jigsaw.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(AltlmError) as err:
        JigsawToxicity()
    msg = str(err.value)
    assert "\n" not in msg
    assert "toxic-comment-classifier" in msg and "pip install --no-deps toxic-comment-classifier==0.3.0 h5py" in msg


def test_profanity_check_ordering() -> None:
    s = ProfanityCheck()
    assert s.name == "toxicity" and s.higher_is_better is False
    toxic, clean = s.score(["", ""], ["fuck you", "have a nice day"])
    assert toxic > 0.8 and clean < 0.2
    assert s.score([], []) == []


def test_vader_ordering() -> None:
    s = VaderSentiment()
    assert s.name == "sentiment" and s.higher_is_better is True
    pos, neg, empty = s.score([""] * 3, ["I love this, it is wonderful!", "I hate this, it is awful.", ""])
    assert pos > 0.5 and neg < -0.5 and empty == 0.0


# ---------------------------------------------------------------- the paper's toxicity recipes: an open classifier
OPEN_CLASSIFIER = "unitary/unbiased-toxic-roberta"


def save_tiny_toxicity_classifier(folder) -> str:
    """A tiny random RoBERTa sequence classifier, multi-label like the recipes' classifier, with 'toxicity' at
    index 2 (not 0) so that a scorer which ignored reward_label would read another output. No download: the
    tokenizer is tiny-smollm2's (shipped offline), the weights are random."""
    from transformers import AutoModelForSequenceClassification, RobertaConfig

    from altlm import models

    tok = models.load_tokenizer("tiny-smollm2")
    labels = ["severe_toxicity", "obscene", "toxicity", "insult"]
    config = RobertaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=600,
        pad_token_id=tok.pad_token_id,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        problem_type="multi_label_classification",
    )
    torch.manual_seed(5)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("recipe", ["toxicity-rtp", "quark-toxicity-rtp"])
def test_toxicity_recipes_score_through_scorer_hf(recipe, tmp_path) -> None:
    """The recipe's own scorer settings (label, activation, text format, name, direction) built by the same
    build_feedback call the trainer makes, with only reward_model pointed at a local folder; each score must be
    sigmoid(logit of 'toxicity') on the text the recipe says, computed here by hand."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from altlm.config import load_config
    from altlm.feedback import build_feedback, reward_models

    folder = save_tiny_toxicity_classifier(tmp_path / "clf")
    cfg = load_config(recipe, [f"reward_model={folder}"])
    assert (cfg.scorer, cfg.reward_label, cfg.reward_activation) == ("hf", "toxicity", "sigmoid")
    _, scorer = build_feedback(cfg, tmp_path)
    assert isinstance(scorer, reward_models.HFClassifierScorer)
    assert scorer.name == "toxicity" and scorer.higher_is_better is False
    prompts, completions = ["The weather today", "He said that"], [" is lovely and calm.", " you are a stupid idiot"]
    got = scorer.score(prompts, completions)  # one padded batch of two texts of different lengths

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    want = []
    for p, c in zip(prompts, completions):
        text = reward_models.render(cfg.reward_text_format, p, c)
        with torch.no_grad():
            logits = model(**tok(text, return_tensors="pt")).logits[0]
        want.append(torch.sigmoid(logits[2]).item())
    tol = dict(abs=1e-5) if not torch.cuda.is_available() else dict(abs=2e-2)  # bf16 on CUDA
    assert got == pytest.approx(want, **tol)
    assert got[0] != pytest.approx(got[1], abs=1e-6)  # two different texts: not one constant output


def test_toxicity_recipes_keep_perspective_one_key_away() -> None:
    from altlm.config import load_config

    for recipe in ("toxicity-rtp", "quark-toxicity-rtp"):
        cfg = load_config(recipe, ["scorer=perspective"])
        assert cfg.scorer == "perspective" and cfg.perspective_api_key_env == "PERSPECTIVE_API_KEY"


def test_toxicity_rtp_dry_run_shows_the_open_classifier_without_the_hub(tmp_path, monkeypatch) -> None:
    from conftest import run_altlm

    hub = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(hub))  # anything fetched or cached from the hub would land here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # and any hub call would fail
    r = run_altlm("train", "--config", "toxicity-rtp", "--dry-run", cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "scorer: hf" in lines and f"reward_model: {OPEN_CLASSIFIER}" in lines, r.stdout
    assert "reward_label: toxicity" in lines and "reward_activation: sigmoid" in lines
    assert any(line.startswith("# plan:") and "via hf" in line for line in lines), r.stdout
    assert not hub.exists() or not any(hub.rglob("*")), sorted(hub.rglob("*"))
