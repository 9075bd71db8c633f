"""One process or many: the trainer's view of data-parallel training through accelerate.

What: :func:`make_runtime` returns a :class:`Runtime` that knows this process's rank and world
size, wraps the transformer for DDP, averages numbers across processes and synchronises them.
Run ``accelerate launch --multi_gpu --num_processes N -m coatflux train CONFIG`` (``torchrun`` on CPU, or ``coatflux train`` for
one process).

How the data is split: the run's micro-batches form one global sequence (a pure function of the
seed, see :mod:`coatflux.trainer.data`); an optimizer step consumes ``world_size x
gradient_accumulation`` of them and rank ``r`` takes every ``world_size``-th, starting at ``r``.
Each micro-batch draws its noise and timesteps from a generator seeded by its global index. So N
processes with batch B compute, up to the order of floating-point sums, the same update as one
process with batch B and N times the accumulation, and the data position saved in a checkpoint is
one global number that every rank agrees on.

Why accelerate only when launched by it: accelerate's process state is a process-wide singleton,
and a single process needs none of it; the DDP wrapper, the reductions and the barriers are all
no-ops there. ``broadcast_buffers`` is off because the frozen FP8 weights are buffers that every
rank loaded identically: broadcasting them on every forward would move the whole model each step.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class Runtime:
    """This process's place in the run; a single-process run has rank 0 of 1 and no accelerator."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    accelerator: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model to call for training: DDP across processes, the model itself otherwise."""
        if self.accelerator is None:
            return model
        return self.accelerator.prepare(model)

    @contextlib.contextmanager
    def no_sync(self, wrapped: nn.Module, skip: bool) -> Iterator[None]:
        """Skip the gradient all-reduce for an accumulation micro-batch that is not the last."""
        if skip and self.world_size > 1 and hasattr(wrapped, "no_sync"):
            with wrapped.no_sync():
                yield
        else:
            yield

    def mean(self, value: float) -> float:
        """``value`` averaged over all processes."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        return float(self.accelerator.reduce(t, reduction="mean").item())

    def any(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on one (a stop signal may reach only one)."""
        if self.world_size == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.accelerator.reduce(t, reduction="sum").item() > 0)

    def barrier(self) -> None:
        if self.world_size > 1:
            self.accelerator.wait_for_everyone()


def launched_distributed() -> bool:
    """Whether this process was started by ``accelerate launch``/``torchrun`` with several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def make_runtime(device: torch.device) -> Runtime:
    """The runtime for ``device``; with several processes, accelerate places each on its own device."""
    if not launched_distributed():
        return Runtime(device)
    from accelerate import Accelerator, DistributedDataParallelKwargs

    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
    accelerator = Accelerator(cpu=device.type == "cpu", kwargs_handlers=[ddp])
    return Runtime(accelerator.device, accelerator.process_index, accelerator.num_processes, accelerator)
