"""End to end through the CLI with the tiny model: train (full and LoRA), generate, refuse reruns (resume: test_resume.py).

Every run folder lives under pytest's tmp dirs; commands run with cwd there too. `threads=1`: the tiny model
is too small to gain from more threads, and on small CI runners extra threads only fight each other.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import run_altlm

from altlm.config import TOXICITY_WORDS
from altlm.feedback import quantile_buckets

SMALL = [
    "threads=1",
    "num_train_prompts=16",
    "num_eval_prompts=2",
    "prompts_per_iteration=6",
    "samples_per_prompt=2",
    "train_steps=2",
    "batch_size=4",
    "eval_samples_per_prompt=1",
    "max_new_tokens=8",
    "report=false",
]


def pool_rows(run: Path) -> list[dict]:
    db = sqlite3.connect(f"file:{run / 'pool.sqlite'}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    rows = [dict(r) for r in db.execute("SELECT * FROM samples ORDER BY id")]
    db.close()
    return rows


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def one_error_line(r, needle: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("altlm: ") and "Traceback" not in r.stderr, r.stderr
    assert needle in lines[0]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The shipped smoke recipe, 2 iterations, full fine-tuning."""
    base = tmp_path_factory.mktemp("smoke")
    run = base / "run"
    r = run_altlm("train", "--config", "smoke", f"output_dir={run}", "threads=1", cwd=base)
    assert r.returncode == 0, r.stderr[-4000:]
    return base, run, r


def test_smoke_summary(smoke):
    _, run, r = smoke
    s = json.loads((run / "summary.json").read_text())
    for k in ("wall_seconds", "metric", "exemplar", "reference", "final", "steerability", "iterations", "reduction"):
        assert k in s
    assert s["metric"] == "toxicity" and s["exemplar"] == "Lowest Toxicity"
    assert s["wall_seconds"] > 0
    for block in (s["reference"], s["final"]):
        assert 0.0 <= block["toxicity_mean"] <= 1.0
        assert 0.0 <= block["toxicity_gt_0_5"] <= 1.0
    assert list(s["final"]["by_feedback"]) == TOXICITY_WORDS
    assert list(s["reference"]["by_feedback"]) == TOXICITY_WORDS
    for d in s["final"]["by_feedback"].values():
        assert 0.0 <= d["toxicity_mean"] <= 1.0
    # the summary's final numbers are the exemplar's row
    assert s["final"]["toxicity_mean"] == s["final"]["by_feedback"]["Lowest Toxicity"]["toxicity_mean"]
    assert [it["iteration"] for it in s["iterations"]] == [1, 2]
    # the noise-free check ran on every scored reference evaluation sample (6 conditions × prompts × k)
    ls = s["likelihood_steer"]
    n_ref = sum(1 for e in jsonl(run / "eval_samples.jsonl") if e["model"] == "reference" and e["completion"])
    assert (ls["best"], ls["worst"], ls["n"]) == ("Lowest Toxicity", "Maximum Toxicity", n_ref) and n_ref >= 3
    assert ls["spearman"] is None or -1.0 <= ls["spearman"] <= 1.0
    assert ls["spearman"] is None or f"likelihood check on {n_ref} fixed reference texts" in r.stdout
    assert "toxicity" in r.stdout  # the table was printed
    state = json.loads((run / "state.json").read_text())
    assert (state["iteration_done"], state["finished"]) == (2, True)


def test_smoke_metrics(smoke):
    _, run, _ = smoke
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    recs = jsonl(run / "metrics.jsonl")
    steps = [x for x in recs if x["kind"] == "step"]
    evals = [x for x in recs if x["kind"] == "eval"]
    assert len(steps) == cfg["iterations"] * cfg["train_steps"]
    assert [(x["iteration"], x["step"]) for x in steps] == [(i, j) for i in (1, 2) for j in range(cfg["train_steps"])]
    for x in steps:
        assert x["tokens"] > 0 and x["nll"] > 0 and x["entropy"] > 0 and x["kl"] >= 0 and x["lr"] >= 0
    assert [(e["iteration"], e["model"]) for e in evals] == [(0, "reference"), (1, "policy"), (2, "policy")]
    assert set(evals[0]["by_feedback"]) == {"<none>", *TOXICITY_WORDS}
    assert set(evals[1]["by_feedback"]) == {"Lowest Toxicity"}
    assert set(evals[2]["by_feedback"]) == {"<none>", *TOXICITY_WORDS}
    n = cfg["num_eval_prompts"] * cfg["eval_samples_per_prompt"]
    assert all(v["n"] == n for e in evals for v in e["by_feedback"].values())
    assert evals[2]["pool_size"] == cfg["iterations"] * cfg["prompts_per_iteration"] * cfg["samples_per_prompt"]


def test_smoke_pool(smoke):
    _, run, _ = smoke
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    rows = pool_rows(run)
    assert len(rows) == cfg["iterations"] * cfg["prompts_per_iteration"] * cfg["samples_per_prompt"] == 96
    assert Counter(r["iteration"] for r in rows) == {1: 48, 2: 48}
    assert {r["bucket"] for r in rows} == set(range(5))
    assert all(r["feedback"] == TOXICITY_WORDS[r["bucket"]] for r in rows)
    assert all(r["dropped_at"] is None and r["valid"] == 1 for r in rows)
    assert all(0.0 <= r["score"] <= 1.0 for r in rows)
    assert all(r["completion_tokens"] <= cfg["max_new_tokens"] and r["prompt_tokens"] > 0 for r in rows)
    # the stored buckets are the global quantiles of the stored scores, lower toxicity = better
    assert [r["bucket"] for r in rows] == quantile_buckets([r["score"] for r in rows], 5, higher_is_better=False)
    # samples_per_prompt completions per drawn prompt and iteration
    per = Counter((r["iteration"], r["prompt_id"]) for r in rows)
    assert set(per.values()) == {cfg["samples_per_prompt"]}
    # evaluation prompts are never trained on
    eval_prompts = {e["prompt"] for e in jsonl(run / "eval_samples.jsonl")}
    assert len(eval_prompts) == cfg["num_eval_prompts"]
    assert not eval_prompts & {r["prompt"] for r in rows}


def test_smoke_checkpoint(smoke):
    _, run, _ = smoke
    ck = run / "checkpoint"
    meta = json.loads((ck / "altlm.json").read_text())
    assert meta["model"] == "tiny-smollm2" and meta["training_mode"] == "full" and meta["iteration"] == 2
    assert meta["exemplar"] == "Lowest Toxicity" and meta["feedback_words"] == TOXICITY_WORDS
    assert meta["template"]["style"] == "tag_separator"
    assert (ck / "model.safetensors").exists() and (ck / "config.json").exists()
    assert "<|separator|>" in (ck / "tokenizer.json").read_text()
    assert not any(p.name.startswith(".") for p in run.iterdir())  # no temp folder left behind


def test_generate_json(smoke):
    base, run, _ = smoke
    r = run_altlm(
        "generate", "--run", str(run), "--json", "--samples", "2", "some prompt", "Another prompt here", cwd=base
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = [json.loads(line) for line in r.stdout.splitlines()]  # every stdout line is JSON
    assert [o["prompt"] for o in out] == ["some prompt"] * 2 + ["Another prompt here"] * 2
    assert all(set(o) == {"prompt", "feedback", "completion"} for o in out)
    assert all(o["feedback"] == "Lowest Toxicity" for o in out)  # the run's exemplar
    assert all(isinstance(o["completion"], str) and o["completion"].strip() for o in out)
    assert all("<|separator|>" not in o["completion"] for o in out)


def in_process_generate(run: Path, feedback: str | None, prompt: str, max_new_tokens: int, base: bool = False) -> str:
    """What `altlm generate --run RUN` (seed 0) should print for one prompt, redone here: the checkpoint's trained
    model, or (`base`) the untrained base model with the same tokens added, under the run's template."""
    from altlm import checkpoint, models
    from altlm.sampler import SampleSettings, inference_model, sample
    from altlm.template import Template

    model, tok, meta = checkpoint.load(run / "checkpoint")
    if base:
        model = checkpoint.base_model(meta, tok)
    template, s = Template(**meta["template"]), meta["sampling"]
    settings = SampleSettings(
        s["temperature"], s["top_p"], s["min_new_tokens"], max_new_tokens, 64, s["max_prompt_tokens"]
    )
    suppress = tok.convert_tokens_to_ids(template.new_tokens(meta["feedback_words"])[0])
    dtype = models.autocast_dtype("auto", model.device)  # as generate: bf16 on CPUs with fast bf16 matmuls
    (out,) = sample(inference_model(model, dtype), tok, template, [(feedback, prompt)], settings, suppress, seed=0)
    return out.completion


def test_generate_with_feedback(smoke):
    """--feedback conditions what is generated, with the trained weights: the CLI prints exactly what the trained
    model samples under that feedback, which differs from what it samples under the exemplar or with no feedback."""
    base, run, _ = smoke
    r = run_altlm(
        "generate",
        "--run",
        str(run),
        "--json",
        "--feedback",
        "Maximum Toxicity",
        "--max-new-tokens",
        "5",
        "some prompt",
        cwd=base,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (o,) = [json.loads(line) for line in r.stdout.splitlines()]
    assert o["feedback"] == "Maximum Toxicity" and o["prompt"] == "some prompt" and o["completion"].strip()
    assert o["completion"] == in_process_generate(run, "Maximum Toxicity", "some prompt", 5)
    assert o["completion"] != in_process_generate(run, "Lowest Toxicity", "some prompt", 5)
    assert o["completion"] != in_process_generate(run, None, "some prompt", 5)
    assert o["completion"] != in_process_generate(run, "Maximum Toxicity", "some prompt", 5, base=True)


def test_rerun_same_output_dir_is_refused(smoke):
    base, run, _ = smoke
    before = (run / "metrics.jsonl").read_text()
    r = run_altlm("train", "--config", "smoke", f"output_dir={run}", "threads=1", cwd=base)
    one_error_line(r, "already holds a run")
    assert "--resume" in r.stderr
    assert (run / "metrics.jsonl").read_text() == before  # untouched


def test_resume_finished_run_is_refused(smoke):
    base, run, _ = smoke
    r = run_altlm("train", "--resume", str(run), cwd=base)
    one_error_line(r, "already finished")


def test_lora_run_and_generate(tmp_path):
    run = tmp_path / "lora"
    r = run_altlm(
        "train", "--config", "smoke", f"output_dir={run}", "training_mode=lora", "iterations=1", *SMALL, cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr[-4000:]
    ck = run / "checkpoint"
    assert (ck / "adapter_model.safetensors").exists() and (ck / "adapter_config.json").exists()
    assert not (ck / "model.safetensors").exists()  # an adapter, not a full copy
    assert json.loads((ck / "altlm.json").read_text())["training_mode"] == "lora"
    from safetensors.torch import load_file

    adapter = load_file(ck / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: the adapter was trained
    assert len(pool_rows(run)) == 6 * 2
    g = run_altlm(
        "generate", "--run", str(run), "--json", "--feedback", "Maximum Toxicity", "hello there", cwd=tmp_path
    )
    assert g.returncode == 0, g.stderr[-3000:]
    (o,) = [json.loads(line) for line in g.stdout.splitlines()]
    assert o["prompt"] == "hello there" and o["feedback"] == "Maximum Toxicity" and o["completion"].strip()
    # the adapter is applied: the trained model's sample, not the base model's (LoRA trains no embeddings here)
    max_new = json.loads((ck / "altlm.json").read_text())["sampling"]["max_new_tokens"]
    assert o["completion"] == in_process_generate(run, "Maximum Toxicity", "hello there", max_new)
    assert o["completion"] != in_process_generate(run, "Maximum Toxicity", "hello there", max_new, base=True)


def test_train_draw_by_bucket_trains_every_feedback_string_alike(tmp_path):
    """train_draw=by_bucket reaches the trainer: each iteration trains every bucket equally often (the iteration
    summary counts the drawn rows per bucket); the uniform default on the same settings does not."""
    run = tmp_path / "r"
    args = [f"output_dir={run}", "train_draw=by_bucket", "train_steps=3", "batch_size=5", *SMALL[:5], *SMALL[7:]]
    r = run_altlm("train", "--config", "smoke", *args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    plan = run_altlm("train", "--config", "smoke", *args, "--dry-run", cwd=tmp_path).stdout
    assert "train_draw: by_bucket" in plan and "equal draws per feedback string" in plan
    its = json.loads((run / "summary.json").read_text())["iterations"]
    assert [x["train"]["examples_per_bucket"] for x in its] == [[3] * 5, [3] * 5]
    # the uniform default on the same run's settings: the counts follow the pool, not 3 apiece
    other = tmp_path / "u"
    uniform = [f"output_dir={other}", *args[2:]]  # the same keys without train_draw
    assert run_altlm("train", "--config", "smoke", *uniform, cwd=tmp_path).returncode == 0
    its = json.loads((other / "summary.json").read_text())["iterations"]
    assert sum(x["train"]["examples_per_bucket"] != [3] * 5 for x in its) >= 1


def test_run_without_all_feedback_eval(tmp_path):
    run = tmp_path / "r"
    r = run_altlm(
        "train",
        "--config",
        "smoke",
        f"output_dir={run}",
        "iterations=1",
        "eval_all_feedback=false",
        *SMALL,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    # the reference is evaluated unconditioned, the trained model under the exemplar only, never the other words
    evals = [x for x in jsonl(run / "metrics.jsonl") if x["kind"] == "eval"]
    assert [(e["iteration"], e["model"]) for e in evals] == [(0, "reference"), (1, "policy")]
    assert set(evals[0]["by_feedback"]) == {"<none>"}
    assert set(evals[1]["by_feedback"]) == {"Lowest Toxicity"}
    assert {e["feedback"] for e in jsonl(run / "eval_samples.jsonl")} == {None, "Lowest Toxicity"}
    s = json.loads((run / "summary.json").read_text())
    assert list(s["final"]["by_feedback"]) == ["Lowest Toxicity"]


def test_reference_model_is_the_baseline(tmp_path):
    from altlm import models

    other = tmp_path / "other-tiny"  # a different tiny model (another seed), saved as a local folder
    models.load_model("tiny-smollm2", seed=1).save_pretrained(other)
    models.load_tokenizer("tiny-smollm2").save_pretrained(other)
    a, b = tmp_path / "a", tmp_path / "b"
    r = run_altlm(
        "train",
        "--config",
        "smoke",
        f"output_dir={a}",
        f"reference_model={other}",
        "iterations=1",
        *SMALL,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_altlm(
        "train", "--config", "smoke", f"output_dir={b}", f"model={other}", "iterations=1", *SMALL, cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr[-3000:]

    def reference_untagged(run):
        return [
            (e["prompt"], e["completion"])
            for e in jsonl(run / "eval_samples.jsonl")
            if e["model"] == "reference" and e["feedback"] is None
        ]

    # same prompts, same sampling seed: the baseline of run a must be the model `other`, as in run b
    assert reference_untagged(a) == reference_untagged(b)


def test_seed_pool_adds_scored_human_continuations_as_iteration_zero(tmp_path):
    import sqlite3

    out = tmp_path / "seeded"
    r = run_altlm(
        "train",
        "--config",
        "smoke",
        f"output_dir={out}",
        "seed_pool=true",
        "iterations=1",
        "eval_all_feedback=false",
        "threads=1",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    db = sqlite3.connect(out / "pool.sqlite")
    n0, scored, words = db.execute(
        "SELECT COUNT(*), COUNT(score), COUNT(DISTINCT feedback) FROM samples WHERE iteration = 0"
    ).fetchone()
    assert n0 == 48 and scored == 48  # one per training prompt of the smoke recipe
    assert words >= 2  # bucketed together with the sampled rows


def test_smoke_run_writes_its_report_and_pool_records(smoke):
    _, run, _ = smoke
    text = (run / "report.md").read_text()
    for png in ("iterations.png", "pool.png", "steerability.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png})" in text
    pools = [x for x in jsonl(run / "metrics.jsonl") if x["kind"] == "iteration"]
    assert [p["iteration"] for p in pools] == [1, 2]
    for p in pools:
        assert sum(p["bucket_counts"]) == p["pool_size"]
        assert sum(p["new_bucket_distribution"]) == pytest.approx(1.0)


def perplexity_by_hand(scorer: str, prompt: str, completion: str) -> float:
    """The fluency number for one sample: exp(−mean log p(completion | BOS + prompt)) under the scoring LM, prompt
    and completion tokenised apart, one unpadded fp32 forward pass."""
    import math

    import torch

    from altlm import models

    tok, model = models.load_tokenizer(scorer), models.load_model(scorer).eval()
    p = [tok.bos_token_id] * (tok.bos_token_id is not None) + tok(prompt, add_special_tokens=False).input_ids
    c = tok(completion, add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1 : -1].float()
    return math.exp(-torch.log_softmax(logits, -1)[range(len(c)), c].mean().item())


def test_eval_run_reference_and_final(smoke, tmp_path):
    import shutil

    from altlm.metrics import perplexity_mean

    base, shared, _ = smoke
    run = shutil.copytree(shared, tmp_path / "run")  # eval.json and the report are written into the run: a copy's
    r = run_altlm(
        "eval",
        "--run",
        str(run),
        "--num-prompts",
        "4",
        "--samples-per-prompt",
        "3",
        "--steer-samples-per-prompt",
        "1",
        "--perplexity-model",
        "tiny-smollm2",
        cwd=base,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ev = json.loads((run / "eval.json").read_text())
    assert ev["prompts"] == 4 and ev["metric"] == "toxicity" and ev["perplexity_model"] == "tiny-smollm2"
    assert list(ev["results"]) == ["reference", "final"]
    assert list(ev["results"]["reference"]) == ["<none>"]
    assert list(ev["results"]["final"]) == TOXICITY_WORDS  # the exemplar first, then every other feedback
    keys = {
        "avg_max_toxicity",
        "toxicity_prob",
        "toxicity_mean",
        "perplexity",
        "dist_1",
        "dist_2",
        "dist_3",
        "reward_mean",
        "length_mean",
        "truncated_share",
    }
    for model, blocks in ev["results"].items():
        for fb, b in blocks.items():
            assert keys <= set(b)
            assert b["samples_per_prompt"] == (3 if fb in ("<none>", "Lowest Toxicity") else 1)
            assert b["n"] == 4 * b["samples_per_prompt"]
            assert b["reward_mean"] == pytest.approx(1 - b["toxicity_mean"])
            assert b["perplexity"] is None or b["perplexity"] > 1  # a random tiny model: huge perplexities are dropped
    st = ev["steerability"]
    assert st["model"] == "final" and st["feedback"] == TOXICITY_WORDS and st["metric"] == "toxicity_mean"
    blocks = ev["results"]["final"]
    assert st["gap"] == pytest.approx(
        blocks["Maximum Toxicity"]["toxicity_mean"] - blocks["Lowest Toxicity"]["toxicity_mean"]
    )
    samples = jsonl(run / "eval.samples.jsonl")
    assert len(samples) == 4 * 3 + 4 * 3 + 4 * 4 * 1
    # a block's fluency is the capped mean of its samples' perplexities (here all over the 1e4 cap: None; a scoring
    # LM with perplexities under the cap: test_eval_fluency_end_to_end_under_the_cap)
    for model, blocks in ev["results"].items():
        for fb, b in blocks.items():
            mine = [e["perplexity"] for e in samples if e["model"] == model and (e["feedback"] or "<none>") == fb]
            want = perplexity_mean([x for x in mine if x is not None])
            assert b["perplexity"] == (None if want != want else pytest.approx(want))
    assert "avg max toxicity" in r.stdout and "wrote" in r.stdout
    # the eval table then shows up in the report
    assert run_altlm("report", str(run), cwd=base).returncode == 0
    assert "`altlm eval` (4 prompts" in (run / "report.md").read_text()


def test_eval_no_reference_evaluates_the_trained_model_only(smoke, tmp_path):
    import shutil

    base, shared, _ = smoke
    run = shutil.copytree(shared, tmp_path / "run")
    r = run_altlm(
        "eval",
        "--run",
        str(run),
        "--num-prompts",
        "2",
        "--samples-per-prompt",
        "1",
        "--steer-samples-per-prompt",
        "1",
        "--perplexity-model",
        "none",
        "--no-reference",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ev = json.loads((run / "eval.json").read_text())
    assert list(ev["results"]) == ["final"] and list(ev["results"]["final"]) == TOXICITY_WORDS
    assert {e["model"] for e in jsonl(run / "eval.samples.jsonl")} == {"final"}


def test_eval_fluency_end_to_end_under_the_cap(tmp_path):
    """A random tiny model's perplexities (~5×10⁴) are all over the 1e4 cap, so its fluency is always None. Here the
    evaluated model and the scoring LM are one *peaked* tiny model (its final norm ×30: it all but always picks its
    top token), so the completions it samples have perplexities near 1 under it: the numbers `altlm eval` reports
    are checked against a hand computation, and the block's fluency is their mean."""
    from altlm import models
    from altlm.metrics import perplexity_mean

    peaked = tmp_path / "peaked-tiny"
    model = models.load_model("tiny-smollm2", seed=0)
    model.model.norm.weight.data *= 30
    model.save_pretrained(peaked)
    models.load_tokenizer("tiny-smollm2").save_pretrained(peaked)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hello there"}\n{"prompt": "You are a"}\n')
    r = run_altlm(
        "eval",
        "--model",
        str(peaked),
        "--prompts",
        str(prompts),
        "--samples-per-prompt",
        "2",
        "--perplexity-model",
        str(peaked),
        "--out",
        "e.json",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ev = json.loads((tmp_path / "e.json").read_text())
    (block,) = ev["results"][str(peaked)].values()
    samples = jsonl(tmp_path / "e.samples.jsonl")
    ppl = [e["perplexity"] for e in samples]
    assert len(ppl) == 4 and all(p is not None and 1 <= p < 10 for p in ppl), ppl
    for e in samples:  # (the CLI may score in bf16 where the CPU has fast bf16 matmuls: a loose tolerance)
        assert e["perplexity"] == pytest.approx(perplexity_by_hand(str(peaked), e["prompt"], e["completion"]), rel=0.1)
    assert block["perplexity"] == pytest.approx(perplexity_mean(ppl))


def test_eval_plain_model_on_a_prompt_file(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hello there"}\n{"prompt": "You are a"}\n')
    r = run_altlm(
        "eval",
        "--model",
        "tiny-smollm2",
        "--prompts",
        str(prompts),
        "--samples-per-prompt",
        "2",
        "--perplexity-model",
        "none",
        "--out",
        "out/e.json",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ev = json.loads((tmp_path / "out" / "e.json").read_text())
    (block,) = ev["results"]["tiny-smollm2"].values()
    assert block["n"] == 4 and block["perplexity"] is None
    assert ev["steerability"]["spearman_rho"] is None


def test_eval_bad_input(smoke, tmp_path):
    base, run, _ = smoke
    one_error_line(run_altlm("eval", "--run", str(tmp_path / "nope"), cwd=tmp_path), "not an altlm run folder")
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.yaml").write_text((run / "config.yaml").read_text())
    one_error_line(run_altlm("eval", "--run", str(half), cwd=tmp_path), "has no checkpoint/")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\nnot json\n')
    one_error_line(run_altlm("eval", "--run", str(run), "--prompts", str(bad), cwd=tmp_path), "line 2 is not JSON")
    bad = tmp_path / "bad.json"
    bad.write_text('{"prompt": "a dict, not a list"}')
    one_error_line(run_altlm("eval", "--run", str(run), "--prompts", str(bad), cwd=tmp_path), "must hold a list")
    one_error_line(
        run_altlm("eval", "--model", "tiny-smollm2", "--feedback", "x", cwd=tmp_path), "--feedback needs --run"
    )


def test_fine_tune_only_control_never_conditions(tmp_path):
    from altlm import models
    from altlm.template import Template

    run = tmp_path / "control"
    r = run_altlm(
        "train", "--config", "smoke", f"output_dir={run}", "use_feedback=false", "iterations=2", *SMALL, cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr[-3000:]
    tok = models.load_tokenizer("tiny-smollm2")
    plain = lambda row: len(Template().input_ids(tok, None, row["prompt"]))  # noqa: E731
    # iteration 2 samples the policy without the exemplar: inputs are the bare prompts, as in iteration 1
    assert all(row["prompt_tokens"] == plain(row) for row in pool_rows(run) if row["iteration"] == 2)
    ok = tmp_path / "alt"
    r = run_altlm("train", "--config", "smoke", f"output_dir={ok}", "iterations=2", *SMALL, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert all(row["prompt_tokens"] > plain(row) for row in pool_rows(ok) if row["iteration"] == 2)


def test_report_to_tensorboard_writes_event_files(tmp_path):
    run = tmp_path / "tb"
    r = run_altlm(
        "train", "--config", "smoke", f"output_dir={run}", "report_to=tensorboard", "iterations=1", *SMALL, cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr[-3000:]
    events = list((run / "trackers").rglob("events.out.tfevents.*"))
    assert events and sum(e.stat().st_size for e in events) > 200  # steps and evaluations were logged


def test_report_to_a_missing_logger_is_one_line(tmp_path):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    r = run_altlm("train", "--config", "smoke", f"output_dir={tmp_path / 'w'}", "report_to=wandb", *SMALL, cwd=tmp_path)
    one_error_line(r, "pip install wandb")
    assert not (tmp_path / "w").exists()  # refused before any work
