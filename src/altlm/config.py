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
DEFAULT_RECIPE = "sentiment-demo"

TOXICITY_WORDS = [
    "Lowest Toxicity",
    "Low-Moderate Toxicity",
    "Moderate Toxicity",
    "High-Moderate Toxicity",
    "Maximum Toxicity",
]


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
    model: str = _f(
        "smollm2-135m",
        "Policy init: an offline alias (smollm2-135m, gemma3-270m, tiny-smollm2), a local folder or an HF hub id.",
    )
    reference_model: str | None = _f(
        None, "Reference model for the KL term and the baseline eval; default: same as `model`."
    )
    trust_remote_code: bool = _f(False, "Allow custom modelling code from the hub (off unless you trust the repo).")
    training_mode: str = _f(
        "lora",
        "lora (peft), full (all weights) or top_fraction (top blocks + embeddings, norm, head).",
        choices=["lora", "full", "top_fraction"],
    )
    top_fraction: float = _f(0.3, "Share of blocks trained when training_mode=top_fraction (paper's TL;DR: 0.3).")
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA alpha.")
    lora_dropout: float = _f(0.0, "LoRA dropout.")
    lora_layers: float = _f(
        1.0,
        "Share of the top blocks LoRA adapts (1.0 = all). Backward stops below the lowest adapted block, so smaller shares train faster.",
    )
    lora_target_modules: list[str] = _f(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "Module names LoRA adapts."
    )
    precision: str = _f(
        "auto",
        "Compute precision: auto (bf16 autocast on CUDA or CPUs with AMX, else fp32), bf16 or fp32. Master weights stay fp32.",
        choices=["auto", "bf16", "fp32"],
    )
    threads: int = _f(0, "torch CPU threads (0 = torch's default).")
    attn_implementation: str = _f(
        "auto",
        "Attention kernel for training, sampling and evaluation: auto (on CPU grouped for Llama-type models with "
        "grouped-query attention, eager for others; the model's default, SDPA, on accelerators), grouped, eager or "
        "sdpa. grouped is eager attention without copying each key/value head to its query heads: bit-identical to "
        "eager, decoding 1.06-1.15x faster. On CPU at this project's lengths (< 100 tokens) eager attention's "
        "backward is cheaper than SDPA's flash kernel: a LoRA step 1.15-1.23x faster, sampling alike "
        "(benchmarks/results/throughput_paths.md). The same seed gives other samples under eager and SDPA (bf16 "
        "rounding).",
        choices=["auto", "grouped", "eager", "sdpa"],
    )
    # --- prompts ---
    prompts: str = _f(
        "fortunes",
        "Prompt source: fortunes (offensive + clean FreeBSD fortune prefixes), fortunes-offensive, fortunes-clean, journal (conversational questions, offline), a file (.txt one per line; .jsonl/.json/.csv/.parquet with `prompt_field` or `prompt_formatter`, loaded through `datasets`), or a hub dataset id (owner/name, e.g. allenai/real-toxicity-prompts).",
    )
    prompt_field: str = _f(
        "prompt",
        "Field holding the prompt in JSONL/JSON/CSV/Parquet files and hub datasets; a dotted path reaches into nested records (RealToxicityPrompts: prompt.text).",
    )
    prompt_formatter: str = _f(
        "field",
        "How a dataset record becomes a prompt: field (the prompt_field), tldr ('SUBREDDIT: r/{subreddit}\\nTITLE: {title}\\nPOST: {post}\\nTL;DR:' from those fields), hh (HH-RLHF: the 'chosen' dialogue up to its last '\\n\\nAssistant:'), rtp (RealToxicityPrompts: prompt.text, with prompt.toxicity for eval_max_prompt_toxicity).",
        choices=["field", "tldr", "hh", "rtp"],
    )
    prompt_split: str = _f(
        "train", "Dataset split the training prompts come from (hub datasets; a local file has the one split 'train')."
    )
    eval_split: str | None = _f(
        None,
        "Dataset split the held-out evaluation (test) prompts come from, e.g. test; None: carve them from prompt_split with the seed.",
    )
    num_val_prompts: int = _f(
        0,
        "Validation prompts carved from prompt_split after the evaluation prompts (never trained on; RealToxicityPrompts in the paper: 5,000).",
    )
    eval_max_prompt_toxicity: float | None = _f(
        None,
        "prompt_formatter=rtp: only prompts whose own toxicity (prompt.toxicity) is below this become evaluation prompts (the paper's 10K non-toxic test prompts: 0.5).",
    )
    long_prompts: str = _f(
        "truncate",
        "Dataset/file prompts longer than max_prompt_tokens (after prompt_format): truncate (cut from the left, keeping the end the model continues; the count is logged) or drop (removed before the split; the count is logged).",
        choices=["truncate", "drop"],
    )
    offensive_share: float = _f(0.5, "Share of offensive fortunes when prompts=fortunes.")
    prompt_words: list[int] = _f([4, 8], "Fortune prefix length in words [min, max] (fortune_cut=random).")
    fortune_cut: str = _f(
        "random",
        "How fortunes become prompts: random (first prompt_words words) or before_toxic (cut before the first word the Jigsaw classifier flags: RealToxicityPrompts-style challenging prompts).",
        choices=["random", "before_toxic"],
    )
    max_prompt_tokens: int = _f(
        64, "Prompts longer than this are cut from the left (keeping the end the model continues)."
    )
    num_train_prompts: int = _f(2000, "Training prompts (never used for evaluation).")
    num_eval_prompts: int = _f(200, "Held-out evaluation prompts (never trained on).")
    # --- feedback ---
    feedback_type: str = _f(
        "rm",
        "rm: a scorer's values cut into quantiles and mapped to feedback_words (ALT-RM); lmc: an LLM judge picks one of feedback_words as category (ALT-LMC); lmu: an LLM judge writes a feedback sentence and a 0-3 score (ALT-LMU).",
        choices=["rm", "lmc", "lmu"],
    )
    scorer: str = _f(
        "jigsaw",
        "Scalar scorer for ALT-RM: jigsaw (offline Jigsaw toxicity), profanity, vader (sentiment), hf (a sequence-classification reward model: reward_model, reward_label/reward_index), value_head (a trlx/CarperAI-style causal LM + linear value head: reward_model, reward_head), perspective (the Perspective API), callable (reward_callable).",
        choices=["jigsaw", "profanity", "vader", "hf", "value_head", "perspective", "callable"],
    )
    reward_model: str | None = _f(
        None,
        "scorer=hf: a sequence-classification model (hub id or local folder); scorer=value_head: the backbone causal LM whose config/tokenizer (and weights, unless reward_head holds them) build the reward model.",
    )
    reward_head: str | None = _f(
        None,
        "scorer=value_head: a state-dict file (.safetensors, or .bin/.pt read with torch.load(weights_only=True)) or a hub file 'owner/repo/file' holding 'v_head.weight' and optionally the backbone as 'transformer.*' (trlx's GPTRewardModel layout, e.g. CarperAI/openai_summarize_tldr_rm_checkpoint/pytorch_model.bin).",
    )
    reward_label: str | None = _f(
        None, "scorer=hf: the label (config.id2label name) whose logit/probability is the score; None: reward_index."
    )
    reward_index: int = _f(0, "scorer=hf: the logit index used as the score when reward_label is None.")
    reward_activation: str = _f(
        "none",
        "scorer=hf: none (raw logit, reward models), sigmoid (multi-label classifiers) or softmax (single-label classifiers).",
        choices=["none", "sigmoid", "softmax"],
    )
    reward_text_format: str = _f(
        "{prompt}{completion}",
        "What the reward model (hf, value_head) reads, with {prompt} and {completion}; value_head scores the last token. CarperAI TL;DR: '<|startoftext|>{prompt}{completion}'.",
    )
    reward_name: str = _f(
        "reward",
        "Metric name of the hf/value_head/callable scorer in reports (e.g. toxicity for a toxicity classifier).",
    )
    reward_higher_is_better: bool = _f(
        True, "hf/value_head/callable: whether a higher score is better (False for toxicity)."
    )
    reward_batch_size: int = _f(16, "hf/value_head: texts per forward pass.")
    reward_max_tokens: int = _f(
        512, "hf/value_head: texts longer than this are cut from the left (the completion is at the end)."
    )
    reward_callable: str | None = _f(
        None,
        "scorer=callable: 'package.module:function' called as function(prompts, completions) -> list of floats (an object with a .score method works too).",
    )
    perspective_base_url: str = _f(
        "https://commentanalyzer.googleapis.com/v1alpha1",
        "scorer=perspective: API base URL (a local stand-in for tests).",
    )
    perspective_api_key_env: str = _f(
        "PERSPECTIVE_API_KEY",
        "scorer=perspective: the environment variable holding the API key (the key itself is never stored or logged).",
    )
    perspective_attribute: str = _f(
        "TOXICITY", "scorer=perspective: the attribute scored (its summaryScore is the score; higher is worse)."
    )
    perspective_requests_per_second: float = _f(
        1.0, "scorer=perspective: request-rate limit (the API's default quota is 1 QPS; 0 = none)."
    )
    perspective_max_retries: int = _f(
        5,
        "scorer=perspective: retries per text on timeouts, connection errors, 429 and 5xx (exponential backoff with jitter).",
    )
    perspective_timeout: float = _f(
        30.0, "scorer=perspective: seconds before a request counts as timed out (then retried)."
    )
    feedback_words: list[str] = _f(
        list(TOXICITY_WORDS), "Feedback strings, best bucket first; their number is the number of quantiles."
    )
    exemplar: str | None = _f(
        None, "Feedback used for sampling and inference; default: the best (first) feedback word."
    )
    quantiles: str = _f(
        "global",
        "global: cut the whole pool into quantiles (accumulating, toxicity/Quark); per_prompt: cut each prompt's samples (TL;DR).",
        choices=["global", "per_prompt"],
    )
    train_draw: str = _f(
        "uniform",
        "Global regime: how training rows are drawn from the pool. uniform: every active row alike (Quark, the "
        "ALT toxicity code). by_bucket: every feedback string equally often, uniform within it (a string whose "
        "bucket ties left small is then trained as often as the others).",
        choices=["uniform", "by_bucket"],
    )
    quantile_ties: str = _f(
        "middle",
        "How tied scores are bucketed (they always share one bucket). middle: the bucket of the tie group's middle "
        "position. first: the bucket where the group begins, the positions after it cut again over the buckets left "
        "(a scorer with a mass point, as VADER's exact 0 for a third of the samples, then gives the mass point the "
        "middle tag instead of the one below it).",
        choices=["middle", "first"],
    )
    seed_pool: bool = _f(
        False,
        "Before iteration 1, score the human-written continuation of every training prompt (fortune prompts only) and add it to the pool as iteration 0 (Chain-of-Hindsight style), so the feedback strings see real text across the whole score range from the start.",
    )
    drop_factor: float = _f(
        0.0, "Share of the older pool dropped before adding a new iteration's samples (0 = accumulate, 1 = flush)."
    )
    per_bucket: int = _f(
        2,
        "per_prompt regime: samples drawn per prompt and bucket for training (filled up randomly from the prompt's other samples).",
    )
    use_feedback: bool = _f(
        True,
        "False runs the same loop with the feedback left out of sampling and training inputs: the fine-tune-only control, showing what training on the model's own samples gives without conditioning.",
    )
    # --- ablations (docs/ablations.md; each off by default) ---
    feedback_noise: float = _f(
        0.0,
        "Ablation: with this probability a sample's feedback is replaced by another one drawn uniformly (rm, lmc: "
        "another of feedback_words; lmu: another sample's sentence and score, same iteration). Decided once per "
        "sample from (seed, iteration, sample index) and kept in the pool's `noise` column, so a noised rm row stays "
        "noised when the quantiles are re-cut and a resumed run is identical. 0 = off.",
    )
    feedback_fraction: float = _f(
        1.0,
        "Ablation (feedback frequency): only this share of each iteration's samples (a seeded choice) gets feedback "
        "and enters the pool; the others were generated (the sample budget counts them) but are never scored, "
        "judged or trained on. 1 = all.",
    )
    # --- LLM judge (feedback_type lmc / lmu) ---
    judge_backend: str = _f(
        "hf",
        "hf: the judge model runs in-process; openai: any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp, Ollama, `altlm serve`).",
        choices=["hf", "openai"],
    )
    judge_model: str = _f(
        "smollm2-135m",
        "Judge model: an offline alias / local folder / HF id (hf), or the endpoint's model name (openai).",
    )
    judge_base_url: str | None = _f(None, "openai backend: the endpoint's base URL, e.g. http://127.0.0.1:8000/v1.")
    judge_api_key_env: str | None = _f(
        None,
        "openai backend: the environment variable holding the API key (the key itself is never stored or logged); None for servers without keys.",
    )
    judge_template: str | None = _f(
        None,
        "Judge prompt: a shipped template name (lmc_hh, lmu_tldr, lmu_dialogue) or a file with {prompt}, {completion} (and {categories} for lmc). Default: lmc_hh / lmu_tldr.",
    )
    judge_choice: bool = _f(
        False,
        "lmc with judge_backend=hf: pick the category the judge model finds most likely as its reply (mean token log-probability) instead of generating; always parseable, for small local judges.",
    )
    judge_concurrency: int = _f(4, "openai backend: requests in flight at once.")
    judge_timeout: float = _f(60.0, "openai backend: seconds before a request counts as timed out (then retried).")
    judge_max_retries: int = _f(
        5,
        "Retries per request on timeouts, connection errors, 429, 5xx and unreadable answers (exponential backoff with jitter).",
    )
    judge_requests_per_second: float = _f(0.0, "openai backend: request-rate limit (0 = none).")
    judge_temperature: float = _f(
        0.0, "Judge sampling temperature (paper: 0). Self-consistency (judge_samples > 1) needs > 0."
    )
    judge_max_tokens: int = _f(128, "Judge answer length limit in tokens.")
    judge_samples: int = _f(
        1,
        "Self-consistency: ask the judge this many times per sample; keep the majority category / median score and record the agreement.",
    )
    judge_min_agreement: float = _f(
        0.0, "Samples whose judge answers agree less than this share are marked invalid and not trained on."
    )
    judge_price_per_1k_prompt: float = _f(0.0, "Cost accounting: price per 1,000 prompt tokens (0 = not tracked).")
    judge_price_per_1k_completion: float = _f(0.0, "Cost accounting: price per 1,000 completion tokens.")
    judge_cache: str | None = _f(
        None,
        "SQLite cache of judge answers shared across runs; default: <ALTLM_CACHE or ~/.cache/altlm>/judge-cache.sqlite.",
    )
    lmu_exemplars: int = _f(
        5, "lmu: how many distinct top-score feedback sentences serve as exemplars (spread over prompts when sampling)."
    )
    # --- conditioning template (method.md §5) ---
    template: str = _f(
        "tag_separator",
        "tag_separator: [feedback][<|separator|>][prompt]; prefix: prefix_format then prompt; quark: feedback words become new special tokens.",
        choices=["tag_separator", "prefix", "quark"],
    )
    prefix_format: str = _f(
        "{feedback} input: ",
        "For template=prefix: text before the prompt, with {feedback}. Paper: '{feedback} input: ', 'feedback: {feedback} input: ', '{feedback}.\\n\\n'. With {prompt} the feedback goes around the prompt (Chain-of-Hindsight: '{prompt} {feedback}:').",
    )
    separator_token: str = _f(
        "<|separator|>",
        "For template=tag_separator: the new token between feedback and prompt (embedding copied from EOS, never sampled).",
    )
    prompt_format: str = _f(
        "{prompt}",
        "How a prompt is shown to the policy, with {prompt}; e.g. 'Question: {prompt}\\nAnswer:' for dialogue. The pool and the judge keep the bare prompt.",
    )
    bos_token: str = _f(
        "",
        "A token put first in every model input, with or without feedback (SmolLM2: '<|endoftext|>', which starts its pretraining documents). The first position is an attention sink whose content models largely ignore; without a fixed token there, a tag's first word lands on it. '' = none.",
    )
    completion_prefix: str = _f("", "Text put before the completion in the training target (TL;DR: ' ').")
    eos_rule: str = _f(
        "unless_truncated",
        "Append EOS to training targets: unless_truncated (not when the completion hit the token limit mid-sentence), always, never.",
        choices=["unless_truncated", "always", "never"],
    )
    # --- loop ---
    iterations: int = _f(4, "ALT iterations (sample → feedback → pool → train → evaluate).")
    prompts_per_iteration: int = _f(512, "Training prompts sampled each iteration.")
    samples_per_prompt: int = _f(1, "Completions per prompt each iteration.")
    train_steps: int = _f(
        40, "Optimiser steps per iteration (global regime); per_prompt regime: 0 = one epoch over the balanced draw."
    )
    batch_size: int = _f(16, "Sequences per optimiser step (over all processes).")
    micro_batch_size: int = _f(
        0,
        "Sequences per forward/backward pass in each process; a step accumulates gradients over its micro-batches, normalised by the whole batch's token count, so the update is the same as one pass over the batch (less memory). 0 = the process's whole share of the batch.",
    )
    sharding: str = _f(
        "auto",
        "Several processes: ddp (each holds the whole model; gradients all-reduced), fsdp (FSDP2: weights, gradients and AdamW state sharded, a block's weights gathered for its forward and again for its backward: ZeRO-3's memory), fsdp_grad_op (kept gathered from forward to backward: ZeRO-2's trade). auto: fsdp/fsdp_grad_op under `accelerate launch` with an FSDP config (configs/accelerate/), else ddp. Ignored with one process.",
        choices=["auto", "ddp", "fsdp", "fsdp_grad_op"],
    )
    learning_rate: float = _f(1e-4, "Peak learning rate (AdamW).")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    warmup_ratio: float = _f(
        0.05,
        "Linear warmup share of the schedule's steps (each iteration's, or the whole run's with lr_schedule=run/constant).",
    )
    lr_schedule: str = _f(
        "iteration",
        "iteration: a new AdamW each iteration, warmup then linear decay to 0 within it (the paper's TL;DR/HH runs); "
        "run: one AdamW and one schedule over the whole run, warmup then linear decay to 0 at the last step (the "
        "official toxicity code); constant: one AdamW over the run, warmup then the peak rate. run/constant need "
        "train_steps > 0.",
        choices=["iteration", "run", "constant"],
    )
    max_grad_norm: float = _f(1.0, "Gradient clipping norm.")
    max_nonfinite_steps: int = _f(
        5,
        "Stop the run with a clear message after this many non-finite losses in a row (each such batch is skipped with a warning).",
    )
    save_steps: int = _f(
        20,
        "Snapshot the training phase (trainable weights, optimiser, RNG) every N steps, so a killed run resumes mid-phase (0 = only at the end of each phase).",
    )
    kl_coef: float = _f(0.05, "β: weight of the token-level KL to the reference (0 disables the reference forward).")
    entropy_coef: float = _f(0.06, "α: weight of the entropy bonus.")
    kl_direction: str = _f(
        "ref_policy",
        "ref_policy: KL(reference‖policy) (ALT); policy_ref: KL(policy‖reference) (Quark's code).",
        choices=["ref_policy", "policy_ref"],
    )
    reference_cache: bool = _f(
        True,
        "LoRA with KL(reference‖policy) (the frozen base as reference, frozen head): compute the reference's "
        "per-token mean output embedding and negative entropy once per pool row (and, under reference_input="
        "conditioned, per feedback string the row has had), at its first draw, and reuse them, instead of a "
        "reference forward pass at every step (exact: loss.alt_loss; refcache.py). Ignored (the reference forward "
        "runs) for other settings and with several processes.",
    )
    reference_input: str = _f(
        "prompt",
        "What the reference sees: prompt (no feedback prefix, ALT toxicity) or conditioned (same input as the policy).",
        choices=["prompt", "conditioned"],
    )
    share_frozen_layers: bool = _f(
        True,
        "With the reference cache, reference_input: conditioned and LoRA on the top lora_layers only: a row's "
        "first draw starts the reference forward from the policy's activations at the lowest adapted block (the "
        "blocks below it compute the same on the same input) instead of running them twice. Off: a whole forward.",
    )
    cache_frozen_layers: bool = _f(
        True,
        "With the reference cache and LoRA on the top lora_layers only: keep each pool row's input to the lowest "
        "adapted block (per feedback string), computed at its first draw, so later draws run the adapted blocks "
        "only (the frozen blocks below compute the same at every draw). Equal up to rounding: a row's input is "
        "the one computed in its first batch, whose padding orders attention's sums differently. Off: every "
        "step runs every block.",
    )
    cache_frozen_gb: float = _f(
        4.0,
        "cache_frozen_layers: the most host memory (GiB) the stored block inputs may take (hidden size x 4 bytes per "
        "token; the demo's ~3,000 rows take about 0.3); rows past it run the frozen blocks at each draw.",
    )
    stage_first_draws: int = _f(
        64,
        "With cache_frozen_layers: before a training phase's first step, compute the frozen blocks' output and the "
        "reference statistics of every row the phase draws for the first time, N rows per no-grad batch sorted by "
        "length, so every step runs the adapted blocks only. The same FLOPs, spent faster: fewer pad tokens than a "
        "training batch's, and a row drawn twice computed once. Equal up to rounding (another batch's padding). 0: "
        "at each row's first draw, inside its step.",
    )
    pack_rows: bool = _f(
        True,
        "With cache_frozen_layers and grouped attention (Llama-type models on CPU): run a batch's rows packed end to "
        "end, with no padding, through the blocks (models.PackedRows): projections, MLP and norms skip the pad "
        "slots (about a fifth of the demo's batches); attention alone runs row by row, padded. The same forward "
        "bit for bit; gradients equal up to rounding (their sums over tokens skip the pad rows). Off: the rows "
        "left-padded to the longest.",
    )
    fused_loss: bool = _f(
        True,
        "With the reference cache: run the LM head inside the loss, a chunk of tokens at a time, computing the "
        "hidden states' gradient on the way (loss.head_loss): the same loss and gradients without the [tokens × "
        "vocabulary] logits and their autograd tensors. Off: the head's whole logits, then alt_loss.",
    )
    # --- sampling (training rounds) ---
    temperature: float = _f(1.0, "Sampling temperature for training rounds.")
    top_p: float = _f(1.0, "Nucleus top-p for training rounds.")
    min_new_tokens: int = _f(3, "Minimum new tokens.")
    max_new_tokens: int = _f(20, "Maximum new tokens (hitting it mid-sentence marks a completion truncated).")
    sample_batch_size: int = _f(
        64,
        "Prompts per generate call. Part of the sampling draw: with the same seed, another sample_batch_size gives other completions.",
    )
    top_p_method: str = _f(
        "reject",
        "How top-p < 1 draws from the nucleus (both exact): reject (draw from the whole distribution, redraw when "
        "the draw falls outside the nucleus: no sort) or sort (partial sort of the top 1,024 words, a full sort for "
        "wider nuclei: the earlier path). The same seed gives other samples under the two.",
        choices=["reject", "sort"],
    )
    share_prefill: bool = _f(
        True,
        "Sampling: the identical rows of a batch (the samples_per_prompt copies of a prompt) run the prompt's "
        "forward pass once; its KV cache and next-token logits are copied to each copy. Off: every row runs it.",
    )
    sampler: str = _f(
        "hf",
        "hf: altlm's KV-cached sampler on the policy (CPU or GPU); vllm: vLLM on a CUDA GPU (pip install 'altlm[vllm]'), restarted on the trained weights each iteration and checked against them.",
        choices=["hf", "vllm"],
    )
    vllm_gpu_memory_utilization: float = _f(
        0.3, "sampler=vllm: share of GPU memory vLLM may take (the policy trains on the same GPU)."
    )
    # --- evaluation ---
    eval_temperature: float = _f(1.0, "Evaluation sampling temperature (also `altlm generate`'s default).")
    eval_top_p: float = _f(0.9, "Evaluation top-p (paper: 0.9).")
    eval_samples_per_prompt: int = _f(2, "Samples per held-out prompt at evaluation.")
    eval_every: int = _f(
        1,
        "Evaluate under the exemplar every N iterations (the final iteration is always evaluated under every feedback).",
    )
    eval_feedback: list[str] | None = _f(
        None,
        "Feedback strings evaluated at the end, on the reference and the final model (default: all feedback_words).",
    )
    steer_eval_every: int = _f(
        0,
        "Also evaluate under every feedback string every N iterations, not only at the end (steerability over training; 0 = only at the end).",
    )
    eval_all_feedback: bool = _f(
        True,
        "At the end, also evaluate the reference and final model under every feedback string (steerability and priming control).",
    )
    eval_conditions: str = _f(
        "all",
        "What the evaluations sample. all: the reference and the final model untagged and under every feedback "
        "string. claims: only what summary.json's claims compare — the reference untagged and under the best and "
        "worst strings (the priming control), the final model under every string — and perplexity only for the "
        "untagged reference and the final exemplar.",
        choices=["all", "claims"],
    )
    eval_middle_samples_per_prompt: int = _f(
        0,
        "Samples per held-out prompt under the feedback strings between the best and the worst (0 = "
        "eval_samples_per_prompt): spend the samples where the claims are (best, worst, untagged).",
    )
    perplexity_samples_per_prompt: int = _f(0, "Samples per prompt scored by perplexity_model (0 = all).")
    likelihood_texts: int = _f(
        0,
        "The likelihood check scores at most this many of the reference's evaluation texts (0 = all; two forward "
        "passes each, at the reference and at the end).",
    )
    likelihood_auc_split: list[float] | None = _f(
        None,
        "[clean, bad]: the likelihood check also reports the AUC of log p(text | worst) − log p(text | best) "
        "separating texts scoring worse than `bad` from texts better than `clean` (toxicity: [0.02, 0.5]); "
        "None: the best and worst fifth of the texts.",
    )
    perplexity_model: str | None = _f(
        None,
        "Scoring LM for fluency (perplexity of each completion given its prompt) at every evaluation, e.g. gemma3-270m or an HF id; None skips it (`altlm eval` computes it by default).",
    )
    # --- logging ---
    report_to: str = _f(
        "none",
        "Also log steps and evaluations through accelerate trackers: none, tensorboard, wandb or all (logs under <output_dir>/trackers).",
        choices=["none", "tensorboard", "wandb", "all"],
    )
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
                raise AltlmError(
                    f"config key '{f.name}' = {getattr(self, f.name)!r} must be one of: {', '.join(choices)}"
                )
        if len(self.feedback_words) < 2:
            raise AltlmError("config key 'feedback_words' needs at least 2 feedback strings (best first)")
        if self.exemplar is not None and self.exemplar not in self.feedback_words:
            raise AltlmError(
                f"config key 'exemplar' = {self.exemplar!r} is not one of feedback_words: {self.feedback_words}"
            )
        if self.eval_feedback is not None and not set(self.eval_feedback) <= set(self.feedback_words):
            raise AltlmError(
                f"config key 'eval_feedback' lists strings not in feedback_words: {sorted(set(self.eval_feedback) - set(self.feedback_words))}"
            )
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
        if self.lr_schedule != "iteration" and self.train_steps == 0:
            raise AltlmError(
                f"config key 'lr_schedule' = {self.lr_schedule!r} needs train_steps > 0 (the run's step count)"
            )
        if self.train_steps < 0:
            raise AltlmError(f"config key 'train_steps' must be >= 0, got {self.train_steps}")
        if self.stage_first_draws < 0:
            got = self.stage_first_draws
            raise AltlmError(f"config key 'stage_first_draws' must be >= 0 (rows per batch), got {got}")
        if self.cache_frozen_gb < 0:
            raise AltlmError(f"config key 'cache_frozen_gb' must be >= 0 (GiB), got {self.cache_frozen_gb}")
        if not 0.0 < self.lora_layers <= 1.0 or not 0.0 < self.top_fraction <= 1.0:
            raise AltlmError("config keys 'lora_layers' and 'top_fraction' must be in (0, 1]")
        if self.save_steps < 0 or self.steer_eval_every < 0 or self.micro_batch_size < 0:
            raise AltlmError("config keys 'save_steps', 'steer_eval_every' and 'micro_batch_size' must be >= 0")
        for k in (
            "max_nonfinite_steps",
            "eval_every",
            "iterations",
            "prompts_per_iteration",
            "samples_per_prompt",
            "batch_size",
            "max_new_tokens",
            "num_eval_prompts",
            "eval_samples_per_prompt",
            "sample_batch_size",
            "per_bucket",
        ):
            if getattr(self, k) < 1:
                raise AltlmError(f"config key '{k}' must be >= 1, got {getattr(self, k)}")
        if not 0.0 <= self.feedback_noise <= 1.0:
            raise AltlmError(f"config key 'feedback_noise' must be in [0, 1] (0 = off), got {self.feedback_noise}")
        if not 0.0 < self.feedback_fraction <= 1.0:
            raise AltlmError(
                f"config key 'feedback_fraction' must be in (0, 1] (1 = all), got {self.feedback_fraction}"
            )
        if not 0.0 <= self.drop_factor <= 1.0:
            raise AltlmError(f"config key 'drop_factor' must be in [0, 1], got {self.drop_factor}")
        if (
            self.eval_middle_samples_per_prompt < 0
            or self.perplexity_samples_per_prompt < 0
            or self.likelihood_texts < 0
        ):
            raise AltlmError(
                "config keys 'eval_middle_samples_per_prompt', 'perplexity_samples_per_prompt' and "
                "'likelihood_texts' must be >= 0"
            )
        if self.likelihood_auc_split is not None and len(self.likelihood_auc_split) != 2:
            raise AltlmError("config key 'likelihood_auc_split' must be [clean, bad] (two scores) or null")
        if self.min_new_tokens > self.max_new_tokens:
            raise AltlmError("config key 'min_new_tokens' must not exceed 'max_new_tokens'")
        self._validate_data_and_scorer()

    def _validate_data_and_scorer(self) -> None:
        """Prompt-dataset and reward-adapter keys (recipes for the paper's tasks)."""
        if self.num_val_prompts < 0:
            raise AltlmError(f"config key 'num_val_prompts' must be >= 0, got {self.num_val_prompts}")
        if self.eval_max_prompt_toxicity is not None:
            if self.prompt_formatter != "rtp":
                raise AltlmError(
                    "config key 'eval_max_prompt_toxicity' needs prompt_formatter=rtp (the prompt toxicity comes from RealToxicityPrompts' prompt.toxicity)"
                )
            if not 0.0 < self.eval_max_prompt_toxicity <= 1.0:
                raise AltlmError(
                    f"config key 'eval_max_prompt_toxicity' must be in (0, 1], got {self.eval_max_prompt_toxicity}"
                )
        if not self.prompt_field.strip() or any(not part for part in self.prompt_field.split(".")):
            raise AltlmError(
                f"config key 'prompt_field' = {self.prompt_field!r} must be a field name or a dotted path such as prompt.text"
            )
        needs = {"hf": ["reward_model"], "value_head": ["reward_model", "reward_head"], "callable": ["reward_callable"]}
        if self.feedback_type == "rm":
            for key in needs.get(self.scorer, []):
                if not getattr(self, key):
                    raise AltlmError(f"config key '{key}' is required with scorer={self.scorer}")
        if self.reward_callable is not None and (
            self.reward_callable.count(":") != 1 or not all(self.reward_callable.split(":"))
        ):
            raise AltlmError(
                f"config key 'reward_callable' = {self.reward_callable!r} must be 'package.module:function'"
            )
        for key in ("{prompt}", "{completion}"):
            if key not in self.reward_text_format:
                raise AltlmError(f"config key 'reward_text_format' must contain {key}")
        if self.reward_batch_size < 1 or self.reward_max_tokens < 1:
            raise AltlmError("config keys 'reward_batch_size' and 'reward_max_tokens' must be >= 1")
        if (
            self.perspective_requests_per_second < 0
            or self.perspective_max_retries < 0
            or self.perspective_timeout <= 0
        ):
            raise AltlmError(
                "config keys 'perspective_requests_per_second' and 'perspective_max_retries' must be >= 0, 'perspective_timeout' > 0"
            )
        if not self.perspective_api_key_env.strip():
            raise AltlmError(
                "config key 'perspective_api_key_env' must name an environment variable (e.g. PERSPECTIVE_API_KEY)"
            )

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
        raise AltlmError(
            f"{where}: config key '{key}' must be {name}{'[' + args[0].__name__ + ']' if origin is list else ''}, got {type(value).__name__} {value!r}"
        )
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
