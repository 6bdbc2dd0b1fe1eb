"""The processes of a data-parallel run, through accelerate (``accelerate launch`` or ``run --num-processes``).

One :class:`Parallel` per process says which process it is and holds the few collective operations the
harness needs; with one process (a plain ``detox-harness run``) every operation is the identity and accelerate
is never imported, so single-process runs compute exactly what they computed before.

What is split, what is gathered (docs/scale.md):

- a PPO batch of ``ppo.batch_size`` rows is split in contiguous shards (:meth:`Parallel.shard`); a row keeps
  its global index, hence its seeds, so its rollout is the one a single process would draw;
- :func:`harness.ppo.step.ppo_step` gathers the rows' per-token tensors after the forward passes, so that
  whitening, KL, score moments, the KL controller's input and the statistics are those of the whole batch;
  each process then forwards its part of every mini-batch, with the loss divided by the mini-batch's global
  action count, and the gradients are summed over the processes (:meth:`Parallel.sum_gradients`) before the
  one optimizer step every process takes identically;
- the before/after evaluation splits its samples the same way and gathers them;
- only the main process writes files (statistics, checkpoints, results, report).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from .errors import HarnessError


def launched_world_size() -> int:
    """The number of processes the launcher started (``WORLD_SIZE``, set by ``accelerate launch``/torchrun)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def launched_as_main() -> bool:
    """Whether this process is the launcher's rank 0 (or not launched at all), without starting accelerate."""
    return os.environ.get("RANK", "0") == "0"


def check_divides(value: int, field: str, processes: int) -> None:
    """Refuse a ``field`` that ``processes`` processes cannot share evenly (each needs the same number of rows);
    ``run --num-processes N`` checks it before starting them, each process again after loading."""
    if value % processes:
        raise HarnessError(f"got {value}, accepted: a multiple of the number of processes ({processes}), "
                           "so that every process gets the same rows", field=field, value=value,
                           fix=f"set {field} to a multiple of {processes} or change --num-processes")


class Parallel:
    """This process's place in the run; one process (``accelerator=None``): every operation is the identity."""

    def __init__(self, accelerator=None):
        self.accelerator = accelerator

    @classmethod
    def from_environment(cls, device: str = "auto") -> Parallel:
        """Under a launcher with several processes, an ``accelerate.Accelerator`` (gloo on CPU, NCCL on CUDA);
        otherwise the single process. ``device`` is the config's: ``cpu`` keeps a multi-process run on the CPU."""
        if launched_world_size() <= 1:
            return cls()
        from accelerate import Accelerator

        return cls(Accelerator(cpu=str(device) == "cpu"))

    # ---------------------------------------------------------------------------- who am I
    @property
    def world_size(self) -> int:
        return 1 if self.accelerator is None else self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return 0 if self.accelerator is None else self.accelerator.process_index

    @property
    def is_main(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def device(self):
        """accelerate's device for this process (``cuda:<local rank>`` or ``cpu``); None with one process."""
        return None if self.accelerator is None else self.accelerator.device

    def shard(self, n: int) -> range:
        """This process's contiguous share of ``n`` rows: ``range(0, n)`` alone, balanced to within one row."""
        w, r = self.world_size, self.rank
        return range(r * n // w, (r + 1) * n // w)

    def check_divides(self, value: int, field: str) -> None:
        """Refuse a ``field`` that the processes cannot share evenly (each needs the same number of rows)."""
        check_divides(value, field, self.world_size)

    # ---------------------------------------------------------------------------- collectives
    def gather(self, tensor):
        """Every process's ``tensor`` (same shape on each), concatenated along dim 0 in process order."""
        if not self.distributed:
            return tensor
        from accelerate.utils import gather

        return gather(tensor.contiguous().to(self.device)).to(tensor.device)

    def gather_object(self, items: Sequence) -> list:
        """Every process's list, concatenated in process order (lists may differ in length)."""
        if not self.distributed:
            return list(items)
        from accelerate.utils import gather_object

        return gather_object(list(items))

    def sum(self, tensor):
        """The element-wise sum of ``tensor`` over the processes (on every process)."""
        if not self.distributed:
            return tensor
        from accelerate.utils import reduce

        return reduce(tensor.to(self.device), reduction="sum").to(tensor.device)

    def any(self, flag: bool) -> bool:
        """True on every process when ``flag`` is True on one (e.g. a stop signal that reached one process)."""
        if not self.distributed:
            return bool(flag)
        import torch

        return bool(self.sum(torch.tensor([1.0 if flag else 0.0])).item() > 0)

    def sum_gradients(self, parameters) -> None:
        """Sum the gradients of ``parameters`` over the processes, in one flat all-reduce.

        Each process's loss is its part of the global mini-batch mean (divided by the global action count),
        so the sum is the single-process gradient. Parameters without a gradient have none on every process.
        """
        if not self.distributed:
            return
        import torch

        grads = [p.grad for p in parameters if p.grad is not None]
        if not grads:
            return
        total = self.sum(torch.cat([g.reshape(-1) for g in grads]))
        offset = 0
        for g in grads:
            g.copy_(total[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def wait(self) -> None:
        """Barrier: every process reaches this line before any goes on."""
        if self.distributed:
            self.accelerator.wait_for_everyone()


SINGLE = Parallel()
