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


def _script():
    spec = importlib.util.spec_from_file_location("sample_efficiency", ROOT / "benchmarks" / "sample_efficiency.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


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
