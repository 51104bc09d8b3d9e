"""Reward adapters for the paper's tasks: any scalar source a recipe names becomes a `Scorer`.

- `HFClassifierScorer` (`scorer: hf`): an HF sequence-classification model (hub id or local folder); the score
  is one logit (by label name or index), raw or through sigmoid/softmax.
- `ValueHeadScorer` (`scorer: value_head`): the trlx/CarperAI reward-model layout — a causal-LM backbone plus a
  bias-free `Linear(hidden, 1)` "v_head" read at the text's last token. The hook is one state-dict file
  (`reward_head`) holding `v_head.weight` and, optionally, the backbone as `transformer.*` (CarperAI's
  `openai_summarize_tldr_rm_checkpoint/pytorch_model.bin` is exactly that); without backbone weights in the
  file, the backbone's own pretrained weights (`reward_model`) are used.
- `PerspectiveScorer` (`scorer: perspective`): Google's Perspective API over HTTP; the key comes only from the
  environment variable the config names, travels in a header (never in a URL), and is never logged.
- `CallableScorer` (`scorer: callable`): any Python `package.module:function(prompts, completions) -> floats`.

A text a scorer cannot score (Perspective's unsupported language, retries exhausted) scores NaN: the quantile
provider marks such samples invalid, so they are never trained on, and metrics leave them out.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import random
import re
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from ..errors import AltlmError
from .base import RateLimiter

_FIELD = re.compile(r"\{(prompt|completion)\}")


def render(fmt: str, prompt: str, completion: str) -> str:
    """`reward_text_format` with {prompt} and {completion} filled in one pass (a prompt may contain either)."""
    return _FIELD.sub(lambda m: prompt if m.group(1) == "prompt" else completion, fmt)


def _encoded_batches(scorer, prompts: Sequence[str], completions: Sequence[str]):
    """(prompt, completion) rendered with the scorer's text_format, tokenised batch by batch onto its device."""
    texts = [render(scorer.text_format, p, c) for p, c in zip(prompts, completions)]
    for s in range(0, len(texts), scorer.batch_size):
        yield scorer.tokenizer(
            texts[s : s + scorer.batch_size],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=scorer.max_tokens,
        ).to(scorer.device)


def _device_and_dtype():
    import torch

    # The policy's device choice lives in the trainer; a reward model only needs to be where it is fast.
    if torch.cuda.is_available():
        return torch.device("cuda"), (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return torch.device("cpu"), torch.float32


def _tokenizer(name: str, trust_remote_code: bool, side: str):
    from transformers import AutoTokenizer

    from .. import models

    tok = models._hub_guard(
        name, AutoTokenizer.from_pretrained, models.resolve(name), trust_remote_code=trust_remote_code
    )
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = side
    tok.truncation_side = "left"  # the completion is at the end of the text: keep it
    return tok


class HFClassifierScorer:
    """Score = one output of a sequence-classification model on `text_format(prompt, completion)`."""

    def __init__(
        self,
        model: str,
        label: str | None = None,
        index: int = 0,
        activation: str = "none",
        name: str = "reward",
        higher_is_better: bool = True,
        text_format: str = "{prompt}{completion}",
        batch_size: int = 16,
        max_tokens: int = 512,
        trust_remote_code: bool = False,
    ):
        from transformers import AutoModelForSequenceClassification

        from .. import models

        self.name, self.higher_is_better = name, higher_is_better
        self.text_format, self.batch_size, self.max_tokens, self.activation = (
            text_format,
            batch_size,
            max_tokens,
            activation,
        )
        self.device, dtype = _device_and_dtype()
        self.tokenizer = _tokenizer(model, trust_remote_code, "right")
        self.model = (
            models._hub_guard(
                model,
                AutoModelForSequenceClassification.from_pretrained,
                models.resolve(model),
                dtype=dtype,
                trust_remote_code=trust_remote_code,
            )
            .to(self.device)
            .eval()
        )
        if self.model.config.pad_token_id is None:  # the pooling finds the last real token through the pad id
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        n = self.model.config.num_labels
        if label is not None:
            label2id = {str(k): int(v) for k, v in (self.model.config.label2id or {}).items()}
            if label not in label2id:
                raise AltlmError(
                    f"reward_label {label!r} is not a label of '{model}' (its labels: {', '.join(sorted(label2id))}); set reward_label= or reward_index="
                )
            index = label2id[label]
        if not 0 <= index < n:
            raise AltlmError(f"reward_index {index} is out of range for '{model}', which has {n} output(s)")
        if activation == "softmax" and n < 2:
            raise AltlmError(f"reward_activation=softmax needs >= 2 outputs; '{model}' has {n}: use none or sigmoid")
        self.index = index

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        import torch

        out: list[float] = []
        for enc in _encoded_batches(self, prompts, completions):
            with torch.no_grad():
                logits = self.model(**enc).logits.float()
            if self.activation == "sigmoid":
                logits = logits.sigmoid()
            elif self.activation == "softmax":
                logits = logits.softmax(-1)
            out += logits[:, self.index].tolist()
        return out


def read_state_dict(spec: str) -> dict:
    """A state-dict file: local .safetensors / .bin / .pt, or a hub file 'owner/repo/path/in/repo'. Pickled
    checkpoints are read with `torch.load(weights_only=True)`, which refuses anything but tensors and containers."""
    import torch

    path = Path(spec).expanduser()
    if not path.is_file():
        parts = spec.split("/")
        if len(parts) < 3 or spec.startswith((".", "/", "~")):
            raise AltlmError(f"reward_head '{spec}' is neither a file nor a hub file 'owner/repo/file'")
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download("/".join(parts[:2]), "/".join(parts[2:])))
        except Exception as e:  # noqa: BLE001 -- offline, missing repo, missing file: all end the same way
            raise AltlmError(
                f"reward_head '{spec}' could not be fetched ({type(e).__name__}); offline, the hub is unreachable: pass a local file"
            ) from None
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- corrupt or foreign files: one line, not a traceback
        raise AltlmError(
            f"reward_head '{spec}' is not a readable state dict ({str(e).splitlines()[0][:160] if str(e) else type(e).__name__})"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # Lightning-style wrapper
    if not isinstance(state, dict):
        raise AltlmError(f"reward_head '{spec}' holds a {type(state).__name__}, not a state dict")
    return state


class ValueHeadScorer:
    """trlx's GPTRewardModel: score = v_head(hidden state of the last token of `text_format(prompt, completion)`).

    trlx reads the reward at the token before the appended `<|endoftext|>`: the same hidden state as our last
    token, so `text_format` should not end with the EOS text. Scores are raw (trlx subtracted the reference
    summary's reward; with per-prompt quantiles that shift cannot change a bucket, so it is left out)."""

    def __init__(
        self,
        backbone: str,
        head: str,
        name: str = "reward",
        higher_is_better: bool = True,
        text_format: str = "{prompt}{completion}",
        batch_size: int = 16,
        max_tokens: int = 512,
        trust_remote_code: bool = False,
    ):
        import torch
        from transformers import AutoConfig, AutoModel

        from .. import models

        self.name, self.higher_is_better = name, higher_is_better
        self.text_format, self.batch_size, self.max_tokens = text_format, batch_size, max_tokens
        self.device, dtype = _device_and_dtype()
        self.tokenizer = _tokenizer(backbone, trust_remote_code, "right")
        state = read_state_dict(head)
        if "v_head.weight" not in state:
            raise AltlmError(
                f"reward_head '{head}' has no 'v_head.weight' (it has e.g.: {', '.join(list(state)[:5])}); save the head as {{'v_head.weight': tensor[1, hidden]}}"
            )
        v = state["v_head.weight"]
        body = {k[len("transformer.") :]: t for k, t in state.items() if k.startswith("transformer.")}
        src = models.resolve(backbone)
        if body:  # the file carries the backbone too (CarperAI): build it empty, then load those weights
            config = models._hub_guard(backbone, AutoConfig.from_pretrained, src, trust_remote_code=trust_remote_code)
            self.backbone = AutoModel.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
            got = self.backbone.load_state_dict(body, strict=False)
            if got.missing_keys:
                raise AltlmError(
                    f"reward_head '{head}' lacks {len(got.missing_keys)} backbone weight(s) of '{backbone}' "
                    f"(e.g. transformer.{got.missing_keys[0]}); is reward_model the architecture it was trained from?"
                )
            if got.unexpected_keys:  # old checkpoints keep buffers (e.g. GPT-J's attn.masked_bias) newer code derives
                print(
                    f"reward model: ignored {len(got.unexpected_keys)} unused entries of {head} (e.g. {got.unexpected_keys[0]})",
                    flush=True,
                )
        else:
            self.backbone = models._hub_guard(
                backbone, AutoModel.from_pretrained, src, dtype=torch.float32, trust_remote_code=trust_remote_code
            )
        hidden = self.backbone.get_input_embeddings().weight.shape[1]
        if tuple(v.shape) != (1, hidden):
            raise AltlmError(
                f"reward_head '{head}': v_head.weight has shape {tuple(v.shape)}, expected (1, {hidden}) for '{backbone}'"
            )
        self.v_head = torch.nn.Linear(hidden, 1, bias=False)
        with torch.no_grad():
            self.v_head.weight.copy_(v.float())
        self.backbone = self.backbone.to(self.device, dtype).eval()
        self.v_head = self.v_head.to(self.device, dtype).eval()

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        import torch

        out: list[float] = []
        for enc in _encoded_batches(self, prompts, completions):
            with torch.no_grad():
                hidden = self.backbone(**enc).last_hidden_state
                values = self.v_head(hidden).squeeze(-1).float()
            last = enc["attention_mask"].sum(1) - 1  # right padding: the last real token of each row
            out += values[torch.arange(len(last), device=values.device), last].tolist()
        return out


class PerspectiveScorer:
    """Perspective API `comments:analyze`: score = the attribute's summaryScore (TOXICITY by default)."""

    higher_is_better = False

    def __init__(
        self,
        base_url: str,
        api_key_env: str,
        attribute: str = "TOXICITY",
        requests_per_second: float = 1.0,
        max_retries: int = 5,
        timeout: float = 30.0,
        backoff: float = 1.0,
        max_workers: int = 8,
    ):
        key = os.environ.get(api_key_env)
        if not key:
            raise AltlmError(
                f"scorer=perspective needs an API key in the environment variable {api_key_env} "
                f"(perspective_api_key_env); export it before the run (it is never stored)"
            )
        self.key_env = api_key_env
        self._key = key  # held in memory only: never in the config, the URL, a log line or an error message
        self.url = base_url.rstrip("/") + "/comments:analyze"
        self.attribute, self.rps, self.max_retries, self.timeout, self.backoff = (
            attribute,
            requests_per_second,
            max_retries,
            timeout,
            backoff,
        )
        self.name = "toxicity" if attribute == "TOXICITY" else attribute.lower()
        self.workers = max(1, min(max_workers, math.ceil(requests_per_second) if requests_per_second else max_workers))
        self._lock, self._limit = threading.Lock(), RateLimiter(requests_per_second)
        self.requests = self.retries = self.failures = 0

    def __repr__(self) -> str:  # never show the key, even in a debugger or a traceback's locals
        return f"PerspectiveScorer(url={self.url!r}, attribute={self.attribute!r})"

    def _one(self, text: str) -> float:
        if not text.strip():
            return 0.0  # the API rejects empty comments; an empty completion is not toxic
        body = json.dumps(
            {
                "comment": {"text": text},
                "languages": ["en"],
                "doNotStore": True,
                "requestedAttributes": {self.attribute: {}},
            }
        ).encode()
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            if attempt:
                with self._lock:
                    self.retries += 1
                time.sleep(min(30.0, self.backoff * 2 ** (attempt - 1)) * (1 + 0.25 * random.random()))
            self._limit.wait()
            req = urllib.request.Request(
                self.url,
                data=body,
                method="POST",
                headers={"Content-Type": "application/json", "X-Goog-Api-Key": self._key},
            )
            with self._lock:
                self.requests += 1
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    data = json.loads(r.read().decode("utf-8"))
                return float(data["attributeScores"][self.attribute]["summaryScore"]["value"])
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}"
                if e.code in (401, 403):
                    raise AltlmError(
                        f"Perspective API refused the key in ${self.key_env} (HTTP {e.code}); check the key and that the API is enabled for its project"
                    ) from None
                if e.code == 400:
                    return float("nan")  # e.g. LANGUAGE_NOT_SUPPORTED_BY_ATTRIBUTE: this text has no score
                if e.code == 429 or e.code >= 500:
                    retry_after = e.headers.get("Retry-After") if e.headers else None
                    if retry_after and retry_after.isdigit():
                        time.sleep(min(60.0, float(retry_after)))
                    continue
                raise AltlmError(
                    f"Perspective API answered HTTP {e.code} at {self.url}; check perspective_base_url"
                ) from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = type(getattr(e, "reason", e)).__name__
                continue
            except (ValueError, KeyError, TypeError):
                last = "unreadable answer"
                continue
        with self._lock:
            self.failures += 1
        self._last_failure = last
        return float("nan")

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        before = self.failures
        with ThreadPoolExecutor(self.workers) as pool:
            out = list(pool.map(self._one, completions))
        if self.failures > before:
            print(
                f"perspective: {self.failures - before} of {len(completions)} texts unscored after {self.max_retries} "
                f"retries ({self._last_failure}); they are left out of training and metrics",
                flush=True,
            )
        return out


class CallableScorer:
    """`package.module:function`, called as function(prompts, completions); an object with `.score` works too."""

    def __init__(self, spec: str, name: str = "reward", higher_is_better: bool = True):
        module_name, attr = spec.split(":", 1)
        # `altlm` run as a console script has no cwd on sys.path; a reward module next to the recipe should import.
        if os.getcwd() not in sys.path:
            sys.path.append(os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise AltlmError(
                f"reward_callable '{spec}': cannot import '{module_name}' ({e}); put it on PYTHONPATH or in the working directory"
            ) from None
        fn = module
        for part in attr.split("."):
            if not hasattr(fn, part):
                raise AltlmError(f"reward_callable '{spec}': '{module_name}' has no attribute '{attr}'")
            fn = getattr(fn, part)
        self._fn = fn.score if hasattr(fn, "score") else fn
        if not callable(self._fn):
            raise AltlmError(f"reward_callable '{spec}' is not callable")
        self.spec, self.name, self.higher_is_better = spec, name, higher_is_better

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        got = self._fn(list(prompts), list(completions))
        try:
            out = [float(x) for x in got]
        except (TypeError, ValueError):
            raise AltlmError(
                f"reward_callable '{self.spec}' must return a list of numbers, got {type(got).__name__}"
            ) from None
        if len(out) != len(completions):
            raise AltlmError(
                f"reward_callable '{self.spec}' returned {len(out)} scores for {len(completions)} completions"
            )
        return out
