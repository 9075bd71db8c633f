"""Optimizer, learning-rate schedule and EMA for the LoRA parameters.

What: :func:`build_optimizer` maps ``train.optimizer`` to an optimizer over the LoRA weights,
:func:`build_lr_scheduler` maps ``train.lr_scheduler`` to a schedule, and :class:`LoRAEMA` keeps an
exponential moving average of the LoRA weights.

Optimizers (``train.optimizer_params`` are passed through as keyword arguments):

* ``coat_fp8_adamw``: coatflux's FP8AdamW, whose two moments are stored in FP8 as configured in
  ``coat.optimizer`` (about 2 bytes/param instead of 8), in its fused multi-tensor form
  (:class:`~coatflux.kernels.adamw.FusedFP8AdamW`, same state bytes as the reference);
* ``adamw``: ``torch.optim.AdamW`` with ``eps=1e-6`` unless given, ai-toolkit's default;
* ``adamw8bit``: bitsandbytes' ``AdamW8bit`` (optional extra ``coatflux[bnb]``);
* ``adafactor``: transformers' ``Adafactor`` with a fixed external learning rate.

Schedules are all one :class:`torch.optim.lr_scheduler.LambdaLR` with a plain function of the step
(linear warmup, then constant, cosine or linear decay to 0 at ``train.steps``), rather than a mix
of torch and diffusers classes: one class means one ``state_dict`` shape to checkpoint, and the
formula is visible here. Warmup comes from ``lr_scheduler_params.num_warmup_steps`` (diffusers'
name) or ``warmup_steps``. The scheduler steps once per optimizer step.

The EMA lives here and not in the optimizer so that any optimizer can be combined with it; it is a
plain fp32 copy of each LoRA tensor, checkpointed with the run.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from coatflux.core.config import COATConfig, ConfigError
from coatflux.trainer.config import TrainConfig


def build_optimizer(params: Sequence[torch.nn.Parameter], train: TrainConfig, coat: COATConfig) -> torch.optim.Optimizer:
    """The optimizer named by ``train.optimizer`` over ``params``, at ``train.lr``."""
    name, lr, extra = train.optimizer, train.lr, dict(train.optimizer_params)
    if name == "coat_fp8_adamw":
        # The fused multi-tensor step gives byte-identical state to the reference FP8AdamW and
        # runs one update over all of a group's LoRA tensors instead of ~60 kernels per tensor.
        from coatflux.kernels.adamw import FusedFP8AdamW as FP8AdamW

        return FP8AdamW(params, lr=lr, fp8_config=coat.optimizer, **extra)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, **{"eps": 1e-6, **extra})
    if name == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise ConfigError("train.optimizer: 'adamw8bit' needs bitsandbytes, which is not installed; "
                              "run `pip install coatflux[bnb]` or choose coat_fp8_adamw") from None
        return bitsandbytes.optim.AdamW8bit(params, lr=lr, **{"eps": 1e-6, **extra})
    if name == "adafactor":
        from transformers.optimization import Adafactor

        defaults = {"relative_step": False, "scale_parameter": False, "warmup_init": False}
        return Adafactor(params, lr=lr, **{**defaults, **extra})
    raise ConfigError(f"train.optimizer: {name!r} is not supported")


def warmup_steps(train: TrainConfig) -> int:
    params = train.lr_scheduler_params
    value = params.get("num_warmup_steps", params.get("warmup_steps", 0))
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"train.lr_scheduler_params.num_warmup_steps: expected an integer >= 0, got {value!r}")
    return int(value)


def lr_factor(step: int, kind: str, total: int, warmup: int) -> float:
    """Multiplier of the base learning rate after ``step`` optimizer steps."""
    if warmup and step < warmup and kind != "constant":
        return (step + 1) / warmup
    if kind in ("constant", "constant_with_warmup"):
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "linear":
        return 1.0 - progress
    raise ConfigError(f"train.lr_scheduler: {kind!r} is not supported")


def build_lr_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """``train.lr_scheduler`` as a LambdaLR (``constant`` ignores warmup, as in diffusers)."""
    kind, total, warmup = train.lr_scheduler, train.steps, warmup_steps(train)
    lr_factor(0, kind, total, warmup)  # fail on a bad name now, not at the first step
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, kind, total, warmup))


class LoRAEMA:
    """Exponential moving average of trainable tensors: ``ema = d * ema + (1 - d) * p``."""

    def __init__(self, params: Sequence[torch.nn.Parameter], decay: float) -> None:
        self.params = list(params)
        self.decay = decay
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        for shadow, p in zip(self.shadow, self.params, strict=True):
            shadow.lerp_(p.detach().float(), 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Temporarily put the EMA weights into the model (for saving and sampling)."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, shadow in zip(self.params, self.shadow, strict=True):
                p.copy_(shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, saved in zip(self.params, backup, strict=True):
                    p.copy_(saved)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": [t.cpu() for t in self.shadow]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError("EMA checkpoint does not match the LoRA parameters")
        self.shadow = [t.to(p.device, torch.float32) for t, p in zip(state["shadow"], self.params, strict=True)]
