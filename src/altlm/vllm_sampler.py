"""vLLM sampling (`sampler: vllm`; a CUDA GPU and vLLM, see docs/gpu.md): the same requests in, the same `Sample`s
out (completion, truncation flag, token counts) as sampler.sample.

One sampling phase, as the trainer runs it:
- `sync` writes the policy as vLLM will run it — `inference_model`'s copy: LoRA merged in fp32, every weight cast
  once to the engine dtype (bf16 from compute capability 8.0, fp16 below) — as a save_pretrained folder with the
  run's tokenizer (conditioning tokens included). A fresh engine on fresh files cannot sample stale weights, the
  bug users report with in-place reloads; it costs seconds on a small model.
- `check` starts the engine, samples a few completions and compares vLLM's log-probability of each sampled token
  with the same bf16 weights run by transformers (eval mode, one sequence at a time): a mean gap above
  `tolerance` — or nothing to compare — stops the run with one line.
- `sample` draws the round (one seed per request, from the round seed and the request's index in the round, so a
  resumed round draws what the killed one would have) and shuts the engine down: training gets the GPU back.
  TRL's colocate mode keeps one engine and frees its memory with `sleep(level=2)` instead, then pushes weights
  into it in place; restarting on saved files trades a few seconds for weights that are right by construction.

The engine starts lazily, with `max_model_len` = the longest request + max_new_tokens (at least the config's
max_prompt_tokens + max_new_tokens + FEEDBACK_ROOM), so vLLM never sizes its KV cache for the model's full context.
`engine=` takes a stand-in for the `vllm` module (LLM, SamplingParams): tests/test_vllm_sampler.py runs everything
but vLLM's own kernels on the CPU that way, and runs the real engine where a GPU and vLLM are.
"""

from __future__ import annotations

import gc
import hashlib
import os
import shutil
from pathlib import Path

import torch

from .errors import AltlmError
from .sampler import Sample, SampleSettings, inference_model, stop_ids
from .template import Template

FEEDBACK_ROOM = 64  # tokens for the BOS, the feedback text and the template's markers, beyond max_prompt_tokens
# Mean |log p_vLLM − log p_transformers| per sampled token allowed after a sync. Measured on SmolLM2-135M, same
# bf16 weights computed two ways by transformers (benchmarks/gpu/logprob_gap.py, docs/gpu.md): left padding 0.010,
# eager vs sdpa attention 0.039, weights off by ~1 bf16 ulp 0.048 nats; a stale policy (head ×1.5) 0.88. 0.1 sits
# twice above the numerical floor and far below a wrong model; the GPU check records vLLM's own gap.
TOLERANCE = 0.1
SEED_BITS = 63  # vLLM ships SamplingParams through msgspec to the engine process: seeds must fit an int64


def request_seed(seed: int, index: int) -> int:
    """The vLLM seed of request `index` (its position in the round's full request list) in a round seeded `seed`:
    a hash, so it fits int64 for any seed, and a resumed round (only the unfinished indices) draws the same
    stream for each request as the uninterrupted round."""
    digest = hashlib.blake2b(f"altlm:{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> (64 - SEED_BITS)


def engine_dtype(capability: tuple[int, int]) -> torch.dtype:
    """bf16 needs compute capability 8.0 (Ampere) or newer; vLLM refuses it below, where fp16 is the fast dtype."""
    return torch.bfloat16 if tuple(capability) >= (8, 0) else torch.float16


def is_truncated(finish_reason: str | None) -> bool:
    """vLLM's finish_reason: "stop" = it emitted EOS, a stop id, or one of generation_config.json's EOS ids (all
    clean ends; the stopping token is the last of token_ids); "length" = max_tokens (or max_model_len) cut it."""
    if finish_reason == "stop":
        return False
    if finish_reason == "length":
        return True
    raise AltlmError(
        f"vLLM ended a request with finish_reason={finish_reason!r} (not 'stop' or 'length'): the engine "
        "aborted it; use sampler=hf and report this with your vLLM version"
    )


class VLLMSampler:
    def __init__(
        self,
        folder: Path,
        gpu_memory_utilization: float = 0.3,
        seed: int = 0,
        *,
        trust_remote_code: bool = False,
        max_model_len: int = 0,
        engine=None,
        dtype: torch.dtype | None = None,
    ):
        if engine is None:
            try:
                import vllm as engine
            except ImportError:
                raise AltlmError(
                    "sampler=vllm needs vLLM: install it as docs/gpu.md says (on a CUDA machine), or set sampler=hf"
                ) from None
            if not torch.cuda.is_available():
                raise AltlmError("sampler=vllm needs a CUDA GPU; this machine has none: set sampler=hf")
        if dtype is None:
            dtype = engine_dtype(torch.cuda.get_device_capability()) if torch.cuda.is_available() else torch.bfloat16
        self.engine, self.dtype = engine, dtype
        self.folder, self.memory, self.seed = Path(folder), gpu_memory_utilization, seed
        self.trust_remote_code, self.min_model_len = trust_remote_code, max_model_len
        self.llm, self.llm_len, self.context = None, 0, None

    @classmethod
    def for_run(cls, cfg, run: Path, processes: int) -> "VLLMSampler | None":
        if cfg.sampler != "vllm":
            return None
        if processes > 1:
            raise AltlmError(
                "sampler=vllm runs in one process (it has the GPU to itself); launch without torchrun, "
                "or set sampler=hf"
            )
        return cls(
            Path(run) / "vllm-weights",
            cfg.vllm_gpu_memory_utilization,
            cfg.seed,
            trust_remote_code=cfg.trust_remote_code,
            max_model_len=cfg.max_prompt_tokens + cfg.max_new_tokens + FEEDBACK_ROOM,
        )

    # ------------------------------------------------------------------ engine lifetime
    def sync(self, model, tokenizer) -> None:
        """Write the current weights of `model` (a peft model merged into a copy) where the next engine loads them."""
        self.close()
        m = inference_model(model, self.dtype)
        tmp = self.folder.with_name(self.folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        m.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        self.context = getattr(m.config, "max_position_embeddings", None)
        del m
        shutil.rmtree(self.folder, ignore_errors=True)
        os.replace(tmp, self.folder)
        self._free()

    def _free(self) -> None:
        # vLLM's worker measures free GPU memory when it starts: blocks torch still caches here count as taken.
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _engine(self, needed: int):
        """The running engine, started (or restarted longer) so that `needed` tokens fit one sequence."""
        if self.llm is not None and self.llm_len >= needed:
            return self.llm
        if not (self.folder / "config.json").exists():
            raise AltlmError("internal: VLLMSampler.sync must write the weights before sampling")
        length = max(needed, self.min_model_len)
        if self.context:
            if needed > self.context:
                raise AltlmError(
                    f"a request needs {needed} tokens (prompt + max_new_tokens), more than the model's "
                    f"context of {self.context}; lower max_prompt_tokens or max_new_tokens"
                )
            length = min(length, self.context)
        self.close()
        kwargs = dict(
            model=str(self.folder),
            dtype=str(self.dtype).removeprefix("torch."),
            gpu_memory_utilization=self.memory,
            seed=self.seed % 2**32,  # (numpy's seed limit)
            enforce_eager=True,
            max_model_len=length,
            trust_remote_code=self.trust_remote_code,
        )
        try:
            self.llm = self.engine.LLM(**kwargs)
        except Exception as e:  # noqa: BLE001 — vLLM's start-up errors (memory, dtype) become one line
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise AltlmError(
                f"vLLM could not start on {self.folder} ({first}); free GPU memory or lower "
                f"vllm_gpu_memory_utilization (now {self.memory}), or set sampler=hf"
            ) from None
        self.llm_len = length
        return self.llm

    def close(self) -> None:
        """Shut the engine down now (its worker process and GPU memory), not whenever garbage collection runs."""
        if self.llm is None:
            return
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        self.llm, self.llm_len = None, 0
        self._free()

    # ------------------------------------------------------------------ requests
    @staticmethod
    def _prompt(ids: list[int], tokenizer) -> list[int]:
        """vLLM rejects an empty prompt (and fails the whole batch): start such a request from the BOS/EOS token,
        the document boundary a model without a prompt continues from."""
        if ids:
            return ids
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [start]

    def _generate(
        self,
        prompts: list[list[int]],
        settings: SampleSettings,
        tokenizer,
        suppress: list[int],
        seeds: list[int],
        logprobs: int | None = None,
    ):
        llm = self._engine(max(len(p) for p in prompts) + settings.max_new_tokens)
        params = [
            self.engine.SamplingParams(
                n=1,
                temperature=settings.temperature,
                top_p=settings.top_p,
                max_tokens=settings.max_new_tokens,
                min_tokens=settings.min_new_tokens,
                stop_token_ids=stop_ids(tokenizer),
                seed=s,
                logprobs=logprobs,
                logit_bias={t: -100.0 for t in suppress} or None,
            )
            for s in seeds
        ]
        return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)

    def sample(
        self,
        tokenizer,
        template: Template,
        requests: list[tuple[str | None, str]],
        settings: SampleSettings,
        suppress: list[int] | None = None,
        seed: int = 0,
        indices: list[int] | None = None,
    ) -> list[Sample]:
        """One Sample per request, in order. `indices`: each request's index in the round's full list (a resumed
        round passes only the unfinished ones), which picks its random stream. Ends the sampling phase: the engine
        is shut down so that training has the GPU."""
        if not requests:  # (a resumed round that had staged everything: the engine still goes)
            self.close()
            return []
        indices = list(range(len(requests))) if indices is None else list(indices)
        if len(indices) != len(requests):
            raise AltlmError(f"internal: {len(indices)} request indices for {len(requests)} requests")
        encoded = [template.input_ids(tokenizer, fb, p, settings.max_prompt_tokens) for fb, p in requests]
        try:
            outs = self._generate(
                [self._prompt(e, tokenizer) for e in encoded],
                settings,
                tokenizer,
                suppress or [],
                [request_seed(seed, i) for i in indices],
            )
        finally:
            self.close()
        out = []
        for e, r in zip(encoded, outs):
            c = r.outputs[0]
            toks = list(c.token_ids)
            truncated = is_truncated(c.finish_reason)
            body = toks if truncated else toks[:-1]  # a clean stop ends with its stopping token
            out.append(
                Sample(
                    completion=tokenizer.decode(body, skip_special_tokens=True),
                    truncated=truncated,
                    prompt_tokens=len(e),
                    completion_tokens=len(body),
                )
            )
        return out

    @torch.no_grad()
    def check(
        self,
        model,
        tokenizer,
        template: Template,
        requests: list[tuple[str | None, str]],
        settings: SampleSettings,
        tolerance: float = TOLERANCE,
    ) -> float:
        """Mean |log p_vLLM − log p_policy| over the sampled tokens of a few requests, the policy run as the same
        weights vLLM loaded (inference_model's merged, cast copy, in eval mode); stops the run above `tolerance`
        or when vLLM returned nothing to compare. The engine stays up for `sample`."""
        from .loss import target_logits

        prompts = [
            self._prompt(template.input_ids(tokenizer, fb, p, settings.max_prompt_tokens), tokenizer)
            for fb, p in requests
        ]
        # temperature 1, top-p 1: the tokens are drawn from the distribution whose log-probabilities are compared
        outs = self._generate(
            prompts,
            SampleSettings(1.0, 1.0, 1, settings.max_new_tokens),
            tokenizer,
            [],
            [request_seed(self.seed, -1 - i) for i in range(len(prompts))],
            logprobs=0,
        )
        ref = inference_model(model, self.dtype)
        gaps = []
        for p, r in zip(prompts, outs):
            c = r.outputs[0]
            toks = list(c.token_ids)
            if not toks or not c.logprobs:
                continue
            # one sequence at a time: no padding, as vLLM runs it
            logits, tgt, mask = target_logits(ref, [p], [toks], tokenizer.pad_token_id)
            ours = torch.log_softmax(logits.float(), -1).gather(-1, tgt.unsqueeze(-1)).squeeze(-1)[mask].tolist()
            theirs = [step[t].logprob for step, t in zip(c.logprobs, toks)]
            gaps += [abs(a - b) for a, b in zip(ours, theirs)]
        del ref
        self._free()
        if not gaps:
            raise AltlmError(
                f"vLLM returned no sampled tokens with log-probabilities for the {len(prompts)} check "
                "requests, so nothing shows it samples the trained weights; use sampler=hf and report "
                "this with your vLLM version"
            )
        gap = sum(gaps) / len(gaps)
        if gap > tolerance:
            raise AltlmError(
                f"vLLM's log-probabilities differ from the policy's by {gap:.3f} nats per token on "
                f"average over {len(gaps)} tokens after the weight sync (tolerance {tolerance}): vLLM is "
                "not sampling the trained weights; use sampler=hf and report this with your vLLM version"
            )
        return gap
