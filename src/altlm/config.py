"""The training configuration: one dataclass drives Python, YAML recipes and `key=value` CLI overrides.

Every field carries a `help=` string (shown by `altlm train --help-config`). Recipes are YAML files whose keys
are field names; shipped recipes live in `altlm/recipes/` and can be named without their path.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import AltlmError

RECIPES_DIR = Path(__file__).parent / "recipes"
DEFAULT_RECIPE = "toxicity-offline"

TOXICITY_WORDS = ["Lowest Toxicity", "Low-Moderate Toxicity", "Moderate Toxicity", "High-Moderate Toxicity", "Maximum Toxicity"]


def _f(default, help: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ALTConfig:
    # --- run ---
    output_dir: str = _f("runs/demo", "Run folder: pool, checkpoints, metrics.jsonl, summary.json.")
    seed: int = _f(0, "Seed for prompt splits, sampling, draws and initialisation.")
    description: str = _f("", "Free text saved with the run.")
    # --- models ---
    model: str = _f("smollm2-135m", "Policy init: an offline alias (smollm2-135m, gemma3-270m, tiny-smollm2), a local folder or an HF hub id.")
    reference_model: str | None = _f(None, "Reference model for the KL term and the baseline eval; default: same as `model`.")
    trust_remote_code: bool = _f(False, "Allow custom modelling code from the hub (off unless you trust the repo).")
    training_mode: str = _f("lora", "lora (peft), full (all weights) or top_fraction (top blocks + embeddings, norm, head).", choices=["lora", "full", "top_fraction"])
    top_fraction: float = _f(0.3, "Share of blocks trained when training_mode=top_fraction (paper's TL;DR: 0.3).")
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA alpha.")
    lora_dropout: float = _f(0.0, "LoRA dropout.")
    lora_layers: float = _f(1.0, "Share of the top blocks LoRA adapts (1.0 = all). Backward stops below the lowest adapted block, so smaller shares train faster.")
    lora_target_modules: list[str] = _f(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "Module names LoRA adapts.")
    precision: str = _f("auto", "Compute precision: auto (bf16 autocast on CUDA or CPUs with AMX, else fp32), bf16 or fp32. Master weights stay fp32.", choices=["auto", "bf16", "fp32"])
    threads: int = _f(0, "torch CPU threads (0 = torch's default).")
    # --- prompts ---
    prompts: str = _f("fortunes", "Prompt source: fortunes (offensive + clean FreeBSD fortune prefixes), fortunes-offensive, fortunes-clean, journal (conversational questions, offline), or a file (.txt one per line, .jsonl/.json with `prompt_field`).")
    prompt_field: str = _f("prompt", "Field holding the prompt in JSONL/JSON prompt files.")
    offensive_share: float = _f(0.5, "Share of offensive fortunes when prompts=fortunes.")
    prompt_words: list[int] = _f([4, 8], "Fortune prefix length in words [min, max] (fortune_cut=random).")
    fortune_cut: str = _f("random", "How fortunes become prompts: random (first prompt_words words) or before_toxic (cut before the first word the Jigsaw classifier flags: RealToxicityPrompts-style challenging prompts).", choices=["random", "before_toxic"])
    max_prompt_tokens: int = _f(64, "Prompts longer than this are cut from the left (keeping the end the model continues).")
    num_train_prompts: int = _f(2000, "Training prompts (never used for evaluation).")
    num_eval_prompts: int = _f(200, "Held-out evaluation prompts (never trained on).")
    # --- feedback ---
    feedback_type: str = _f("rm", "rm: a scorer's values cut into quantiles and mapped to feedback_words (ALT-RM); lmc: an LLM judge picks one of feedback_words as category (ALT-LMC); lmu: an LLM judge writes a feedback sentence and a 0-3 score (ALT-LMU).", choices=["rm", "lmc", "lmu"])
    scorer: str = _f("jigsaw", "Scalar scorer for ALT-RM: jigsaw (offline Jigsaw toxicity), profanity, vader (sentiment).", choices=["jigsaw", "profanity", "vader"])
    feedback_words: list[str] = _f(list(TOXICITY_WORDS), "Feedback strings, best bucket first; their number is the number of quantiles.")
    exemplar: str | None = _f(None, "Feedback used for sampling and inference; default: the best (first) feedback word.")
    quantiles: str = _f("global", "global: cut the whole pool into quantiles (accumulating, toxicity/Quark); per_prompt: cut each prompt's samples (TL;DR).", choices=["global", "per_prompt"])
    seed_pool: bool = _f(False, "Before iteration 1, score the human-written continuation of every training prompt (fortune prompts only) and add it to the pool as iteration 0 (Chain-of-Hindsight style), so the feedback strings see real text across the whole score range from the start.")
    drop_factor: float = _f(0.0, "Share of the older pool dropped before adding a new iteration's samples (0 = accumulate, 1 = flush).")
    per_bucket: int = _f(2, "per_prompt regime: samples drawn per prompt and bucket for training (filled up randomly from the prompt's other samples).")
    use_feedback: bool = _f(True, "False runs the same loop with the feedback left out of sampling and training inputs: the fine-tune-only control, showing what training on the model's own samples gives without conditioning.")
    # --- LLM judge (feedback_type lmc / lmu) ---
    judge_backend: str = _f("hf", "hf: the judge model runs in-process; openai: any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp, Ollama, `altlm serve`).", choices=["hf", "openai"])
    judge_model: str = _f("smollm2-135m", "Judge model: an offline alias / local folder / HF id (hf), or the endpoint's model name (openai).")
    judge_base_url: str | None = _f(None, "openai backend: the endpoint's base URL, e.g. http://127.0.0.1:8000/v1.")
    judge_api_key_env: str | None = _f(None, "openai backend: the environment variable holding the API key (the key itself is never stored or logged); None for servers without keys.")
    judge_template: str | None = _f(None, "Judge prompt: a shipped template name (lmc_hh, lmu_tldr, lmu_dialogue) or a file with {prompt}, {completion} (and {categories} for lmc). Default: lmc_hh / lmu_tldr.")
    judge_choice: bool = _f(False, "lmc with judge_backend=hf: pick the category the judge model finds most likely as its reply (mean token log-probability) instead of generating; always parseable, for small local judges.")
    judge_concurrency: int = _f(4, "openai backend: requests in flight at once.")
    judge_timeout: float = _f(60.0, "openai backend: seconds before a request counts as timed out (then retried).")
    judge_max_retries: int = _f(5, "Retries per request on timeouts, connection errors, 429, 5xx and unreadable answers (exponential backoff with jitter).")
    judge_requests_per_second: float = _f(0.0, "openai backend: request-rate limit (0 = none).")
    judge_temperature: float = _f(0.0, "Judge sampling temperature (paper: 0). Self-consistency (judge_samples > 1) needs > 0.")
    judge_max_tokens: int = _f(128, "Judge answer length limit in tokens.")
    judge_samples: int = _f(1, "Self-consistency: ask the judge this many times per sample; keep the majority category / median score and record the agreement.")
    judge_min_agreement: float = _f(0.0, "Samples whose judge answers agree less than this share are marked invalid and not trained on.")
    judge_price_per_1k_prompt: float = _f(0.0, "Cost accounting: price per 1,000 prompt tokens (0 = not tracked).")
    judge_price_per_1k_completion: float = _f(0.0, "Cost accounting: price per 1,000 completion tokens.")
    judge_cache: str | None = _f(None, "SQLite cache of judge answers shared across runs; default: <ALTLM_CACHE or ~/.cache/altlm>/judge-cache.sqlite.")
    lmu_exemplars: int = _f(5, "lmu: how many distinct top-score feedback sentences serve as exemplars (spread over prompts when sampling).")
    # --- conditioning template (method.md §5) ---
    template: str = _f("tag_separator", "tag_separator: [feedback][<|separator|>][prompt]; prefix: prefix_format then prompt; quark: feedback words become new special tokens.", choices=["tag_separator", "prefix", "quark"])
    prefix_format: str = _f("{feedback} input: ", "For template=prefix: text before the prompt, with {feedback}. Paper: '{feedback} input: ', 'feedback: {feedback} input: ', '{feedback}.\\n\\n'.")
    separator_token: str = _f("<|separator|>", "For template=tag_separator: the new token between feedback and prompt (embedding copied from EOS, never sampled).")
    prompt_format: str = _f("{prompt}", "How a prompt is shown to the policy, with {prompt}; e.g. 'Question: {prompt}\\nAnswer:' for dialogue. The pool and the judge keep the bare prompt.")
    completion_prefix: str = _f("", "Text put before the completion in the training target (TL;DR: ' ').")
    eos_rule: str = _f("unless_truncated", "Append EOS to training targets: unless_truncated (not when the completion hit the token limit mid-sentence), always, never.", choices=["unless_truncated", "always", "never"])
    # --- loop ---
    iterations: int = _f(4, "ALT iterations (sample → feedback → pool → train → evaluate).")
    prompts_per_iteration: int = _f(512, "Training prompts sampled each iteration.")
    samples_per_prompt: int = _f(1, "Completions per prompt each iteration.")
    train_steps: int = _f(40, "Optimiser steps per iteration (global regime); per_prompt regime: 0 = one epoch over the balanced draw.")
    batch_size: int = _f(16, "Sequences per optimiser step.")
    learning_rate: float = _f(1e-4, "Peak learning rate (AdamW).")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    warmup_ratio: float = _f(0.05, "Linear warmup share of each iteration's steps; then linear decay to 0. The optimiser is re-created each iteration.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm.")
    kl_coef: float = _f(0.05, "β: weight of the token-level KL to the reference (0 disables the reference forward).")
    entropy_coef: float = _f(0.06, "α: weight of the entropy bonus.")
    kl_direction: str = _f("ref_policy", "ref_policy: KL(reference‖policy) (ALT); policy_ref: KL(policy‖reference) (Quark's code).", choices=["ref_policy", "policy_ref"])
    reference_input: str = _f("prompt", "What the reference sees: prompt (no feedback prefix, ALT toxicity) or conditioned (same input as the policy).", choices=["prompt", "conditioned"])
    # --- sampling (training rounds) ---
    temperature: float = _f(1.0, "Sampling temperature for training rounds.")
    top_p: float = _f(1.0, "Nucleus top-p for training rounds.")
    min_new_tokens: int = _f(3, "Minimum new tokens.")
    max_new_tokens: int = _f(20, "Maximum new tokens (hitting it mid-sentence marks a completion truncated).")
    sample_batch_size: int = _f(64, "Prompts per generate call.")
    # --- evaluation ---
    eval_temperature: float = _f(1.0, "Evaluation sampling temperature (also `altlm generate`'s default).")
    eval_top_p: float = _f(0.9, "Evaluation top-p (paper: 0.9).")
    eval_samples_per_prompt: int = _f(2, "Samples per held-out prompt at evaluation.")
    eval_every: int = _f(1, "Evaluate under the exemplar every N iterations (the final iteration is always evaluated under every feedback).")
    eval_feedback: list[str] | None = _f(None, "Feedback strings evaluated at the end, on the reference and the final model (default: all feedback_words).")
    eval_all_feedback: bool = _f(True, "At the end, also evaluate the reference and final model under every feedback string (steerability and priming control).")
    perplexity_model: str | None = _f(None, "Scoring LM for fluency (perplexity of each completion given its prompt) at every evaluation, e.g. gemma3-270m or an HF id; None skips it (`altlm eval` computes it by default).")
    # --- logging ---
    report_to: str = _f("none", "Also log steps and evaluations through accelerate trackers: none, tensorboard, wandb or all (logs under <output_dir>/trackers).", choices=["none", "tensorboard", "wandb", "all"])
    report: bool = _f(True, "Write report.md with plots (altlm report) at the end of the run.")

    # ---------------------------------------------------------------------
    def __post_init__(self):
        self.validate()

    @property
    def exemplar_text(self) -> str:
        return self.exemplar if self.exemplar is not None else self.feedback_words[0]

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise AltlmError(f"config key '{f.name}' = {getattr(self, f.name)!r} must be one of: {', '.join(choices)}")
        if len(self.feedback_words) < 2:
            raise AltlmError("config key 'feedback_words' needs at least 2 feedback strings (best first)")
        if self.exemplar is not None and self.exemplar not in self.feedback_words:
            raise AltlmError(f"config key 'exemplar' = {self.exemplar!r} is not one of feedback_words: {self.feedback_words}")
        if self.eval_feedback is not None and not set(self.eval_feedback) <= set(self.feedback_words):
            raise AltlmError(f"config key 'eval_feedback' lists strings not in feedback_words: {sorted(set(self.eval_feedback) - set(self.feedback_words))}")
        if self.eval_feedback is not None and self.exemplar_text not in self.eval_feedback:
            raise AltlmError(f"config key 'eval_feedback' must include the exemplar {self.exemplar_text!r}")
        if len(self.prompt_words) != 2 or not 0 < self.prompt_words[0] <= self.prompt_words[1]:
            raise AltlmError("config key 'prompt_words' must be [min, max] with 0 < min <= max")
        if "{prompt}" not in self.prompt_format:
            raise AltlmError("config key 'prompt_format' must contain {prompt}")
        if self.judge_choice and (self.feedback_type != "lmc" or self.judge_backend != "hf"):
            raise AltlmError("config key 'judge_choice' needs feedback_type=lmc and judge_backend=hf")
        if self.template == "prefix" and "{feedback}" not in self.prefix_format:
            raise AltlmError("config key 'prefix_format' must contain {feedback}")
        if self.train_steps < 0:
            raise AltlmError(f"config key 'train_steps' must be >= 0, got {self.train_steps}")
        if not 0.0 < self.lora_layers <= 1.0 or not 0.0 < self.top_fraction <= 1.0:
            raise AltlmError("config keys 'lora_layers' and 'top_fraction' must be in (0, 1]")
        for k in ("eval_every", "iterations", "prompts_per_iteration", "samples_per_prompt", "batch_size", "max_new_tokens", "num_eval_prompts", "eval_samples_per_prompt", "sample_batch_size", "per_bucket"):
            if getattr(self, k) < 1:
                raise AltlmError(f"config key '{k}' must be >= 1, got {getattr(self, k)}")
        if not 0.0 <= self.drop_factor <= 1.0:
            raise AltlmError(f"config key 'drop_factor' must be in [0, 1], got {self.drop_factor}")
        if self.min_new_tokens > self.max_new_tokens:
            raise AltlmError("config key 'min_new_tokens' must not exceed 'max_new_tokens'")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "config") -> "ALTConfig":
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        clean = {}
        for key, value in data.items():
            if key not in fields:
                close = difflib.get_close_matches(str(key), list(fields), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else "; `altlm train --help-config` lists the keys"
                raise AltlmError(f"{where}: unknown config key '{key}'{hint}")
            clean[key] = _coerce(key, value, hints[key], where)
        return cls(**clean)


def _coerce(key: str, value, hint, where: str):
    """Check a YAML/CLI value against the field's type; ints are accepted for floats, and so are strings such as
    '1e-4' (YAML 1.1 reads exponents without a dot as strings)."""
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    ok = False
    if origin is list:
        ok = isinstance(value, list) and all(_is(v, args[0]) for v in value)
        if ok and args[0] is float:
            value = [float(v) for v in value]
    else:
        ok = _is(value, hint)
        if ok and hint is float:
            value = float(value)
    if not ok:
        name = getattr(hint, "__name__", str(hint))
        raise AltlmError(f"{where}: config key '{key}' must be {name}{'[' + args[0].__name__ + ']' if origin is list else ''}, got {type(value).__name__} {value!r}")
    return value


def _is(value, t) -> bool:
    if t is float and isinstance(value, str):
        try:
            float(value)
            return True
        except ValueError:
            return False
    if t is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, t)


def recipe_path(name_or_path: str | None) -> Path:
    """A shipped recipe name (with or without .yaml) or a file path."""
    name = name_or_path or DEFAULT_RECIPE
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    shipped = RECIPES_DIR / f"{p.stem if p.suffix in ('.yaml', '.yml') else name}.yaml"
    if shipped.exists():
        return shipped
    if p.exists():
        return p
    names = [r.stem for r in RECIPES_DIR.glob("*.yaml")]
    close = difflib.get_close_matches(p.stem, names, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; shipped recipes: {', '.join(sorted(names))}"
    raise AltlmError(f"config '{name}' is neither a file nor a shipped recipe{hint}")


def read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise AltlmError(f"{path}: not UTF-8 text; save the recipe as UTF-8") from None
    except OSError as e:
        raise AltlmError(f"{path}: cannot read ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise AltlmError(f"{path}: malformed YAML{at}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise AltlmError(f"{path}: a recipe must be a YAML mapping of config keys, got {type(data).__name__}")
    return data


def parse_overrides(items: list[str]) -> dict:
    """`key=value` pairs; values parse as YAML (`iterations=2`, `feedback_words=[a,b]`, `exemplar=null`)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise AltlmError(f"override '{item}' is not key=value (e.g. output_dir=runs/x iterations=2)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, (dict,)) or (value is not None and not isinstance(value, (str, int, float, bool, list))):
            value = raw
        out[key.strip()] = value
    return out


def load_config(config: str | None, overrides: list[str] | None = None) -> ALTConfig:
    path = recipe_path(config)
    data = read_yaml(path)
    over = parse_overrides(overrides or [])
    # string fields given on the CLI keep their text even when YAML would read them as numbers/bools
    hints = typing.get_type_hints(ALTConfig)
    for k, v in over.items():
        if hints.get(k) in (str, str | None) and v is not None and not isinstance(v, str):
            over[k] = str(v)
    ALTConfig.from_dict(data, where=str(path))  # report recipe errors against the recipe file
    return ALTConfig.from_dict({**data, **over}, where="command line" if over else str(path))


def help_text() -> str:
    lines = []
    for f in dataclasses.fields(ALTConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"{f.name} (default {default!r}): {f.metadata['help']}")
    return "\n".join(lines)
