"""`altlm serve`: a small OpenAI-compatible chat-completions server over a local HF causal LM.

It lets any OpenAI client — the LLM feedback provider included — use an offline judge, and gives the tests a
real HTTP endpoint on 127.0.0.1. Endpoints: `GET /v1/models`, `POST /v1/chat/completions` (messages,
temperature, top_p, max_tokens, n, seed; usage counts in the answer). One request is generated at a time
(a lock): on CPU, concurrent generation would only split the same cores. `ChatModel` is also the in-process
backend of the judge (feedback/judge.py), so both paths generate the same way.

Every bad request gets a 4xx JSON answer in OpenAI's error shape (`{"error": {message, type, param, code}}`), checked
before any generation: a prompt longer than the model's context is refused (400 `context_length_exceeded`) rather
than truncated, a body is read within `read_timeout` seconds (408 after) and one announced over `max_body` bytes is
refused unread (413), so no client can hold a thread or make the server drop a connection.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from . import models
from .sampler import SampleSettings, decode, inference_model, stop_ids
from .template import left_pad


class ChatModel:
    """Chat completions from a causal LM with a chat template (plain concatenation of turns without one)."""

    def __init__(self, name: str, dtype=None, max_prompt_tokens: int | None = 1536):
        """`max_prompt_tokens`: keep only the prompt's last tokens (the in-process judge); None keeps them all."""
        self.name, self.max_prompt_tokens = name, max_prompt_tokens
        self.tokenizer = models.load_tokenizer(name)
        self.model = inference_model(models.load_model(name), dtype)
        self.context: int | None = getattr(self.model.config, "max_position_embeddings", None)
        self.lock = threading.Lock()

    def encode(self, messages: list[dict]) -> list[int]:
        tok = self.tokenizer
        if tok.chat_template:
            ids = list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])
        else:
            ids = tok("\n\n".join(m["content"] for m in messages) + "\n\n", add_special_tokens=True).input_ids
        if self.max_prompt_tokens is None:
            return ids
        return ids[-self.max_prompt_tokens :]  # keep the end: the question being asked

    def complete(
        self,
        conversations: list[list[dict]],
        n: int = 1,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_tokens: int = 128,
        seed: int | None = None,
    ) -> tuple[list[list[tuple[str, str]]], dict]:
        """For each conversation, n (text, finish_reason) answers; and usage token counts. Temperature 0 is greedy."""
        return self.complete_ids([self.encode(c) for c in conversations], n, temperature, top_p, max_tokens, seed)

    @torch.no_grad()
    def complete_ids(
        self,
        prompts: list[list[int]],
        n: int = 1,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_tokens: int = 128,
        seed: int | None = None,
    ) -> tuple[list[list[tuple[str, str]]], dict]:
        """complete() for prompts already encoded (the server encodes once to check the context)."""
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        tok = self.tokenizer
        encoded = [p for p in prompts for _ in range(n)]
        settings = SampleSettings(max(temperature, 1e-6), top_p if temperature > 0 else 1.0, 1, max_tokens)
        eos = stop_ids(tok)
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
        with self.lock:
            if seed is not None:
                torch.manual_seed(seed)
            ids, attn, _ = left_pad(encoded, pad)
            new = decode(self.model, ids, attn, settings, eos, [], pad).tolist()
        answers, completion_tokens = [], 0
        for toks in new:
            end = next((j for j, t in enumerate(toks) if t in eos), None)
            body = toks if end is None else toks[:end]
            completion_tokens += len(body)
            answers.append((tok.decode(body, skip_special_tokens=True).strip(), "length" if end is None else "stop"))
        grouped = [answers[i * n : (i + 1) * n] for i in range(len(prompts))]
        usage = {"prompt_tokens": sum(len(e) for e in encoded[::n]), "completion_tokens": completion_tokens}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return grouped, usage

    def choose(self, conversations: list[list[dict]], options: list[str], batch_size: int = 16) -> list[int]:
        """For each conversation, the index of the option the model finds most likely as its reply (mean token
        log-probability, so short options are not favoured). A constrained judge: the answer is always one of the
        options, which small local models cannot be relied on to produce by free generation."""
        from .loss import mean_logprobs

        tok = self.tokenizer
        opts = [tok(o, add_special_tokens=False).input_ids for o in options]
        pad = tok.pad_token_id if tok.pad_token_id is not None else stop_ids(tok)[0]
        pairs = [(self.encode(c), o) for c in conversations for o in opts]
        means: list[float] = []
        with self.lock:
            for s in range(0, len(pairs), batch_size):
                chunk = pairs[s : s + batch_size]
                means += mean_logprobs(self.model, [a for a, _ in chunk], [b for _, b in chunk], pad)
        k = len(options)
        return [max(range(k), key=lambda j: means[i * k + j]) for i in range(len(conversations))]


ROLES = {"system", "developer", "user", "assistant"}
MAX_N = 64  # completions per request: more would only queue minutes of generation behind one client


class BadRequest(Exception):
    """A request the server refuses: HTTP status, OpenAI error code and the parameter at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def _int_param(req: dict, name: str, default: int | None, low: int, high: int | None = None) -> int | None:
    value = req.get(name)
    if value is None:
        return default
    # JSON booleans are ints to Python, and 2.5 tokens means a broken client: both refused, as OpenAI does
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(400, f"'{name}' must be an integer, got {json.dumps(value)}", name, "invalid_type")
    if value < low or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        raise BadRequest(400, f"'{name}' must be {bounds}, got {value}", name, "invalid_value")
    return value


def _float_param(req: dict, name: str, default: float, low: float, high: float) -> float:
    value = req.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(400, f"'{name}' must be a number, got {json.dumps(value)}", name, "invalid_type")
    if not (math.isfinite(value) and low <= value <= high):  # json.loads reads NaN and Infinity
        raise BadRequest(400, f"'{name}' must be between {low} and {high}, got {value}", name, "invalid_value")
    return float(value)


def _messages(req: dict) -> list[dict]:
    """The conversation as [{role, content: str}]; content may also be OpenAI's list of text parts."""
    messages = req.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadRequest(400, f"{where} must be an object with 'role' and 'content'", where)
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or role not in ROLES:  # a list or an object would not even hash
            raise BadRequest(
                400, f"{where}.role must be one of {sorted(ROLES)}, got {json.dumps(role)}", f"{where}.role"
            )
        if isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
        ):
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise BadRequest(400, f"{where}.content must be a string or a list of text parts", f"{where}.content")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def make_handler(chat: ChatModel, read_timeout: float = 30.0, max_body: int = 4 << 20):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # socket timeout for every read, the request line and headers included: an idle or stalled
        # connection frees its thread after this long (StreamRequestHandler applies it in setup())
        timeout = read_timeout

        def log_message(self, *args):  # quiet: one line per request would drown the judge's own progress
            pass

        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)

        def _error(
            self,
            status: int,
            message: str,
            param: str | None = None,
            code: str | None = None,
            kind: str = "invalid_request_error",
        ) -> None:
            self._send(status, {"error": {"message": message, "type": kind, "param": param, "code": code}})

        def send_error(self, code, message=None, explain=None):
            """http.server's own refusals (malformed request line, headers too long, unknown method) in the
            same JSON shape as ours; an unknown method is the client's error (405), not the server's (501)."""
            self.close_connection = True
            if code == 501:
                code, message = 405, f"method {self.command} is not allowed"
            self._error(int(code), message or explain or "bad request")

        def _read_body(self) -> bytes:
            """The body, refused before reading when its size is unknown or too large, and read within
            read_timeout seconds in all (a per-recv timeout alone lets a client trickle bytes for ever)."""
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                self.close_connection = True
                raise BadRequest(411, "chunked request bodies are not supported; send Content-Length")
            raw = self.headers.get("Content-Length", "0").strip()
            if not raw.isdigit():
                self.close_connection = True
                raise BadRequest(400, f"bad Content-Length header {raw!r}")
            size = int(raw)
            if size > max_body:
                self.close_connection = True  # the unread body would be taken for the next request
                raise BadRequest(413, f"request body of {size} bytes is over the limit of {max_body}")
            deadline, parts, got = time.monotonic() + read_timeout, [], 0
            try:
                while got < size:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError
                    self.connection.settimeout(left)
                    chunk = self.rfile.read1(min(size - got, 1 << 16))
                    if not chunk:
                        raise ConnectionError("client closed the connection mid-body")
                    parts.append(chunk)
                    got += len(chunk)
            except TimeoutError:
                self.close_connection = True
                raise BadRequest(
                    408, f"request body not received within {read_timeout:g} s ({got} of {size} bytes)"
                ) from None
            finally:
                self.connection.settimeout(read_timeout)
            return b"".join(parts)

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                models_ = [{"id": chat.name, "object": "model", "owned_by": "altlm"}]
                self._send(200, {"object": "list", "data": models_})
            else:
                self._error(404, f"no route GET {self.path}")

        def do_POST(self):
            try:
                body = self._read_body()  # read even for a wrong route: an unread body would poison keep-alive
                if self.path.rstrip("/") != "/v1/chat/completions":
                    raise BadRequest(404, f"no route POST {self.path}")
                self._complete(self._parse(body))
            except BadRequest as e:
                self._error(e.status, str(e), e.param, e.code)
            except ConnectionError:
                self.close_connection = True  # nobody left to answer
            except Exception as e:  # noqa: BLE001 — a bug or an out-of-memory: answer it, keep serving
                print(f"altlm serve: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                self._error(500, f"the server failed on this request ({type(e).__name__})", kind="server_error")

        def _parse(self, body: bytes) -> dict:
            """The validated generation arguments, all checked before any model work."""
            try:
                req = json.loads(body)
            except (ValueError, UnicodeDecodeError) as e:
                raise BadRequest(400, f"the body is not valid JSON ({e})") from None
            if not isinstance(req, dict):
                raise BadRequest(400, "the body must be a JSON object")
            if req.get("stream"):
                raise BadRequest(400, "streaming is not supported; send stream=false", "stream", "unsupported_value")
            messages = _messages(req)
            name = "max_tokens" if req.get("max_tokens") is not None else "max_completion_tokens"
            max_tokens = _int_param(req, name, None, 1)
            n = _int_param(req, "n", 1, 1, MAX_N)
            temperature = _float_param(req, "temperature", 1.0, 0.0, 2.0)
            top_p = _float_param(req, "top_p", 1.0, 0.0, 1.0)
            if top_p == 0.0:
                raise BadRequest(400, "'top_p' must be above 0", "top_p", "invalid_value")
            seed = _int_param(req, "seed", None, -(2**63), 2**64 - 1)  # the range torch.manual_seed takes
            try:
                ids = chat.encode(messages)
            except Exception as e:  # noqa: BLE001 — a chat template may refuse a role order (e.g. two system turns)
                raise BadRequest(400, f"the model's chat template refused these messages: {e}", "messages") from None
            context = chat.context
            if max_tokens is None:  # as OpenAI: what the context leaves (at least 1), here capped to keep answers quick
                max_tokens = 128 if context is None else max(1, min(128, context - len(ids)))
            if context is not None and len(ids) + max_tokens > context:
                raise BadRequest(
                    400,
                    f"This model's maximum context length is {context} tokens. However, you "
                    f"requested {len(ids) + max_tokens} tokens ({len(ids)} in the messages, "
                    f"{max_tokens} in the completion). Please reduce the length of the messages "
                    f"or completion.",
                    "messages",
                    "context_length_exceeded",
                )
            return dict(ids=ids, n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)

        def _complete(self, a: dict) -> None:
            answers, usage = chat.complete_ids(
                [a["ids"]], a["n"], a["temperature"], a["top_p"], a["max_tokens"], a["seed"]
            )
            self._send(
                200,
                {
                    "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": chat.name,
                    "usage": usage,
                    "choices": [
                        {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": fin}
                        for i, (text, fin) in enumerate(answers[0])
                    ],
                },
            )

    return Handler


def serve(
    name: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    dtype=None,
    read_timeout: float = 30.0,
    max_body: int = 4 << 20,
) -> ThreadingHTTPServer:
    """A started server (in a daemon thread); `server.server_address` has the bound port (port 0 = any free).
    The whole prompt is kept (no truncation): one over the model's context is refused, as OpenAI's servers do."""
    chat = ChatModel(name, dtype, max_prompt_tokens=None)
    server = ThreadingHTTPServer((host, port), make_handler(chat, read_timeout, max_body))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
