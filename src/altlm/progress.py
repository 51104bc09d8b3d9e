"""One plain line per phase when stderr is not a terminal (a log file, CI, nohup, SLURM, a notebook).

The progress bars (tqdm, `disable=None`) switch themselves off when stderr is not a terminal, and a log would
otherwise show nothing for many minutes. A terminal keeps the bars and gets no extra lines.
"""

from __future__ import annotations

import sys
import time


def phase(name: str, started: float, **numbers) -> None:
    """`altlm: <name>: k=v, ..., <seconds> s` on stderr, unless stderr is a terminal (where the bars show it)."""
    if sys.stderr.isatty():
        return
    parts = [
        f"{k.replace('_', ' ')} {v:.4g}" if isinstance(v, float) else f"{k.replace('_', ' ')} {v}"
        for k, v in numbers.items()
        if v is not None
    ]
    print(f"altlm: {name}: {', '.join(parts + [f'{time.time() - started:.1f} s'])}", file=sys.stderr, flush=True)
