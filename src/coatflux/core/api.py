"""One-call API: convert a model's linears, compress its saved activations, build the optimizer.

What: :func:`replace_linear_with_fp8` swaps ``nn.Linear`` modules for
:class:`~coatflux.core.linear.FP8Linear`; :func:`apply_coat` does that and installs the
:class:`~coatflux.core.activation.ActivationCompressor` around the model's forward;
:class:`COATTrainer` bundles both with the optimizer, under the names the user's integration
guide already uses (``COATTrainer(COATConfig()).create_optimizer(params, lr=...)``).

Conversion happens in place, module by module, and returns the same model object. Module names
are matched with ``include`` / ``exclude`` substrings (exclude wins). The compressor is entered by
a forward pre-hook and left by a forward hook registered with ``always_call=True``, so an
exception inside forward never leaves the hooks active. It is installed on the module passed in
(the root), not on inner blocks, so that a block wrapped by non-reentrant gradient checkpointing
keeps checkpointing's own hooks innermost.

With ``activation.compile_blocks`` the model's repeated blocks are compiled instead
(:mod:`coatflux.core.compiled`): the same FP8 linears, traced into one graph per block, and the
saved activations compressed by GraphModule hooks that the compiler inlines into those graphs;
the fused non-linear modules and the eager compressor are then not installed.

Fallbacks are never silent: without FP8 tensor cores the linears keep FP8 weights and FP8 saved
inputs but multiply in the compute dtype, and :func:`apply_coat` warns once, saying what is lost.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from coatflux.core.activation import ActivationCompressor, is_attention_module
from coatflux.core.compiled import (
    COAT_PARTITIONER,
    COAT_RECOMPUTE,
    SavedTensorCompression,
    coat_compile_options,
    compile_blocks,
    inline_hooks_available,
)
from coatflux.core.config import ActivationConfig, COATConfig
from coatflux.core.gemm import GemmPlanner, PlanCache, fp8_gemm_support, shape_supported
from coatflux.core.linear import FP8Linear, InputCache
from coatflux.core.nonlinear import fused_replacement
from coatflux.core.optim import FP8AdamW

logger = logging.getLogger(__name__)


@dataclass
class COATContext:
    """What :func:`apply_coat` attached to a model: its compressor (eager) or compiled blocks, and hooks."""

    config: COATConfig
    compressor: ActivationCompressor | None
    input_cache: InputCache
    converted: list[str] = field(default_factory=list)
    fused: list[str] = field(default_factory=list)
    handles: list[Any] = field(default_factory=list)
    attention_modules: int = 0  # modules that open the compressor's attention scope themselves
    compression: SavedTensorCompression | None = None  # compiled blocks' inlined saved-tensor hooks
    compiled_blocks: list[str] = field(default_factory=list)
    planner: GemmPlanner | None = None  # per-shape FP8-or-not decisions of the eager GEMMs
    fp8_gemm_in_graph: bool = False  # compiled blocks multiply on FP8 tensor cores
    plan_device: torch.device | None = None  # where the planner times each linear's row plan (compiled blocks)
    _stacks: list[contextlib.ExitStack] = field(default_factory=list)
    _scopes: list[contextlib.AbstractContextManager] = field(default_factory=list)

    def fp8_linear(self, linear: nn.Linear, trainable: bool | None = None) -> FP8Linear:
        """``linear`` as an :class:`FP8Linear` that shares this model's input cache and GEMM choices.

        :func:`apply_coat` converts the model's own linears with it; an integration that keeps a
        base linear outside the module tree (ai-toolkit's LoRA) converts that one with it too.
        """
        layer = FP8Linear.from_linear(linear, self.config.activation, self.input_cache, trainable)
        layer.planner = self.planner
        layer.fp8_gemm_in_graph = self.fp8_gemm_in_graph
        n, k = layer.out_features, layer.in_features
        if self.planner is not None and self.plan_device is not None and shape_supported(1, n, k):
            layer.row_plan = self.planner.row_plan(self.plan_device, n, k, layer.compute_dtype)
        return layer

    def enter(self, module: nn.Module, args: Any) -> None:
        stack = contextlib.ExitStack()
        if self.compressor is not None:
            stack.enter_context(self.compressor(find_attention=self.attention_modules == 0))
        elif self.compression is not None:
            stack.enter_context(self.compression())
        self._stacks.append(stack)

    def exit(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._stacks:
            self._stacks.pop().close()

    def enter_attention(self, module: nn.Module, args: Any) -> None:
        if self.compressor is not None and self._stacks:  # only inside a COAT forward
            scope = self.compressor.attention_scope()
            scope.__enter__()
            self._scopes.append(scope)

    def exit_attention(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._scopes:
            self._scopes.pop().__exit__(None, None, None)
            # a block that concatenates this output with others saves the concatenation as its parts
            for t in output if isinstance(output, tuple | list) else (output,):
                self.compressor.register_part(t)


def _matches(name: str, include: Iterable[str], exclude: Iterable[str]) -> bool:
    include, exclude = tuple(include), tuple(exclude)
    if any(s in name for s in exclude):
        return False
    return not include or any(s in name for s in include)


def _float8_available() -> bool:
    return hasattr(torch, "float8_e4m3fn") and hasattr(torch, "float8_e5m2")


def _new_context(config: COATConfig, compressor: ActivationCompressor | None = None,
                 input_cache: InputCache | None = None, **fields: Any) -> COATContext:
    """A context with the model's GEMM planner (one per model, if ``gemm_autotune``; its row plans
    for compiled blocks are kept on disk, see :class:`~coatflux.core.gemm.PlanCache`)."""
    activation = config.activation
    planner = (GemmPlanner(cache=PlanCache.default(), fast_accum=activation.fp8_fast_accumulation)
               if activation.gemm_autotune else None)
    return COATContext(config, compressor, input_cache or InputCache(), planner=planner, **fields)


def _convert_linears(model: nn.Module, context: COATContext) -> list[str]:
    config = context.config
    converted = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and _matches(full, config.include, config.exclude):
                setattr(module, child_name, context.fp8_linear(child))
                converted.append(full)
    return converted


def _fuse_nonlinear(model: nn.Module, config: COATConfig, compressor: ActivationCompressor) -> list[str]:
    fused = []
    for name, module in list(model.named_modules()):
        if any(name == done or name.startswith(f"{done}.") for done in fused):
            continue  # inside a replaced module (an AdaLN replacement took over its children)
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if not _matches(full, config.include, config.exclude):
                continue
            replacement = fused_replacement(child, compressor)
            if replacement is not None:
                setattr(module, child_name, replacement)
                fused.append(full)
    return fused


def _scope_attention_modules(model: nn.Module, context: COATContext) -> list[Any]:
    """Open the compressor's attention scope only inside attention modules (see core.activation).

    A nested attention module (one inside another) needs no scope of its own. The hooks also
    register each attention module's output as a part a saved concatenation may be stored as.
    """
    handles, scoped = [], []
    for name, module in model.named_modules():  # parents come before their children
        if is_attention_module(module) and not any(name.startswith(f"{outer}.") for outer in scoped):
            handles.append(module.register_forward_pre_hook(context.enter_attention))
            handles.append(module.register_forward_hook(context.exit_attention, always_call=True))
            scoped.append(name)
    context.attention_modules = len(scoped)
    return handles


def _model_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    tensors = list(model.parameters()) + list(model.buffers())
    return tensors[0].device if tensors else torch.device("cpu")


def _warn_fallback(model: nn.Module, device: torch.device | str | None) -> None:
    support = fp8_gemm_support(_model_device(model, device))
    if not support.available:
        warnings.warn(
            f"COAT: {support.reason}. Linears keep FP8 weights and FP8 saved activations (the memory "
            "saving) but multiply in the compute dtype: no FP8 speed-up.", RuntimeWarning, stacklevel=3)


def replace_linear_with_fp8(model: nn.Module, config: COATConfig | ActivationConfig | None = None,
                            device: torch.device | str | None = None) -> nn.Module:
    """Swap every matching ``nn.Linear`` for an :class:`FP8Linear`, in place; returns ``model``.

    Frozen linears (``requires_grad=False``) get an FP8 weight stored once; trainable ones keep
    their parameter and quantize it on the fly. ``device`` is where the model will run (default:
    where its weights are now), for the one warning about missing FP8 tensor cores.
    """
    if isinstance(config, ActivationConfig):
        config = COATConfig(activation=config)
    config = config or COATConfig()
    if not _float8_available():
        warnings.warn(f"COAT: PyTorch {torch.__version__} has no float8 dtypes; linears stay in their "
                      "own precision (no FP8 memory saving, no speed-up).", RuntimeWarning, stacklevel=2)
        return model
    _warn_fallback(model, device)
    _convert_linears(model, _new_context(config))
    return model


def apply_coat(model: nn.Module, config: COATConfig | None = None,
               device: torch.device | str | None = None,
               compile_options: Mapping[str, Any] | None = None) -> nn.Module:
    """Apply COAT to ``model`` in place: FP8 linears plus FP8 compression of saved activations.

    With ``config.enabled`` false, or ``config.activation.use_fp8`` false, the model is returned
    unchanged. Calling it twice on the same model is an error (the second call would re-quantize
    already-quantized weights). ``device`` is where the model will run (default: where its
    weights are now), for the one warning about missing FP8 tensor cores and, with
    ``compile_blocks``, whether compiled blocks use FP8 GEMMs. ``compile_options`` go to
    ``torch.compile`` for those blocks (``backend``, ``mode``, ...).
    """
    config = config or COATConfig()
    if getattr(model, "coat_context", None) is not None:
        raise RuntimeError("apply_coat: this model already has COAT applied")
    if not (config.enabled and config.activation.use_fp8):
        return model
    if not _float8_available():
        warnings.warn(f"COAT: PyTorch {torch.__version__} has no float8 dtypes; the model runs in its own "
                      "precision (no FP8 activations, weights or GEMMs).", RuntimeWarning, stacklevel=2)
        return model
    _warn_fallback(model, device)
    if config.activation.compile_blocks:
        context = _apply_compiled(model, config, device, compile_options or {})
    else:
        context = _apply_eager(model, config)
    context.handles += [
        model.register_forward_pre_hook(context.enter),
        model.register_forward_hook(context.exit, always_call=True),
    ]
    model.coat_context = context
    logger.info("COAT: %d linears converted to FP8, %d norms/activations fused, %d blocks compiled; saved "
                "activations compressed (%s, group %d)", len(context.converted), len(context.fused),
                len(context.compiled_blocks), config.activation.nonlinear_granularity, config.activation.group_size)
    return model


def _apply_eager(model: nn.Module, config: COATConfig) -> COATContext:
    cache = InputCache()
    context = _new_context(config, compressor=ActivationCompressor(config.activation, linear_inputs=cache),
                           input_cache=cache)
    context.converted = _convert_linears(model, context)
    for module in model.modules():
        if isinstance(module, FP8Linear):
            module.input_saved_by_hooks = True
    if config.activation.fused_nonlinear:
        context.fused = _fuse_nonlinear(model, config, context.compressor)
    context.handles += _scope_attention_modules(model, context)
    return context


def _apply_compiled(model: nn.Module, config: COATConfig, device: torch.device | str | None,
                    compile_options: Mapping[str, Any]) -> COATContext:
    available, reason = inline_hooks_available()
    if not available:
        raise RuntimeError(f"coat.activation.compile_blocks: {reason}. Set compile_blocks: false for eager COAT.")
    model_device = _model_device(model, device)
    in_graph = config.activation.fp8_gemm and fp8_gemm_support(model_device).available
    # With gemm_autotune, each linear's FP8-or-plain plan is timed now, before anything compiles.
    context = _new_context(config, compression=SavedTensorCompression(config.activation), fp8_gemm_in_graph=in_graph,
                           plan_device=model_device if in_graph else None)
    context.converted = _convert_linears(model, context)
    context.compiled_blocks = compile_blocks(model, partitioner=COAT_PARTITIONER, recompute=COAT_RECOMPUTE,
                                             save_parameter_casts=True, **coat_compile_options(compile_options))
    return context


class COATTrainer:
    """The user guide's entry point: prepare a model and create the optimizer from one config."""

    def __init__(self, config: COATConfig | None = None) -> None:
        self.config = config or COATConfig()

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return apply_coat(model, self.config)

    def create_optimizer(self, params: Iterable[Any], lr: float = 1e-4, **kwargs: Any) -> torch.optim.Optimizer:
        """``FP8AdamW`` when COAT is enabled, else ``torch.optim.AdamW`` with the same arguments."""
        if self.config.enabled and (self.config.optimizer.use_fp8_m1 or self.config.optimizer.use_fp8_m2):
            return FP8AdamW(params, lr=lr, fp8_config=self.config.optimizer, **kwargs)
        return torch.optim.AdamW(params, lr=lr, **kwargs)
