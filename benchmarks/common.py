"""What the benchmarks share: one `altlm` command with a deadline, and atomic writes of their results.

`run_altlm` is the time-box of steer_budget, ablations and sample_efficiency_sentiment. At the deadline the run gets
Ctrl-C, as a user would give it: altlm stops at once and keeps everything it saved, so the same command with
`--resume` goes on later. A run that does not stop within `grace` seconds is killed; SIGKILL loses nothing committed
either (runs write atomically), only the work since the last commit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

# The sentiment-demo recipe's settings when the committed ablation and sample-efficiency results were measured
# (commit 5bebda4); the demo has moved on (README "Results"), and both benchmarks keep these so their points compare.
DEMO_RECIPE_THEN = ["reference_input=prompt", "kl_coef=0.1", "top_p=1.0", "learning_rate=1e-3"]


def run_altlm(args: list[str], seconds: float | None, grace: float = 60.0) -> tuple[int, str, bool]:
    """(exit code, stderr, stopped by the deadline) of `python -m altlm *args`."""
    p = subprocess.Popen(
        [sys.executable, "-m", "altlm", *args],
        env=dict(os.environ, TOKENIZERS_PARALLELISM="false"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: the signal reaches the run's workers too
        # a benchmark started in the background of a shell inherits SIGINT ignored: Ctrl-C must reach the run
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        _, err = p.communicate(timeout=None if seconds is None else max(1.0, seconds))
        return p.returncode, err, False
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGINT)
    try:
        _, err = p.communicate(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        _, err = p.communicate()
    return p.returncode, err, True


def write_atomic(path: Path, data: bytes | str) -> None:
    """A reader never sees half a file; a killed writer leaves the old one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600
    os.replace(tmp, path)


def save_figure(fig, path: Path, dpi: int) -> None:
    """`fig` as a PNG at `path`, atomically, and closed."""
    import matplotlib.pyplot as plt  # here, not at the top: the scripts import matplotlib only when they plot

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
