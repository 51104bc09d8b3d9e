"""`altlm serve`: a small OpenAI-compatible chat-completions server over a local HF causal LM.

It lets any OpenAI client — the LLM feedback provider included — use an offline judge, and gives the tests a
real HTTP endpoint on 127.0.0.1. Endpoints: `GET /v1/models`, `POST /v1/chat/completions` (messages,
temperature, top_p, max_tokens, n, seed; usage counts in the answer). One request is generated at a time
(a lock): on CPU, concurrent generation would only split the same cores. `ChatModel` is also the in-process
backend of the judge (feedback/judge.py), so both paths generate the same way.
"""
from __future__ import annotations

import json
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

    def __init__(self, name: str, dtype=None, max_prompt_tokens: int = 1536):
        self.name, self.max_prompt_tokens = name, max_prompt_tokens
        self.tokenizer = models.load_tokenizer(name)
        self.model = inference_model(models.load_model(name), dtype)
        self.lock = threading.Lock()

    def encode(self, messages: list[dict]) -> list[int]:
        tok = self.tokenizer
        if tok.chat_template:
            ids = list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])
        else:
            ids = tok("\n\n".join(m["content"] for m in messages) + "\n\n", add_special_tokens=True).input_ids
        return ids[-self.max_prompt_tokens:]  # keep the end: the question being asked

    @torch.no_grad()
    def complete(self, conversations: list[list[dict]], n: int = 1, temperature: float = 0.0, top_p: float = 1.0,
                 max_tokens: int = 128, seed: int | None = None) -> tuple[list[list[tuple[str, str]]], dict]:
        """For each conversation, n (text, finish_reason) answers; and usage token counts. Temperature 0 is greedy."""
        tok = self.tokenizer
        encoded = [self.encode(c) for c in conversations for _ in range(n)]
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
        grouped = [answers[i * n:(i + 1) * n] for i in range(len(conversations))]
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
                chunk = pairs[s:s + batch_size]
                means += mean_logprobs(self.model, [a for a, _ in chunk], [b for _, b in chunk], pad)
        k = len(options)
        return [max(range(k), key=lambda j: means[i * k + j]) for i in range(len(conversations))]


def make_handler(chat: ChatModel):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet: one line per request would drown the judge's own progress
            pass

        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, code: int, message: str) -> None:
            self._send(code, {"error": {"message": message, "type": "invalid_request_error", "code": code}})

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": chat.name, "object": "model", "owned_by": "altlm"}]})
            else:
                self._error(404, f"no route {self.path}")

        def do_POST(self):
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self._error(404, f"no route {self.path}")
            try:
                req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                messages = req["messages"]
                if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
                    raise ValueError("messages must be a list of {role, content} objects")
                n, max_tokens = int(req.get("n") or 1), int(req.get("max_tokens") or req.get("max_completion_tokens") or 128)
                temperature, top_p = float(req.get("temperature", 1.0)), float(req.get("top_p", 1.0))
            except (ValueError, KeyError, TypeError) as e:
                return self._error(400, f"bad request: {e}")
            answers, usage = chat.complete([messages], n, temperature, top_p, max_tokens, req.get("seed"))
            self._send(200, {
                "id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": int(time.time()),
                "model": chat.name, "usage": usage,
                "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": fin}
                            for i, (text, fin) in enumerate(answers[0])]})

    return Handler


def serve(name: str, host: str = "127.0.0.1", port: int = 8000, dtype=None) -> ThreadingHTTPServer:
    """A started server (in a daemon thread); `server.server_address` has the bound port (port 0 = any free)."""
    server = ThreadingHTTPServer((host, port), make_handler(ChatModel(name, dtype)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
