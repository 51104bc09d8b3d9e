"""vLLM sampling (`sampler: vllm`; `pip install 'altlm[vllm]'`, a CUDA GPU): the same requests in, the same
`Sample`s out (completion, truncation flag, token counts) as sampler.sample.

Weights: before each sampling phase `sync` writes the policy — LoRA merged into a copy — as a save_pretrained
folder with the run's tokenizer (conditioning tokens included) and restarts the engine on it. Restarting costs
seconds on a small model and cannot leave vLLM on stale weights, the bug users report with in-place reloads.
`check` then samples a few completions and compares vLLM's log-probability of each sampled token with the policy's
own (fp32, same input ids): a mean gap above `tolerance` stops the run with one line.

Not run on this project's CPU machine (no GPU there); tests/test_vllm_sampler.py runs where a GPU and vLLM are.
"""
from __future__ import annotations

import copy
import gc
import os
import shutil
from pathlib import Path

import torch

from .errors import AltlmError
from .sampler import Sample, SampleSettings, stop_ids
from .template import Template


class VLLMSampler:
    def __init__(self, folder: Path, gpu_memory_utilization: float = 0.3, seed: int = 0):
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise AltlmError("sampler=vllm needs vLLM: pip install 'altlm[vllm]' (on a CUDA machine), or set sampler=hf") from None
        if not torch.cuda.is_available():
            raise AltlmError("sampler=vllm needs a CUDA GPU; this machine has none: set sampler=hf")
        self.folder, self.memory, self.seed, self.llm = Path(folder), gpu_memory_utilization, seed, None

    @classmethod
    def for_run(cls, cfg, run: Path, processes: int) -> "VLLMSampler | None":
        if cfg.sampler != "vllm":
            return None
        if processes > 1:
            raise AltlmError("sampler=vllm runs in one process (it has the GPU to itself); launch without torchrun, or set sampler=hf")
        return cls(Path(run) / "vllm-weights", cfg.vllm_gpu_memory_utilization, cfg.seed)

    def sync(self, model, tokenizer) -> None:
        """Restart the engine on the current weights of `model` (a peft model is merged into a copy first)."""
        from vllm import LLM

        m = copy.deepcopy(model)
        if hasattr(m, "merge_and_unload"):
            m = m.merge_and_unload()
        tmp = self.folder.with_name(self.folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        m.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        del m
        self.close()
        shutil.rmtree(self.folder, ignore_errors=True)
        os.replace(tmp, self.folder)
        self.llm = LLM(model=str(self.folder), dtype="bfloat16", gpu_memory_utilization=self.memory, seed=self.seed,
                       enforce_eager=True)

    def close(self) -> None:
        if self.llm is not None:
            self.llm = None
            gc.collect()
            torch.cuda.empty_cache()

    def _generate(self, encoded: list[list[int]], settings: SampleSettings, tokenizer, suppress: list[int], seed: int,
                  logprobs: int | None = None):
        from vllm import SamplingParams

        # One seed per request: a shared seed would give every request the same random stream.
        params = [SamplingParams(temperature=settings.temperature, top_p=settings.top_p, max_tokens=settings.max_new_tokens,
                                 min_tokens=settings.min_new_tokens, stop_token_ids=stop_ids(tokenizer), seed=seed * 1_000_003 + i,
                                 logit_bias={t: -100.0 for t in suppress} or None, logprobs=logprobs)
                  for i in range(len(encoded))]
        return self.llm.generate([{"prompt_token_ids": e} for e in encoded], params, use_tqdm=False)

    def sample(self, tokenizer, template: Template, requests: list[tuple[str | None, str]], settings: SampleSettings,
               suppress: list[int] | None = None, seed: int = 0) -> list[Sample]:
        encoded = [template.input_ids(tokenizer, fb, p, settings.max_prompt_tokens) for fb, p in requests]
        eos = set(stop_ids(tokenizer))
        out = []
        for e, r in zip(encoded, self._generate(encoded, settings, tokenizer, suppress or [], seed)):
            c = r.outputs[0]
            toks = list(c.token_ids)
            ended = bool(toks) and toks[-1] in eos
            body = toks[:-1] if ended else toks
            out.append(Sample(completion=tokenizer.decode(body, skip_special_tokens=True), truncated=not ended,
                              prompt_tokens=len(e), completion_tokens=len(body)))
        return out

    @torch.no_grad()
    def check(self, model, tokenizer, template: Template, requests: list[tuple[str | None, str]], settings: SampleSettings,
              tolerance: float = 0.05) -> float:
        """Mean |log p_vLLM − log p_policy| over the sampled tokens of a few requests; stops the run above tolerance."""
        from .loss import target_logits

        encoded = [template.input_ids(tokenizer, fb, p, settings.max_prompt_tokens) for fb, p in requests]
        outs = self._generate(encoded, SampleSettings(1.0, 1.0, 1, settings.max_new_tokens), tokenizer, [], self.seed, logprobs=0)
        gaps = []
        for e, r in zip(encoded, outs):
            c = r.outputs[0]
            toks = list(c.token_ids)
            if not toks or c.logprobs is None:
                continue
            logits, tgt, mask = target_logits(model, [e], [toks], tokenizer.pad_token_id)
            ours = torch.log_softmax(logits.float(), -1).gather(-1, tgt.unsqueeze(-1)).squeeze(-1)[mask].tolist()
            theirs = [step[t].logprob for step, t in zip(c.logprobs, toks)]
            gaps += [abs(a - b) for a, b in zip(ours, theirs)]
        gap = sum(gaps) / max(len(gaps), 1)
        if gap > tolerance:
            raise AltlmError(f"vLLM's log-probabilities differ from the policy's by {gap:.3f} nats per token on average after "
                             f"the weight sync (tolerance {tolerance}): vLLM is not sampling the trained weights; use sampler=hf "
                             "and report this with your vLLM version")
        return gap
