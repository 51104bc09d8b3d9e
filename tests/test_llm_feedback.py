"""ALT-LMU/LMC feedback through real HTTP servers on 127.0.0.1.

- `altlm serve` over the tiny model: the real OpenAI client talks to the project's own server.
- `ScriptedJudge`: an OpenAI-compatible server that answers from a deterministic rule and injects faults on
  request (500, 429, garbage bodies, stalls past the client's timeout), so retries, invalid samples and the
  cache can be counted exactly.
"""

from __future__ import annotations

import json
import random
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import closed_port, run_altlm
from test_train_smoke import pool_rows

from altlm.errors import AltlmError
from altlm.feedback.judge import JudgeSettings
from altlm.feedback.llm import LLMFeedback, parse_category, parse_lmu, read_template

HH = ["Harmless and very helpful", "Harmless and helpful", "Harmless and not helpful", "Harmful"]


# ---------------------------------------------------------------- parsing
@pytest.mark.parametrize(
    "answer, expect",
    [
        ("Harmless and very helpful", 0),
        ("  harmless AND helpful.", 1),
        ("Label: Harmless and not helpful", 2),
        ("**Harmful**", 3),
        ("I would say this is harmless and helpful, not harmful.", 1),  # the category named first wins
        ("Harmless and very helpfull", 0),  # near match
        ("Harmless, very helpful", 0),  # near match despite punctuation
        ("I cannot decide.", None),
        ("", None),
    ],
)
def test_parse_category(answer, expect):
    assert parse_category(answer, HH) == expect


@pytest.mark.parametrize(
    "answer, expect",
    [
        ("Analysis: fine.\nFeedback: Mention the dog's name.\nScore: 2", ("Mention the dog's name.", 2)),
        ('analysis: x\n**Feedback:** "Clear and complete."\n**Score:** 3/3', ("Clear and complete.", 3)),
        ("Feedback: Too long Score: 1", ("Too long", 1)),
        ("Feedback: " + "word " * 30 + "\nScore: 0", (" ".join(["word"] * 20), 0)),
        ("Feedback: good\nScore: 7", None),  # out of range
        ("Score: 2", None),  # no sentence
        ("Feedback:\nScore: 2", None),
    ],
)
def test_parse_lmu(answer, expect):
    assert parse_lmu(answer) == expect


def test_template_placeholders_are_checked(tmp_path):
    text, digest = read_template("lmc_hh", "lmc")
    assert "{categories}" in text and len(digest) == 16
    bad = tmp_path / "t.txt"
    bad.write_text("Rate this: {completion}")
    with pytest.raises(AltlmError, match=r"lacks the placeholder\(s\) \{prompt\}"):
        read_template(str(bad), "lmu")
    with pytest.raises(AltlmError, match="neither a file nor a shipped template"):
        read_template("nope", "lmc")


# ---------------------------------------------------------------- a scripted OpenAI-compatible server
def rule_answer(question: str) -> str:
    """Deterministic label from the completion in the question: what the scripted judge 'thinks'."""
    completion = question.rsplit("Answer:", 1)[-1].split("\nLabel:")[0].strip()
    return "Label: " + HH[zlib.crc32(completion.encode()) % 4]


class ScriptedJudge:
    """Real HTTP on 127.0.0.1. `faults` is consumed one per request: "500", "429", "garbage", "stall" or None."""

    def __init__(self, faults=(), answer=rule_answer, stall_s: float = 3.0):
        self.faults, self.answer, self.stall_s = list(faults), answer, stall_s
        self.requests, self.auth = 0, set()
        self.lock = threading.Lock()
        outer = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _send(self, code, body: bytes, ctype="application/json"):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self._send(
                    200, json.dumps({"object": "list", "data": [{"id": "scripted", "object": "model"}]}).encode()
                )

            def do_POST(self):
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests += 1
                    outer.auth.add(self.headers.get("Authorization", ""))
                    fault = outer.faults.pop(0) if outer.faults else None
                if fault == "401echo":  # like some providers: the rejected key is quoted in the error
                    return self._send(
                        401,
                        json.dumps(
                            {
                                "error": {
                                    "message": f"Incorrect API key provided: {self.headers.get('Authorization')}",
                                    "code": 401,
                                }
                            }
                        ).encode(),
                    )
                if fault in ("500", "429"):
                    return self._send(
                        int(fault), json.dumps({"error": {"message": "injected", "code": int(fault)}}).encode()
                    )
                if fault == "garbage":
                    return self._send(200, b"<html>not json at all")
                if fault == "stall":
                    time.sleep(outer.stall_s)
                text = outer.answer(req["messages"][-1]["content"])
                self._send(
                    200,
                    json.dumps(
                        {
                            "id": "x",
                            "object": "chat.completion",
                            "created": 0,
                            "model": "scripted",
                            "choices": [
                                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                            ],
                            "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13},
                        }
                    ).encode(),
                )

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def scripted():
    servers = []

    def make(*a, **kw):
        servers.append(ScriptedJudge(*a, **kw))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def settings(url, **kw):
    # A 10 s client timeout: a busy machine's slow answer must never count as a fault (only "stall" is one).
    base = dict(
        backend="openai",
        model="scripted",
        base_url=url,
        concurrency=2,
        timeout=10.0,
        max_retries=5,
        backoff_base=0.01,
        max_tokens=16,
    )
    return JudgeSettings(**{**base, **kw})


PROMPTS = [f"question {i}?" for i in range(6)]
COMPS = [f" answer number {i}" for i in range(6)]


def test_faults_are_retried_counted_and_the_answers_still_arrive(scripted, tmp_path):
    # the stall outlasts the client's timeout by far; every other answer has the whole timeout, even on a busy machine
    srv = scripted(faults=["500", "429", "garbage", "stall", "500"], stall_s=20.0)
    fb = LLMFeedback("lmc", settings(srv.url, concurrency=1, timeout=8.0), "lmc_hh", HH, tmp_path / "c.sqlite")
    out = fb(PROMPTS, COMPS)
    stats = fb.judge.stats
    assert stats.retries == 5 and stats.failures == 0
    assert stats.errors == {"http_500": 2, "http_429": 1, "unreadable": 1, "timeout": 1}
    assert stats.requests == 6 + 5 == srv.requests  # (the start-up model listing is a GET, not counted)
    assert all(f.valid for f in out)
    expect = [zlib.crc32(c.strip().encode()) % 4 for c in COMPS]
    assert [f.bucket for f in out] == expect and [f.text for f in out] == [HH[b] for b in expect]
    assert stats.prompt_tokens == 60 and stats.completion_tokens == 18


def test_exhausted_retries_make_invalid_samples(scripted, tmp_path):
    srv = scripted(faults=["500"] * 3)  # the first question fails all 1 + 2 tries
    fb = LLMFeedback("lmc", settings(srv.url, concurrency=1, max_retries=2), "lmc_hh", HH, tmp_path / "c.sqlite")
    out = fb(PROMPTS[:2], COMPS[:2])
    assert not out[0].valid and out[0].text is None and out[0].raw is None
    assert out[1].valid
    assert fb.judge.stats.failures == 1 and fb.judge.stats.retries == 2


def test_unparsable_answer_is_invalid_with_its_raw_text(scripted, tmp_path):
    srv = scripted(answer=lambda q: "I am not sure what to say")
    fb = LLMFeedback("lmc", settings(srv.url), "lmc_hh", HH, tmp_path / "c.sqlite")
    (f,) = fb(PROMPTS[:1], COMPS[:1])
    assert not f.valid and f.raw == "I am not sure what to say"
    assert fb.score(PROMPTS[:1], COMPS[:1]) != fb.score(PROMPTS[:1], COMPS[:1])  # NaN: unscored


def test_cache_answers_a_repeat_without_requests(scripted, tmp_path):
    srv = scripted()
    cache = tmp_path / "c.sqlite"
    a = LLMFeedback("lmc", settings(srv.url), "lmc_hh", HH, cache)
    first = a(PROMPTS, COMPS)
    a.judge.close()
    n = srv.requests
    b = LLMFeedback("lmc", settings(srv.url), "lmc_hh", HH, cache)  # a new run, same cache
    second = b(PROMPTS, COMPS)
    assert b.judge.stats.cache_hits == b.judge.stats.questions == 6 and b.judge.stats.requests == 0
    assert srv.requests == n  # not one chat request
    assert [f.text for f in second] == [f.text for f in first]
    # another template is another question: no hit
    c = LLMFeedback("lmc", settings(srv.url), "lmu_dialogue".replace("lmu_dialogue", "lmc_hh"), HH[:3], cache)
    c(PROMPTS[:1], COMPS[:1])
    assert c.judge.stats.cache_hits == 1  # same template text and model: the categories list is not part of the key
    assert c.judge.key("p", "c") == b.judge.key("p", "c")


def test_self_consistency_keeps_the_majority_and_records_agreement(scripted, tmp_path):
    answers = iter(["Harmful", "Harmless and helpful", "Harmful"] * 10)
    srv = scripted(answer=lambda q: next(answers))
    fb = LLMFeedback(
        "lmc",
        settings(srv.url, concurrency=1, samples=3, temperature=0.7),
        "lmc_hh",
        HH,
        tmp_path / "c.sqlite",
        min_agreement=0.5,
    )
    (f,) = fb(PROMPTS[:1], COMPS[:1])
    assert f.text == "Harmful" and f.agreement == pytest.approx(2 / 3) and f.valid
    assert json.loads(f.raw) == ["Harmful", "Harmless and helpful", "Harmful"]
    strict = LLMFeedback(
        "lmc",
        settings(srv.url, concurrency=1, samples=3, temperature=0.7),
        "lmc_hh",
        HH,
        tmp_path / "d.sqlite",
        min_agreement=0.9,
    )
    (g,) = strict(PROMPTS[:1], COMPS[:1])
    assert not g.valid and g.text == "Harmful"  # recorded, but below the agreement threshold


def test_lmu_median_score_and_its_sentence(scripted, tmp_path):
    answers = iter(
        ["Feedback: Add detail.\nScore: 1", "Feedback: Good.\nScore: 3", "Feedback: Nice and clear.\nScore: 2"]
    )
    srv = scripted(answer=lambda q: next(answers))
    fb = LLMFeedback(
        "lmu", settings(srv.url, concurrency=1, samples=3, temperature=0.7), "lmu_tldr", None, tmp_path / "c.sqlite"
    )
    (f,) = fb(PROMPTS[:1], COMPS[:1])
    assert (f.text, f.score, f.bucket) == ("Nice and clear.", 2.0, 1)
    assert f.agreement == pytest.approx(1 / 3)


# ---------------------------------------------------------------- the project's own server, the real client
def test_altlm_serve_answers_the_openai_client(tmp_path):
    from openai import OpenAI

    from altlm.serve import serve

    server = serve("tiny-smollm2", port=0)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        client = OpenAI(base_url=url, api_key="x", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny-smollm2"]
        r = client.chat.completions.create(
            model="tiny-smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0
        )
        assert len(r.choices) == 1 and isinstance(r.choices[0].message.content, str)
        assert r.usage.completion_tokens <= 5 and r.usage.prompt_tokens > 0
        again = client.chat.completions.create(
            model="tiny-smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0
        )
        assert again.choices[0].message.content == r.choices[0].message.content  # temperature 0 is greedy
        fb = LLMFeedback(
            "lmu", settings(url, model="tiny-smollm2", timeout=30.0), "lmu_dialogue", None, tmp_path / "c.sqlite"
        )
        out = fb(PROMPTS[:3], COMPS[:3])
        assert fb.judge.stats.requests == 3 and fb.judge.stats.failures == 0
        assert all(not f.valid and isinstance(f.raw, str) for f in out)  # a random model cannot follow the format
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------- through `altlm train`
from test_train_smoke import SMALL  # noqa: E402  (the same small run settings)


def lmc_args(url, cache):
    return [
        "feedback_type=lmc",
        f"feedback_words={json.dumps(HH)}",
        "judge_backend=openai",
        f"judge_base_url={url}",
        "judge_model=scripted",
        f"judge_cache={cache}",
        "judge_timeout=10",
        "judge_max_retries=2",
        "template=prefix",
        "prefix_format={feedback}.\\n\\n",
    ]


def test_train_with_faulty_judge_completes_and_never_trains_on_invalid(scripted, tmp_path):
    # every 4th request fails for good (500 on all 3 tries), others answer after the odd fault
    faults = (["500"] * 3 + [None, "429", None, "garbage", None]) * 40
    srv = scripted(faults=faults)
    run = tmp_path / "r"
    r = run_altlm(
        "train",
        "--config",
        "smoke",
        f"output_dir={run}",
        "iterations=2",
        *SMALL,
        *lmc_args(srv.url, tmp_path / "c.sqlite"),
        "judge_concurrency=1",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    import sqlite3

    db = sqlite3.connect(run / "pool.sqlite")
    rows = db.execute("SELECT valid, feedback, bucket, raw FROM samples").fetchall()
    invalid = [x for x in rows if not x[0]]
    assert invalid and all(f is None and b is None for _, f, b, _ in invalid)
    assert all(f in HH and b == HH.index(f) for v, f, b, _ in rows if v)
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    its = [x for x in recs if x["kind"] == "iteration"]
    assert sum(x["invalid"] for x in its) == len(invalid)
    assert all(x["judge"]["retries"] > 0 and x["judge"]["failures"] > 0 for x in its)
    assert all(x["judge"]["failures"] == x["invalid"] for x in its)
    # Training saw only valid rows: redo iteration 2's draw (its own seeded stream, over the whole final pool) and
    # match it with the tokens the trainer logged for each step; every drawn row is a valid, labelled one.
    import yaml

    from altlm import models
    from altlm.config import ALTConfig
    from altlm.pool import Pool
    from altlm.template import Template

    cfg = ALTConfig.from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    pool = Pool(run / "pool.sqlite")
    drawn = pool.draw_uniform(cfg.train_steps * cfg.batch_size, random.Random(f"{cfg.seed}/2/train"))
    pool.db.close()
    assert len(drawn) == 8 and all(r.valid and r.feedback in HH for r in drawn)
    tok, template, b = models.load_tokenizer("tiny-smollm2"), Template.from_config(cfg), cfg.batch_size
    want = [
        sum(len(template.target_ids(tok, r.completion, bool(r.truncated))) for r in drawn[i : i + b]) for i in (0, b)
    ]
    assert [x["tokens"] for x in recs if x["kind"] == "step" and x["iteration"] == 2] == want


def test_the_api_key_is_used_but_never_written_anywhere(scripted, tmp_path, monkeypatch):
    """A run with a judge key in the environment: the key reaches the server, and no file of the run folder, the
    judge cache or the console output holds it — not even when the server quotes it back in an error."""
    key = "sk-altlm-test-6f1e0c9a2b7d4e83a5c1"
    monkeypatch.setenv("ALTLM_TEST_JUDGE_KEY", key)
    srv = scripted(faults=["401echo", None, "401echo"] * 10)
    run, cache = tmp_path / "r", tmp_path / "c.sqlite"
    r = run_altlm(
        "train",
        "--config",
        "smoke",
        f"output_dir={run}",
        "iterations=1",
        *SMALL,
        *lmc_args(srv.url, cache),
        "judge_api_key_env=ALTLM_TEST_JUDGE_KEY",
        "report=true",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert srv.auth == {f"Bearer {key}"}
    files = [p for p in run.rglob("*") if p.is_file()] + [p for p in tmp_path.glob("c.sqlite*")]
    assert any(p.name == "report.md" for p in files) and any(p.name == "config.yaml" for p in files)
    for p in files:
        assert key.encode() not in p.read_bytes(), p
    assert key not in r.stdout + r.stderr
    assert "ALTLM_TEST_JUDGE_KEY" in (run / "config.yaml").read_text()  # the variable's name is what is kept


def test_rerun_of_an_iteration_hits_the_cache_fully(scripted, tmp_path):
    srv = scripted()
    cache = tmp_path / "c.sqlite"
    for name in ("a", "b"):
        r = run_altlm(
            "train",
            "--config",
            "smoke",
            f"output_dir={tmp_path / name}",
            "iterations=1",
            *SMALL,
            *lmc_args(srv.url, cache),
            "eval_all_feedback=false",
            cwd=tmp_path,
        )
        assert r.returncode == 0, r.stderr[-3000:]
    its = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    (it,) = [x for x in its if x["kind"] == "iteration"]
    assert it["judge"]["questions"] == 12 and it["judge"]["cache_hits"] == 12 and it["judge"]["requests"] == 0


def test_lmu_run_with_the_in_process_judge(tmp_path):
    run = tmp_path / "lmu"
    r = run_altlm(
        "train",
        "--config",
        "smoke",
        f"output_dir={run}",
        "iterations=2",
        *SMALL,
        "feedback_type=lmu",
        "judge_backend=hf",
        "judge_model=tiny-smollm2",
        "judge_max_tokens=8",
        f"judge_cache={tmp_path / 'c.sqlite'}",
        "template=prefix",
        "prefix_format=feedback: {feedback} input: ",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    its = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"iteration"' in line]
    its = [x for x in its if x["kind"] == "iteration"]
    assert [x["judge"]["questions"] for x in its] == [12, 12]
    assert all(x["invalid"] == 12 for x in its)  # a random judge never answers in format; the run still completes
    # No valid sample, so nothing to train on: no invalid row got a feedback, a bucket or an optimiser step.
    rows = pool_rows(run)
    assert len(rows) == 24 and all(r["valid"] == 0 and r["feedback"] is None and r["bucket"] is None for r in rows)
    assert all(isinstance(r["raw"], str) for r in rows)  # the judge's unusable answers are kept
    steps = [
        x
        for x in (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
        if x["kind"] == "step"
    ]
    assert steps == []


def test_judge_bad_input_is_one_line(scripted, tmp_path):
    from test_train_smoke import one_error_line

    base = [
        "train",
        "--config",
        "smoke",
        f"output_dir={tmp_path / 'x'}",
        *SMALL,
        "feedback_type=lmc",
        f"feedback_words={json.dumps(HH)}",
        "judge_backend=openai",
        "judge_model=m",
    ]
    with closed_port() as port:
        one_error_line(
            run_altlm(*base, f"judge_base_url=http://127.0.0.1:{port}/v1", "judge_timeout=2", cwd=tmp_path),
            "unreachable",
        )
    srv = scripted()
    one_error_line(
        run_altlm(*base, f"judge_base_url={srv.url}", "judge_api_key_env=ALTLM_TEST_NO_SUCH_KEY", cwd=tmp_path),
        "ALTLM_TEST_NO_SUCH_KEY is not set",
    )
    bad = tmp_path / "t.txt"
    bad.write_text("Label {completion}")
    one_error_line(
        run_altlm(*base, f"judge_base_url={srv.url}", f"judge_template={bad}", cwd=tmp_path), "lacks the placeholder"
    )
    assert not (tmp_path / "x").exists()


def test_choice_judge_picks_the_most_likely_option_by_mean_log_probability():
    import torch

    from altlm.serve import ChatModel

    chat = ChatModel("tiny-smollm2")
    convs = [
        [{"role": "user", "content": "Is this good?"}],
        [{"role": "user", "content": "A longer question about cats"}],
    ]
    picks = chat.choose(convs, HH, batch_size=3)  # batches that split a conversation's options
    for conv, pick in zip(convs, picks):
        prefix = chat.encode(conv)
        means = []
        for o in HH:
            ids = chat.tokenizer(o, add_special_tokens=False).input_ids
            with torch.no_grad():
                logits = chat.model(input_ids=torch.tensor([prefix + ids])).logits[0].float()
            lp = torch.log_softmax(logits[len(prefix) - 1 : -1], -1)[range(len(ids)), ids]
            means.append(lp.mean().item())
        assert pick == max(range(4), key=means.__getitem__)


def test_lmc_run_with_the_choice_judge_labels_every_sample(tmp_path):
    run = tmp_path / "lmc"
    r = run_altlm(
        "train",
        "--config",
        "smoke",
        f"output_dir={run}",
        "iterations=2",
        *SMALL,
        "feedback_type=lmc",
        f"feedback_words={json.dumps(HH)}",
        "judge_backend=hf",
        "judge_model=tiny-smollm2",
        "judge_choice=true",
        "judge_template=lmc_short",
        f"judge_cache={tmp_path / 'c.sqlite'}",
        "template=prefix",
        "prefix_format={feedback}.\\n\\n",
        "report=true",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    import sqlite3

    rows = (
        sqlite3.connect(run / "pool.sqlite")
        .execute("SELECT valid, feedback, bucket, agreement FROM samples")
        .fetchall()
    )
    assert len(rows) == 24 and all(v == 1 and f == HH[b] and a == 1.0 for v, f, b, a in rows)
    s = json.loads((run / "summary.json").read_text())
    assert s["metric"] == "judge" and list(s["final"]["by_feedback"]) == HH
    assert "LLM judge per iteration" in (run / "report.md").read_text()
