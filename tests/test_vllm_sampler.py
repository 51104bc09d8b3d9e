"""The vLLM sampler. On the CPU: everything but vLLM's kernels, with `StandInVLLM` — vLLM's offline API (LLM,
SamplingParams, RequestOutput) as the sampler uses it, run by transformers on the folder `sync` wrote, with vLLM's
rules (empty prompts refused, generation_config.json's EOS ids stop a request, stop ids masked before min_tokens,
raw log-probabilities, per-request seeds, int64 seeds, max_model_len). Where a CUDA GPU and vLLM are: the real
engine. Elsewhere: one clear line."""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import run_altlm

from altlm import models
from altlm.config import load_config
from altlm.errors import AltlmError
from altlm.sampler import SampleSettings
from altlm.template import Template
from altlm.vllm_sampler import TOLERANCE, VLLMSampler, engine_dtype, request_seed

HAS_VLLM = importlib.util.find_spec("vllm") is not None
GPU = torch.cuda.is_available()
SETTINGS = SampleSettings(1.0, 1.0, 2, 8, 16, 64)
REQUESTS = [
    ("Good", "The weather today is"),
    (None, "Once upon a time"),
    ("Bad", "My neighbour"),
    (None, "I think that"),
    ("Good", "Cats are"),
    ("Bad", "The news"),
]


# ---------------------------------------------------------------------------------------------- the stand-in
@dataclass
class StandInParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16
    min_tokens: int = 0
    stop_token_ids: list = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None
    logit_bias: dict | None = None

    def __post_init__(self):
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:  # msgspec's int64 to the engine process
            raise OverflowError(f"seed {self.seed} does not fit int64")


class StandInLLM:
    """vLLM's LLM on the CPU: loads the synced folder with transformers (in the dtype `sync` saved), samples with
    a torch.Generator seeded per request, returns RequestOutput-shaped results with raw log-probabilities."""

    made: list["StandInLLM"] = []
    drop_logprobs = False

    def __init__(self, model: str, dtype: str, max_model_len: int, **kwargs):
        from transformers import AutoModelForCausalLM, GenerationConfig

        self.kwargs = dict(model=model, dtype=dtype, max_model_len=max_model_len, **kwargs)
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval()
        gen = GenerationConfig.from_pretrained(model)
        eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
        self.eos = {e for e in eos if e is not None}  # vLLM adds these to every request's stop ids
        self.max_model_len, self.closed = max_model_len, False
        self.llm_engine = SimpleNamespace(engine_core=SimpleNamespace(shutdown=self._shutdown))
        StandInLLM.made.append(self)

    def _shutdown(self):
        self.closed = True

    @torch.no_grad()
    def generate(self, prompts, params, use_tqdm=True):
        assert not self.closed and len(prompts) == len(params)
        return [self._one(p["prompt_token_ids"], sp) for p, sp in zip(prompts, params)]

    def _one(self, ids: list[int], sp: StandInParams):
        if not ids:
            raise ValueError("The decoder prompt cannot be empty")  # vLLM's input processor
        assert len(ids) + sp.max_tokens <= self.max_model_len, "max_model_len too small for this request"
        g = torch.Generator().manual_seed(sp.seed)
        stops, toks, lps, reason = set(sp.stop_token_ids) | self.eos, [], [], "length"
        for step in range(sp.max_tokens):
            logits = self.model(input_ids=torch.tensor([ids + toks])).logits[0, -1].float()
            raw = torch.log_softmax(logits, -1)  # logprobs_mode="raw_logprobs": before bias, masks, temperature
            for t, b in (sp.logit_bias or {}).items():
                logits[t] += b
            if step < sp.min_tokens:
                logits[list(stops)] = float("-inf")
            t = int(torch.multinomial(torch.softmax(logits / sp.temperature, -1), 1, generator=g))
            toks.append(t)
            lps.append({t: SimpleNamespace(logprob=float(raw[t]))})
            if t in stops:
                reason = "stop"
                break
        out = SimpleNamespace(
            token_ids=toks, finish_reason=reason, logprobs=None if (sp.logprobs is None or self.drop_logprobs) else lps
        )
        return SimpleNamespace(prompt_token_ids=ids, outputs=[out])


def stand_in(drop_logprobs: bool = False):
    llm = type("StandInLLM", (StandInLLM,), {"drop_logprobs": drop_logprobs})
    return SimpleNamespace(LLM=llm, SamplingParams=StandInParams)


def with_separator(model, tok):
    """The template's separator token added, as the trainer adds it (REQUESTS hold feedback)."""
    new, init = Template().new_tokens([])
    models.add_tokens(model, tok, new, init)
    return model, tok


def lora_policy(model, tok):
    """The trainer's LoRA set-up with precision bf16: adapters fp32, frozen block weights stored in bf16
    (models.cast_frozen_linears), non-zero adapters, conditioning tokens added, in train mode with dropout."""
    template = Template()
    new, init = template.new_tokens(["Good", "Bad"])
    added = models.add_tokens(model, tok, new, init)
    lora = dict(r=4, alpha=8, dropout=0.5, target_modules=["q_proj", "v_proj", "up_proj"], layers=1.0)
    policy = models.prepare_for_training(model, "lora", 1.0, lora, added)
    assert models.cast_frozen_linears(policy, torch.bfloat16) > 0
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    return policy.train(), template, added


# ---------------------------------------------------------------------------------------------- CPU tests
def test_check_on_a_lora_policy_with_bf16_frozen_weights_passes_and_a_changed_head_fails(fresh_tiny, tmp_path):
    model, tok = fresh_tiny
    policy, template, _ = lora_policy(model, tok)
    v = VLLMSampler(tmp_path / "w", seed=3, engine=stand_in(), dtype=torch.bfloat16)
    v.sync(policy, tok)
    gap = v.check(policy, tok, template, REQUESTS, SETTINGS)
    assert gap < 1e-3  # the same bf16 weights on both sides; the policy's dropout is off (eval mode)
    assert policy.training  # the caller's model is left as it was
    with torch.no_grad():  # the policy moves on without a sync: caught
        head = policy.get_output_embeddings().weight
        head.add_(torch.randn(head.shape, generator=torch.Generator().manual_seed(2)))
    with pytest.raises(AltlmError, match="not sampling the trained weights"):
        v.check(policy, tok, template, REQUESTS, SETTINGS)
    v.sync(policy, tok)
    assert v.check(policy, tok, template, REQUESTS, SETTINGS) < 1e-3


def test_check_compares_against_the_engines_weights_in_eval_mode(fresh_tiny, tmp_path, monkeypatch):
    """What check() runs the policy as: LoRA merged, every weight in the engine's dtype (what vLLM loaded), eval
    mode (no dropout). The gap alone cannot show this on the tiny model: fp32 instead of bf16 moves it from 3e-4 to
    1e-3 nats, too thin a margin to assert on every CPU."""
    import altlm.loss

    model, tok = fresh_tiny
    policy, template, _ = lora_policy(model, tok)
    seen = []
    real = altlm.loss.target_logits

    def spy(m, *args, **kwargs):
        dtypes = {p.dtype for p in m.parameters()}
        lora = any("lora_" in name for name, _ in m.named_parameters())
        seen.append((dtypes, lora, any(x.training for x in m.modules())))
        return real(m, *args, **kwargs)

    monkeypatch.setattr(altlm.loss, "target_logits", spy)
    for dtype in (torch.bfloat16, torch.float16):  # the engine's dtype by compute capability
        v = VLLMSampler(tmp_path / str(dtype), seed=3, engine=stand_in(), dtype=dtype)
        v.sync(policy, tok)
        seen.clear()
        v.check(policy, tok, template, REQUESTS, SETTINGS)
        assert seen and all(s == ({dtype}, False, False) for s in seen), seen
    assert policy.training and {p.dtype for p in policy.parameters()} == {torch.float32, torch.bfloat16}


def test_check_refuses_when_nothing_was_compared(fresh_tiny, tmp_path):
    model, tok = with_separator(*fresh_tiny)
    v = VLLMSampler(tmp_path / "w", engine=stand_in(drop_logprobs=True), dtype=torch.bfloat16)
    v.sync(model, tok)
    with pytest.raises(AltlmError, match="returned no sampled tokens with log-probabilities for the 4 check requests"):
        v.check(model, tok, Template(), REQUESTS[:4], SETTINGS)


def test_truncation_follows_finish_reason_including_generation_config_eos(fresh_tiny, tmp_path):
    """vLLM also stops on generation_config.json's EOS ids, which altlm's stop ids need not hold: an instruct
    model's '<|im_start|>' here, made a likely token. Such an end is clean (not truncated) and its token is not text."""
    model, tok = with_separator(*fresh_tiny)
    from altlm.sampler import stop_ids

    extra = tok.convert_tokens_to_ids("<|im_start|>")
    assert extra not in stop_ids(tok)
    model.generation_config.eos_token_id = [tok.eos_token_id, extra]
    with torch.no_grad():
        model.get_output_embeddings().weight[extra].mul_(2000.0)
    v = VLLMSampler(tmp_path / "w", engine=stand_in(), dtype=torch.bfloat16)
    v.sync(model, tok)
    out = v.sample(tok, Template(), REQUESTS, SETTINGS, seed=1)
    early = [s for s in out if s.completion_tokens < SETTINGS.max_new_tokens]  # stopped by '<|im_start|>'
    assert len(early) >= 3 and not any(s.truncated for s in early), out
    assert all("<|im_start|>" not in s.completion for s in out)
    v.sync(with_separator(models.load_model("tiny-smollm2"), tok)[0], tok)  # an untrained model ends by the token limit
    out = v.sample(tok, Template(), REQUESTS, SampleSettings(1.0, 1.0, 0, 5, 16, 64), seed=1)
    assert all(s.truncated and s.completion_tokens == 5 for s in out), out


def test_seeds_follow_the_request_index_so_a_resumed_round_draws_the_same(fresh_tiny, tmp_path):
    model, tok = with_separator(*fresh_tiny)
    v = VLLMSampler(tmp_path / "w", engine=stand_in(), dtype=torch.bfloat16)
    v.sync(model, tok)
    big = 10**30 * 100_003 + 7  # a large `seed` config value, as the trainer combines it with the iteration
    whole = v.sample(tok, Template(), REQUESTS, SETTINGS, seed=big)
    todo = [1, 4, 5]  # what a killed attempt had not staged
    resumed = v.sample(tok, Template(), [REQUESTS[i] for i in todo], SETTINGS, seed=big, indices=todo)
    assert resumed == [whole[i] for i in todo]
    assert len({s.completion for s in whole}) > 1  # one stream per request, not one shared
    assert all(0 <= request_seed(big, i) < 2**63 for i in range(100))
    assert v.sample(tok, Template(), REQUESTS, SETTINGS, seed=big + 1) != whole


def test_engine_lifetime_settings_and_empty_prompt(fresh_tiny, tmp_path):
    model, tok = fresh_tiny
    StandInLLM.made.clear()
    v = VLLMSampler(
        tmp_path / "w",
        0.25,
        seed=2**40,
        trust_remote_code=True,
        max_model_len=90,
        engine=stand_in(),
        dtype=torch.bfloat16,
    )
    v.sync(model, tok)
    out = v.sample(tok, Template(), [(None, ""), (None, "Hello")], SETTINGS)  # vLLM alone refuses an empty prompt
    assert len(out) == 2 and out[0].prompt_tokens == 0 and out[1].prompt_tokens > 0
    eng = StandInLLM.made[-1]
    assert eng.closed and v.llm is None  # shut down after sampling: training gets the GPU
    kw = eng.kwargs
    assert kw["trust_remote_code"] is True and kw["dtype"] == "bfloat16" and kw["gpu_memory_utilization"] == 0.25
    assert kw["max_model_len"] == 90 and kw["seed"] < 2**32 and kw["enforce_eager"] is True
    long = [(None, "word " * 60)]  # 60 prompt tokens + 200 new do not fit the 90 the config asked for
    v.sample(tok, Template(), long, SampleSettings(1.0, 1.0, 0, 200, 16, 64))
    assert StandInLLM.made[-1].kwargs["max_model_len"] >= 60 + 200  # started long enough for the request
    with pytest.raises(AltlmError, match="more than the model's context of 8192"):
        v.sample(tok, Template(), long, SampleSettings(1.0, 1.0, 0, 9000, 16, 64))


def test_dtype_by_compute_capability_and_refusals(tmp_path):
    assert engine_dtype((7, 5)) == torch.float16 and engine_dtype((8, 0)) == torch.bfloat16
    assert engine_dtype((9, 0)) == torch.bfloat16
    cfg = load_config("smoke", ["sampler=vllm", "max_prompt_tokens=50", "max_new_tokens=12", "trust_remote_code=true"])
    with pytest.raises(AltlmError, match="sampler=vllm runs in one process.*sampler=hf"):
        VLLMSampler.for_run(cfg, tmp_path, 2)
    assert VLLMSampler.for_run(load_config("smoke", []), tmp_path, 2) is None
    if not HAS_VLLM:
        with pytest.raises(AltlmError, match="sampler=vllm needs vLLM.*docs/gpu.md.*sampler=hf"):
            VLLMSampler.for_run(cfg, tmp_path, 1)


def test_sampler_vllm_where_it_cannot_run_is_one_line(tmp_path):
    if HAS_VLLM and GPU:
        pytest.skip("this machine can run vLLM: covered by the GPU test below")
    r = run_altlm("train", "--config", "smoke", "sampler=vllm", f"output_dir={tmp_path / 'o'}", cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "sampler=vllm needs" in lines[0] and "sampler=hf" in lines[0]
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------- the real engine
@pytest.mark.skipif(
    not (HAS_VLLM and GPU),
    reason=f"needs a CUDA GPU and vLLM (docs/gpu.md); this machine has {'no GPU' if not GPU else 'no vLLM'}",
)
def test_vllm_samples_like_the_hf_sampler_and_agrees_after_sync(tmp_path):
    """The real engine on a LoRA policy with bf16 frozen weights. ALTLM_GPU_MODEL: a model folder (gpu_check.sh
    passes its random-weight SmolLM2-135M); ALTLM_GPU_RESULTS: a folder for the measured gap."""
    name = os.environ.get("ALTLM_GPU_MODEL", "smollm2-135m")
    tok = models.load_tokenizer(name)
    policy, template, added = lora_policy(models.load_model(name).cuda(), tok)
    v = VLLMSampler(tmp_path / "w", 0.3, seed=0, max_model_len=64 + 12 + 64)
    v.sync(policy, tok)
    gap = v.check(policy, tok, template, REQUESTS, SETTINGS)
    settings = SampleSettings(1.0, 0.9, 3, 12, 64, 64)
    out = v.sample(tok, template, REQUESTS * 2, settings, added, seed=1)
    assert v.llm is None and len(out) == 2 * len(REQUESTS)
    for s in out:
        assert 3 <= s.completion_tokens <= 12 and s.prompt_tokens > 0 and isinstance(s.truncated, bool)
    todo = [1, 7, 10]
    again = v.sample(tok, template, [(REQUESTS * 2)[i] for i in todo], settings, added, seed=1, indices=todo)
    assert again == [out[i] for i in todo]  # seeded by request index: a resumed round draws the same
    with torch.no_grad():
        head = policy.get_output_embeddings().weight
        head.add_(torch.randn(head.shape, device=head.device, generator=torch.Generator(head.device).manual_seed(2)))
    with pytest.raises(AltlmError, match="not sampling the trained weights"):
        v.check(policy, tok, template, REQUESTS, SETTINGS)
    v.sync(policy, tok)
    gap_after = v.check(policy, tok, template, REQUESTS, SETTINGS)
    v.close()
    if os.environ.get("ALTLM_GPU_RESULTS"):
        import vllm

        Path(os.environ["ALTLM_GPU_RESULTS"], "vllm_check.json").write_text(
            json.dumps(
                {
                    "model": name,
                    "vllm": vllm.__version__,
                    "dtype": str(v.dtype),
                    "gap": gap,
                    "gap_after_resync": gap_after,
                    "tolerance": TOLERANCE,
                    "device": torch.cuda.get_device_name(),
                },
                indent=1,
            )
        )
    assert gap < TOLERANCE and gap_after < TOLERANCE
