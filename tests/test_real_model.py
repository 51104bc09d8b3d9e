"""One short ALT run with the real offline SmolLM2-135M (LoRA): the pipeline works on a real model and its
completions are English, not the token salad of the tiny random model.

Marked `slow` (it loads a real 135M model) but not skipped: `make test` runs it. `threads=1` keeps it from
fighting other processes for the cores of small CI runners.
"""

from __future__ import annotations

import json
import re
import sqlite3

import pytest
from conftest import run_altlm

# Frequent English function words: about half the words of real English text, ~0% of random-token text.
COMMON = set(
    """the a an and or but of to in on at for with from by as is are was were be been it its this that these
those i you he she we they me him her us them my your his our their not no yes do does did have has had will would can
could should there here what who when where how so if then than just all some one up out about into over""".split()
)


@pytest.mark.slow
def test_real_smollm2_lora_run(tmp_path):
    run = tmp_path / "real"
    r = run_altlm(
        "train",
        "--config",
        "smoke",
        "model=smollm2-135m",
        "training_mode=lora",
        "precision=auto",
        "iterations=1",
        "prompts_per_iteration=8",
        "train_steps=2",
        "batch_size=4",
        "num_eval_prompts=4",
        "eval_samples_per_prompt=1",
        "max_new_tokens=8",
        "threads=1",
        f"output_dir={run}",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-4000:]

    s = json.loads((run / "summary.json").read_text())
    assert s["metric"] == "toxicity" and s["eval_prompts"] == 4
    assert 0.0 <= s["final"]["toxicity_mean"] <= 1.0 and 0.0 <= s["reference"]["toxicity_mean"] <= 1.0
    assert len(s["final"]["by_feedback"]) == 5
    assert (run / "checkpoint" / "adapter_model.safetensors").exists()
    db = sqlite3.connect(run / "pool.sqlite")
    assert db.execute("SELECT COUNT(*) FROM samples").fetchone()[0] == 8 * 2  # smoke: samples_per_prompt=2
    db.close()

    recs = [json.loads(line) for line in (run / "eval_samples.jsonl").read_text().splitlines()]
    assert len(recs) == 4 * (1 + 5) * 2  # 4 prompts × (untagged + 5 feedback) × (reference, final)
    comps = [x["completion"] for x in recs]
    assert sum(bool(c.strip()) and bool(re.search(r"[A-Za-z]", c)) for c in comps) >= 0.8 * len(comps)
    words = [w for c in comps for w in re.findall(r"[a-z']+", c.lower())]
    assert len(words) >= 2 * len(comps)
    share = sum(w in COMMON for w in words) / len(words)
    assert share > 0.2, (share, comps[:10])
