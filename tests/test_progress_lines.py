"""When stderr is not a terminal (a log, CI, nohup), train, eval and generate print one plain line per phase."""

from __future__ import annotations

import re

from conftest import run_altlm
from test_train_smoke import SMALL


def test_train_eval_and_generate_print_one_line_per_phase_into_a_log(tmp_path):
    run = tmp_path / "r"
    r = run_altlm("train", "--config", "smoke", f"output_dir={run}", "iterations=2", *SMALL, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("altlm: ")]
    for it in (1, 2):
        for name, numbers in (
            ("sampling", r"samples 12"),
            ("feedback", r"scored 12, mean score [-\d.e]+"),
            ("training", r"steps 2, examples 8, loss [-\d.e]+, kl [-\d.e]+"),
        ):
            pattern = rf"altlm: iteration {it} {name}: {numbers}, \d+\.\d s$"
            assert sum(bool(re.fullmatch(pattern, ln)) for ln in lines) == 1, (pattern, lines)
    evals = [ln for ln in lines if ln.startswith("altlm: evaluation ")]
    assert any(ln.startswith("altlm: evaluation reference [no feedback]: samples 2, toxicity mean") for ln in evals)
    assert any(ln.startswith("altlm: evaluation policy [Lowest Toxicity]: samples 2") for ln in evals)
    assert "it/s" not in r.stderr  # no progress bar drawn into the log
    r = run_altlm("generate", "--run", str(run), "--samples", "2", "a prompt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"^altlm: generate: samples 2, \d+\.\d s$", r.stderr, re.M), r.stderr
