"""Shared fixtures: the tiny randomly initialised SmolLM2 (real architecture, real SmolLM2 tokenizer), and isolation.

Isolation, so that a test passes or fails by what it checks, not by the machine's cache or the tests before it:
- Every pytest run gets a fresh folder (removed at its end) holding `ALTLM_CACHE` and the Hugging Face caches
  (`HF_HOME`, `HF_DATASETS_CACHE`), set here before anything imports altlm or datasets. The process that
  creates it (the xdist controller, or a lone pytest) passes it to its workers through the environment, so the
  workers of one run share the dequantised models, and `ALTLM_TEST_SESSION` names the folder's owner.
  Nothing reads or writes the user's `~/.cache/altlm`: a run pays the dequantisation of SmolLM2 (~15 s) once.
- The models are dequantised under a file lock (`cached_alias`), before any test starts, so two workers never
  convert the same GGUF at once, and subprocesses (`altlm train`) only ever read the finished folder.
- Each test sees its own `ALTLM_CACHE` (judge cache, flagged-word lists) whose `models/` and `gguf/` link to the
  run's shared ones; its environment and torch's thread count are restored after it (an in-process `main()`
  sets both), and accelerate's process state is reset.

`tiny` is shared by the whole session and must not be mutated. Tests that add tokens (separator, Quark
tokens) or train take `fresh_tiny`: a new tokenizer and a deep copy of the model.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

_OWNER = "ALTLM_TEST_SESSION"  # "<pid>:<folder>" of the process that made this run's folder
if not os.path.isdir(os.environ.get(_OWNER, ":").split(":", 1)[1]):  # unset, or left over from a finished run
    _root = Path(tempfile.mkdtemp(prefix="altlm-test-"))
    os.environ[_OWNER] = f"{os.getpid()}:{_root}"
    os.environ["ALTLM_CACHE"] = str(_root / "cache")
    os.environ["HF_HOME"] = str(_root / "hf")
    os.environ["HF_DATASETS_CACHE"] = str(_root / "hf" / "datasets")
    os.environ.pop("HF_HUB_CACHE", None)
    os.environ.pop("HUGGINGFACE_HUB_CACHE", None)
_OWNER_PID, _ROOT = os.environ[_OWNER].split(":", 1)
ROOT = Path(_ROOT)
SESSION_CACHE = Path(os.environ["ALTLM_CACHE"])

from altlm import models  # noqa: E402  (after the environment above)


def pytest_unconfigure(config):
    if str(os.getpid()) == _OWNER_PID:  # the controller ends last: its workers are done with the folder
        shutil.rmtree(ROOT, ignore_errors=True)


def cached_alias(alias: str) -> str:
    """`models.resolve(alias)`, with the dequantisation done by one process at a time (the others wait, then read)."""
    SESSION_CACHE.mkdir(parents=True, exist_ok=True)
    with open(SESSION_CACHE / f".lock-{alias}", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return models.resolve(alias)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session", autouse=True)
def _models_ready():
    """The tiny model's base (SmolLM2) is dequantised before any test, in-process or CLI, can race for it."""
    cached_alias("tiny-smollm2")
    (SESSION_CACHE / "gguf").mkdir(exist_ok=True)


@pytest.fixture(autouse=True)
def _isolated():
    """A private ALTLM_CACHE (shared models linked in); the environment, torch threads and accelerate state restored."""
    import torch

    env, threads = dict(os.environ), torch.get_num_threads()
    (ROOT / "per-test").mkdir(exist_ok=True)
    own = Path(tempfile.mkdtemp(dir=ROOT / "per-test"))
    for sub in ("models", "gguf"):
        (own / sub).symlink_to(SESSION_CACHE / sub, target_is_directory=True)
    os.environ["ALTLM_CACHE"] = str(own)
    yield
    os.environ.clear()
    os.environ.update(env)
    torch.set_num_threads(threads)
    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    shutil.rmtree(own, ignore_errors=True)


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


@contextlib.contextmanager
def closed_port():
    """A 127.0.0.1 port that refuses connections for as long as the block runs: bound here, never listening, so no
    other process can take it (a fixed port such as 9 may be open on some machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@contextlib.contextmanager
def taken_port():
    """A 127.0.0.1 port with a listener on it for as long as the block runs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def run_altlm(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m altlm ARGS` in `cwd` (a tmp_path: relative run folders can never land in the repo)."""
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return subprocess.run(
        [sys.executable, "-m", "altlm", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
