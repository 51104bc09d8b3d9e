"""The reference cache (refcache.py): KL(reference‖policy) from two cached numbers per token equals the KL from the
reference's whole distribution, and a run with the cache trains as a run without it."""

from __future__ import annotations

import copy

import torch
from test_resume import CRASH, altlm
from test_train_smoke import jsonl

import pytest

from altlm import models
from altlm.loss import (
    alt_loss,
    block_inputs,
    head_logits,
    head_loss,
    target_hidden,
    target_hidden_from,
    target_logits,
)
from altlm.refcache import ReferenceCache, key, statistics

LORA = dict(
    r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"], layers=0.5, train_new_tokens=False
)


def lora_tiny(tiny):
    model = models.prepare_for_training(copy.deepcopy(tiny[0]), "lora", 0.3, LORA, [])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LoRA starts as the identity (B = 0): move it so the policy differs from the reference
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def batch(tok, n=5):
    inputs = [tok(f"prompt number {i} says", add_special_tokens=False).input_ids for i in range(n)]
    targets = [tok(" and then" + " more" * i, add_special_tokens=False).input_ids for i in range(n)]
    return inputs, targets


@pytest.mark.parametrize("fused", [False, True])
def test_cached_kl_equals_the_full_distribution_kl_with_the_same_gradients(tiny, fused):
    """The issue's exactness check, in fp32: the new path (cached reference statistics; fused: the head inside the
    loss, loss.head_loss) against the old (the reference's logits at every step): loss terms within 1e-3 relative,
    LoRA gradients within 1e-2 relative L2."""
    model, tok = lora_tiny(tiny), tiny[1]
    inputs, targets = batch(tok)
    v = len(tok)
    # the old path: the reference's logits at every step
    logits, tgt, mask = target_logits(model, inputs, targets, tok.pad_token_id)
    with torch.no_grad(), model.disable_adapter():
        ref_logits = target_logits(model, inputs, targets, tok.pad_token_id)[0]
    old_loss, old = alt_loss(logits, tgt, mask, ref_logits, 0.05, 0.06, vocab_size=v)
    old_loss.backward()
    old_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    assert old["kl"] > 1e-4  # the policy is not the reference: the comparison means something
    # the new path: Wᵀq and Σ q log q per token, then the policy's hidden states
    head = model.get_output_embeddings().weight.detach()
    with torch.no_grad(), model.disable_adapter():
        r_hidden = target_hidden(model, inputs, targets, tok.pad_token_id)[0]
    mean_embedding, negentropy = statistics(r_hidden, head, head, v, chunk_rows=3)
    hidden, tgt2 = target_hidden(model, inputs, targets, tok.pad_token_id)
    assert torch.equal(tgt[mask], tgt2)  # packed: the completion positions, row by row
    if fused:  # chunks of 4 rows: the batch's 20 targets take several
        new_loss, new = head_loss(hidden, head, tgt2, 0.05, 0.06, v, None, (mean_embedding, negentropy), chunk_rows=4)
    else:
        ref_stats = (hidden, mean_embedding, negentropy)
        new_loss, new = alt_loss(
            head_logits(model, hidden), tgt2, None, None, 0.05, 0.06, vocab_size=v, ref_stats=ref_stats
        )
    new_loss.backward()
    for k in ("nll", "kl", "entropy"):
        assert abs(new[k] - old[k]) <= 1e-3 * abs(old[k]), (k, new[k], old[k])
    assert abs(new_loss.item() - old_loss.item()) <= 1e-3 * abs(old_loss.item())
    for n, p in model.named_parameters():
        if p.requires_grad:
            rel = (p.grad - old_grads[n]).norm() / old_grads[n].norm().clamp(min=1e-12)
            assert rel < 1e-2, (n, float(rel))


@pytest.mark.parametrize("entropy_coef", [0.0, 0.06])
def test_the_fused_head_loss_is_the_unfused_one_under_bf16_autocast(tiny, entropy_coef):
    """fused_loss under the CPU default (bf16 autocast), with words added past the tokenizer's vocabulary (Quark's,
    a separator): at the demo's α = 0 the LoRA gradients are bit-identical to head_logits + alt_loss (the same
    values in the same order, in chunks of 3 rows); with the entropy bonus its gradient is summed in another order,
    and bf16's rounding of the backward is within 1e-2 relative L2."""
    model, tok = lora_tiny(tiny), tiny[1]
    inputs, targets = batch(tok, n=6)
    v = len(tok) - 5  # the head's last 5 rows act as added words: the NLL normalises over them, the KL does not
    head = model.get_output_embeddings().weight.detach()
    low = head.to(torch.bfloat16)
    results = {}
    for fused in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with torch.no_grad(), model.disable_adapter():
                r_hidden = target_hidden(model, inputs, targets, tok.pad_token_id)[0]
            ref = statistics(r_hidden, low, head, v, chunk_rows=3)
            hidden, tgt = target_hidden(model, inputs, targets, tok.pad_token_id)
            if not fused:
                logits = head_logits(model, hidden)
        if fused:
            loss, stats = head_loss(hidden, low, tgt, 0.1, entropy_coef, v, 7.0, ref, chunk_rows=3)
        else:
            loss, stats = alt_loss(
                logits, tgt, None, None, 0.1, entropy_coef, vocab_size=v, denominator=7.0, ref_stats=(hidden, *ref)
            )
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        results[fused] = (loss.item(), stats, grads)
    (old_loss, old, old_grads), (new_loss, new, new_grads) = results[False], results[True]
    assert new["tokens"] == old["tokens"] > 3 * 3  # several chunks
    assert old["kl"] > 1e-4
    assert new_loss == pytest.approx(old_loss, rel=1e-6)
    for k in ("nll", "kl", "entropy"):
        assert new[k] == pytest.approx(old[k], rel=1e-5), k
    for n, g in old_grads.items():
        if entropy_coef == 0.0:
            assert torch.equal(new_grads[n], g), n
        else:
            assert (new_grads[n] - g).norm() <= 1e-2 * g.norm(), n


@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_adapted_blocks_from_cached_inputs_compute_what_the_whole_forward_does(tiny, amp):
    """cache_frozen_layers: the input of the lowest adapted block, taken per row (block_inputs) and run from there
    (target_hidden_from), gives the whole forward's hidden states bit for bit in the same batch (the padded
    positions are masked, their values never reach a real one), and the same up to rounding when the rows come
    from other batches with other padding; the gradient reaches the adapters alike."""
    model, tok = lora_tiny(tiny), tiny[1]
    inputs, targets = batch(tok, n=6)
    pad = tok.pad_token_id
    autocast = torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None)
    with autocast:
        want, want_tgt = target_hidden(model, inputs, targets, pad)
        acts = block_inputs(model, inputs, targets, pad, 1)
        got, got_tgt = target_hidden_from(model, acts, inputs, targets, pad, 1)
    assert torch.equal(got, want) and torch.equal(got_tgt, want_tgt)
    assert [a.shape[0] for a in acts] == [len(x) + len(t) for x, t in zip(inputs, targets)]
    assert not any(a.requires_grad for a in acts)
    # each row's input from a batch of its own (no padding), then the six together
    with autocast:
        alone = [block_inputs(model, [x], [t], pad, 1)[0] for x, t in zip(inputs, targets)]
        mixed, _ = target_hidden_from(model, alone, inputs, targets, pad, 1)
    torch.testing.assert_close(mixed, want, rtol=1e-2 if amp else 1e-5, atol=1e-2 if amp else 1e-5)
    grads = []
    for hidden in (want, got):
        model.zero_grad(set_to_none=True)
        (hidden.float() ** 2).mean().backward(retain_graph=True)
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    assert any(g.abs().sum() > 0 for g in grads[0])


@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_packed_rows_compute_what_the_padded_batch_does_bit_for_bit(tiny, amp):
    """pack_rows: the rows packed end to end with no padding (models.PackedRows) give the padded batch's block
    inputs and hidden states bit for bit, for rows of six different lengths: the token-wise layers compute each row
    alone, and attention runs on the same padded shapes. At these sizes the LoRA gradients too; at the demo's, their
    sums over tokens (now without the pad rows) are blocked differently and round differently (bf16: relative L2
    ≤ 7e-4, the README's pack_rows bullet)."""
    model, tok = lora_tiny(tiny), tiny[1]
    models.set_attention(model.get_base_model(), "grouped", torch.device("cpu"))
    assert models.packs_rows(model.get_base_model())
    inputs, targets = batch(tok, n=6)
    assert len({len(x) + len(t) for x, t in zip(inputs, targets)}) == 6
    pad = tok.pad_token_id
    autocast = torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None)
    hidden, grads = {}, {}
    for pack in (False, True):
        with autocast:
            acts = block_inputs(model, inputs, targets, pad, 1, pack)
            hidden[pack] = target_hidden_from(model, acts, inputs, targets, pad, 1, pack)
        hidden[pack] = (acts, *hidden[pack])
        model.zero_grad(set_to_none=True)
        (hidden[pack][1].float() ** 2).mean().backward()
        grads[pack] = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    (acts, got, got_tgt), (padded_acts, want, want_tgt) = hidden[True], hidden[False]
    assert all(torch.equal(a, b) for a, b in zip(acts, padded_acts))
    assert torch.equal(got, want) and torch.equal(got_tgt, want_tgt)
    assert all(torch.equal(a, b) for a, b in zip(grads[True], grads[False]))
    assert any(g.abs().sum() > 0 for g in grads[True])
    # and grouped attention (packed or padded) computes what eager attention does on the padded batch
    models.set_attention(model.get_base_model(), "eager", torch.device("cpu"))
    assert not models.packs_rows(model.get_base_model())
    with autocast:
        eager = target_hidden_from(model, padded_acts, inputs, targets, pad, 1)[0]
    torch.testing.assert_close(eager, want)


def test_cache_files_reload_up_to_the_resume_point_and_drop_later_ones(tmp_path):
    cache = ReferenceCache(tmp_path)
    for it, step, row in ((1, 2, 10), (1, 4, 11), (2, 2, 12)):
        cache.add(key(row), torch.full((3, 4), float(row)), torch.full((3,), -float(row)))
        cache.flush(it, step)
    cache.flush(2, 3)  # nothing pending: no file
    assert sorted(p.name for p in (tmp_path / "refcache").iterdir()) == [
        "it1-step2.safetensors",
        "it1-step4.safetensors",
        "it2-step2.safetensors",
    ]
    resumed = ReferenceCache(tmp_path)
    resumed.load(1, 4)  # resuming iteration 1 at its snapshot of step 4: iteration 2's file is a killed attempt's
    assert sorted(resumed.entries) == ["10", "11"]
    assert not (tmp_path / "refcache" / "it2-step2.safetensors").exists()
    emb, neg = resumed.gather(["11", "10"], "cpu")
    assert emb.shape == (6, 4) and emb[0, 0] == 11 and emb[3, 0] == 10 and neg[0] == -11
    assert resumed.missing(["10", "12", "11"]) == [1]
    # a conditioned reference's entries carry the feedback string, and reload as written
    cache.add(key(13, "Most Positive", True), torch.zeros(2, 4), torch.zeros(2))
    cache.flush(1, 5)
    again = ReferenceCache(tmp_path)
    again.load(1, 5)
    assert key(13, "Most Positive", True) in again.entries and key(13, "Most Negative", True) not in again.entries


def test_block_inputs_are_saved_with_the_cache_within_their_budget(tmp_path):
    """cache_frozen_layers' stored inputs: written with the statistics at a flush, reloaded up to the resume point,
    and never past cache_frozen_gb (a row past the budget is not stored; it runs the frozen blocks at each draw)."""
    row = torch.ones(3, 4)  # 48 bytes
    cache = ReferenceCache(tmp_path, block_input_bytes=100)
    for r in ("a", "b", "c"):
        cache.add_block_input(r, row * len(r))
    cache.add_block_input("a", row)  # already stored: no second copy counted
    assert sorted(cache.block_inputs) == ["a", "b"] and cache.stored_bytes == 96
    cache.flush(1, 2)
    resumed = ReferenceCache(tmp_path, block_input_bytes=100)
    resumed.load(1, 2)
    assert sorted(resumed.block_inputs) == ["a", "b"] and resumed.stored_bytes == 96
    assert torch.equal(resumed.block_inputs["b"], row)
    resumed.add_block_input("c", row)  # the budget holds after a resume as it did before
    assert "c" not in resumed.block_inputs


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["lora_layers=0.5", "reference_input=conditioned"],
        ["lora_layers=0.5", "reference_input=conditioned", "stage_first_draws=0"],
    ],
    ids=["defaults", "frozen-blocks-cached", "frozen-blocks-first-draws-in-step"],
)
def test_a_run_with_the_cache_trains_as_one_without_it_and_computes_fewer_reference_rows(tmp_path, extra):
    """frozen-blocks-cached: LoRA on the top block of two, so cache_frozen_layers keeps each row's input to it and
    share_frozen_layers starts the reference there: the run still trains as one with every forward whole. Its
    phases stage every first draw before their first step (stage_first_draws); -in-step: at each row's first draw,
    inside its step."""
    common = ["train", "--config", "smoke", "training_mode=lora", *CRASH, *extra]
    steps = {}
    train = {}
    for on in (True, False):
        run = tmp_path / f"cache-{on}"
        r = altlm([*common, f"output_dir={run}", f"reference_cache={str(on).lower()}"], tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        steps[on] = [s for s in jsonl(run / "metrics.jsonl") if s["kind"] == "step"]
        train[on] = [e["train"] for e in jsonl(run / "metrics.jsonl") if e["kind"] == "eval" and e.get("train")]
        assert not (run / "refcache").exists()  # removed when the run finished
    assert len(steps[True]) == len(steps[False]) == 6
    for a, b in zip(steps[True], steps[False]):
        for k in ("loss", "nll", "kl", "entropy"):
            # (+1e-6: a KL of exactly 0, the untrained policy against a reference reading its input, comes out of
            # Σ q log q − h·Wᵀq + logsumexp as fp32 rounding of terms near 10)
            assert abs(a[k] - b[k]) <= 1e-3 * abs(b[k]) + 1e-6, (k, a, b)
    forwards = [t["reference_forward_rows"] for t in train[True]]
    assert forwards[0] <= 12 and forwards[1] < 12  # 12 rows drawn per iteration; iteration 2 reuses some
    assert "reference_forward_rows" not in train[False][0]
    staged = [t["staged_rows"] for t in train[True]]
    assert staged == (forwards if "lora_layers=0.5" in extra and "stage_first_draws=0" not in extra else [0, 0])


def test_packed_rows_train_as_padded_rows_bit_for_bit(tmp_path):
    """pack_rows in a run (LoRA on the top block of two, cached frozen blocks, staged first draws): every step's loss
    terms and the trained adapter equal those of the same run with the rows padded, bit for bit at the tiny model's
    sizes (at the demo's the gradients round differently, above)."""
    common = ["train", "--config", "smoke", "training_mode=lora", *CRASH, "lora_layers=0.5"]
    steps, packed, adapters = {}, {}, {}
    for pack in ("true", "false"):
        run = tmp_path / f"pack-{pack}"
        r = altlm([*common, "reference_input=conditioned", f"output_dir={run}", f"pack_rows={pack}"], tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        steps[pack] = [s for s in jsonl(run / "metrics.jsonl") if s["kind"] == "step"]
        packed[pack] = [e["train"]["packed_rows"] for e in jsonl(run / "metrics.jsonl") if e.get("train")]
        adapters[pack] = (run / "checkpoint" / "adapter_model.safetensors").read_bytes()
    assert packed == {"true": [True, True], "false": [False, False]}
    assert len(steps["true"]) == 6
    for a, b in zip(steps["true"], steps["false"]):
        assert [a[k] for k in ("loss", "nll", "kl", "entropy")] == [b[k] for k in ("loss", "nll", "kl", "entropy")]
    assert adapters["true"] == adapters["false"]
