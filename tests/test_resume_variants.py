"""Crash tests beyond test_resume.py's default run: each variant is killed (SIGKILL, real) where its own state is
written, resumed until it finishes, and must end bit for bit as its uninterrupted twin.

- seed-pool-per-prompt: seed_pool's iteration-0 rows, per-prompt quantiles, the pool flushed (drop_factor=1);
  killed in the reference evaluation, then in iteration 2's feedback (before its pool commit), then in its training.
- llm-judge: ALT-LMU feedback from a judge over HTTP; killed by the judge mid-chunk (the other questions in flight),
  then after iteration 2's feedback is staged.
- lora-frozen-blocks: LoRA on the top block only, a conditioned reference (cache_frozen_layers and
  share_frozen_layers at work), first draws staged three rows at a time (stage_first_draws); killed in iteration 1's
  first step (before any snapshot: the staging runs again), in its second, and in iteration 2's training.
- quark-partial-flush: Quark tokens trained through LoRA's trainable rows; drop_factor=0.5 (a random half retired,
  then the global quantiles re-cut); killed in training (resumed from its snapshot), in evaluation, and in
  iteration 2's feedback (before the commit that flushes and re-cuts).

Each kill is asserted to have happened (exit -9) at the phase it was aimed at (the progress record it left).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import pytest
from test_llm_feedback import ScriptedJudge
from test_resume import CRASH, comparable

QUARK = ["_TREE_TOKEN_00000", "_TREE_TOKEN_00001", "_TREE_TOKEN_00002", "_TREE_TOKEN_00003", "_TREE_TOKEN_00004"]
LMU_SENTENCES = [("Keep it.", 3), ("Say more about the cat.", 2), ("Too vague.", 1), ("Wrong and unclear.", 0)]


def lmu_answer(question: str) -> str:
    completion = question.split("Summary:\n", 1)[1].split("\n\nAnswer in", 1)[0]
    sentence, score = LMU_SENTENCES[zlib.crc32(completion.encode()) % len(LMU_SENTENCES)]
    return f"Analysis: scripted.\nFeedback: {sentence}\nScore: {score}"


class KillingJudge(ScriptedJudge):
    """The scripted judge, which can SIGKILL the run that asks it: at its `n`-th question after `arm` — mid-chunk,
    with the other questions of the chunk in flight, as a power cut during a long judge phase would."""

    def __init__(self):
        self.victim, self.countdown, self.fired = None, 0, threading.Event()
        super().__init__(answer=self._answer)

    def arm(self, proc: subprocess.Popen, n: int) -> None:
        self.victim, self.countdown = proc, n
        self.fired.clear()

    def _answer(self, question: str) -> str:
        with self.lock:
            if self.victim is not None:
                self.countdown -= 1
                if self.countdown == 0:
                    os.kill(self.victim.pid, signal.SIGKILL)
                    self.victim = None
                    self.fired.set()
        return lmu_answer(question)


def lmu_args(url: str) -> list[str]:
    return [
        "feedback_type=lmu",
        "judge_backend=openai",
        "judge_model=scripted",
        f"judge_base_url={url}",
        "judge_timeout=10",
        "judge_concurrency=2",
        "template=prefix",
        "prefix_format=feedback: {feedback} input: ",
        "lmu_exemplars=2",
    ]


# variant → (config overrides, kills: (failpoint or "judge:<n>", the progress phase and iteration_done it leaves))
VARIANTS = {
    "lora-frozen-blocks": (  # cache_frozen_layers: the rows' inputs to the adapted block, saved with the cache
        ["training_mode=lora", "lora_layers=0.5", "reference_input=conditioned", "stage_first_draws=3"],
        [("train:1", "train", 0), ("train:2", "train", 0), ("train:3", "train", 1)],
    ),
    "seed-pool-per-prompt": (
        ["training_mode=full", "seed_pool=true", "quantiles=per_prompt", "drop_factor=1.0", "per_bucket=1"],
        [("eval:1", "reference", 0), ("feedback:2", "sample", 1), ("train:1", "train", 1)],
    ),
    "llm-judge": (
        ["training_mode=lora", "LMU"],
        [("judge:5", "sample", 0), ("feedback:2", "sample", 1)],
    ),
    "quark-partial-flush": (
        [
            "training_mode=lora",
            "template=quark",
            f"feedback_words={json.dumps(QUARK)}",
            f"exemplar={QUARK[0]}",
            "drop_factor=0.5",
        ],
        [("train:2", "train", 0), ("eval:1", "eval", 0), ("feedback:1", "sample", 1)],
    ),
}


def launch(args: list[str], cwd: Path, failpoint: str | None) -> subprocess.Popen:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    env.pop("ALTLM_FAILPOINT", None)
    if failpoint:
        env["ALTLM_FAILPOINT"] = failpoint
    return subprocess.Popen(
        [sys.executable, "-m", "altlm", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(p: subprocess.Popen) -> tuple[int, str]:
    """Wait for the run (generously: a whole LMU run per process on a loaded 2-core machine took over 10 minutes);
    a run left over from a failed wait is killed, never left behind."""
    try:
        _, err = p.communicate(timeout=1800)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return p.returncode, err


@pytest.fixture(scope="module")
def judge():
    srv = KillingJudge()
    yield srv
    srv.close()


def config_args(name: str, run: Path, judge: KillingJudge) -> list[str]:
    overrides = []
    for o in VARIANTS[name][0]:
        overrides += lmu_args(judge.url) + [f"judge_cache={run}.judge.sqlite"] if o == "LMU" else [o]
    return ["train", "--config", "smoke", f"output_dir={run}", *CRASH, *overrides]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_killed_variant_resumes_to_the_uninterrupted_run(tmp_path, judge, name):
    straight = tmp_path / "straight"
    code, err = finish(launch(config_args(name, straight, judge), tmp_path, None))
    assert code == 0, err[-3000:]

    run = tmp_path / "killed"
    args = config_args(name, run, judge)
    for n, (point, phase, done) in enumerate(VARIANTS[name][1]):
        cmd = args if n == 0 else ["train", "--resume", str(run)]
        if point.startswith("judge:"):  # killed by the judge it is asking
            p = launch(cmd, tmp_path, None)
            judge.arm(p, int(point.split(":")[1]))
            code, err = finish(p)
            assert judge.fired.is_set(), "the judge never got to its kill"
        else:
            code, err = finish(launch(cmd, tmp_path, point))
        assert code == -signal.SIGKILL, (point, code, err[-3000:])
        state = json.loads((run / "state.json").read_text())
        assert (state["phase"], state["iteration_done"]) == (phase, done), (point, state)
    code, err = finish(launch(["train", "--resume", str(run)], tmp_path, None))
    assert code == 0, err[-3000:]

    got, want = comparable(run), comparable(straight)
    for m in got["metrics"] + want["metrics"]:
        # The judge's request counts are what each process asked: a resume that finds an iteration's feedback
        # staged asks nothing. Everything the judge's answers decided is compared.
        m.pop("judge", None)
    assert got["pool"][1] == 0, "staged samples left behind"
    for key in ("pool", "metrics", "eval_samples", "summary", "weights"):
        assert got[key] == want[key], key
    assert json.loads((run / "state.json").read_text())["finished"] is True
