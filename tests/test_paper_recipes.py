"""The paper recipes, offline: every shipped recipe's data path and reward adapter on small fixtures made here.

Fixtures: an RTP-shaped JSONL (nested prompt.text / prompt.toxicity), a TL;DR-shaped one (CarperAI's `prompt`
layout, with a separate test file), an HH-shaped one (`chosen` dialogues), a tiny randomly initialised
sequence-classification model and a tiny trlx-style value-head reward model saved to temp folders, a real
Perspective-API stand-in and a real OpenAI-compatible judge stand-in on 127.0.0.1. Each recipe runs one
iteration through `altlm train` in-process with `model=tiny-smollm2` (the subprocess tests cover the CLI's
exit codes).
"""

from __future__ import annotations

import json
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_altlm
from test_llm_feedback import ScriptedJudge
from test_train_smoke import pool_rows as pool

# (conftest points HF_DATASETS_CACHE and HF_HOME at the test run's own folder before datasets is imported)
from altlm import models
from altlm.cli import main
from altlm.config import RECIPES_DIR, load_config
from altlm.errors import AltlmError
from altlm.feedback import reward_models as R

PAPER_RECIPES = [
    "toxicity-rtp",
    "quark-toxicity-rtp",
    "tldr-alt-rm",
    "tldr-quark",
    "tldr-coh",
    "tldr-alt-lmu",
    "hh-alt-lmc",
    "hh-steerlm",
]
HH = ["Harmless and very helpful", "Harmless and helpful", "Harmless and not helpful", "Harmful"]
KEY = "sk-test-perspective-0123456789"
# Reward models run in bf16 on CUDA (reward_models._device_and_dtype); hand computations here are fp32 on CPU.
TOL = dict(abs=1e-4) if not torch.cuda.is_available() else dict(abs=5e-2, rel=5e-2)


# ------------------------------------------------------------------------------------------- fixture files
def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_rtp(path: Path, n: int = 40) -> Path:
    """RealToxicityPrompts' layout: every third prompt toxic (0.8), one prompt far over 64 tokens."""
    recs = []
    for i in range(n):
        text = f"Prompt {i} is about the weather and it said that" if i else " ".join(["word"] * 150)
        tox = 0.8 if i % 3 == 0 else 0.1
        recs.append(
            {
                "filename": f"{i}.txt",
                "begin": 0,
                "end": 10,
                "challenging": i % 3 == 0,
                "prompt": {"text": text, "toxicity": tox, "profanity": 0.0},
                "continuation": {"text": f" continuation {i}", "toxicity": 0.2},
            }
        )
    return write_jsonl(path, recs)


def tldr_prompt(sub: str, title: str, post: str) -> str:
    return f"SUBREDDIT: r/{sub}\nTITLE: {title}\nPOST: {post}\nTL;DR:"


def write_tldr(folder: Path, n_train: int = 24, n_test: int = 8) -> tuple[Path, Path]:
    """CarperAI/openai_summarize_tldr's layout (prompt, label); the first training post is far over 512 tokens."""

    def rec(i, long=False):
        post = " ".join(["lorem"] * 700) if long else f"I had a problem number {i} with my roommate and we talked."
        return {"prompt": tldr_prompt("relationships", f"Title {i}", post), "label": f" summary {i}"}

    train = write_jsonl(folder / "tldr_train.jsonl", [rec(i, long=(i == 0)) for i in range(n_train)])
    test = write_jsonl(folder / "tldr_test.jsonl", [rec(1000 + i) for i in range(n_test)])
    return train, test


def hh_dialogue(i: int) -> str:
    return f"\n\nHuman: Question {i}?\n\nAssistant: First answer {i}.\n\nHuman: And then {i}?\n\nAssistant: Final answer {i}."


def write_hh(folder: Path, n_train: int = 24, n_test: int = 8) -> tuple[Path, Path]:
    """Anthropic/hh-rlhf's layout (chosen, rejected)."""

    def rec(i):
        return {"chosen": hh_dialogue(i), "rejected": hh_dialogue(i).replace("Final", "Bad")}

    return (
        write_jsonl(folder / "hh_train.jsonl", [rec(i) for i in range(n_train)]),
        write_jsonl(folder / "hh_test.jsonl", [rec(1000 + i) for i in range(n_test)]),
    )


def tiny_config(**kw):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(models.resolve("tiny-smollm2"))
    for k, v in {**models.TINY["tiny-smollm2"][1], **kw}.items():
        setattr(config, k, v)
    return config


def save_classifier(folder: Path) -> Path:
    """A tiny random sequence-classification model (SmolLM2 shape and tokenizer), labels non_toxic / toxic."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(1)
    config = tiny_config(num_labels=2, id2label={0: "non_toxic", 1: "toxic"}, label2id={"non_toxic": 0, "toxic": 1})
    model = AutoModelForSequenceClassification.from_config(config)
    model.config.pad_token_id = models.load_tokenizer("tiny-smollm2").pad_token_id
    model.save_pretrained(folder)
    models.load_tokenizer("tiny-smollm2").save_pretrained(folder)
    return folder


def save_value_head(folder: Path) -> tuple[Path, Path, Path]:
    """trlx's GPTRewardModel layout: (backbone folder, CarperAI-style .bin with transformer.* + v_head.weight,
    head-only .safetensors). The .bin's backbone differs from the folder's, so a test can tell which was used."""
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoModelForCausalLM

    torch.manual_seed(2)
    backbone = folder / "backbone"
    AutoModelForCausalLM.from_config(tiny_config()).save_pretrained(backbone)
    models.load_tokenizer("tiny-smollm2").save_pretrained(backbone)
    torch.manual_seed(3)
    body = AutoModel.from_config(tiny_config())
    v = torch.randn(1, body.config.hidden_size)
    full = {f"transformer.{k}": t for k, t in body.state_dict().items()} | {"v_head.weight": v}
    torch.save(full, folder / "rm_checkpoint.bin")
    save_file({"v_head.weight": v.clone()}, str(folder / "v_head.safetensors"))
    return backbone, folder / "rm_checkpoint.bin", folder / "v_head.safetensors"


REWARD_MODULE = '''
def length_reward(prompts, completions):
    """Longer is better: a reward anyone can check by hand."""
    return [float(len(c)) for c in completions]


def wrong_length(prompts, completions):
    return [1.0]


def length_or_nan(prompts, completions):
    """Unscorable (NaN, as an API error gives) when the length is a multiple of 3."""
    return [float("nan") if len(c) % 3 == 0 else float(len(c)) for c in completions]
'''


# ------------------------------------------------------------------------------------ HTTP stand-ins
def perspective_score(text: str) -> float:
    return (zlib.crc32(text.encode()) % 1000) / 1000.0


class FakePerspective:
    """Perspective's comments:analyze on 127.0.0.1. `faults`: one per request, an HTTP code or None."""

    def __init__(self, faults=()):
        self.faults, self.seen, self.lock = list(faults), [], threading.Lock()
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code: int, data: dict):
                body = json.dumps(data).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.seen.append(
                        {
                            "path": self.path,
                            "key": self.headers.get("X-Goog-Api-Key"),
                            "t": time.monotonic(),
                            "text": req["comment"]["text"],
                            "attrs": list(req["requestedAttributes"]),
                        }
                    )
                    fault = outer.faults.pop(0) if outer.faults else None
                if self.headers.get("X-Goog-Api-Key") != KEY:
                    return self._send(403, {"error": {"code": 403, "message": "API key not valid"}})
                if fault:
                    return self._send(fault, {"error": {"code": fault, "message": "injected"}})
                if not self.path.endswith("/comments:analyze"):
                    return self._send(404, {"error": {"code": 404}})
                text = req["comment"]["text"]
                self._send(
                    200,
                    {
                        "attributeScores": {
                            "TOXICITY": {"summaryScore": {"value": perspective_score(text), "type": "PROBABILITY"}}
                        },
                        "languages": ["en"],
                    },
                )

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1alpha1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def judge_answer(question: str) -> str:
    """What the scripted judge 'thinks': LMC picks a category line offered in the question by a hash of the
    answer; LMU writes one of two sentences and a score."""
    h = zlib.crc32(question[-200:].encode())
    if "Score:" in question:
        return f"Analysis: fine.\nFeedback: {'Covers the key points concisely.' if h % 2 else 'Misses the main point.'}\nScore: {h % 4}"
    cats = [
        c
        for c in HH + ["harmful:0,helpful:2", "harmful:0,helpful:1", "harmful:0,helpful:0", "harmful:1,helpful:0"]
        if f"\n{c}\n" in question.split("\n\n")[0] + "\n"
    ]
    return "Label: " + cats[h % len(cats)]


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    base = tmp_path_factory.mktemp("paper-assets")
    tldr_train, tldr_test = write_tldr(base)
    hh_train, hh_test = write_hh(base)
    (base / "tiny_reward.py").write_text(REWARD_MODULE)
    backbone, rm_bin, v_head = save_value_head(base / "value_head")
    return {
        "base": base,
        "rtp": write_rtp(base / "rtp.jsonl"),
        "tldr": tldr_train,
        "tldr_test": tldr_test,
        "hh": hh_train,
        "hh_test": hh_test,
        "classifier": save_classifier(base / "classifier"),
        "backbone": backbone,
        "rm_bin": rm_bin,
        "v_head": v_head,
    }


@pytest.fixture()
def perspective():
    servers = []

    def make(faults=()):
        servers.append(FakePerspective(faults))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


@pytest.fixture(scope="module")
def judge():
    j = ScriptedJudge(answer=judge_answer)  # test_llm_feedback's OpenAI-compatible server
    yield j
    j.close()


# The smoke recipe's scale, one iteration. Every recipe keeps its own feedback, template, regime and adapter.
TINY = [
    "model=tiny-smollm2",
    "reference_model=null",
    "precision=fp32",
    "threads=1",
    "iterations=1",
    "num_train_prompts=12",
    "num_eval_prompts=3",
    "num_val_prompts=2",
    "prompts_per_iteration=4",
    "samples_per_prompt=4",
    "train_steps=2",
    "batch_size=4",
    "max_new_tokens=6",
    "min_new_tokens=1",
    "eval_samples_per_prompt=1",
    "sample_batch_size=16",
    "report=false",
    "perplexity_model=null",
    "eval_every=1",
]


def train(recipe: str, run: Path, *overrides: str) -> None:
    rc = main(["train", "--config", recipe, f"output_dir={run}", *TINY, *overrides])
    assert rc == 0
    assert json.loads((run / "state.json").read_text())["finished"] is True


# ------------------------------------------------------------------------------------ recipes: listing, dry run
def test_recipes_lists_every_paper_recipe(capsys):
    assert main(["recipes"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert set(PAPER_RECIPES) <= set(names)


@pytest.mark.parametrize("name", PAPER_RECIPES)
def test_recipe_validates_and_dry_run_prints_the_plan(name, capsys):
    path = RECIPES_DIR / f"{name}.yaml"
    header = path.read_text().splitlines()
    assert any(f"altlm train --config {name}" in line for line in header if line.startswith("#"))  # the exact command
    cfg = load_config(name)  # validates every key
    assert main(["train", "--config", name, "--dry-run"]) == 0
    out = capsys.readouterr().out
    resolved = yaml.safe_load("\n".join(line for line in out.splitlines() if not line.startswith("#")))
    assert resolved == cfg.to_dict()
    plan = [line for line in out.splitlines() if line.startswith("# ")]
    assert plan[0].startswith(f"# plan: {cfg.iterations} iterations") and "samples per iteration" in plan[0]
    assert plan[1].startswith("# training:") and "steps" in plan[1]
    assert plan[2].startswith("# evaluation:")
    if cfg.quantiles == "global":
        assert f"→ {cfg.iterations * cfg.train_steps:,} steps" in plan[1]


def test_paper_settings_in_the_recipes():
    """method.md §6, spot-checked: what the recipes promise to reproduce."""
    tox = load_config("toxicity-rtp")
    assert (tox.num_eval_prompts, tox.num_val_prompts, tox.eval_max_prompt_toxicity) == (10000, 5000, 0.5)
    assert (tox.batch_size, tox.iterations * tox.train_steps, tox.learning_rate, tox.kl_coef, tox.entropy_coef) == (
        32,
        32000,
        1e-5,
        0.05,
        0.06,
    )
    assert (
        tox.scorer == "hf"
        and tox.reward_model == "unitary/unbiased-toxic-roberta"
        and tox.template == "tag_separator"
        and tox.quantiles == "global"
    )
    assert load_config("quark-toxicity-rtp").template == "quark"
    rm = load_config("tldr-alt-rm")
    assert rm.scorer == "value_head" and rm.reward_head.startswith("CarperAI/openai_summarize_tldr_rm_checkpoint/")
    assert (rm.samples_per_prompt, rm.prompts_per_iteration, rm.per_bucket, rm.quantiles, rm.drop_factor) == (
        96,
        2048,
        2,
        "per_prompt",
        1.0,
    )
    assert (
        rm.feedback_words[0] == "Excellent."
        and rm.prefix_format == "{feedback} input: "
        and rm.training_mode == "top_fraction"
    )
    assert load_config("tldr-alt-lmu").prefix_format == "feedback: {feedback} input: "
    assert (
        load_config("hh-alt-lmc").feedback_words == HH and load_config("hh-alt-lmc").prefix_format == "{feedback}.\n\n"
    )
    assert load_config("hh-steerlm").exemplar == "harmful:0,helpful:2"
    assert load_config("tldr-coh").prefix_format == "{prompt} {feedback}:"


# ------------------------------------------------------------------------------------ one iteration per recipe
def test_toxicity_rtp_with_perspective(assets, perspective, monkeypatch, tmp_path, capsys):
    server = perspective()
    monkeypatch.setenv("PERSPECTIVE_API_KEY", KEY)
    run = tmp_path / "run"
    train(
        "toxicity-rtp",
        run,
        "scorer=perspective",
        f"prompts={assets['rtp']}",
        f"perspective_base_url={server.url}",
        "perspective_requests_per_second=0",
        "prompts_per_iteration=4",
    )
    out = capsys.readouterr().out
    assert "prompts: 1 of " in out and "truncated from the left" in out  # the 150-word prompt, counted
    rows = pool(run)
    assert len(rows) == 16 and all(r["valid"] for r in rows)
    for r in rows:  # the pool holds exactly what the API answered for each completion
        want = perspective_score(r["completion"]) if r["completion"].strip() else 0.0
        assert r["score"] == pytest.approx(want)
    assert {r["feedback"] for r in rows} <= set(load_config("toxicity-rtp").feedback_words)
    # the key went in the header only: never in a URL, the run folder or the logs
    assert server.seen and all(s["key"] == KEY and KEY not in s["path"] for s in server.seen)
    assert all(s["attrs"] == ["TOXICITY"] for s in server.seen)
    for f in run.rglob("*"):
        if f.is_file():
            assert KEY.encode() not in f.read_bytes(), f
    assert KEY not in out
    # the split: evaluation prompts are non-toxic ones, never trained on
    rtp = {
        json.loads(line)["prompt"]["text"]: json.loads(line)["prompt"]["toxicity"]
        for line in assets["rtp"].read_text().splitlines()
    }
    evals = {json.loads(line)["prompt"] for line in (run / "eval_samples.jsonl").read_text().splitlines()}
    assert evals and all(rtp[p] < 0.5 for p in evals) and not evals & {r["prompt"] for r in rows}
    s = json.loads((run / "summary.json").read_text())
    assert s["metric"] == "toxicity" and s["exemplar"] == "Lowest Toxicity"


def test_quark_toxicity_rtp_with_an_hf_classifier(assets, tmp_path):
    run = tmp_path / "run"
    train(
        "quark-toxicity-rtp",
        run,
        f"prompts={assets['rtp']}",
        "scorer=hf",
        f"reward_model={assets['classifier']}",
        "reward_label=toxic",
        "reward_activation=softmax",
        "reward_name=toxicity",
        "reward_higher_is_better=false",
    )
    rows = pool(run)
    scorer = R.HFClassifierScorer(str(assets["classifier"]), label="toxic", activation="softmax")
    want = scorer.score([r["prompt"] for r in rows], [r["completion"] for r in rows])
    assert [r["score"] for r in rows] == pytest.approx(want, **TOL)
    assert all(0.0 <= r["score"] <= 1.0 for r in rows)
    assert {r["feedback"] for r in rows} <= {f"_TREE_TOKEN_0000{i}" for i in range(5)}
    assert json.loads((run / "summary.json").read_text())["metric"] == "toxicity"


@pytest.mark.parametrize("recipe,head", [("tldr-alt-rm", "rm_bin"), ("tldr-quark", "v_head")])
def test_tldr_rm_recipes_with_the_value_head_hook(recipe, head, assets, tmp_path, capsys):
    run = tmp_path / "run"
    train(
        recipe,
        run,
        f"prompts={assets['tldr']}",
        f"eval_split={assets['tldr_test']}",
        f"reward_model={assets['backbone']}",
        f"reward_head={assets[head]}",
    )
    out = capsys.readouterr().out
    assert "prompts: 1 of " in out and "dropped" in out  # the 700-word post over max_prompt_tokens=512
    rows = pool(run)
    assert len(rows) == 16 and all(r["score"] is not None for r in rows)
    assert len({round(r["score"], 6) for r in rows}) > 1
    assert all(r["prompt"].startswith("SUBREDDIT: r/") and r["prompt"].endswith("TL;DR:") for r in rows)
    assert not any("lorem lorem" in r["prompt"] for r in rows)
    test_prompts = {json.loads(line)["prompt"] for line in assets["tldr_test"].read_text().splitlines()}
    evals = {json.loads(line)["prompt"] for line in (run / "eval_samples.jsonl").read_text().splitlines()}
    assert evals <= test_prompts  # eval_split as a second file
    # per-prompt quantiles: within each prompt, a higher reward never gets a worse bucket
    by_prompt: dict[int, list] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_id"], []).append(r)
    for group in by_prompt.values():
        for a in group:
            for b in group:
                if a["score"] > b["score"]:
                    assert a["bucket"] <= b["bucket"]


def test_tldr_coh_with_a_callable_reward(assets, tmp_path, monkeypatch):
    monkeypatch.chdir(assets["base"])  # `tiny_reward.py` sits next to the run, as a user's module would
    run = tmp_path / "run"
    train(
        "tldr-coh",
        run,
        f"prompts={assets['tldr']}",
        f"eval_split={assets['tldr_test']}",
        "scorer=callable",
        "reward_callable=tiny_reward:length_reward",
    )
    rows = pool(run)
    assert [r["score"] for r in rows] == [float(len(r["completion"])) for r in rows]
    assert {r["feedback"] for r in rows} <= {"A good summary", "A bad summary"}
    s = json.loads((run / "summary.json").read_text())
    assert s["metric"] == "reward" and set(s["final"]["by_feedback"]) == {"A good summary", "A bad summary"}


@pytest.mark.parametrize("recipe", ["hh-alt-lmc", "hh-steerlm"])
def test_hh_recipes_with_an_openai_compatible_judge(recipe, assets, judge, tmp_path):
    run = tmp_path / "run"
    words = load_config(recipe).feedback_words
    train(
        recipe,
        run,
        f"prompts={assets['hh']}",
        f"eval_split={assets['hh_test']}",
        f"judge_base_url={judge.url}",
        "judge_model=scripted",
        "judge_api_key_env=null",
        f"judge_cache={tmp_path / 'cache.sqlite'}",
    )
    rows = pool(run)
    assert len(rows) == 16 and all(r["valid"] for r in rows)
    assert {r["feedback"] for r in rows} <= set(words) and len({r["feedback"] for r in rows}) > 1
    for r in rows:  # the dialogue without its last answer, exactly
        assert r["prompt"].startswith("Human: Question ") and r["prompt"].endswith("\n\nAssistant:")
        assert "Final answer" not in r["prompt"]


def test_tldr_alt_lmu_with_an_openai_compatible_judge(assets, judge, tmp_path):
    run = tmp_path / "run"
    train(
        "tldr-alt-lmu",
        run,
        f"prompts={assets['tldr']}",
        f"eval_split={assets['tldr_test']}",
        f"judge_base_url={judge.url}",
        "judge_model=scripted",
        "judge_api_key_env=null",
        f"judge_cache={tmp_path / 'cache.sqlite'}",
    )
    rows = pool(run)
    assert rows and {r["feedback"] for r in rows} <= {"Covers the key points concisely.", "Misses the main point."}
    assert all(r["score"] in (0.0, 1.0, 2.0, 3.0) for r in rows)


# ------------------------------------------------------------------------------------ bad input: one line, exit 2
def one_error_line(r, *needles: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("altlm: ") and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_hub_dataset_offline_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf"))  # neither a datasets nor a hub cache can answer
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-hf" / "datasets"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf" / "hub"))
    r = run_altlm(
        "train", "--config", "toxicity-rtp", "model=tiny-smollm2", f"output_dir={tmp_path / 'run'}", cwd=tmp_path
    )
    one_error_line(r, "allenai/real-toxicity-prompts", "hub is unreachable", "local file", "prompts=")
    assert not (tmp_path / "run").exists()


def test_missing_field_names_the_fields_it_has(assets, tmp_path):
    r = run_altlm(
        "train",
        "--config",
        "toxicity-rtp",
        "model=tiny-smollm2",
        f"prompts={assets['rtp']}",
        "prompt_formatter=field",
        "prompt_field=text",
        "eval_max_prompt_toxicity=null",
        f"output_dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    one_error_line(r, "no field 'text'", "challenging", "continuation", "filename", "prompt")


# ------------------------------------------------------------------------------------ adapters, directly
def test_hf_classifier_label_index_and_activation(assets):
    from transformers import AutoModelForSequenceClassification

    folder = str(assets["classifier"])
    prompts, comps = ["You are", "The cat"], [" a fine person.", " sat on the mat and looked around."]
    tok = models.load_tokenizer(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = torch.stack([model(**tok(p + c, return_tensors="pt")).logits[0] for p, c in zip(prompts, comps)])
    assert R.HFClassifierScorer(folder, index=1).score(prompts, comps) == pytest.approx(logits[:, 1].tolist(), **TOL)
    assert R.HFClassifierScorer(folder, label="toxic", activation="softmax").score(prompts, comps) == pytest.approx(
        logits.softmax(-1)[:, 1].tolist(), **TOL
    )
    assert R.HFClassifierScorer(folder, label="non_toxic", activation="sigmoid").score(prompts, comps) == pytest.approx(
        logits[:, 0].sigmoid().tolist(), **TOL
    )
    with pytest.raises(AltlmError, match="its labels: non_toxic, toxic"):
        R.HFClassifierScorer(folder, label="insult")
    with pytest.raises(AltlmError, match="out of range"):
        R.HFClassifierScorer(folder, index=2)


def test_value_head_matches_a_hand_computed_reward(assets):
    from transformers import AutoModel

    prompts, comps = (
        ["SUBREDDIT: r/x\nTITLE: t\nPOST: p\nTL;DR:", "short"],
        [" a summary", " and a much longer completion here"],
    )
    tok = models.load_tokenizer(str(assets["backbone"]))
    state = torch.load(assets["rm_bin"], weights_only=True)
    v = state["v_head.weight"]

    def by_hand(body):
        out = []
        with torch.no_grad():
            for p, c in zip(prompts, comps):
                h = body(**tok("<|startoftext|>" + p + c, return_tensors="pt")).last_hidden_state[0, -1]
                out.append(float(h @ v[0]))
        return out

    carper = AutoModel.from_config(tiny_config())
    carper.load_state_dict({k[len("transformer.") :]: t for k, t in state.items() if k.startswith("transformer.")})
    fmt = "<|startoftext|>{prompt}{completion}"
    got = R.ValueHeadScorer(str(assets["backbone"]), str(assets["rm_bin"]), text_format=fmt).score(prompts, comps)
    assert got == pytest.approx(by_hand(carper.eval()), **TOL)  # the checkpoint's own backbone weights
    head_only = R.ValueHeadScorer(str(assets["backbone"]), str(assets["v_head"]), text_format=fmt).score(prompts, comps)
    assert head_only == pytest.approx(by_hand(AutoModel.from_pretrained(assets["backbone"]).eval()), **TOL)
    assert head_only != pytest.approx(got, **TOL)


def test_value_head_bad_files_are_one_line(assets, tmp_path):
    from safetensors.torch import save_file

    save_file({"score.weight": torch.zeros(1, 64)}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(AltlmError, match="no 'v_head.weight'"):
        R.ValueHeadScorer(str(assets["backbone"]), str(tmp_path / "wrong.safetensors"))
    save_file({"v_head.weight": torch.zeros(1, 7)}, str(tmp_path / "shape.safetensors"))
    with pytest.raises(AltlmError, match=r"shape \(1, 7\), expected \(1, 64\)"):
        R.ValueHeadScorer(str(assets["backbone"]), str(tmp_path / "shape.safetensors"))
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(AltlmError, match="not a readable state dict"):
        R.ValueHeadScorer(str(assets["backbone"]), str(tmp_path / "junk.bin"))


def test_perspective_retries_rate_limit_and_errors(perspective, monkeypatch):
    monkeypatch.setenv("ALTLM_TEST_KEY", KEY)
    server = perspective(faults=[503, 429, None])
    p = R.PerspectiveScorer(server.url, "ALTLM_TEST_KEY", requests_per_second=0, backoff=0.01)
    assert p.score(["x"], ["you are nice"]) == [pytest.approx(perspective_score("you are nice"))]
    assert (p.requests, p.retries, p.failures) == (3, 2, 0)
    assert p.score(["x", "y"], ["", "   "]) == [0.0, 0.0] and p.requests == 3  # empty texts are never sent
    assert KEY not in repr(p)

    # retries exhausted → NaN (the sample becomes invalid), and the run goes on
    server = perspective(faults=[503] * 3)
    p = R.PerspectiveScorer(server.url, "ALTLM_TEST_KEY", requests_per_second=0, max_retries=2, backoff=0.01)
    got = p.score(["x"], ["hello"])
    assert got[0] != got[0] and p.failures == 1
    server = perspective(faults=[400])
    got = R.PerspectiveScorer(server.url, "ALTLM_TEST_KEY", requests_per_second=0).score(["x"], ["hola"])
    assert got[0] != got[0]  # e.g. an unsupported language: no score, not a retry

    # the rate limit spaces requests even with several workers: 6 requests at 20/s take at least 5/20 s. Timed by
    # the client, whose clock can only run long on a busy machine (the server's arrival times can bunch up).
    server = perspective()
    p = R.PerspectiveScorer(server.url, "ALTLM_TEST_KEY", requests_per_second=20)
    t0 = time.monotonic()
    p.score(["x"] * 6, [f"text {i}" for i in range(6)])
    assert time.monotonic() - t0 >= 5 / 20 and len(server.seen) == 6

    # a wrong key: one clear error that names the variable, never the key
    monkeypatch.setenv("ALTLM_TEST_KEY", "wrong-key-value")
    with pytest.raises(AltlmError, match=r"\$ALTLM_TEST_KEY \(HTTP 403\)") as e:
        R.PerspectiveScorer(server.url, "ALTLM_TEST_KEY", requests_per_second=0).score(["x"], ["hello"])
    assert "wrong-key-value" not in str(e.value)
    monkeypatch.delenv("ALTLM_TEST_KEY")
    with pytest.raises(AltlmError, match="environment variable ALTLM_TEST_KEY"):
        R.PerspectiveScorer(server.url, "ALTLM_TEST_KEY")


def test_callable_reward_errors(assets, monkeypatch):
    monkeypatch.chdir(assets["base"])
    assert R.CallableScorer("tiny_reward:length_reward").score(["p"], ["abc"]) == [3.0]
    with pytest.raises(AltlmError, match="returned 1 scores for 2 completions"):
        R.CallableScorer("tiny_reward:wrong_length").score(["p", "q"], ["a", "b"])
    with pytest.raises(AltlmError, match="has no attribute 'nope'"):
        R.CallableScorer("tiny_reward:nope")
    with pytest.raises(AltlmError, match="cannot import 'no_such_module_xyz'"):
        R.CallableScorer("no_such_module_xyz:f")


def test_scorer_keys_are_validated():
    from altlm.config import ALTConfig

    with pytest.raises(AltlmError, match="'reward_model' is required with scorer=hf"):
        ALTConfig(scorer="hf")
    with pytest.raises(AltlmError, match="'reward_head' is required with scorer=value_head"):
        ALTConfig(scorer="value_head", reward_model="x/y")
    with pytest.raises(AltlmError, match="package.module:function"):
        ALTConfig(scorer="callable", reward_callable="no_colon")
    with pytest.raises(AltlmError, match="eval_max_prompt_toxicity' needs prompt_formatter=rtp"):
        ALTConfig(eval_max_prompt_toxicity=0.5)


def test_unscored_texts_become_invalid_samples():
    """A NaN score (an API error, an unsupported language) must never reach the quantiles or training."""
    from altlm.feedback import QuantileFeedback

    class Flaky:
        name, higher_is_better = "toxicity", False

        def score(self, prompts, completions):
            return [float("nan") if c == "?" else 0.1 for c in completions]

    fbs = QuantileFeedback(Flaky(), ["a", "b"])(["p", "p"], ["fine", "?"])
    assert [f.valid for f in fbs] == [True, False]


def test_unscored_samples_in_a_run_get_no_bucket_and_are_never_drawn(assets, tmp_path, monkeypatch):
    """Through a run: rows the scorer could not score are kept invalid, without feedback or bucket; the quantiles
    are cut over the scored rows alone (as if the NaN rows did not exist) and the training draw never picks one."""
    import random

    from altlm.config import ALTConfig
    from altlm.feedback import grouped_buckets, quantile_buckets
    from altlm.pool import Pool

    monkeypatch.chdir(assets["base"])
    run = tmp_path / "run"
    train(
        "tldr-coh",
        run,
        f"prompts={assets['tldr']}",
        f"eval_split={assets['tldr_test']}",
        "scorer=callable",
        "reward_callable=tiny_reward:length_or_nan",
    )
    cfg = ALTConfig.from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    rows = pool(run)
    nan = [r for r in rows if len(r["completion"]) % 3 == 0]
    ok = [r for r in rows if len(r["completion"]) % 3 != 0]
    assert nan and ok
    assert all(r["valid"] == 0 and r["feedback"] is None and r["bucket"] is None for r in nan)
    assert all(r["valid"] == 1 and r["score"] == len(r["completion"]) for r in ok)
    scores, k = [r["score"] for r in ok], len(cfg.feedback_words)
    want = (
        quantile_buckets(scores, k, True)
        if cfg.quantiles == "global"
        else grouped_buckets(scores, [r["prompt_id"] for r in ok], k, True)
    )
    assert [r["bucket"] for r in ok] == want
    p = Pool(run / "pool.sqlite")
    drawn = p.draw_uniform(4 * len(rows), random.Random(0)) + p.draw_balanced(8, k, random.Random(0))
    p.db.close()
    assert drawn and {r.id for r in drawn} <= {r["id"] for r in ok}
