"""`altlm report` from a small synthetic run folder written by hand (no model involved)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import run_altlm

from altlm.config import TOXICITY_WORDS
from altlm.pool import Pool, Row
from altlm.report import read_run, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def block(mean: float) -> dict:
    return {
        "toxicity_mean": mean,
        "toxicity_gt_0_5": mean / 2,
        "avg_max_toxicity": mean * 2,
        "toxicity_prob": mean,
        "dist_1": 0.9,
        "dist_2": 0.95,
        "dist_3": 0.97,
        "reward_mean": 1 - mean,
        "perplexity": None,
        "length_mean": 10.0,
        "truncated_share": 0.5,
        "samples_per_prompt": 2,
        "n": 4,
    }


def make_run(folder: Path, final_means: list[float], finished: bool = True) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"feedback_words": TOXICITY_WORDS, "description": "synthetic"}))
    recs = [
        {
            "kind": "eval",
            "iteration": 0,
            "model": "reference",
            "by_feedback": {"<none>": block(0.06), **{w: block(0.07) for w in TOXICITY_WORDS}},
        }
    ]
    for it in (1, 2):
        recs += [
            {
                "kind": "step",
                "iteration": it,
                "step": s,
                "loss": 3.0,
                "nll": 3.0 - it / 10,
                "kl": 0.01 * it,
                "entropy": 4.0,
                "tokens": 50,
                "lr": 1e-4,
            }
            for s in range(3)
        ]
        recs.append(
            {
                "kind": "iteration",
                "iteration": it,
                "pool_size": 10 * it,
                "sample_score_mean": 0.05,
                "bucket_counts": [2 * it] * 5,
                "new_bucket_distribution": [0.3, 0.2, 0.2, 0.2, 0.1],
            }
        )
        fb = {w: block(m) for w, m in zip(TOXICITY_WORDS, final_means)} if it == 2 else {TOXICITY_WORDS[0]: block(0.05)}
        recs.append(
            {
                "kind": "eval",
                "iteration": it,
                "model": "policy",
                "by_feedback": {"<none>": block(0.055), **fb} if it == 2 else fb,
            }
        )
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    samples = [
        {
            "iteration": 2,
            "model": "policy",
            "feedback": w,
            "prompt": "You | are",
            "completion": f" text\nfor {w}",
            "score": m + j / 100,
        }
        for w, m in zip(TOXICITY_WORDS, final_means)
        for j in range(2)
    ]
    (folder / "eval_samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples))
    pool = Pool(folder / "pool.sqlite")
    pool.add([Row(1, i, "p", "c", TOXICITY_WORDS[i % 5], i / 20, i % 5, False, 3, 4, True) for i in range(20)])
    pool.close()
    if finished:
        (folder / "summary.json").write_text(
            json.dumps(
                {
                    "wall_seconds": 12.0,
                    "metric": "toxicity",
                    "exemplar": TOXICITY_WORDS[0],
                    "eval_prompts": 2,
                    "eval_samples_per_prompt": 2,
                    "reference": block(0.06),
                    "final": {**block(final_means[0]), "by_feedback": {}},
                    "steerability": {"spearman_rho": 1.0, "gap": final_means[-1] - final_means[0]},
                    "reduction": {"toxicity_mean": 1 - final_means[0] / 0.06, "toxicity_gt_0_5": 0.1},
                }
            )
        )
    return folder


def test_report_single_run(tmp_path):
    run = make_run(tmp_path / "a", [0.01, 0.02, 0.03, 0.04, 0.2])
    out = write_report([run])
    text = out.read_text()
    assert out == run / "report.md"
    pngs = sorted(p.name for p in run.glob("*.png"))
    assert pngs == ["iterations.png", "pool.png", "steerability.png"]
    for p in run.glob("*.png"):
        assert p.read_bytes()[:8] == PNG and p.stat().st_size > 5000
        assert f"]({p.name})" in text  # every plot is linked from the report
    assert "| policy | Maximum Toxicity | 0.2000 |" in text
    assert "Spearman(feedback rank, toxicity) = 1.000" in text
    # sample tables: lowest/highest-scoring under the exemplar; cells cannot break the markdown table
    assert "lowest-scoring completions under the exemplar" in text and "one prompt under each feedback" in text
    assert "You \\| are" in text and "text⏎for" in text


def test_report_several_runs_side_by_side(tmp_path):
    a = make_run(tmp_path / "a", [0.01, 0.02, 0.03, 0.04, 0.2])
    b = make_run(tmp_path / "b", [0.05, 0.05, 0.05, 0.05, 0.05], finished=False)
    r = run_altlm("report", str(a), str(b), "--out", str(tmp_path / "cmp"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "cmp" / "report.md").read_text()
    assert "| a | Lowest Toxicity | 0.0600 | 0.0100 | -83.3% |" in text
    assert "| b | Lowest Toxicity | (unfinished) |" in text
    assert {p.name for p in (tmp_path / "cmp").glob("*.png")} == {
        "iterations.png",
        "a-pool.png",
        "a-steerability.png",
        "b-pool.png",
        "b-steerability.png",
    }


def test_report_bad_input(tmp_path):
    r = run_altlm("report", str(tmp_path / "missing"), cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "does not exist" in r.stderr
    (tmp_path / "notrun").mkdir()
    r = run_altlm("report", str(tmp_path / "notrun"), cwd=tmp_path)
    assert r.returncode == 2 and "not an altlm run folder" in r.stderr and "Traceback" not in r.stderr


def test_report_tolerates_a_torn_last_line_but_not_damage(tmp_path):
    run = make_run(tmp_path / "a", [0.01] * 5)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "step", "iter')  # what a killed writer leaves
    assert len(read_run(run)["steps"]) == 6
    (run / "metrics.jsonl").write_text('{"kind": "eval"\n')
    with pytest.raises(Exception, match="line 1 is not JSON"):
        read_run(run)


def test_report_shows_the_judge_and_category_distribution(tmp_path):
    run = make_run(tmp_path / "lmc", [0.01] * 5)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**cfg, "feedback_type": "lmu"}))
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for r in recs:
        if r["kind"] == "iteration":
            r["new_bucket_distribution"] = [0.5, 0.25, 0.25, 0.0]
            r.update(
                invalid=3,
                agreement_mean=0.75,
                judge={
                    "questions": 20,
                    "cache_hits": 5,
                    "requests": 17,
                    "retries": 2,
                    "failures": 1,
                    "prompt_tokens": 100,
                    "completion_tokens": 20,
                    "cost": 0.0,
                    "errors": {"http_500": 2},
                },
            )
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    text = write_report([run]).read_text()
    assert (
        "| iteration | questions | cache hits | requests | retries | failures | invalid | agreement | tokens | cost | score 3 |"
        in text
    )
    assert "| 1 | 20 | 5 | 17 | 2 | 1 | 3 | 0.75 | 120 | 0.0000 | 0.50 | 0.25 | 0.25 | 0.00 |" in text
