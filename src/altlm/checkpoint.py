"""Checkpoints: a `save_pretrained` folder (full model or peft adapter) + tokenizer + `altlm.json`.

`altlm.json` holds what generation needs besides weights — base model name, template, feedback vocabulary,
exemplar, sampling defaults — so `altlm generate --run DIR` needs nothing else. Writes are atomic: a temp
folder is filled, then renamed over the old checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from . import models, runfolder
from .errors import AltlmError
from .template import Template

META = "altlm.json"


def run_meta(cfg, template: Template, exemplar: str, vocab_size: int, iteration: int) -> dict:
    """altlm.json of a training run's checkpoint."""
    return {
        "model": cfg.model,
        "seed": cfg.seed,
        "training_mode": cfg.training_mode,
        "template": template.to_dict(),
        "feedback_words": cfg.feedback_words,
        "exemplar": exemplar,
        "vocab_size": vocab_size,
        "iteration": iteration,
        "scorer": cfg.scorer,
        "sampling": {
            "temperature": cfg.eval_temperature,
            "top_p": cfg.eval_top_p,
            "min_new_tokens": cfg.min_new_tokens,
            "max_new_tokens": cfg.max_new_tokens,
            "max_prompt_tokens": cfg.max_prompt_tokens,
        },
    }


def save(model, tokenizer, folder: Path, meta: dict) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    if hasattr(model, "peft_config"):
        # Conditioning-token rows are re-created deterministically at load (models.add_tokens), and Quark's
        # trainable rows are saved by peft itself: the 100 MB embedding matrix need not be copied each time.
        model.save_pretrained(tmp, save_embedding_layers=False)
    else:
        model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / META).write_text(json.dumps(meta, indent=2))
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        os.replace(folder, old)  # two renames: there is always one complete checkpoint on disk
    runfolder.failpoint("checkpoint")
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def load_weights(model, folder: Path, lora: bool) -> None:
    """Put a checkpoint's trained weights into a model prepared for training as the run prepares it (resume)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        if lora:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
        else:
            model.load_state_dict(load_file(folder / "model.safetensors"), strict=False)
            model.tie_weights()
    except (OSError, SafetensorError, RuntimeError) as e:
        raise AltlmError(
            f"--resume: checkpoint '{folder}' cannot be loaded ({str(e).splitlines()[0][:120]}); "
            "restore it, or start a new run folder"
        ) from None


def read_meta(folder: Path) -> dict:
    path = Path(folder) / META
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise AltlmError(f"'{folder}' has no {META}: not an altlm checkpoint (expected <run>/checkpoint)") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise AltlmError(f"'{path}' is corrupt (not JSON); restore it or retrain") from None


def base_model(meta: dict, tokenizer, name: str | None = None):
    """The run's base model (or `name`, e.g. a separate reference) with the conditioning tokens added exactly as
    in training (models.add_tokens is deterministic), so it shares the checkpoint tokenizer's ids."""
    model = models.load_model(name or meta["model"], seed=meta["seed"])
    new, init = Template(**meta["template"]).new_tokens(meta["feedback_words"])
    models.add_tokens(model, tokenizer, new, init)
    return model


def load(folder: Path, trainable: bool = False):
    """(model, tokenizer, meta) from a checkpoint folder."""
    from safetensors import SafetensorError
    from transformers import AutoTokenizer

    folder = Path(folder)
    meta = read_meta(folder)
    try:
        tok = AutoTokenizer.from_pretrained(folder)
        if meta["training_mode"] == "lora":
            from peft import PeftModel

            model = PeftModel.from_pretrained(base_model(meta, tok), folder, is_trainable=trainable)
        else:
            model = models.load_model(str(folder))
            model.requires_grad_(trainable)
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise AltlmError(
            f"checkpoint '{folder}' cannot be loaded ({str(e).splitlines()[0][:160]}); it may be corrupt — resume from an earlier run or retrain"
        ) from None
    tok.padding_side = "left"
    return model, tok, meta
