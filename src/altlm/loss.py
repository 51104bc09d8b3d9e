"""The ALT loss (method.md §2) and the forward pass that yields logits for completion tokens only.

loss = mean over generated tokens of [ −log pθ(y_t | f, x, y<t) + β·KL_t − α·H(pθ(·| f, x, y<t)) ]

- only completion tokens count; the mean is over all completion tokens of the batch (token-level);
- KL_t = KL(reference‖policy) by default (`kl_direction="policy_ref"` gives Quark's original direction);
- logits of tokens added for conditioning (separator, Quark tokens) are dropped before the KL/entropy
  softmax (`vocab_size` = the tokenizer's size before they were added).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .models import PackedRows
from .template import left_pad


def _pad_targets(targets: list[list[int]], m: int, pad_id: int, device):
    tgt = torch.full((len(targets), m), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(targets), m), dtype=torch.bool, device=device)
    for i, t in enumerate(targets):
        if t:
            tgt[i, m - len(t) :] = torch.tensor(t, device=device)
            mask[i, m - len(t) :] = True
    return tgt, mask


def _causal_lm(model):
    """The causal LM itself, inside a peft model or not; its decoder body (e.g. LlamaModel) is `.base_model`."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _padded_batch(model, inputs: list[list[int]], targets: list[list[int]], pad_id: int):
    """`inputs + targets` left-padded (input ids, attention mask, position ids) on the model's device."""
    seqs = [i + t for i, t in zip(inputs, targets)]
    ids, attn, pos = left_pad(seqs, pad_id)
    dev = next(model.parameters()).device  # (a DDP wrapper has no .device)
    return ids.to(dev), attn.to(dev), pos.to(dev)


def target_hidden(model, inputs: list[list[int]], targets: list[list[int]], pad_id: int):
    """(final hidden states [N, D] before the LM head, target ids [N]) at the N completion positions of
    `inputs + targets`, row by row: packed, with no padding. `model` is a causal LM or a peft model of one; its body
    (`base_model`, e.g. LlamaModel) runs with the adapters as they are. The head is the caller's: `head_loss` runs
    it chunk by chunk inside the loss, `head_logits` whole. The head and the loss see no padded position: no
    [B, M, V] tensor for the masked indexing to scatter its gradient back into."""
    ids, attn, pos = _padded_batch(model, inputs, targets, pad_id)
    m = max(len(t) for t in targets)
    out = _causal_lm(model).base_model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False)
    tgt, mask = _pad_targets(targets, m, pad_id, ids.device)
    return out.last_hidden_state[:, -(m + 1) : -1][mask], tgt[mask]


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on packed hidden states [N, D]: logits [N, V] (the unfused path, fused_loss=false)."""
    return _causal_lm(model).get_output_embeddings()(hidden)


class _StopForward(Exception):
    """Raised by layer_input(stop=True) once its block's input is recorded: nothing above that block is needed."""


@contextlib.contextmanager
def layer_input(model, index: int, stop: bool = False):
    """Records what the decoder body passes to its layer `index` during a forward run inside the block: the hidden
    states (`record["hidden"]`) and the keyword arguments (mask, rotary embeddings, position ids). stop: the forward
    ends there (the block leaves the exception the hook raises)."""
    record: dict = {}

    def hook(module, args, kwargs):
        record["hidden"] = args[0] if args else kwargs["hidden_states"]
        record["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        if stop:
            raise _StopForward

    handle = _causal_lm(model).base_model.layers[index].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield record
    except _StopForward:
        pass
    finally:
        handle.remove()


def _packed_layers(model, hidden: torch.Tensor, rows: PackedRows, start: int, stop: int) -> torch.Tensor:
    """The decoder blocks start..stop-1 on a packed sequence [1, N, D] (pack_rows): the keyword arguments the body
    gives its blocks, with the rows as the attention mask and rotary embeddings at each row's own positions."""
    body = _causal_lm(model).base_model
    rotary = body.rotary_emb(hidden, rows.position_ids)
    for layer in body.layers[start:stop]:
        hidden = layer(hidden, attention_mask=rows, position_ids=rows.position_ids, position_embeddings=rotary)
    return hidden


@torch.no_grad()
def block_inputs(
    model, inputs: list[list[int]], targets: list[list[int]], pad_id: int, index: int, pack: bool = False
) -> list:
    """What the decoder body hands its block `index` for each sequence `inputs + targets`: [T_i, D] per row, its
    real positions only. The blocks below `index` run, none above (cache_frozen_layers: they are frozen). pack: the
    rows run packed, with no padding (models.PackedRows; the attention must be grouped)."""
    seqs = [x + t for x, t in zip(inputs, targets)]
    if pack:
        dev = next(model.parameters()).device
        ids = torch.tensor([token for s in seqs for token in s], device=dev)
        embeddings = _causal_lm(model).base_model.embed_tokens(ids[None])
        rows = PackedRows([len(s) for s in seqs], dev, embeddings.dtype)
        hidden = _packed_layers(model, embeddings, rows, 0, index)[0]
        return [h.clone() for h in hidden.split(rows.lengths)]
    ids, attn, pos = _padded_batch(model, inputs, targets, pad_id)
    with layer_input(model, index, stop=True) as record:
        _causal_lm(model).base_model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False)
    width = ids.shape[1]
    return [record["hidden"][i, width - len(s) :].clone() for i, s in enumerate(seqs)]


def target_hidden_from(
    model, acts: list, inputs: list[list[int]], targets: list[list[int]], pad_id: int, index: int, pack: bool = False
):
    """target_hidden, from block `index` up: `acts` are the rows' inputs to that block (block_inputs), so the blocks
    below it do not run. The blocks' keyword arguments (mask, rotary embeddings) are the body's own for this batch,
    recorded at block 0 (every block takes the same ones: trainer.cache_frozen_layers checks). pack: the rows run
    packed, with no padding (models.PackedRows; the attention must be grouped)."""
    body = _causal_lm(model).base_model
    if pack:
        rows = PackedRows([a.shape[0] for a in acts], acts[0].device, acts[0].dtype)
        hidden = _packed_layers(model, torch.cat(acts)[None], rows, index, body.config.num_hidden_layers)
        hidden = body.norm(hidden)[0]
        # a row's targets are predicted at its positions len(x) - 1 .. len(x) + len(t) - 2
        at = [torch.arange(s + len(x) - 1, s + len(x) + len(t) - 1) for s, x, t in zip(rows.starts, inputs, targets)]
        flat_targets = [token for t in targets for token in t]
        return hidden[torch.cat(at).to(hidden.device)], torch.tensor(flat_targets, device=hidden.device)
    ids, attn, pos = _padded_batch(model, inputs, targets, pad_id)
    with torch.no_grad(), layer_input(model, 0, stop=True) as record:
        body(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False)
    width = ids.shape[1]
    hidden = acts[0].new_zeros(len(acts), width, acts[0].shape[-1])  # padded positions: masked, so any value
    for i, a in enumerate(acts):
        hidden[i, width - a.shape[0] :] = a
    for layer in body.layers[index : body.config.num_hidden_layers]:
        hidden = layer(hidden, **record["kwargs"])
    hidden = body.norm(hidden)
    m = max(len(t) for t in targets)
    tgt, mask = _pad_targets(targets, m, pad_id, ids.device)
    return hidden[:, -(m + 1) : -1][mask], tgt[mask]


def tail_target_hidden(model, record: dict, index: int, rows: list[int], targets: list[list[int]], pad_id: int):
    """Final hidden states [N, D] at the completion positions of the batch rows `rows`, from the input `layer_input`
    recorded at layer `index` of target_hidden's forward over the whole batch (`targets`: all its rows): layers
    index.. and the final norm run again on those rows alone, as the model is now (e.g. with its adapter disabled)."""
    batch = record["hidden"].shape[0]
    keep = torch.tensor(rows, device=record["hidden"].device)

    def pick(value):  # the rows' slice of every per-row tensor (mask, position ids, rotary cos/sin)
        if isinstance(value, tuple):
            return tuple(pick(v) for v in value)
        if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == batch:
            return value[keep]
        return value

    kwargs = {k: pick(v) for k, v in record["kwargs"].items()}
    hidden = record["hidden"].detach()[keep]
    body = _causal_lm(model).base_model
    for layer in body.layers[index : body.config.num_hidden_layers]:
        hidden = layer(hidden, **kwargs)
    hidden = body.norm(hidden)
    m = max(len(t) for t in targets)  # the whole batch's: left padding right-aligned every row to it
    mask = _pad_targets([targets[i] for i in rows], m, pad_id, hidden.device)[1]
    return hidden[:, -(m + 1) : -1][mask]


def target_logits(model, inputs: list[list[int]], targets: list[list[int]], pad_id: int):
    """Run `inputs + targets` left-padded and return (logits [B, M, V], target ids [B, M], mask [B, M]) where
    M is the longest target. Left padding right-aligns every target, so only the last M+1 positions need the
    LM head (`logits_to_keep`): prompt and feedback positions never pay for the vocabulary projection."""
    ids, attn, pos = _padded_batch(model, inputs, targets, pad_id)
    m = max(len(t) for t in targets)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False, logits_to_keep=m + 1).logits[
        :, :-1
    ]
    tgt, mask = _pad_targets(targets, m, pad_id, ids.device)
    return logits, tgt, mask


@torch.no_grad()
def mean_logprobs(model, inputs: list[list[int]], targets: list[list[int]], pad_id: int) -> list[float]:
    """Mean log-probability per target token of each `inputs + targets` sequence (targets must be non-empty).
    logsumexp − gather instead of a log-softmax: no second [B, M, V] tensor over the vocabulary."""
    logits, tgt, mask = target_logits(model, inputs, targets, pad_id)
    logits = logits.float()
    lp = logits.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
    return ((lp * mask).sum(-1) / mask.sum(-1)).tolist()


def alt_loss(
    policy_logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None,
    ref_logits: torch.Tensor | None = None,
    kl_coef: float = 0.05,
    entropy_coef: float = 0.06,
    kl_direction: str = "ref_policy",
    vocab_size: int | None = None,
    denominator: float | None = None,
    ref_stats: tuple | None = None,
):
    """Returns (loss, stats) with stats = token-level means of nll, kl, entropy (floats). The loss is the token
    mean, or the token sum / `denominator` (distributed: every process divides by the same global count).
    policy_logits [B, M, V] with targets and mask [B, M]; or packed (target_hidden): [N, V], targets [N], mask None.

    ref_stats = (hidden [N, D], ref_mean_embedding [N, D], ref_negentropy [N]) replaces ref_logits for
    KL(reference‖policy) when the LM head W is frozen (LoRA): with q the reference distribution and z = W·h the
    policy logits, Σ_v q_v log p_v = Σ_v q_v z_v − logsumexp(z) = h·(Wᵀq) − logsumexp(z), so
    KL = Σ q log q − h·(Wᵀq) + logsumexp(z): exact, from two numbers per token the reference cache stores
    (refcache.py) instead of the reference's whole vocabulary-wide distribution.

    One log-softmax over the vocabulary serves the NLL, the entropy and the KL: the NLL's normaliser over the
    added tokens (index ≥ vocab_size) is folded in from their few logits. The entropy is computed without a graph
    when its coefficient is 0 (it is still reported)."""
    z = (policy_logits if mask is None else policy_logits[mask]).float()  # [N, V]: completion positions only
    tgt = targets if mask is None else targets[mask]
    n = z.shape[0]
    if n == 0:
        zero = policy_logits.sum() * 0.0
        return zero, {"nll": 0.0, "kl": 0.0, "entropy": 0.0, "tokens": 0}
    v = vocab_size or z.shape[-1]
    logp = torch.log_softmax(z[:, :v], -1)
    log_normaliser = z[:, 0] - logp[:, 0]  # logsumexp over the first v logits, without another vocabulary pass
    if v < z.shape[-1]:  # the NLL normalises over every token, the added ones too
        nll = torch.logaddexp(log_normaliser, torch.logsumexp(z[:, v:], -1)) - z.gather(-1, tgt[:, None])[:, 0]
    else:
        nll = -logp.gather(-1, tgt[:, None])[:, 0]
    with torch.set_grad_enabled(torch.is_grad_enabled() and entropy_coef != 0.0):
        p = logp.exp()
        entropy = -(p * logp).sum(-1)
    loss_tok = nll - entropy_coef * entropy
    kl = torch.zeros_like(nll)
    if ref_stats is not None and kl_coef != 0.0:
        hidden, ref_mean_embedding, ref_negentropy = ref_stats
        cross = (hidden.float() * ref_mean_embedding).sum(-1)
        kl = ref_negentropy - cross + log_normaliser
        loss_tok = loss_tok + kl_coef * kl
    elif ref_logits is not None and kl_coef != 0.0:
        ref_logp = torch.log_softmax((ref_logits if mask is None else ref_logits[mask]).float()[:, :v], -1)
        if kl_direction == "ref_policy":
            kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
        else:
            kl = (logp.exp() * (logp - ref_logp)).sum(-1)
        loss_tok = loss_tok + kl_coef * kl
    stats = {"nll": nll.mean().item(), "kl": kl.mean().item(), "entropy": entropy.mean().item(), "tokens": n}
    return (loss_tok.mean() if denominator is None else loss_tok.sum() / denominator), stats


HEAD_CHUNK_ROWS = 64  # rows of the head's logits in flight: 64 × 49k words × 4 bytes = 12.6 MB, fits the L3 cache


def head_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    kl_coef: float,
    entropy_coef: float,
    vocab_size: int | None = None,
    denominator: float | None = None,
    ref_stats: tuple | None = None,
    chunk_rows: int = HEAD_CHUNK_ROWS,
):
    """alt_loss of the packed hidden states [N, D] under a frozen LM head `weight` [V, D], with the head inside the
    loss (fused_loss): the same loss, stats and gradients as head_logits, then alt_loss with
    ref_stats=(hidden, *ref_stats), without the [N, V] logits. `weight` is the head in the dtype its matmul runs in
    (under autocast, the compute dtype: the matmuls are then autocast's own). ref_stats: (ref_mean_embedding [N, D],
    ref_negentropy [N]) or None (no KL). Returns (loss, stats) as alt_loss does.

    Why: the unfused loss keeps [N, V] fp32 tensors for autograd (logits, log-probabilities, their gradients, the
    zeros that indexing scatters into); fresh 40 MB tensors page-fault on every step. Here the rows go through in
    chunks of `chunk_rows`, and each chunk's gradient w.r.t. its hidden states is computed at once (the head is
    frozen, so nothing else needs the logits): the backward only scales the stored gradient."""
    n = hidden.shape[0]
    if n == 0:
        zero = hidden.sum() * 0.0
        return zero, {"nll": 0.0, "kl": 0.0, "entropy": 0.0, "tokens": 0}
    mean_embedding, negentropy = ref_stats if ref_stats is not None and kl_coef != 0.0 else (None, None)
    scale = 1.0 / (n if denominator is None else denominator)
    loss, sums = _HeadLoss.apply(
        hidden, weight, targets, mean_embedding, negentropy, kl_coef, entropy_coef, vocab_size, scale, chunk_rows
    )
    stats = {"nll": sums[0].item() / n, "kl": sums[1].item() / n, "entropy": sums[2].item() / n, "tokens": n}
    return loss, stats


class _HeadLoss(torch.autograd.Function):
    """head_loss's forward and backward: loss_t = nll_t − α·H_t + β·KL_t over the rows t, in fp32 from the head's
    logits, as alt_loss computes them. With p the softmax of the first v logits z and lse their logsumexp:
      ∂nll/∂z = softmax over all V logits − onehot(target);
      ∂KL/∂z = p (KL = Σ q log q − h·(Wᵀq) + lse, and ∂KL/∂h = −Wᵀq besides);
      ∂(−H)/∂z = p ⊙ (log p + H).
    The hidden states' gradient is (Σ ∂/∂z) W, in the head's dtype as autograd's matmul backward would run it."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, mean_embedding, negentropy, kl_coef, entropy_coef, vocab, scale, chunk):
        grad = torch.empty_like(hidden)
        sums = torch.zeros(4, dtype=torch.float64, device=hidden.device)  # loss, nll, kl, entropy (token sums)
        with torch.autocast(hidden.device.type, enabled=False):  # `weight` is already in the matmuls' dtype
            for start in range(0, hidden.shape[0], chunk):
                rows = slice(start, start + chunk)
                h, t = hidden[rows], targets[rows]
                z = F.linear(h.to(weight.dtype), weight).float()  # [c, V]
                v = vocab or z.shape[-1]
                logp = torch.log_softmax(z[:, :v], -1)
                p = logp.exp()
                entropy = -torch.linalg.vecdot(p, logp)  # (no [c, V] temporary)
                lse = z[:, 0] - logp[:, 0]  # logsumexp of the first v logits, without another pass
                picked = z.gather(-1, t[:, None])[:, 0]
                lse_all = lse if v == z.shape[-1] else torch.logaddexp(lse, torch.logsumexp(z[:, v:], -1))
                nll = lse_all - picked
                loss_tok = nll - entropy_coef * entropy
                factor = torch.exp(lse - lse_all)  # the first v words' share of the NLL's softmax (1 when V = v)
                kl = torch.zeros_like(nll)
                if mean_embedding is not None:
                    kl = negentropy[rows] - (h.float() * mean_embedding[rows]).sum(-1) + lse
                    loss_tok = loss_tok + kl_coef * kl
                    factor = factor + kl_coef
                g = torch.empty_like(z)
                if entropy_coef != 0.0:
                    torch.mul(p, factor[:, None] + entropy_coef * (logp + entropy[:, None]), out=g[:, :v])
                else:
                    torch.mul(p, factor[:, None], out=g[:, :v])
                if v < z.shape[-1]:  # the added tokens: the NLL's softmax only
                    g[:, v:] = torch.exp(z[:, v:] - lse_all[:, None])
                g.scatter_add_(1, t[:, None], torch.full_like(picked[:, None], -1.0))
                g.mul_(scale)  # (then cast: autograd's order, which keeps the gradients bit-identical at α = 0)
                gh = (g.to(weight.dtype) @ weight).to(hidden.dtype)
                if mean_embedding is not None:
                    gh = gh - (kl_coef * scale) * mean_embedding[rows]
                grad[rows] = gh
                for i, value in enumerate((loss_tok, nll, kl, entropy)):
                    sums[i] += value.sum().double()
        ctx.save_for_backward(grad)
        stats = sums[1:].clone()
        ctx.mark_non_differentiable(stats)
        return (sums[0] * scale).float(), stats

    @staticmethod
    def backward(ctx, grad_loss, _):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss, None, None, None, None, None, None, None, None, None
