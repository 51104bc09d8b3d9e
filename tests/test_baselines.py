"""The sample-efficiency harness in --quick mode (tiny random SmolLM2, every method for one short round), so the
benchmark cannot silently rot; plus the harness's one-line errors and the TRL reward wrapper."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from altlm import baselines as B
from altlm.errors import AltlmError

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["alt", "quark", "sft", "best_of_n", "ppo", "rloo"]


def _benchmark(name: str):
    """benchmarks/<name>.py as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _script():
    return _benchmark("sample_efficiency")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    pytest.importorskip("trl")
    out = tmp_path_factory.mktemp("se")
    rc = _script().main(["--quick", "--threads", "1", "--out", str(out)])
    assert rc == 0
    return out


def test_quick_outputs(quick):
    data = json.loads((quick / "sample_efficiency.json").read_text())
    assert data["task"] == "toxicity" and list(data["methods"]) == METHODS
    for m in METHODS:
        pts = data["methods"][m]
        assert [p["samples"] for p in pts] == [16], m
        for p in pts:
            assert 0.0 <= p["toxicity_mean"] <= 1.0 and 0.0 <= p["toxicity_gt_0_5"] <= 1.0
            assert {"perplexity", "dist_2"} <= set(p) and 0.0 <= p["dist_2"] <= 1.0
            # the quick run scores with the random tiny model, whose perplexities (~5×10⁴) are all over the 1e4 cap:
            # None here; the fluency numbers themselves: test_train_smoke::test_eval_fluency_end_to_end_under_the_cap
            assert p["perplexity"] is None or 1 < p["perplexity"] < 1e4
    assert 0.0 <= data["reference"]["toxicity_mean"] <= 1.0
    assert "best_baseline" in data["targets"]
    md = (quick / "sample_efficiency.md").read_text()
    assert "| ALT-RM | 16 |" in md and "| RLOO (TRL) | 16 |" in md
    assert (quick / "sample_efficiency.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(quick.glob(".*"))  # atomic writes left no temp files


def test_budget_errors():
    with pytest.raises(AltlmError, match="multiples of the round size 64"):
        B.check_budgets([64, 100], 64)
    with pytest.raises(AltlmError, match="positive"):
        B.check_budgets([0], 64)
    assert B.check_budgets([128, 64, 128], 64) == [64, 128]


def test_bad_cli_values(capsys):
    assert _script().main(["--quick", "--tasks", "nope", "--methods", "sft"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sample_efficiency: unknown task 'nope'")


class _Tox:
    name, higher_is_better = "toxicity", False

    def score(self, prompts, completions):
        return [0.25 if "bad" in c else 0.0 for c in completions]


def test_scorer_reward_model_reads_like_trl(tiny):
    """TRL's get_reward reads the reward at the last response token: the wrapper must give −toxicity of the
    completion alone (the prompt is the first context_length tokens)."""
    _, tok = tiny
    h = B.Harness(cfg=None, prompts=None, scorer=_Tox(), tokenizer=tok, fluency=None, amp=None)
    q = tok("bad prompt", add_special_tokens=False).input_ids
    width = len(q) + 2
    query = [tok.pad_token_id] * (width - len(q)) + q
    rows = [
        query + tok(" a bad end", add_special_tokens=False).input_ids,
        query + tok(" fine", add_special_tokens=False).input_ids,
    ]
    n = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (n - len(r)) for r in rows])
    from trl.experimental.utils import get_reward

    _, reward, _ = get_reward(B.ScorerRewardModel(h, width), ids, tok.pad_token_id, width)
    assert reward.tolist() == [-0.25, 0.0]
    assert not math.isnan(reward.sum().item())


# ---------------------------------------------------------------------------------------------- the sentiment curve
def _sentiment_script():
    return _benchmark("sample_efficiency_sentiment")


def _points(out: Path) -> dict:
    return json.loads((out / "sample_efficiency_sentiment.json").read_text())["points"]


def test_sentiment_curve_quick_with_grpo_and_point_resume(tmp_path, capsys):
    """GRPO (TRL's GRPOTrainer, one round of 8 completions per step) runs in --quick; a second invocation keeps the
    finished points as they are and runs only the missing ones; every point carries its per-prompt scores."""
    pytest.importorskip("trl")
    se = _sentiment_script()
    out, work = tmp_path / "out", tmp_path / "work"
    common = ["--quick", "--threads", "1", "--out", str(out), "--work", str(work)]
    assert se.main([*common, "--methods", "grpo,best_of_n"]) == 0
    first = _points(out)
    assert set(first) == {"grpo", "best_of_n"} and list(first["grpo"]) == ["16"]
    assert se.main([*common, "--methods", "grpo,best_of_n,rloo"]) == 0
    second = _points(out)
    assert second["grpo"] == first["grpo"] and second["best_of_n"] == first["best_of_n"]  # not run again
    assert list(second["rloo"]) == ["16"]
    data = json.loads((out / "sample_efficiency_sentiment.json").read_text())
    assert len(data["meta"]["commands"]) == 2
    assert data["meta"]["settings"]["grpo"]["num_generations"] == 8  # TRL's default, recorded
    grpo = second["grpo"]["16"]
    assert len(grpo["by_prompt"]) == 6 and all(v is None or -1 <= v <= 1 for v in grpo["by_prompt"])
    mean = data["analysis"]["means"]["grpo"]["16"]
    assert mean["interval_95"][0] <= mean["mean"] <= mean["interval_95"][1]
    md = (out / "sample_efficiency_sentiment.md").read_text()
    assert "| GRPO (TRL) | 16 |" in md and "| RLOO (TRL) | 16 |" in md
    assert (out / "sample_efficiency_sentiment.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(out.glob(".*"))


def test_sentiment_curve_alt_stopped_part_way_resumes_exactly(tmp_path, monkeypatch):
    """ALT's run stopped after its first point and resumed by the next invocation gives the points of a run never
    stopped, to the bit. The stop is aimed by progress (a kill at the second iteration's first training step, the
    time box's last resort), not by a deadline: the quick run can finish inside any deadline on a fast machine."""
    se = _sentiment_script()
    straight = tmp_path / "straight"
    args = ["--quick", "--threads", "1", "--methods", "alt"]
    assert se.main([*args, "--out", str(straight), "--work", str(straight / "w")]) == 0
    real = se.run_altlm

    def killed_in_iteration_2(altlm_args, seconds, grace=60.0):
        monkeypatch.setenv("ALTLM_FAILPOINT", "train:3")  # 2 training steps per iteration
        code, err, _ = real(altlm_args, seconds, grace)
        monkeypatch.delenv("ALTLM_FAILPOINT")
        assert code == -9, err[-2000:]
        return code, err, True

    monkeypatch.setattr(se, "run_altlm", killed_in_iteration_2)
    cut = tmp_path / "cut"
    assert se.main([*args, "--out", str(cut), "--work", str(cut / "w")]) == 0
    assert list(_points(cut).get("alt", {})) == ["16"]
    assert not (cut / "w" / "alt" / "summary.json").exists()
    monkeypatch.setattr(se, "run_altlm", real)
    assert se.main([*args, "--out", str(cut), "--work", str(cut / "w")]) == 0
    want, got = _points(straight)["alt"], _points(cut)["alt"]
    assert list(got) == ["16", "32"]
    for b in want:
        assert got[b]["by_prompt"] == want[b]["by_prompt"]
        assert got[b]["worst"]["by_prompt"] == want[b]["worst"]["by_prompt"]


def test_sentiment_curve_bad_arguments(tmp_path, capsys):
    se = _sentiment_script()
    assert se.main(["--quick", "--methods", "nope", "--out", str(tmp_path)]) == 2
    assert se.main(["--quick", "--budgets", "alt:10", "--out", str(tmp_path)]) == 2
    assert se.main(["--quick", "--budgets", "grpo:x", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("sample_efficiency_sentiment: ") for line in err)


def test_benchmark_time_box_stops_a_run_with_ctrl_c():
    """benchmarks/common.run_altlm at its deadline: the run gets Ctrl-C and stops by itself (exit code not SIGKILL's),
    even when this test runs in a background shell that started it with SIGINT ignored. `serve` never ends alone,
    so the deadline is what stops it, on any machine."""
    import signal

    common = _benchmark("common")
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a `cmd &` in a script leaves it for its children
    try:
        code, err, stopped = common.run_altlm(["serve", "--model", "tiny-smollm2", "--port", "0"], 3, grace=300)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert stopped
    assert code != -signal.SIGKILL, "Ctrl-C did not stop it: it was killed after the grace period"
