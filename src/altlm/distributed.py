"""Several processes, one run: who does what when altlm runs under torchrun / `accelerate launch`.

One process (the default) needs none of this: every function here is then a no-op or the identity. With N
processes: sampling batches and feedback chunks are dealt out round-robin (batch b to process b mod N — the
same batches, seeded the same way, as one process would make, so the samples are identical) and gathered;
the main process alone writes the pool, logs, snapshots and checkpoints; every process reads the pool and
draws the same training rows, takes every N-th row of each batch, and the gradients of a loss normalised by
the global token count are averaged over the processes, so an optimiser step equals one process's step on the
whole batch. Evaluation runs on the main process. The run folder must be on a filesystem every process sees.

How the model is spread (`sharding`):
  ddp           every process holds the whole model, gradients and AdamW state; gradients are all-reduced.
  fsdp          FSDP2 (`fully_shard` per decoder block and on the root): weights, gradients and AdamW state are
                sharded over the processes and a block's weights are gathered for its forward and again for its
                backward — DeepSpeed ZeRO-3's memory, for models whose training state does not fit on one device.
  fsdp_grad_op  the same, but a block's gathered weights are kept from its forward to its backward (one gather
                less per step, more memory) — ZeRO-2's trade.
Sampling, evaluation and checkpoints need whole weights: `full()` gathers them into a plain copy (a collective
call: every process makes it), so the sampler, the evaluator and `save_pretrained` never see a shard.
"""

from __future__ import annotations

import contextlib
import copy
import os

import torch
from accelerate import PartialState
from accelerate.utils import gather_object

from .errors import AltlmError


def _sharding_from_accelerate() -> str:
    """What `accelerate launch --config_file configs/accelerate/<x>.yaml` asked for (its environment)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        raise AltlmError(
            "accelerate launch with a DeepSpeed config: altlm shards with FSDP instead (ZeRO-3's memory: "
            "configs/accelerate/fsdp.yaml; ZeRO-2's: configs/accelerate/fsdp_grad_op.yaml); relaunch with one of those"
        )
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() != "true":
        return "ddp"
    # FSDP2 configs say fsdp_reshard_after_forward: true/false; FSDP1 ones a strategy name or number (2 = SHARD_GRAD_OP)
    keep = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() in (
        "false",
        "shard_grad_op",
        "2",
    ) or os.environ.get("FSDP_SHARDING_STRATEGY", "").lower() in ("shard_grad_op", "2")
    return "fsdp_grad_op" if keep else "fsdp"


class Processes:
    def __init__(self, sharding: str = "auto") -> None:
        # cpu=True on machines without CUDA: otherwise accelerate ignores torchrun's environment there (one process each)
        self.state = PartialState(cpu=not torch.cuda.is_available())
        self.rank, self.world = self.state.process_index, self.state.num_processes
        self.main = self.state.is_main_process
        self.device = self.state.device
        self.sharding = sharding if sharding != "auto" else _sharding_from_accelerate()
        self._shell = None  # fsdp: the model's modules and buffers without parameters (wrap), that full() fills

    def wait(self) -> None:
        if self.world > 1:
            self.state.wait_for_everyone()

    def close(self) -> None:
        """End the process group once a run is done (several processes). A process that exits with gloo's threads
        still running can abort at exit ("terminate called without an active exception"): seen once in the suite."""
        if self.world > 1:
            self.wait()
            self.state.destroy_process_group()

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
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    # ------------------------------------------------------------------ the model
    def wrap(self, model):
        """The module the training forward runs through: `model` itself (one process; FSDP, which shards it in
        place), or a DDP wrapper. Call once, with the model on its device and its dtypes final."""
        if self.world == 1:
            return model
        if self.main:
            print(f"{self.world} processes ({torch.distributed.get_backend()}), sharding: {self.sharding}")
        if self.sharding == "ddp":
            return torch.nn.parallel.DistributedDataParallel(model)
        from torch.distributed.fsdp import fully_shard

        # Before sharding: the plain modules and buffers, each parameter (a tied one once) a meta tensor — deepcopy
        # takes them from its memo, so no weight is copied.
        memo = {
            id(p): torch.nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad) for p in model.parameters()
        }
        self._shell = copy.deepcopy(model, memo)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        blocks = set(getattr(base, "_no_split_modules", None) or [])  # transformers' name for a decoder block class
        keep = self.sharding == "fsdp_grad_op"
        units = [m for m in base.modules() if type(m).__name__ in blocks]
        if not units and self.main:
            print(
                f"warning: {type(base).__name__} names no decoder-block class (_no_split_modules): FSDP shards it as one unit, "
                "gathering every weight at once"
            )
        for m in units:
            fully_shard(m, reshard_after_forward=not keep)
        fully_shard(model, reshard_after_forward=not keep)  # the rest (embeddings, tied head, final norm)
        return model

    def no_sync(self, module, skip: bool):
        """DDP: skip the gradient all-reduce of a micro-batch that is not the step's last. FSDP reduce-scatters
        every micro-batch, which keeps the accumulated gradients sharded."""
        return (
            module.no_sync()
            if skip and isinstance(module, torch.nn.parallel.DistributedDataParallel)
            else contextlib.nullcontext()
        )

    def full(self, model, everyone: bool = True):
        """A plain module with `model`'s whole current weights: `model` itself unless FSDP sharded it; then a copy
        gathered from the shards (collective: every process calls it). everyone=False: only the main process
        needs it (evaluation, checkpoints); under FSDP the others get None."""
        from torch.distributed.fsdp import FSDPModule

        if not isinstance(model, FSDPModule):
            return model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=not everyone))
        if not (everyone or self.main):
            return None
        out = copy.deepcopy(self._shell)
        out.load_state_dict(weights, assign=True, strict=True)
        if not hasattr(out, "peft_config"):  # assign= untied a shared head (peft's copy is merged and cast before use)
            out.tie_weights()
        return out.to(self.device)
