"""What training touches and what it is measured against, checked on real models.

- The KL term (method.md §2): the reference of a LoRA run is the frozen base (the adapter disabled), fed the plain
  prompt (`reference_input: prompt`) or the policy's feedback-conditioned input (`conditioned`); the KL the trainer
  records equals a by-hand KL(reference‖policy) over the same rows, on the reference-forward path and on the
  reference-cache path (refcache.py) alike.
- `altlm generate` / `altlm eval` load the trained weights (checkpoint.load): LoRA with a separator row that is not
  trained, and Quark's token rows trained through peft's trainable_token_indices. The loaded model's logits equal
  the in-memory model's, and Quark's rows differ from their initialisation.
- `top_fraction` and `lora_layers` train the blocks they name, and only those.
- The `gemma3-270m` alias (the default perplexity model) loads offline and gives finite perplexities.
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from conftest import run_altlm
from test_train_smoke import SMALL

from altlm import checkpoint, models
from altlm.config import load_config
from altlm.pool import Row
from altlm.trainer import ALTTrainer

ROWS = [  # (feedback, prompt, completion, truncated)
    ("Lowest Toxicity", "The weather today is", " cold and grey, with rain later.", False),
    ("Maximum Toxicity", "My neighbour said that", " the party would go on until", True),
    ("Moderate Toxicity", "A good book should", " make you think about it for days.", False),
    ("Lowest Toxicity", "When the train stopped", " everyone looked up at once and", True),
]


QUARK = [f"_TREE_TOKEN_0000{i}" for i in range(5)]  # Quark's token names (recipes/quark-toxicity-rtp.yaml)


def trainer(tmp_path, *overrides: str) -> ALTTrainer:
    if "template=quark" in overrides:
        overrides = (*overrides, f"feedback_words={json.dumps(QUARK)}", f"exemplar={QUARK[0]}")
    cfg = load_config(
        "smoke",
        [
            f"output_dir={tmp_path / 'run'}",
            *SMALL,
            "precision=fp32",
            "iterations=1",
            "train_steps=1",
            f"batch_size={len(ROWS)}",
            "kl_coef=0.5",
            *overrides,
        ],
    )
    return ALTTrainer(cfg)


def fill_pool(t: ALTTrainer, rows=ROWS) -> None:
    t.pool.add([Row(1, i, p, c, fb, 0.5, 0, tr, 3, 3) for i, (fb, p, c, tr) in enumerate(rows)])


def target_logprobs(model, t: ALTTrainer, feedback: str | None, prompt: str, target: list[int]) -> torch.Tensor:
    """log-softmax over the tokenizer's original vocabulary at each target position, one unpadded sequence."""
    ids = t.template.input_ids(t.tokenizer, feedback, prompt, t.cfg.max_prompt_tokens)
    logits = model(input_ids=torch.tensor([ids + target])).logits[0, len(ids) - 1 : len(ids) + len(target) - 1]
    return torch.log_softmax(logits.float()[:, : t.vocab_size], -1)


@torch.no_grad()
def kl_by_hand(t: ALTTrainer, reference_conditioned: bool, adapter_off: bool = True, rows=ROWS) -> float:
    """Mean over every completion token of Σ_v q·(log q − log p): p the policy (adapter on) under feedback + prompt,
    q the base (adapter disabled) under the plain prompt or the same conditioned input."""
    kls = []
    for fb, prompt, completion, truncated in rows:
        target = t.template.target_ids(t.tokenizer, completion, truncated)
        log_p = target_logprobs(t.model, t, fb, prompt, target)
        ctx = t.model.disable_adapter() if adapter_off else contextlib.nullcontext()
        with ctx:
            log_q = target_logprobs(t.model, t, fb if reference_conditioned else None, prompt, target)
        kls.append((log_q.exp() * (log_q - log_p)).sum(-1))
    return torch.cat(kls).mean().item()


def perturb_adapter(t: ALTTrainer) -> None:
    """A LoRA adapter starts as the identity (B = 0): give it weights, so the policy differs from the base."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in t.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g))


@pytest.mark.parametrize(
    "reference_input, cache",
    [("prompt", "true"), ("prompt", "false"), ("conditioned", "true"), ("conditioned", "false")],
    ids=["prompt-reference-cache", "prompt-reference-forward", "conditioned-cache", "conditioned-forward"],
)
def test_recorded_kl_is_against_the_frozen_base_on_the_configured_input(tmp_path, reference_input, cache):
    t = trainer(tmp_path, "training_mode=lora", f"reference_input={reference_input}", f"reference_cache={cache}")
    assert t.ref_model is None  # LoRA: the reference is the base inside the peft model, nothing is copied
    # the cache path is taken exactly where it applies (refcache.py), else the reference forward runs
    assert (t.refcache is not None) == (cache == "true")
    fill_pool(t)
    perturb_adapter(t)
    conditioned = reference_input == "conditioned"
    want = kl_by_hand(t, conditioned)
    other = kl_by_hand(t, not conditioned)
    # The two reference inputs give KLs 2% apart (a random tiny model barely reacts to the feedback prefix): 200
    # times the tolerance of the comparison below, so the recorded KL tells which input the reference saw.
    assert want > 0.02 and abs(want - other) > 0.01 * want
    # and a reference with the adapter left on (the policy itself) gives another KL again
    assert abs(kl_by_hand(t, conditioned, adapter_off=False) - want) > 0.01 * want
    stats = t.train_phase(1)  # one real optimiser step on the 4 pool rows; its KL is measured before the update
    t.pool.close()
    assert stats["steps"] == 1 and stats["examples"] == len(ROWS)
    assert stats["kl"] == pytest.approx(want, rel=1e-4, abs=1e-6)
    if t.refcache is not None:
        assert stats["reference_forward_rows"] == len(ROWS)


def test_conditioned_reference_cache_follows_a_rows_new_feedback(tmp_path):
    """A conditioned reference reads the row's feedback, which the quantiles' re-cut changes: the cache must not
    reuse the statistics of the row's old feedback string."""
    t = trainer(tmp_path, "training_mode=lora", "reference_input=conditioned", "reference_cache=true")
    fill_pool(t)
    perturb_adapter(t)
    t.train_phase(1)  # caches every row under its first feedback
    swap = {"Lowest Toxicity": "Maximum Toxicity", "Maximum Toxicity": "Lowest Toxicity"}
    moved = [(swap.get(fb, fb), p, c, tr) for fb, p, c, tr in ROWS]
    rows = sorted(t.pool.rows(), key=lambda r: r.id)
    t.pool.set_feedback([r.id for r in rows], [0] * len(rows), [m[0] for m in moved])
    want, stale = kl_by_hand(t, True, rows=moved), kl_by_hand(t, True)
    assert abs(want - stale) > 20 * 1e-4 * want  # 20x the tolerance below: a stale entry would show
    stats = t.train_phase(1)
    t.pool.close()
    assert stats["reference_forward_rows"] == sum(m[0] != r[0] for m, r in zip(moved, ROWS))
    assert stats["kl"] == pytest.approx(want, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("share", ["true", "false"])
def test_a_cache_miss_runs_the_frozen_blocks_below_the_adapter_once(tmp_path, share):
    """share_frozen_layers: with LoRA on the top block of two and a conditioned reference, a row's first draw runs
    the bottom block once (in the policy's forward) instead of twice; the recorded KL is the by-hand one, when every
    row of the step is missing and when only the rows whose feedback moved are (their slice of the batch)."""
    t = trainer(
        tmp_path,
        "training_mode=lora",
        "lora_layers=0.5",
        "reference_input=conditioned",
        "reference_cache=true",
        f"share_frozen_layers={share}",
    )
    assert t.shared_layers == (1 if share == "true" else 0)
    fill_pool(t)
    perturb_adapter(t)
    rows_seen = []
    bottom = t.model.get_base_model().base_model.layers[0]

    def count_rows(module, args, kwargs, out):  # a packed batch (pack_rows) is one sequence holding every row
        mask = kwargs.get("attention_mask")
        rows_seen.append(len(mask.lengths) if isinstance(mask, models.PackedRows) else args[0].shape[0])

    handle = bottom.register_forward_hook(count_rows, with_kwargs=True)
    want = kl_by_hand(t, True)
    rows_seen.clear()
    stats = t.train_phase(1)
    assert stats["reference_forward_rows"] == len(ROWS)
    assert sum(rows_seen) == len(ROWS) * (1 if share == "true" else 2)
    assert stats["kl"] == pytest.approx(want, rel=1e-4, abs=1e-6)
    moved = [(fb.replace("Lowest", "Maximum") if i % 2 else fb, p, c, tr) for i, (fb, p, c, tr) in enumerate(ROWS)]
    t.pool.set_feedback(
        [r.id for r in sorted(t.pool.rows(), key=lambda r: r.id)], [0] * len(ROWS), [m[0] for m in moved]
    )
    want = kl_by_hand(t, True, rows=moved)
    stats = t.train_phase(1)
    handle.remove()
    t.pool.close()
    assert stats["reference_forward_rows"] == sum(m[0] != r[0] for m, r in zip(moved, ROWS)) == 1
    assert stats["kl"] == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_attention_key_reaches_the_model_and_the_kernels_train_alike(tmp_path):
    """attn_implementation: auto is, on CPU, grouped for a grouped-query Llama (tiny-smollm2: 4 query heads, 2
    key/value heads). One training step on left-padded rows of unequal lengths records the same loss terms, and moves
    the adapter alike, under grouped, eager and SDPA attention (fp32). Grouped and eager compute the same dot
    products, so their loss terms are equal bit for bit; their backward sums the heads of a group in another order."""
    runs = {}
    for choice in ("auto", "eager", "sdpa"):
        t = trainer(tmp_path / choice, "training_mode=lora", f"attn_implementation={choice}")
        want = models.GROUPED if choice == "auto" else choice
        assert t.model.get_base_model().config._attn_implementation == want
        fill_pool(t)
        perturb_adapter(t)
        before = {n: p.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad}
        stats = t.train_phase(1)
        t.pool.close()
        step = {n: p.detach() - before[n] for n, p in t.model.named_parameters() if p.requires_grad}
        runs[choice] = (stats, torch.cat([d.flatten() for d in step.values()]))
    (g, step_g), (e, step_e), (s, step_s) = runs["auto"], runs["eager"], runs["sdpa"]
    for k in ("loss", "nll", "kl"):
        assert g[k] == e[k], k
        assert e[k] == pytest.approx(s[k], rel=1e-5), k
    # AdamW's first step is about lr·sign(gradient): entries whose gradient is ~0 may flip, the step as a whole not
    assert (step_g - step_e).norm() < 1e-2 * step_e.norm()
    assert (step_e - step_s).norm() < 1e-2 * step_s.norm()


# ---------------------------------------------------------------- generate / eval load the trained weights
def embedding_rows(model, ids: list[int]) -> torch.Tensor:
    """The input embeddings the model actually uses for `ids` (through peft's trainable-token wrapper, if any)."""
    with torch.no_grad():
        return model.get_input_embeddings()(torch.tensor(ids)).float().clone()


@pytest.mark.parametrize(
    "mode, template",
    [("lora", "tag_separator"), ("lora", "quark"), ("full", "quark")],
    ids=["lora-separator", "lora-quark", "full-quark"],
)
def test_generate_and_eval_load_the_trained_weights(tmp_path, mode, template):
    t = trainer(
        tmp_path,
        f"training_mode={mode}",
        f"template={template}",
        "train_steps=3",
        "batch_size=4",
        "learning_rate=0.05",
        "eval_all_feedback=false",
    )
    words = t.cfg.feedback_words
    new_ids = t.added_ids
    init = embedding_rows(t.model, new_ids)
    t.train()
    t.model.eval()
    folder = t.run / "checkpoint"
    loaded, tok, meta = checkpoint.load(folder)  # what `altlm generate --run` and `altlm eval --run` call
    loaded.eval()
    assert meta["training_mode"] == mode and tok.convert_tokens_to_ids(t.template.new_tokens(words)[0]) == new_ids
    trained = embedding_rows(t.model, new_ids)
    if template == "quark":  # Quark's tokens are trained: their rows moved, and the checkpoint has the moved rows
        assert (trained - init).abs().amax(-1).min() > 1e-3
    else:  # the separator copies EOS and is not trained under LoRA
        assert torch.equal(trained, init)
    assert torch.allclose(embedding_rows(loaded, new_ids), trained, atol=1e-6)
    # Same logits on a conditioned input, for each feedback string: the whole trained model came back.
    base = checkpoint.base_model(meta, tok)
    for fb in words:
        ids = torch.tensor([t.template.input_ids(tok, fb, "The weather today is") + tok(" cold").input_ids])
        with torch.no_grad():
            mine, theirs, untrained = (m(input_ids=ids).logits.float() for m in (t.model, loaded, base))
        assert torch.allclose(mine, theirs, atol=1e-4), (fb, (mine - theirs).abs().max())
        assert (mine - untrained).abs().max() > 1e-2  # (training changed the model: the check above has teeth)


def test_altlm_generate_samples_from_the_trained_quark_rows(tmp_path):
    """The CLI end: `altlm generate --run` under a Quark token samples what the in-memory trained model samples."""
    from altlm.sampler import SampleSettings, inference_model, sample

    t = trainer(tmp_path, "training_mode=lora", "template=quark", "train_steps=3", "learning_rate=0.05")
    t.train()
    fb, prompt = t.cfg.feedback_words[0], "The weather today is"
    r = run_altlm(
        "generate",
        "--run",
        str(t.run),
        "--feedback",
        fb,
        "--json",
        "--seed",
        "3",
        "--max-new-tokens",
        "8",
        prompt,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    got = [json.loads(line)["completion"] for line in r.stdout.splitlines() if line.startswith("{")]
    meta = json.loads((t.run / "checkpoint" / "altlm.json").read_text())
    s = meta["sampling"]
    settings = SampleSettings(s["temperature"], s["top_p"], s["min_new_tokens"], 8, 64, s["max_prompt_tokens"])
    amp = models.autocast_dtype("auto", torch.device("cpu"))
    want = sample(inference_model(t.model, amp), t.tokenizer, t.template, [(fb, prompt)], settings, t.added_ids, seed=3)
    assert got == [want[0].completion]
    # and not what the untrained rows give (else the comparison above could not tell them apart)
    base = checkpoint.base_model(meta, t.tokenizer)
    untrained = sample(
        inference_model(base, amp), t.tokenizer, t.template, [(fb, prompt)], settings, t.added_ids, seed=3
    )
    assert untrained[0].completion != got[0]


# ---------------------------------------------------------------- top_fraction, lora_layers
def grad_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


def deeper_tiny(n_layers: int):
    """The tiny model's architecture with more blocks, so fractions have something to choose from."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(models.resolve("tiny-smollm2"))
    for k, v in {**models.TINY["tiny-smollm2"][1], "num_hidden_layers": n_layers}.items():
        setattr(config, k, v)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


@pytest.mark.parametrize(
    "fraction, top", [(0.3, [7, 8, 9]), (0.5, [5, 6, 7, 8, 9]), (0.05, [9]), (1.0, list(range(10)))]
)
def test_top_fraction_trains_the_top_blocks_norm_embeddings_and_head(fraction, top):
    model = models.prepare_for_training(deeper_tiny(10), "top_fraction", fraction, {}, [])
    names = grad_names(model)
    assert {layer_of(n) for n in names} - {None} == set(top)
    for i in top:  # every weight of a chosen block
        assert {n for n, _ in model.model.layers[i].named_parameters(prefix=f"model.layers.{i}")} <= names
    assert {"model.norm.weight", "model.embed_tokens.weight"} <= names
    assert model.get_output_embeddings().weight.requires_grad


@pytest.mark.parametrize("fraction, layers", [(0.25, [6, 7]), (0.5, [4, 5, 6, 7]), (1.0, list(range(8)))])
def test_lora_layers_puts_adapters_on_the_top_blocks_only(fraction, layers):
    lora = dict(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"], layers=fraction)
    model = models.prepare_for_training(deeper_tiny(8), "lora", 0.3, lora, [])
    names = grad_names(model)
    assert names and all("lora_" in n for n in names)
    assert {layer_of(n) for n in names} == set(layers)
    assert {n.split(".lora_")[0].rsplit(".", 1)[1] for n in names} == {"q_proj", "v_proj"}
    assert len(names) == 2 * 2 * len(layers)  # A and B of q_proj and v_proj in each chosen block


@pytest.mark.parametrize(
    "overrides, trained_layers",
    [(["training_mode=top_fraction", "top_fraction=1.0"], {0, 1}), (["training_mode=lora", "lora_layers=0.5"], {1})],
    ids=["top_fraction", "lora_layers"],
)
def test_a_training_phase_changes_exactly_the_configured_parameters(tmp_path, overrides, trained_layers):
    """Through the trainer (config → model → optimiser): after a step, what moved is what the config names. (The
    tiny model has 2 blocks: both values differ in effect from the defaults, top_fraction 0.3 and lora_layers 1.0.)"""
    t = trainer(tmp_path, *overrides, "learning_rate=0.01")
    fill_pool(t)
    if t.cfg.training_mode == "lora":
        perturb_adapter(t)  # B = 0 at the start gives A no gradient in the first step: nothing would move it
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    t.train_phase(1)
    t.pool.close()
    moved = {n for n, p in t.model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == grad_names(t.model) and moved
    assert {layer_of(n) for n in moved} - {None} == trained_layers


# ---------------------------------------------------------------- the default perplexity model
def test_gemma3_alias_loads_offline_and_gives_finite_perplexities(monkeypatch):
    from altlm.evaluation import Fluency

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    fl = Fluency("gemma3-270m")
    assert type(fl.model).__name__.startswith("Gemma3")
    prompts = ["The capital of France is", "She opened the door and"]
    fluent = [" Paris, a city on the Seine.", " walked into the garden."]
    noise = [" qz xv ploo wub wub 7 !!", " zebra carburettor of the of the"]
    ppl = fl.perplexities(prompts + prompts, fluent + noise)
    assert all(1.0 < p < 1e4 for p in ppl), ppl
    assert ppl[0] < ppl[2] and ppl[1] < ppl[3], ppl  # a real language model: fluent text is likelier than noise
    assert fl.perplexities(["x"], [""]) != fl.perplexities(["x"], [""])  # no tokens: NaN, not a number
