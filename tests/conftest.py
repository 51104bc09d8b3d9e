"""Shared fixtures: the tiny randomly initialised SmolLM2 (real architecture, real SmolLM2 tokenizer).

The alias cache lives in ~/.cache/altlm (or wherever the user's ALTLM_CACHE points); tests never set it for
model loading, so a fresh CI machine pays the ~20 s dequantisation once for the whole suite.

`tiny` is shared by the whole session and must not be mutated. Tests that add tokens (separator, Quark
tokens) or train take `fresh_tiny`: a new tokenizer and a deep copy of the model.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest

from altlm import models


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of `tiny-smollm2`. Read-only: never add tokens to these."""
    tok = models.load_tokenizer("tiny-smollm2")
    model = models.load_model("tiny-smollm2", seed=0)
    model.eval()
    return model, tok


@pytest.fixture()
def fresh_tiny(tiny):
    """A private (model, tokenizer) pair that a test may extend with tokens or train."""
    model, _ = tiny
    return copy.deepcopy(model), models.load_tokenizer("tiny-smollm2")


def run_altlm(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m altlm ARGS` in `cwd` (a tmp_path: relative run folders can never land in the repo)."""
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return subprocess.run([sys.executable, "-m", "altlm", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
