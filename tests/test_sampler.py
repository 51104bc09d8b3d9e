"""The sampler: exact nucleus sampling, EOS/min-token handling, suppressed tokens, truncation flags."""

from __future__ import annotations

import copy

import torch

from altlm import models
from altlm.sampler import SampleSettings, draw, inference_model, sample, stop_ids
from altlm.template import Template


def _empirical(logits, top_p, k_first, n=20000, temperature=1.0, method="sort"):
    """Draw frequencies; method=sort is the path whose k_first fallback these tests check (test_nucleus.py: reject)."""
    torch.manual_seed(0)
    rows = logits.expand(n, -1).clone()
    got = draw(rows, temperature, top_p, k_first=k_first, method=method)
    return torch.bincount(got, minlength=logits.shape[-1]).float() / n


def _nucleus_probs(logits, top_p):
    p = torch.softmax(logits, -1)
    sp, idx = p.sort(descending=True)
    keep = (sp.cumsum(-1) - sp) < top_p
    out = torch.zeros_like(p)
    out[idx[keep]] = sp[keep]
    return out / out.sum()


def test_draw_matches_the_nucleus_distribution():
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0, -5.0])
    want = _nucleus_probs(logits, 0.8)
    got = _empirical(logits, 0.8, k_first=8)
    assert (got - want).abs().max() < 0.015
    assert got[want == 0].sum() == 0  # tokens outside the nucleus are never drawn


def test_draw_falls_back_to_full_sort_when_the_nucleus_is_wider_than_k_first():
    logits = torch.zeros(10)  # uniform: the 0.9-nucleus holds 9 tokens, far more than k_first=2
    got = _empirical(logits, 0.9, k_first=2)
    assert (got[got > 0].numel()) == 9
    assert (got - _nucleus_probs(logits, 0.9)).abs().max() < 0.015


def test_draw_top_p_one_is_plain_softmax_sampling_with_temperature():
    logits = torch.tensor([1.0, 0.0, -1.0])
    got = _empirical(logits, 1.0, k_first=8, temperature=2.0)
    assert (got - torch.softmax(logits / 2.0, -1)).abs().max() < 0.015


def test_sample_respects_min_tokens_suppression_and_marks_truncation(fresh_tiny):
    model, tok = fresh_tiny
    template = Template()
    sep = models.add_tokens(model, tok, [template.separator_token], "eos")
    # The separator's embedding (tied to the head) copies EOS's, so it is as likely as EOS: suppression must hold.
    settings = SampleSettings(max_new_tokens=6, min_new_tokens=3, batch_size=4)
    requests = [("Lowest Toxicity", "Hello there"), (None, "A longer prompt that pads the other one"), (None, "x")] * 2
    out = sample(inference_model(model), tok, template, requests, settings, suppress=sep, seed=0)
    assert len(out) == len(requests)
    for s in out:
        assert 3 <= s.completion_tokens <= 6
        assert s.truncated == (s.completion_tokens == 6)  # the body excludes EOS: only a full body is truncated
        assert "<|separator|>" not in s.completion
    # prompt token counts include the conditioning prefix
    assert out[0].prompt_tokens == len(template.input_ids(tok, "Lowest Toxicity", "Hello there"))
    assert out[2].prompt_tokens == len(template.input_ids(tok, None, "x"))


def test_sample_is_deterministic_per_seed_and_batch_size(tiny):
    """What a seed fixes is (seed, batch size): batch b draws from torch's RNG seeded by (seed, b), so the same seed
    at the same `batch_size` gives the same completions. The batch size is part of the draw — with the same seed,
    batches of 2 and of 4 give different completions (measured) — so this claims nothing across sizes."""
    model, tok = tiny
    requests = [(None, p) for p in ["The cat", "Once upon a time", "I think that", "Why"]]
    for size in (2, 4):
        a = sample(model, tok, Template(), requests, SampleSettings(max_new_tokens=5, batch_size=size), seed=3)
        b = sample(model, tok, Template(), requests, SampleSettings(max_new_tokens=5, batch_size=size), seed=3)
        assert [s.completion for s in a] == [s.completion for s in b], size
        assert all(s.completion_tokens >= 3 for s in a)
        c = sample(model, tok, Template(), requests, SampleSettings(max_new_tokens=5, batch_size=size), seed=4)
        assert [s.completion for s in c] != [s.completion for s in a], size  # the seed is what decides


def test_each_batch_can_be_redone_on_its_own(tiny):
    """A resumed run passes the samples it has (`done`) and gets, for the missing batch, what the whole call drew."""
    model, tok = tiny
    requests = [(None, f"Prompt number {i} says") for i in range(6)]
    settings = SampleSettings(max_new_tokens=5, batch_size=2)
    batches: list[list[int]] = []
    whole = sample(
        model, tok, Template(), requests, settings, seed=5, on_batch=lambda b: batches.append([i for i, _ in b])
    )
    assert sorted(len(b) for b in batches) == [2, 2, 2]
    for missing in batches:
        done = {i: s for i, s in enumerate(whole) if i not in missing}
        redone: list[list[int]] = []
        again = sample(
            model,
            tok,
            Template(),
            requests,
            settings,
            seed=5,
            done=done,
            on_batch=lambda b: redone.append([i for i, _ in b]),
        )
        assert redone == [missing]  # only the missing batch was sampled
        assert [s.completion for s in again] == [s.completion for s in whole]


def test_stop_ids_include_endoftext_and_eos(tiny):
    _, tok = tiny
    ids = stop_ids(tok)
    assert tok.eos_token_id in ids
    assert tok.convert_tokens_to_ids("<|endoftext|>") in ids


def test_shared_prefill_runs_each_prompt_once_and_samples_as_every_row(tiny):
    """share_prefill: the k copies of a prompt in a batch run its forward once (the model sees each distinct row
    once), and the samples equal those of the path where every row runs it (fp32: the same arithmetic per row)."""
    model, tok = tiny
    requests = [(None, p) for p in ["The cat", "Once upon a time", "I think that"] for _ in range(4)]
    first_batch_rows = []
    hook = model.register_forward_pre_hook(
        lambda mod, args, kwargs: first_batch_rows.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    try:
        out = {}
        for shared in (True, False):
            first_batch_rows.clear()
            settings = SampleSettings(max_new_tokens=6, batch_size=12, top_p=0.9, share_prefill=shared)
            out[shared] = [s.completion for s in sample(model, tok, Template(), requests, settings, seed=5)]
            assert first_batch_rows[0][0] == (3 if shared else 12)  # the prefill: 3 distinct prompts, or 12 rows
            assert all(shape[0] == 12 for shape in first_batch_rows[1:])  # every decoding step: all 12 rows
    finally:
        hook.remove()
    assert out[True] == out[False]
    assert len({c for c in out[True][:4]}) > 1  # the copies of a prompt still draw their own samples


def test_grouped_attention_is_eager_attention_bit_for_bit(tiny):
    """attn_implementation=grouped (auto on CPU for grouped-query Llamas) stacks the query heads of a key/value head
    instead of copying the head to each (tiny-smollm2: 4 query heads, 2 key/value heads). The logits of a left-padded
    prefill and the samples of KV-cached decoding equal eager attention's, in fp32 and in bf16, and the grouped
    function really ran (a counter on the registered function)."""
    from transformers import AttentionInterface

    model, tok = tiny
    cpu = torch.device("cpu")
    calls = []
    nets = {}
    for choice in ("eager", "grouped"):
        m = copy.deepcopy(model)
        models.set_attention(m, choice, cpu)
        for dtype in (None, torch.bfloat16):
            nets[choice, dtype] = inference_model(m, dtype)
    assert nets["grouped", None].config._attn_implementation == models.GROUPED

    def counting(*args, **kwargs):
        calls.append(1)
        return models.grouped_attention(*args, **kwargs)

    AttentionInterface.register(models.GROUPED, counting)
    try:
        prompts = ["The cat", "Once upon a time there was", "I think that"]
        requests = [(None, p) for p in prompts for _ in range(3)]
        settings = SampleSettings(max_new_tokens=6, batch_size=9, top_p=0.9)
        for dtype in (None, torch.bfloat16):
            batch = tok(prompts, return_tensors="pt", padding=True)
            real = batch["attention_mask"].bool()
            with torch.no_grad():
                logits = {c: nets[c, dtype](**batch).logits[real] for c in ("eager", "grouped")}
            assert torch.equal(logits["eager"], logits["grouped"])
            out = {c: sample(nets[c, dtype], tok, Template(), requests, settings, seed=3) for c in ("eager", "grouped")}
            assert [s.completion for s in out["eager"]] == [s.completion for s in out["grouped"]]
    finally:
        AttentionInterface.register(models.GROUPED, models.grouped_attention)
    assert len(calls) > 2 * 2 * 6  # both dtypes, the prefills and every decoding step, each layer


def test_grouped_attention_equals_the_eager_functions_it_replaces():
    """The attention function alone, against transformers' own eager functions on random fp32 tensors with a padding
    mask: Llama's (no softcap) and Gemma-2's (with its logit softcap), 6 query heads over 2 key/value heads, a
    prefill (t = 5) and a decoding step (t = 1). Within 1e-6: a matmul over stacked rows may take another kernel
    than the per-head one for these odd shapes."""
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward as gemma2_eager
    from transformers.models.llama.modeling_llama import eager_attention_forward as llama_eager

    class Layer(torch.nn.Module):
        num_key_value_groups = 3

    layer = Layer().eval()
    torch.manual_seed(0)
    for t in (5, 1):
        query = torch.randn(2, t, 6, 8).transpose(1, 2)  # [b, h, t, d] as the attention modules hand it over
        key, value = torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
        mask = torch.zeros(2, 1, t, 7)
        mask[0, :, :, :2] = torch.finfo(torch.float32).min  # row 0: two left-padded positions
        want, _ = llama_eager(layer, query, key, value, mask, scaling=0.3)
        got, _ = models.grouped_attention(layer, query, key, value, mask, scaling=0.3)
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)  # (bit for bit on the model: the test above)
        want, _ = gemma2_eager(layer, query, key, value, mask, scaling=0.3, softcap=2.0)
        got, _ = models.grouped_attention(layer, query, key, value, mask, scaling=0.3, softcap=2.0)
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(got, models.grouped_attention(layer, query, key, value, mask, scaling=0.3)[0])
