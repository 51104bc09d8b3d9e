"""Several processes, one run: who does what when altlm runs under torchrun / `accelerate launch`.

One process (the default) needs none of this: every function here is then a no-op or the identity. With N
processes: sampling batches and feedback chunks are dealt out round-robin (batch b to process b mod N — the
same batches, seeded the same way, as one process would make, so the samples are identical) and gathered;
the main process alone writes the pool, logs, snapshots and checkpoints; every process reads the pool and
draws the same training rows, takes every N-th row of each batch, and DDP averages the gradients of a loss
normalised by the global token count, so an optimiser step equals one process's step on the whole batch.
Evaluation runs on the main process. The run folder must be on a filesystem every process sees.
"""
from __future__ import annotations

from accelerate import PartialState
from accelerate.utils import gather_object


class Processes:
    def __init__(self) -> None:
        import torch

        # cpu=True on machines without CUDA: otherwise accelerate ignores torchrun's environment there (one process each)
        self.state = PartialState(cpu=not torch.cuda.is_available())
        self.rank, self.world = self.state.process_index, self.state.num_processes
        self.main = self.state.is_main_process
        self.device = self.state.device

    def wait(self) -> None:
        if self.world > 1:
            self.state.wait_for_everyone()

    def merge(self, part: dict) -> dict:
        """Union of every process's {index: item}."""
        if self.world == 1:
            return part
        out: dict = {}
        for d in gather_object([part]):
            out.update(d)
        return out

    def sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()
