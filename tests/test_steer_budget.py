"""benchmarks/steer_budget.py --quick: both tasks at once with the tiny model, through the real CLI runs, so the
benchmark cannot rot silently."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_parallel(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("steer_budget", ROOT / "benchmarks" / "steer_budget.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "results"
    # --minutes is only a cap (a run past it is stopped): 60, so a busy machine's slow quick runs still finish
    assert (
        mod.main(
            [
                "--quick",
                "--parallel",
                "--threads",
                "1",
                "--minutes",
                "60",
                "--work",
                str(tmp_path / "work"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    data = json.loads((out / "steer_budget.json").read_text())
    assert list(data["tasks"]) == ["toxicity", "sentiment"]
    for task, r in data["tasks"].items():
        assert not r["stopped_at_budget"]
        curve = r["curve"]
        # the reference point, then one point per iteration (steer_eval_every=1), examples = steps × batch (3 × 8)
        assert [p["iteration"] for p in curve] == [0, 1, 2, 3]
        assert [p["examples"] for p in curve] == [0, 24, 48, 72]
        for p in curve:
            assert p["likelihood_spearman"] is None or -1 <= p["likelihood_spearman"] <= 1
            assert set(p["by_tag"]) == set(
                json.loads((Path(r["run"]) / "summary.json").read_text())["final"]["by_feedback"]
            )
        assert any(p["likelihood_spearman"] is not None for p in curve)
    md = (out / "steer_budget.md").read_text()
    assert "## toxicity" in md and "## sentiment" in md and "likelihood Spearman" in md
    assert (out / "steer_budget.png").read_bytes()[:4] == b"\x89PNG"
