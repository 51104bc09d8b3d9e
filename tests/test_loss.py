"""The ALT loss (method.md §2) against a hand computation, and `target_logits` on the real tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from altlm import models
from altlm.loss import alt_loss, target_logits
from altlm.template import Template

# --------------------------------------------------------------------------- hand computation


def _log_softmax(row):
    m = max(row)
    z = math.log(sum(math.exp(x - m) for x in row)) + m
    return [x - z for x in row]


def hand_loss(policy, ref, targets, mask, beta, alpha, direction, v):
    """Plain-Python loss: nll over the full vocabulary, entropy and KL over the first v logits,
    token-level mean over every masked position of the batch."""
    per_tok, nlls, kls, ents = [], [], [], []
    for b in range(len(policy)):
        for t in range(len(policy[b])):
            if not mask[b][t]:
                continue
            nll = -_log_softmax(policy[b][t])[targets[b][t]]
            lp = _log_softmax(policy[b][t][:v])
            p = [math.exp(x) for x in lp]
            ent = -sum(pi * li for pi, li in zip(p, lp))
            kl = 0.0
            if ref is not None:
                lr = _log_softmax(ref[b][t][:v])
                r = [math.exp(x) for x in lr]
                if direction == "ref_policy":
                    kl = sum(ri * (a - c) for ri, a, c in zip(r, lr, lp))
                else:
                    kl = sum(pi * (c - a) for pi, a, c in zip(p, lr, lp))
            per_tok.append(nll - alpha * ent + beta * kl)
            nlls.append(nll), kls.append(kl), ents.append(ent)
    n = len(per_tok)
    return sum(per_tok) / n, sum(nlls) / n, sum(kls) / n, sum(ents) / n, n


@pytest.fixture()
def toy():
    g = torch.Generator().manual_seed(0)
    B, M, V = 2, 3, 5  # V = 4 real tokens + 1 added conditioning token
    policy = torch.randn(B, M, V, generator=g, dtype=torch.float64) * 2
    ref = torch.randn(B, M, V, generator=g, dtype=torch.float64) * 2
    policy[..., 4] += 3.0  # the added token's logit carries real mass: slicing must matter
    ref[..., 4] -= 1.0
    targets = torch.tensor([[0, 3, 1], [2, 0, 3]])
    mask = torch.tensor([[False, True, True], [True, True, True]])  # rows of 2 and 3 completion tokens
    return policy, ref, targets, mask


@pytest.mark.parametrize("direction", ["ref_policy", "policy_ref"])
@pytest.mark.parametrize("beta,alpha", [(0.05, 0.06), (0.5, 0.0), (0.0, 0.3)])
def test_alt_loss_matches_hand_computation(toy, direction, beta, alpha):
    policy, ref, targets, mask = toy
    loss, stats = alt_loss(
        policy, targets, mask, ref, kl_coef=beta, entropy_coef=alpha, kl_direction=direction, vocab_size=4
    )
    exp_loss, nll, kl, ent, n = hand_loss(
        policy.tolist(), ref.tolist() if beta else None, targets.tolist(), mask.tolist(), beta, alpha, direction, 4
    )
    assert loss.item() == pytest.approx(exp_loss, rel=1e-5, abs=1e-6)
    assert stats["tokens"] == n == 5
    assert stats["nll"] == pytest.approx(nll, rel=1e-5)
    assert stats["entropy"] == pytest.approx(ent, rel=1e-5)
    assert stats["kl"] == pytest.approx(kl, rel=1e-5, abs=1e-7)
    if beta:
        assert stats["kl"] > 0


def test_kl_directions_differ(toy):
    policy, ref, targets, mask = toy
    _, a = alt_loss(policy, targets, mask, ref, 1.0, 0.0, "ref_policy", 4)
    _, b = alt_loss(policy, targets, mask, ref, 1.0, 0.0, "policy_ref", 4)
    assert a["kl"] != pytest.approx(b["kl"], rel=1e-3)
    # each matches its own definition and not the other one
    assert a["kl"] == pytest.approx(
        hand_loss(policy.tolist(), ref.tolist(), targets.tolist(), mask.tolist(), 1, 0, "ref_policy", 4)[2], rel=1e-6
    )
    assert b["kl"] == pytest.approx(
        hand_loss(policy.tolist(), ref.tolist(), targets.tolist(), mask.tolist(), 1, 0, "policy_ref", 4)[2], rel=1e-6
    )


def test_token_level_mean_not_row_mean(toy):
    policy, ref, targets, mask = toy
    _, stats = alt_loss(policy, targets, mask, None, 0.0, 0.0, vocab_size=4)
    lp = torch.log_softmax(policy, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    row0, row1 = -lp[0, 1:], -lp[1]
    token_mean = (row0.sum() + row1.sum()).item() / 5
    row_mean = (row0.mean() + row1.mean()).item() / 2
    assert abs(token_mean - row_mean) > 1e-3  # the toy data can tell them apart
    assert stats["nll"] == pytest.approx(token_mean, rel=1e-6)


def test_masked_positions_do_not_count(toy):
    policy, ref, targets, mask = toy
    a, _ = alt_loss(policy, targets, mask, ref, 0.05, 0.06, vocab_size=4)
    p2, r2, t2 = policy.clone(), ref.clone(), targets.clone()
    p2[0, 0] = torch.randn(5, dtype=torch.float64) * 50  # the masked (prompt / padding) position
    r2[0, 0] = -r2[0, 0]
    t2[0, 0] = 4
    b, _ = alt_loss(p2, t2, mask, r2, 0.05, 0.06, vocab_size=4)
    assert a.item() == pytest.approx(b.item(), rel=1e-12)


def test_vocab_size_drops_added_token_logits(toy):
    policy, ref, targets, mask = toy
    _, s4 = alt_loss(policy, targets, mask, ref, 0.05, 0.06, vocab_size=4)
    p2, r2 = policy.clone(), ref.clone()
    p2[..., 4] = 40.0
    r2[..., 4] = -40.0
    _, s4b = alt_loss(p2, targets, mask, r2, 0.05, 0.06, vocab_size=4)
    assert s4b["kl"] == pytest.approx(s4["kl"], rel=1e-9)
    assert s4b["entropy"] == pytest.approx(s4["entropy"], rel=1e-9)
    # without slicing the added column changes KL and entropy
    _, s5 = alt_loss(policy, targets, mask, ref, 0.05, 0.06, vocab_size=None)
    assert s5["kl"] != pytest.approx(s4["kl"], rel=1e-3)
    assert s5["entropy"] != pytest.approx(s4["entropy"], rel=1e-3)


def test_kl_coef_zero_ignores_reference(toy):
    policy, ref, targets, mask = toy
    a, sa = alt_loss(policy, targets, mask, ref, 0.0, 0.06, vocab_size=4)
    b, sb = alt_loss(policy, targets, mask, None, 0.0, 0.06, vocab_size=4)
    assert a.item() == b.item() and sa["kl"] == sb["kl"] == 0.0


def test_empty_mask_is_zero_with_grad(toy):
    policy, _, targets, mask = toy
    policy = policy.clone().requires_grad_(True)
    loss, stats = alt_loss(policy, targets, torch.zeros_like(mask), None)
    assert loss.item() == 0.0 and stats["tokens"] == 0
    loss.backward()
    assert policy.grad is not None and torch.all(policy.grad == 0)


# --------------------------------------------------------------------------- the real tiny model


def _batch(tok, sep_template: Template):
    prompts = ["The cat sat on", "A very long prompt about the weather and the sea, which goes on and on and", "Hi"]
    feedback = ["Lowest Toxicity", None, "Maximum Toxicity"]
    completions = [(" the mat and slept.", False), (" on", True), (" there, how are you doing today", True)]
    inputs = [sep_template.input_ids(tok, f, p) for f, p in zip(feedback, prompts)]
    targets = [sep_template.target_ids(tok, c, t) for c, t in completions]
    assert len({len(i) for i in inputs}) == 3 and len({len(t) for t in targets}) == 3
    return inputs, targets, prompts


@pytest.fixture()
def sep_batch(fresh_tiny):
    """The tiny model with the separator added, and a batch of three different-length (input, target) pairs."""
    model, tok = fresh_tiny
    t = Template(style="tag_separator")
    models.add_tokens(model, tok, *t.new_tokens([]))
    model.eval()
    return (model, tok, t, *_batch(tok, t))


def test_target_logits_alignment_matches_unpadded_forward(sep_batch):
    model, tok, t, inputs, targets, prompts = sep_batch
    with torch.no_grad():
        logits, tgt, mask = target_logits(model, inputs, targets, tok.pad_token_id)
        m = max(len(x) for x in targets)
        assert logits.shape == (3, m, len(tok))
        assert tgt.shape == mask.shape == (3, m)
        for i, (inp, tg) in enumerate(zip(inputs, targets)):
            assert mask[i].tolist() == [False] * (m - len(tg)) + [True] * len(tg)
            assert tgt[i, m - len(tg) :].tolist() == tg
            full = torch.tensor([inp + tg])
            alone = model(input_ids=full).logits[0]
            # logits at position j predict token j+1: the targets are predicted from len(inp)-1 on
            want = alone[len(inp) - 1 : len(inp) + len(tg) - 1]
            got = logits[i, m - len(tg) :]
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            # and they really are predictions of *these* targets: one position off would not match
            if len(tg) > 1:
                assert not torch.allclose(got[1:], want[:-1], atol=1e-4)


def test_kl_zero_when_policy_equals_reference(sep_batch):
    model, tok, t, inputs, targets, prompts = sep_batch
    vocab = tok.convert_tokens_to_ids(t.separator_token)  # the size before the separator was added
    with torch.no_grad():
        pol, tgt, mask = target_logits(model, inputs, targets, tok.pad_token_id)
        ref, _, _ = target_logits(model, inputs, targets, tok.pad_token_id)
    loss, stats = alt_loss(pol, tgt, mask, ref, kl_coef=0.05, entropy_coef=0.06, vocab_size=vocab)
    assert abs(stats["kl"]) < 1e-6
    assert loss.item() == pytest.approx(stats["nll"] - 0.06 * stats["entropy"], rel=1e-5)
    assert stats["tokens"] == sum(len(x) for x in targets)
    assert stats["entropy"] > 1.0  # a random model is far from deterministic
    # a reference that sees the prompt without the feedback (the ALT default) is *not* at KL 0
    ref_inputs = [t.input_ids(tok, None, p) for p in prompts]
    with torch.no_grad():
        ref2, _, _ = target_logits(model, ref_inputs, targets, tok.pad_token_id)
    _, s2 = alt_loss(pol, tgt, mask, ref2, 0.05, 0.06, vocab_size=vocab)
    assert s2["kl"] > 1e-4


def test_gradient_flows(fresh_tiny):
    model, tok = fresh_tiny
    t = Template(style="tag_separator")
    models.add_tokens(model, tok, *t.new_tokens([]))
    ref_model = models.load_model("tiny-smollm2", seed=1)
    models.add_tokens(ref_model, tok, *t.new_tokens([]))
    model.train()
    inputs, targets, prompts = _batch(tok, t)
    logits, tgt, mask = target_logits(model, inputs, targets, tok.pad_token_id)
    with torch.no_grad():
        ref = target_logits(ref_model, inputs, targets, tok.pad_token_id)[0]
    loss, stats = alt_loss(logits, tgt, mask, ref, 0.05, 0.06, vocab_size=len(tok) - 1)
    assert torch.isfinite(loss) and stats["kl"] > 0
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["model.layers.0.self_attn.q_proj.weight"].abs().sum() > 0
    assert grads["model.layers.1.mlp.down_proj.weight"].abs().sum() > 0
    assert grads["model.embed_tokens.weight"].abs().sum() > 0


def test_frozen_linears_in_bf16_give_the_same_lora_step(fresh_tiny):
    """cast_frozen_linears stores what autocast would compute anyway: loss and LoRA gradients are bitwise equal."""
    import copy

    from altlm import models
    from altlm.loss import alt_loss, target_logits

    model, tok = fresh_tiny
    lora = dict(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"], layers=1.0)
    a = models.prepare_for_training(model, "lora", 0.3, lora, [])
    torch.manual_seed(0)
    for n, p in a.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.02)  # B starts at zero: give the adapter something to say
    b = copy.deepcopy(a)
    assert models.cast_frozen_linears(b, torch.bfloat16) > 0
    assert models.cast_frozen_linears(b, None) == 0
    inputs = [tok("The weather today").input_ids, tok("Once upon a time there").input_ids]
    targets = [tok(" is fine and warm").input_ids, tok(" was a cat").input_ids]
    out = []
    for m in (a, b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, tgt, mask = target_logits(m, inputs, targets, tok.pad_token_id)
            with torch.no_grad(), m.disable_adapter():
                ref = target_logits(m, inputs, targets, tok.pad_token_id)[0]
        loss, _ = alt_loss(logits, tgt, mask, ref, 0.05, 0.06)
        loss.backward()
        out.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}))
    assert torch.equal(out[0][0], out[1][0])
    assert out[0][1].keys() == out[1][1].keys() and all(torch.equal(out[0][1][k], out[1][1][k]) for k in out[0][1])


def _plain_alt_loss(policy, targets, mask, ref, beta, alpha, v):
    """The loss as written in method.md §2, one vocabulary-wide softmax per term: what alt_loss's single
    log-softmax, folded normaliser and graph-free entropy must reproduce, gradients included."""
    z, t = policy[mask], targets[mask]
    nll = -torch.log_softmax(z, -1).gather(-1, t[:, None])[:, 0]
    logp = torch.log_softmax(z[:, :v], -1)
    entropy = -(logp.exp() * logp).sum(-1)
    ref_logp = torch.log_softmax(ref[mask][:, :v], -1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    return (nll - alpha * entropy + beta * kl).mean()


@pytest.mark.parametrize("alpha", [0.0, 0.06])
@pytest.mark.parametrize("packed", [False, True])
def test_one_softmax_loss_has_the_plain_loss_gradients(toy, alpha, packed):
    policy, ref, targets, mask = toy
    want_policy = policy.clone().requires_grad_(True)
    want = _plain_alt_loss(want_policy, targets, mask, ref, 0.05, alpha, 4)
    want.backward()
    got_policy = policy.clone().requires_grad_(True)
    if packed:  # what target_hidden hands over: the completion positions only, row by row
        got, _ = alt_loss(got_policy[mask], targets[mask], None, ref[mask], 0.05, alpha, vocab_size=4)
    else:
        got, _ = alt_loss(got_policy, targets, mask, ref, 0.05, alpha, vocab_size=4)
    got.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-6)  # (alt_loss computes in float32)
    torch.testing.assert_close(got_policy.grad, want_policy.grad, rtol=1e-5, atol=1e-7)
    # the added token's column (index 4) gets the NLL's gradient only: the normaliser is folded in, not dropped
    assert got_policy.grad[mask][:, 4].abs().min() > 0
