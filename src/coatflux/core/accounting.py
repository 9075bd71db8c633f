"""Memory and error accounting: what optimizer states and saved activations cost, and how accurate.

What: :func:`optimizer_state_bytes_per_param` reads any ``torch.optim`` optimizer's state
(``torch.optim.AdamW``, :class:`~coatflux.core.optim.FP8AdamW`, bitsandbytes or torchao ones);
:func:`saved_activation_bytes` runs a forward pass and counts the bytes its autograd graph keeps
for backward, each storage once, with or without COAT. Benchmarks and the trainer's memory table
call these; nothing here estimates -- every figure is read off real tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from coatflux.core.activation import SavedBytesMeter
from coatflux.core.compiled import compiled_saved_tensors


def _tensor_bytes(value: Any) -> int:
    if torch.is_tensor(value):
        inner = getattr(value, "__tensor_flatten__", None)
        if inner is not None:  # tensor subclasses (torchao) keep their data in inner tensors
            names, _ = value.__tensor_flatten__()
            return sum(_tensor_bytes(getattr(value, n)) for n in names)
        return value.numel() * value.element_size()
    return 0


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of per-parameter optimizer state, excluding the scalar step counters."""
    total = 0
    for state in optimizer.state.values():
        for key, value in state.items():
            if key != "step" and torch.is_tensor(value) and value.numel() > 1:
                total += _tensor_bytes(value)
    return total


def optimizer_state_bytes_per_param(optimizer: torch.optim.Optimizer) -> float:
    """Optimizer state bytes divided by the number of parameters that have state."""
    numel = sum(p.numel() for p in optimizer.state)
    return optimizer_state_bytes(optimizer) / max(numel, 1)


def _weight_storages(model: nn.Module) -> set[int]:
    tensors = list(model.parameters()) + list(model.buffers())
    return {t.untyped_storage().data_ptr() for t in tensors}


def saved_activation_bytes(model: nn.Module, run: Callable[[], torch.Tensor]) -> int:
    """Bytes kept for backward by ``run()`` (a forward through ``model``), each storage once.

    Works for plain models and for models prepared with :func:`~coatflux.core.api.apply_coat`
    (then the FP8 copies are what is counted), compiled blocks included: what their graphs keep
    is read from the autograd graph of ``run()``'s output. Weights and buffers are not counted.
    """
    meter = SavedBytesMeter(exclude=_weight_storages(model))
    context = getattr(model, "coat_context", None)
    compressor = getattr(context, "compressor", None)
    compression = getattr(context, "compression", None)
    if compression is not None:  # compiled blocks: eager parts counted by the hooks, graphs by their nodes
        with compression.metering(meter):
            out = run()
        for root in _tensors(out):
            for saved in compiled_saved_tensors(root):
                meter.add(saved)
    elif compressor is not None:
        compressor.meter = meter
        try:
            out = run()
        finally:
            compressor.meter = None
    else:
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t):
            out = run()
    del out
    return meter.total


def _tensors(out: Any) -> list[torch.Tensor]:
    """The tensors with autograd history in a forward's output (tensor, tuple, list or dict)."""
    if torch.is_tensor(out):
        return [out] if out.grad_fn is not None else []
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, list | tuple):
        return [t for item in out for t in _tensors(item)]
    return []


def module_bytes(model: nn.Module, trainable: bool | None = None) -> int:
    """Bytes of a model's parameters and buffers (``trainable`` filters parameters by requires_grad)."""
    total = 0
    for p in model.parameters():
        if trainable is None or p.requires_grad == trainable:
            total += p.numel() * p.element_size()
    if trainable is not True:
        total += sum(b.numel() * b.element_size() for b in model.buffers())
    return total
