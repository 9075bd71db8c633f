"""What the loop does when a run goes wrong: a stop signal, a non-finite step, out of memory.

What: :class:`StopSignals` turns SIGINT and SIGTERM into a request the loop honours between
optimizer steps; :class:`NonFiniteGuard` decides whether a step's loss and gradients are usable,
counts the skipped steps and names where a non-finite value first appeared;
:func:`out_of_memory_advice` turns a CUDA out-of-memory error into suggestions drawn from the
config.

Why between steps: a signal that lands mid-step would leave gradients half accumulated and the
data position between micro-batches. Finishing the step costs seconds and makes the checkpoint
an ordinary one, which resumes exactly. A second SIGINT raises ``KeyboardInterrupt`` at once for
the user who cannot wait; the newest checkpoint on disk is then used on resume.

Why skip rather than stop at the first non-finite step: a single bad batch (an fp16/FP8
overflow at a rare timestep) is common and harmless if its update is dropped, as mixed-precision
loss scaling does; a run that keeps producing them has diverged, and stopping early with a
diagnosis saves the GPU hours that would be spent producing NaN weights. Where a non-finite loss
came from is found by replaying the same micro-batch forward with hooks (its noise is a function
of its index, so the replay is exact) instead of hooking every module on every step, which would
force a device sync per module.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import torch
from torch import nn

from coatflux.trainer.config import TrainJobConfig


class StopSignals:
    """Record SIGINT/SIGTERM while active; the loop checks :attr:`received` between steps."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        # Signal handlers can only be installed from the main thread (a trainer driven from a
        # worker thread keeps the default behaviour, and says nothing is caught).
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now, the newest checkpoint is used on resume
        self.received = signum
        print(f"\n{signal.Signals(signum).name} received: finishing this step, then saving a checkpoint "
              "(Ctrl-C again to stop at once)", flush=True)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


# ----------------------------------------------------------------------------------------------
# Non-finite steps.


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


@dataclass
class NonFiniteGuard:
    """Counts skipped steps; ``limit`` skipped in a row is a divergence."""

    limit: int
    in_a_row: int = 0
    total: int = 0
    events: list[str] = field(default_factory=list)

    def record_skip(self, message: str) -> bool:
        """Count a skipped step; True when the run must stop."""
        self.in_a_row += 1
        self.total += 1
        self.events = [*self.events[-9:], message]
        return self.in_a_row >= self.limit

    def record_ok(self) -> None:
        self.in_a_row = 0

    def state_dict(self) -> dict[str, int]:
        return {"in_a_row": self.in_a_row, "total": self.total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.in_a_row, self.total = int(state["in_a_row"]), int(state["total"])


def gradient_norm(params: Iterable[nn.Parameter]) -> torch.Tensor:
    """The global L2 norm of the gradients (non-finite if any element is)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads, norm_type=2.0, error_if_nonfinite=False)


def nonfinite_gradients(named_params: Iterable[tuple[str, nn.Parameter]], limit: int = 3) -> list[str]:
    """Names of the first ``limit`` parameters whose gradient has a NaN or inf."""
    found = []
    for name, p in named_params:
        if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
            found.append(name)
            if len(found) == limit:
                break
    return found


def first_nonfinite_output(model: nn.Module, forward: Callable[[], Any]) -> str | None:
    """Replay ``forward`` without grad; the first module (in execution order) with a non-finite output."""
    first: list[str] = []

    def hook(name: str) -> Callable:
        def check(_module: nn.Module, _args: Any, output: Any) -> None:
            if first:
                return
            tensors = output if isinstance(output, tuple | list) else (output,)
            for t in tensors:
                if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    first.append(name)
                    return
        return check

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            forward()
    finally:
        for handle in handles:
            handle.remove()
    return first[0] if first else None


# ----------------------------------------------------------------------------------------------
# Out of memory.


class TrainingOutOfMemory(RuntimeError):
    """The device ran out of memory; the message carries the memory report and suggestions."""


def out_of_memory_advice(cfg: TrainJobConfig) -> list[str]:
    """Concrete changes, from the most to the least memory saved, that this config has not made."""
    advice = []
    if not (cfg.coat.enabled and cfg.coat.activation.use_fp8):
        advice.append("enable COAT FP8 activations: coat: {enabled: true, activation: {use_fp8: true}} "
                      "(about 0.45x the saved activations)")
    if not cfg.train.gradient_checkpointing:
        advice.append("turn on train.gradient_checkpointing: true (activations of one block at a time)")
    if cfg.train.batch_size > 1:
        advice.append(f"lower train.batch_size from {cfg.train.batch_size} (raise train.gradient_accumulation "
                      "to keep the effective batch)")
    largest = max(r for d in cfg.datasets for r in d.resolution)
    if largest > 512:
        advice.append(f"train at lower resolutions (datasets[].resolution includes {largest}; "
                      "activation memory grows with the square of the side)")
    if cfg.train.optimizer != "coat_fp8_adamw":
        advice.append(f"use train.optimizer: coat_fp8_adamw instead of {cfg.train.optimizer} "
                      "(FP8 moments, about 2 bytes per trained parameter)")
    if not cfg.model.quantize and not (cfg.coat.enabled and cfg.coat.activation.use_fp8):
        advice.append("store the frozen transformer in FP8: model.quantize: true")
    if cfg.network.type == "lora" and cfg.network.linear > 32:
        advice.append(f"a smaller LoRA rank than network.linear: {cfg.network.linear}")
    return advice or ["this config already uses every memory saving coatflux has; use a GPU with more memory"]
