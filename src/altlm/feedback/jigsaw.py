"""Pure-torch port of the offline Jigsaw toxicity classifier from `toxic-comment-classifier==0.3.0`.

This module owns: locating the package's files without importing it (its `__init__` imports
TensorFlow), reading the Keras `Tokenizer` pickle safely and caching it as JSON, re-implementing
Keras `texts_to_sequences` + `pad_sequences`, rebuilding the Keras 3 BiLSTM in torch from the h5
weights, and the `JigsawToxicity` scorer.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from altlm.errors import AltlmError

LABELS = ("toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate")
MAXLEN = 100  # the package's MAXLEN: pad_sequences(seq, maxlen=100) with Keras defaults (pre/pre)
_PIP = "pip install --no-deps toxic-comment-classifier==0.3.0 h5py"
_CACHE_FORMAT = 1


def _package_dir() -> Path:
    # find_spec on a top-level name does not execute the package, so TensorFlow is never imported.
    spec = importlib.util.find_spec("toxic_classifier")
    if spec is None or not spec.submodule_search_locations:
        raise AltlmError(f"package toxic-comment-classifier is not installed; run: {_PIP}")
    return Path(list(spec.submodule_search_locations)[0])


def cache_dir() -> Path:
    """Where the extracted tokenizer lives: $ALTLM_CACHE/jigsaw or ~/.cache/altlm/jigsaw."""
    root = os.environ.get("ALTLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "altlm")
    return Path(root) / "jigsaw"


# --------------------------------------------------------------------------- tokenizer pickle


class _KerasTokenizerState:
    """Inert stand-in for keras' Tokenizer: the pickle's BUILD just fills its __dict__."""


class TokenizerUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals the Keras Tokenizer pickle needs.

    A pickle can call any importable callable; whitelisting keeps a tampered file from running code.
    """

    ALLOWED: dict[tuple[str, str], Any] = {
        ("keras.src.legacy.preprocessing.text", "Tokenizer"): _KerasTokenizerState,
        ("keras.preprocessing.text", "Tokenizer"): _KerasTokenizerState,  # Keras 2 spelling
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("collections", "defaultdict"): collections.defaultdict,
        ("builtins", "int"): int,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"tokenizer pickle refers to disallowed global {module}.{name}") from None


def _tokenizer_from_pickle(path: Path) -> dict[str, Any]:
    with open(path, "rb") as fh:
        obj = TokenizerUnpickler(fh).load()
    state = getattr(obj, "__dict__", None)
    if not isinstance(obj, _KerasTokenizerState) or not isinstance(state, dict):
        raise AltlmError(f"{path} is not a Keras Tokenizer pickle; reinstall with: {_PIP}")
    if state.get("char_level") or state.get("analyzer") is not None:
        raise AltlmError(f"{path}: char-level/custom-analyzer tokenizers are not supported by the port")
    num_words = state.get("num_words")
    oov = state.get("oov_token")
    word_index = state["word_index"]
    # Ids >= num_words never reach the model (dropped, or mapped to the OOV id), so they needn't be cached.
    if num_words:
        word_index = {w: i for w, i in word_index.items() if i < num_words or w == oov}
    return {
        "word_index": word_index,
        "filters": state["filters"],
        "lower": bool(state["lower"]),
        "split": state["split"],
        "num_words": num_words,
        "oov_token": oov,
    }


def _source_stamp(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def load_tokenizer_config(pickle_path: Path) -> dict[str, Any]:
    """The tokenizer settings from the JSON cache, or (first time / stale) from the pickle, then cached."""
    cache = cache_dir() / "tokenizer.json"
    stamp = _source_stamp(pickle_path)
    try:
        data = json.loads(cache.read_text(encoding="utf-8"))
        if data.get("format") == _CACHE_FORMAT and data.get("source") == stamp:
            return data["tokenizer"]
    except (OSError, ValueError, KeyError, AttributeError):
        pass  # missing or corrupt cache: rebuild it below
    config = _tokenizer_from_pickle(pickle_path)
    payload = {"format": _CACHE_FORMAT, "source": stamp, "tokenizer": config}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        # temp file + os.replace so a concurrent reader never sees a half-written JSON.
        fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=".tokenizer.", suffix=".json.tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(payload, fh, ensure_ascii=False)
            os.replace(tmp, cache)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass  # read-only cache location: work uncached rather than fail
    return config


class KerasTokenizer:
    """Keras' legacy `Tokenizer.texts_to_sequences` + `pad_sequences` (defaults), reimplemented."""

    def __init__(self, config: dict[str, Any], maxlen: int = MAXLEN):
        self.word_index: dict[str, int] = config["word_index"]
        self.lower: bool = config["lower"]
        self.split: str = config["split"]
        self.filters: str = config["filters"]
        self.num_words: int | None = config["num_words"]
        self.oov_token: str | None = config["oov_token"]
        self.maxlen = maxlen
        self._table = str.maketrans({c: self.split for c in self.filters})

    def words(self, text: str) -> list[str]:
        if self.lower:
            text = text.lower()
        return [w for w in text.translate(self._table).split(self.split) if w]

    def texts_to_sequences(self, texts: Sequence[str]) -> list[list[int]]:
        oov_id = self.word_index.get(self.oov_token) if self.oov_token is not None else None
        out = []
        for text in texts:
            seq = []
            for w in self.words(text):
                i = self.word_index.get(w)
                if i is not None and self.num_words and i >= self.num_words:
                    i = oov_id
                elif i is None:
                    i = oov_id
                if i is not None:
                    seq.append(i)
            out.append(seq)
        return out

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """int64 [n, maxlen]: pre-padded with 0, pre-truncated (the LAST maxlen tokens are kept)."""
        ids = torch.zeros(len(texts), self.maxlen, dtype=torch.long)
        for row, seq in enumerate(self.texts_to_sequences(texts)):
            seq = seq[-self.maxlen :]
            if seq:
                ids[row, self.maxlen - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        return ids


# --------------------------------------------------------------------------- model


class JigsawBiLSTM(nn.Module):
    """Embedding(20k, 50) -> BiLSTM(50, seq) -> max over time -> Dense 50 relu -> Dense 6 sigmoid."""

    def __init__(self, vocab: int = 20000, dim: int = 50, hidden: int = 50, n_labels: int = len(LABELS)):
        super().__init__()
        # No padding_idx: Keras used mask_zero=False, so id 0 is an ordinary (trained) embedding row
        # and the pad steps run through the LSTM exactly as in Keras.
        self.embedding = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, hidden, batch_first=True, bidirectional=True)
        self.dense = nn.Linear(2 * hidden, 50)
        self.out = nn.Linear(50, n_labels)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.embedding(ids))
        return torch.sigmoid(self.out(torch.relu(self.dense(h.amax(dim=1)))))


def load_jigsaw_model(h5_path: Path) -> JigsawBiLSTM:
    try:
        import h5py
    except ImportError:
        raise AltlmError(f"package h5py is not installed (needed for the Jigsaw classifier); run: {_PIP}") from None

    def t(x: Any) -> torch.Tensor:
        return torch.from_numpy(x[()]).float()

    with h5py.File(h5_path, "r") as f:
        L = f["layers"]
        emb = t(L["embedding/vars/0"])
        model = JigsawBiLSTM(vocab=emb.shape[0], dim=emb.shape[1])
        sd: dict[str, torch.Tensor] = {"embedding.weight": emb}
        for keras_dir, suffix in (("forward_layer", ""), ("backward_layer", "_reverse")):
            cell = L[f"bidirectional/{keras_dir}/cell/vars"]
            # Keras kernels are (in, 4h) with gates i,f,c,o == torch's i,f,g,o; transpose to (4h, in).
            sd[f"lstm.weight_ih_l0{suffix}"] = t(cell["0"]).T.contiguous()
            sd[f"lstm.weight_hh_l0{suffix}"] = t(cell["1"]).T.contiguous()
            # Keras has a single bias; torch adds bias_ih + bias_hh, so the second one is zero.
            sd[f"lstm.bias_ih_l0{suffix}"] = t(cell["2"])
            sd[f"lstm.bias_hh_l0{suffix}"] = torch.zeros_like(sd[f"lstm.bias_ih_l0{suffix}"])
        for keras_name, torch_name in (("dense", "dense"), ("dense_1", "out")):
            sd[f"{torch_name}.weight"] = t(L[f"{keras_name}/vars/0"]).T.contiguous()
            sd[f"{torch_name}.bias"] = t(L[f"{keras_name}/vars/1"])
    model.load_state_dict(sd, strict=True)  # strict: a shape/name mismatch means a different model file
    return model.eval()


# --------------------------------------------------------------------------- scorer


class JigsawToxicity:
    """Scorer: probability of one Jigsaw label (default "toxic") for each completion.

    Only the completion is scored (the prompt is ignored), as in RealToxicityPrompts.
    """

    name = "toxicity"
    higher_is_better = False

    def __init__(self, batch_size: int = 512, label: str = "toxic"):
        if label not in LABELS:
            raise AltlmError(f"unknown Jigsaw label {label!r}; choose one of {', '.join(LABELS)}")
        self.batch_size = batch_size
        self.label = label
        self.label_index = LABELS.index(label)
        pkg = _package_dir()
        self.tokenizer = KerasTokenizer(load_tokenizer_config(pkg / "model" / "tokenizer.pickle"))
        self.model = load_jigsaw_model(pkg / "model" / "model.weights.h5")

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer.encode(texts)

    def predict_all(self, texts: Sequence[str]) -> torch.Tensor:
        """float32 [n, 6] probabilities in LABELS order."""
        outs = [torch.zeros(0, len(LABELS))]
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                outs.append(self.model(self.encode(texts[start : start + self.batch_size])))
        return torch.cat(outs)

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        return self.predict_all(list(completions))[:, self.label_index].tolist()
