"""The benchmarked training recipes, each a function that turns a fresh bf16 model into (model, optimizer).

Every recipe freezes the base transformer, adds rank-16 LoRA adapters (fp32 weights multiplied in
bf16, as under ``torch.autocast``; ai-toolkit's targets: every linear inside the double and single
blocks) and builds an optimizer over them:

* ``bf16`` / ``bf16+ckpt``: the plain baseline, ``torch.optim.AdamW`` (fused on CUDA), with and
  without diffusers' gradient checkpointing (non-reentrant ``torch.utils.checkpoint`` per block).
* ``fp8-storage``: what kohya's ``--fp8_base`` and ai-toolkit's quantized base do: every frozen
  linear keeps its weight in ``float8_e4m3fn`` (one fp32 scale per tensor, like quanto's
  ``qfloat8``) and upcasts it to bf16 on each call; the GEMMs, activations and optimizer stay
  bf16/fp32. :class:`FP8StorageLinear` re-upcasts in backward instead of letting autograd save
  the upcast bf16 copy (which would bring the bf16 weights back for the whole backward pass).
* ``torchao-float8``: ``torchao.float8.convert_to_float8_training`` (tensorwise recipe, eager,
  no ``torch.compile``) on the frozen base linears whose dimensions are multiples of 16, minus the
  AdaLN modulation linears (their M is the batch size). Only when torchao imports; else the row
  says "not installed".
* ``coat`` / ``coat+ckpt``: :func:`coatflux.core.api.apply_coat` (FP8 weights, FP8 GEMMs, FP8
  saved activations) and :class:`~coatflux.core.optim.FP8AdamW`, or the fused multi-tensor
  FP8AdamW of :mod:`coatflux.kernels` when ``fused_optimizer`` is set.
* ``coat-unfused``: ``coat`` with ``activation.fused_nonlinear: false``. The fused norm and GELU
  kernels save memory (their outputs are recomputed, not stored) but add compiled-function calls,
  and on an H200 COAT's step was bound by host time; this row measures that trade.
* ``coat-compiled``: ``coat`` with ``activation.compile_blocks: true``: every double and single
  block one ``torch.compile`` graph, FP8 GEMMs and the FP8 compression of saved activations
  inside it (:mod:`coatflux.core.compiled`).
* ``bf16-compiled``: the bf16 baseline with the same blocks compiled, so that the compiler's own
  share of the speed-up is visible next to COAT's; ``torchao-compiled``: torchao's float8
  training with the blocks compiled, its intended use (its eager row pays a tensor-subclass
  dispatch per op).
* ``coat-compiled+cudagraphs`` / ``bf16-compiled+cudagraphs``: the same compiled blocks with
  ``mode="reduce-overhead"``: inductor records each block's forward and backward as CUDA graphs
  and replays them, one launch per graph instead of one per kernel. On an H100 the compiled
  steps cost about 45 us per Triton launch at 512 px (``docs/benchmarks-notes.md``), so these
  rows measure how much of the step is host time. The step loop marks each step's start
  (``torch.compiler.cudagraph_mark_step_begin``) and drops gradients before the next replay.

Compiled rows spend their first (warm-up) step compiling; ``--compile-backend`` picks the
``torch.compile`` backend (``inductor``; the CPU tests use ``aot_eager``, which traces the same
graphs without generating code).

Why functions over a fresh model rather than toggles on one model: every recipe converts modules
in place, so each configuration gets its own model, built again from the preset.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from coatflux.flux.lora import BLOCK_PREFIXES, find_lora_targets, inject_lora, lora_parameters

LR = 1e-4


class _UpcastLinear(torch.autograd.Function):
    """``x @ (w8 * s).T + b`` that saves the FP8 weight, not its bf16 upcast, for backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(w8, scale)
        return F.linear(x, w8.to(x.dtype) * scale.to(x.dtype), bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        w8, scale = ctx.saved_tensors
        return grad @ (w8.to(grad.dtype) * scale.to(grad.dtype)), None, None, None


class FP8StorageLinear(nn.Module):
    """A frozen linear whose weight is stored in float8_e4m3fn and upcast to the input dtype per call."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        amax = w.abs().amax().float().clamp(min=1e-12)
        scale = amax / torch.finfo(torch.float8_e4m3fn).max
        self.register_buffer("weight_fp8", (w.float() / scale).to(torch.float8_e4m3fn))
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _UpcastLinear.apply(x, self.weight_fp8, self.weight_scale, self.bias)


@dataclass(frozen=True)
class SetupOptions:
    """Choices that apply to every recipe: the fused FP8AdamW, how the compiled blocks compile, and
    how COAT's FP8 GEMMs accumulate.

    ``compile_dynamic`` defaults to True, ai-toolkit's ``compile_dynamic`` default and so the
    trainer's: one graph serves every resolution (and the inductor cache serves a later run).
    """

    fused_optimizer: bool = False
    compile_backend: str = "inductor"
    compile_dynamic: bool = True
    compile_mode: str | None = None
    fp8_fast_accumulation: bool = True  # COAT configs' FP8 GEMMs (ActivationConfig's default)

    def compile_options(self) -> dict[str, object]:
        options: dict[str, object] = {"backend": self.compile_backend, "dynamic": self.compile_dynamic}
        if self.compile_mode is not None:
            options["mode"] = self.compile_mode
        return options


def _adamw(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=LR, fused=fused or None)


def _add_lora(model: nn.Module, rank: int) -> list[nn.Parameter]:
    model.requires_grad_(False)
    inject_lora(model, rank, float(rank), find_lora_targets(model))
    return lora_parameters(model)


def _swap_frozen_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> int:
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and not child.weight.requires_grad:
                setattr(module, name, make(child))
                count += 1
    return count


def prepare_bf16(model: nn.Module, rank: int, options: SetupOptions) -> torch.optim.Optimizer:
    return _adamw(_add_lora(model, rank))


def prepare_bf16_compiled(model: nn.Module, rank: int, options: SetupOptions) -> torch.optim.Optimizer:
    from coatflux.core.compiled import compile_blocks

    compile_blocks(model, **options.compile_options())
    return _adamw(_add_lora(model, rank))


def prepare_fp8_storage(model: nn.Module, rank: int, options: SetupOptions) -> torch.optim.Optimizer:
    params = _add_lora(model, rank)
    _swap_frozen_linears(model, FP8StorageLinear)
    return _adamw(params)


def _torchao_filter(module: nn.Module, fqn: str) -> bool:
    return (isinstance(module, nn.Linear) and fqn.startswith(BLOCK_PREFIXES) and "norm" not in fqn
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def prepare_torchao(model: nn.Module, rank: int, options: SetupOptions) -> torch.optim.Optimizer:
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    model.requires_grad_(False)
    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name("tensorwise"),
                               module_filter_fn=_torchao_filter)
    return _adamw(_add_lora(model, rank))


def prepare_torchao_compiled(model: nn.Module, rank: int, options: SetupOptions) -> torch.optim.Optimizer:
    from coatflux.core.compiled import compile_blocks

    optimizer = prepare_torchao(model, rank, options)
    compile_blocks(model, **options.compile_options())
    return optimizer


def _prepare_coat(model: nn.Module, rank: int, options: SetupOptions, **activation: bool) -> torch.optim.Optimizer:
    from coatflux.core.api import COATTrainer, apply_coat
    from coatflux.core.config import ActivationConfig, COATConfig

    model.requires_grad_(False)
    activation = {"fp8_fast_accumulation": options.fp8_fast_accumulation, **activation}
    trainer = COATTrainer(COATConfig(activation=ActivationConfig(**activation)))
    apply_coat(model, trainer.config, compile_options=options.compile_options())
    params = _add_lora(model, rank)
    if options.fused_optimizer:
        from coatflux.kernels.adamw import FusedFP8AdamW

        return FusedFP8AdamW(params, lr=LR, fp8_config=trainer.config.optimizer)
    return trainer.create_optimizer(params, lr=LR)


def prepare_coat(model: nn.Module, rank: int, options: SetupOptions) -> torch.optim.Optimizer:
    return _prepare_coat(model, rank, options)


def prepare_coat_unfused(model: nn.Module, rank: int, options: SetupOptions) -> torch.optim.Optimizer:
    return _prepare_coat(model, rank, options, fused_nonlinear=False)


def prepare_coat_compiled(model: nn.Module, rank: int, options: SetupOptions) -> torch.optim.Optimizer:
    return _prepare_coat(model, rank, options, compile_blocks=True)


def _torchao_missing() -> str | None:
    return None if importlib.util.find_spec("torchao") else "not installed"


@dataclass(frozen=True)
class BenchConfig:
    """One recipe: how to prepare a model, whether blocks are checkpointed, and when it cannot run."""

    name: str
    description: str
    prepare: Callable[..., torch.optim.Optimizer]
    checkpointing: bool = False
    unavailable: Callable[[], str | None] = lambda: None
    compile_mode: str | None = None  # torch.compile mode of the compiled blocks (None: the default)

    def options(self, options: SetupOptions | None = None) -> SetupOptions:
        """The run's :class:`SetupOptions` with this recipe's own compile mode."""
        options = options or SetupOptions()
        return options if self.compile_mode is None else replace(options, compile_mode=self.compile_mode)

    def cudagraphs(self, options: SetupOptions | None = None) -> bool:
        """Whether this recipe's compiled blocks replay as CUDA graphs (the step loop must mark steps)."""
        from coatflux.core.compiled import uses_cudagraphs

        return uses_cudagraphs(self.options(options).compile_options())

    def setup(self, model: nn.Module, rank: int, options: SetupOptions | None = None) -> torch.optim.Optimizer:
        """Convert ``model`` in place for this recipe and return its optimizer."""
        optimizer = self.prepare(model, rank, self.options(options))
        if self.checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
        return optimizer


CONFIGS: dict[str, BenchConfig] = {c.name: c for c in (
    BenchConfig("bf16", "bf16 weights and activations, AdamW", prepare_bf16),
    BenchConfig("bf16+ckpt", "bf16, gradient checkpointing per block", prepare_bf16, checkpointing=True),
    BenchConfig("fp8-storage", "FP8 weight storage upcast to bf16 (kohya fp8_base, ai-toolkit)", prepare_fp8_storage),
    BenchConfig("torchao-float8", "torchao float8 training, tensorwise, eager", prepare_torchao,
                unavailable=_torchao_missing),
    BenchConfig("coat", "COAT: FP8 weights, GEMMs, activations, FP8AdamW", prepare_coat),
    BenchConfig("coat+ckpt", "COAT with gradient checkpointing per block", prepare_coat, checkpointing=True),
    BenchConfig("coat-unfused", "COAT without the fused norm/GELU kernels (fewer host calls, more saved bytes)",
                prepare_coat_unfused),
    BenchConfig("coat-compiled", "COAT with each block one torch.compile graph (compile_blocks)",
                prepare_coat_compiled),
    BenchConfig("bf16-compiled", "bf16 with each block one torch.compile graph", prepare_bf16_compiled),
    BenchConfig("coat-compiled+cudagraphs", "coat-compiled, each block's graphs replayed as CUDA graphs "
                "(mode reduce-overhead)", prepare_coat_compiled, compile_mode="reduce-overhead"),
    BenchConfig("bf16-compiled+cudagraphs", "bf16-compiled, each block's graphs replayed as CUDA graphs "
                "(mode reduce-overhead)", prepare_bf16_compiled, compile_mode="reduce-overhead"),
    BenchConfig("torchao-compiled", "torchao float8 training with each block compiled (how torchao is meant to run)",
                prepare_torchao_compiled, unavailable=_torchao_missing),
)}
