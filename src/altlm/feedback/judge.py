"""The LLM judge behind ALT-LMU/LMC feedback: who answers, how often it is asked, and what asking cost.

- Backends: any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp's server, Ollama,
  `altlm serve`) through the `openai` client, or an in-process HF causal LM (`serve.ChatModel`).
- Endpoint calls run concurrently (a thread pool) under a request-rate limit, and are retried with
  exponential backoff and jitter on timeouts, connection errors, 429, 5xx and unreadable answers.
- A persistent SQLite cache keyed by (backend, model, template hash, prompt, completion, n, temperature): a
  resumed or repeated run never pays twice for the same question.
- Counters: requests, retries, failures, cache hits, prompt/completion tokens, and cost when prices are set.

API keys are read from the environment variable the config names and are never stored or logged.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import AltlmError
from .base import RateLimiter


@dataclass
class JudgeSettings:
    backend: str = "hf"  # "hf" (in-process) or "openai" (any OpenAI-compatible endpoint)
    model: str = "smollm2-135m"
    base_url: str | None = None
    api_key_env: str | None = None
    concurrency: int = 4
    timeout: float = 60.0
    max_retries: int = 5
    requests_per_second: float = 0.0  # 0 = unlimited
    temperature: float = 0.0
    max_tokens: int = 128
    samples: int = 1  # answers per question (self-consistency); > 1 needs temperature > 0 to differ
    price_per_1k_prompt: float = 0.0
    price_per_1k_completion: float = 0.0
    backoff_base: float = 0.5  # seconds; attempt k waits base·2^k·U(0.5, 1.5), capped at 30 s
    choices: list[str] | None = None  # hf backend: pick the most likely of these instead of generating


@dataclass
class JudgeStats:
    questions: int = 0
    cache_hits: int = 0
    requests: int = 0
    retries: int = 0
    failures: int = 0  # questions left without an answer after all retries
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    errors: dict = field(default_factory=dict)  # error kind → count

    def as_dict(self) -> dict:
        return dict(self.__dict__, errors=dict(self.errors))

    def minus(self, before: dict) -> dict:
        """The counts accumulated since `before` (an earlier as_dict()), e.g. one iteration's share."""
        now = self.as_dict()
        out = {k: v - before[k] for k, v in now.items() if k != "errors"}
        out["errors"] = {
            k: v - before["errors"].get(k, 0) for k, v in now["errors"].items() if v - before["errors"].get(k, 0)
        }
        return out


class Cache:
    """question key → list of answers, in SQLite (WAL). Only complete answers are stored: a failed question is
    asked again next time."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, answers TEXT NOT NULL)")
        self.lock = threading.Lock()

    def get(self, keys: list[str]) -> dict[str, list[str]]:
        out = {}
        with self.lock:
            for i in range(0, len(keys), 500):
                chunk = keys[i : i + 500]
                q = f"SELECT key, answers FROM answers WHERE key IN ({','.join('?' * len(chunk))})"
                out.update({k: json.loads(a) for k, a in self.db.execute(q, chunk)})
        return out

    def put(self, key: str, answers: list[str]) -> None:
        with self.lock:
            self.db.execute("INSERT OR REPLACE INTO answers (key, answers) VALUES (?, ?)", (key, json.dumps(answers)))

    def close(self) -> None:
        self.db.close()


class Judge:
    """`ask(questions, ids)` → one list of `samples` answers per question, or None where none could be had."""

    def __init__(self, settings: JudgeSettings, cache_path: Path | None, template_hash: str):
        self.s, self.stats, self.template_hash = settings, JudgeStats(), template_hash
        self.cache = Cache(cache_path) if cache_path else None
        self._limit, self._count_lock = RateLimiter(settings.requests_per_second), threading.Lock()
        if settings.backend == "openai":
            self._client = self._openai_client()
        else:
            from ..serve import ChatModel

            self._chat = ChatModel(settings.model)

    # ------------------------------------------------------------------ backends
    def _openai_client(self):
        s = self.s
        if not s.base_url:
            raise AltlmError(
                "judge_backend=openai needs judge_base_url (e.g. http://127.0.0.1:8000/v1 or https://api.openai.com/v1)"
            )
        key = "not-needed"
        if s.api_key_env:
            key = os.environ.get(s.api_key_env, "")
            if not key:
                raise AltlmError(
                    f"the judge's API key variable {s.api_key_env} is not set; export it (or set judge_api_key_env= to the variable that holds the key)"
                )
        try:
            from openai import OpenAI
        except ImportError:
            raise AltlmError("judge_backend=openai needs the openai package; pip install 'altlm[llm]'") from None
        client = OpenAI(base_url=s.base_url, api_key=key, timeout=s.timeout, max_retries=0)  # we retry and count
        try:
            client.with_options(timeout=min(s.timeout, 10.0)).models.list()
        except Exception as e:  # noqa: BLE001 — any failure here means the endpoint cannot be used
            raise AltlmError(
                f"judge endpoint {s.base_url} is unreachable or refused the key ({type(e).__name__}); start the server or fix judge_base_url"
            ) from None
        return client

    def _add(self, error: str | None = None, **counts: int) -> None:
        """Add to the counters; endpoint calls run in a thread pool, and `+=` on shared state can lose updates."""
        with self._count_lock:
            for k, n in counts.items():
                setattr(self.stats, k, getattr(self.stats, k) + n)
            if error:
                self.stats.errors[error] = self.stats.errors.get(error, 0) + 1

    def _request(self, messages: list[dict]) -> str | None:
        """One answer from the endpoint, retried on transient failures; None when all tries failed."""
        import openai

        s = self.s
        for attempt in range(s.max_retries + 1):
            self._limit.wait()
            self._add(requests=1)
            try:
                r = self._client.chat.completions.create(
                    model=s.model, messages=messages, temperature=s.temperature, max_tokens=s.max_tokens
                )
                text = r.choices[0].message.content
                if not isinstance(text, str):
                    raise ValueError("answer without text")
                if r.usage:
                    self._add(
                        prompt_tokens=r.usage.prompt_tokens or 0, completion_tokens=r.usage.completion_tokens or 0
                    )
                return text
            except openai.APIStatusError as e:
                self._add(f"http_{e.status_code}")
                if e.status_code != 429 and e.status_code < 500:
                    return None  # 4xx other than 429: asking again gives the same answer
            except openai.APITimeoutError:
                self._add("timeout")
            except openai.APIConnectionError:
                self._add("connection")
            except (openai.APIResponseValidationError, ValueError, IndexError, AttributeError, TypeError):
                self._add("unreadable")
            if attempt < s.max_retries:
                self._add(retries=1)
                time.sleep(min(30.0, s.backoff_base * 2**attempt) * random.uniform(0.5, 1.5))
        return None

    def _ask_endpoint(self, messages: list[dict]) -> list[str] | None:
        answers = [self._request(messages) for _ in range(self.s.samples)]
        return None if any(a is None for a in answers) else answers

    # ------------------------------------------------------------------ the public call
    def key(self, prompt: str, completion: str) -> str:
        s = self.s
        raw = json.dumps(
            [
                s.backend,
                s.model,
                s.base_url if s.backend == "openai" else None,
                self.template_hash,
                prompt,
                completion,
                s.samples,
                s.temperature,
                s.max_tokens,
                s.choices,
            ]
        )
        return hashlib.sha256(raw.encode()).hexdigest()

    def ask(self, questions: list[list[dict]], keys: list[str]) -> list[list[str] | None]:
        self.stats.questions += len(questions)
        cached = self.cache.get(keys) if self.cache else {}
        out: list[list[str] | None] = [cached.get(k) for k in keys]
        todo = [i for i, a in enumerate(out) if a is None]
        self.stats.cache_hits += len(questions) - len(todo)
        if self.s.backend == "openai":
            with ThreadPoolExecutor(max_workers=max(1, self.s.concurrency)) as pool:
                for i, answers in zip(todo, pool.map(lambda i: self._ask_endpoint(questions[i]), todo)):
                    out[i] = answers
        else:
            for start in range(0, len(todo), 16):  # in-process: batched generation, 16 questions at a time
                idx = todo[start : start + 16]
                if self.s.choices:
                    picks = self._chat.choose([questions[i] for i in idx], self.s.choices)
                    self.stats.requests += len(idx)
                    for i, j in zip(idx, picks):
                        out[i] = [self.s.choices[j]] * self.s.samples  # deterministic: every ask agrees
                    continue
                answers, usage = self._chat.complete(
                    [questions[i] for i in idx], self.s.samples, self.s.temperature, 1.0, self.s.max_tokens
                )
                self.stats.requests += len(idx)
                self.stats.prompt_tokens += usage["prompt_tokens"]
                self.stats.completion_tokens += usage["completion_tokens"]
                for i, a in zip(idx, answers):
                    out[i] = [text for text, _ in a]
        for i in todo:
            if out[i] is None:
                self.stats.failures += 1
            elif self.cache:
                self.cache.put(keys[i], out[i])
        s = self.s
        self.stats.cost = (
            self.stats.prompt_tokens * s.price_per_1k_prompt + self.stats.completion_tokens * s.price_per_1k_completion
        ) / 1000
        return out

    def close(self) -> None:
        if self.cache:
            self.cache.close()
