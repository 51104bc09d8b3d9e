"""The vLLM sampler: one clear line where it cannot run; where a CUDA GPU and vLLM are present, the same Samples
interface as the HF sampler and log-probabilities that agree with the policy's after a weight sync."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import run_altlm

HAS_VLLM = importlib.util.find_spec("vllm") is not None
GPU = torch.cuda.is_available()


def test_sampler_vllm_where_it_cannot_run_is_one_line(tmp_path):
    if HAS_VLLM and GPU:
        pytest.skip("this machine can run vLLM: covered by the GPU test below")
    r = run_altlm("train", "--config", "smoke", "sampler=vllm", f"output_dir={tmp_path / 'o'}", cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "sampler=vllm needs" in lines[0] and "sampler=hf" in lines[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(not (HAS_VLLM and GPU), reason="needs a CUDA GPU and vLLM (pip install 'altlm[vllm]'); this machine has "
                    f"{'no GPU' if not GPU else 'no vLLM'}")
def test_vllm_samples_like_the_hf_sampler_and_agrees_after_sync(tmp_path):
    from altlm import models
    from altlm.sampler import SampleSettings
    from altlm.template import Template
    from altlm.vllm_sampler import VLLMSampler

    tok = models.load_tokenizer("smollm2-135m")
    model = models.load_model("smollm2-135m").cuda()
    template = Template()
    new, init = template.new_tokens(["Good", "Bad"])
    added = models.add_tokens(model, tok, new, init)
    v = VLLMSampler(tmp_path / "w", 0.3, seed=0)
    v.sync(model, tok)
    requests = [("Good", "The weather today is"), (None, "Once upon a time"), ("Bad", "My neighbour")] * 4
    settings = SampleSettings(1.0, 0.9, 3, 12, 64, 64)
    out = v.sample(tok, template, requests, settings, added, seed=1)
    assert len(out) == len(requests)
    for s in out:
        assert 3 <= s.completion_tokens <= 12 and s.prompt_tokens > 0 and isinstance(s.truncated, bool)
        assert s.truncated == (s.completion_tokens == 12)
    assert v.check(model, tok, template, requests[:4], settings, tolerance=0.05) < 0.05
    with torch.no_grad():  # a changed policy without a sync is caught
        model.get_output_embeddings().weight.mul_(1.5)
    with pytest.raises(Exception, match="not sampling the trained weights"):
        v.check(model, tok, template, requests[:4], settings, tolerance=0.05)
    v.sync(model, tok)
    assert v.check(model, tok, template, requests[:4], settings, tolerance=0.05) < 0.05
    v.close()
