"""Which ``scaled_dot_product_attention`` backends FLUX training may use on a GPU.

What: :func:`attention_policy` disables PyTorch's cuDNN attention backend for the code it
encloses (flash, memory-efficient and math stay allowed) and restores the previous setting after.
Both the trainer and ``coatflux bench`` run inside it. Where cuDNN is allowed,
:func:`keep_attention_grads_contiguous` hooks FLUX's attention modules so that cuDNN's backward
can run (below).

Why: on an NVIDIA H200 with torch 2.11 + CUDA 13 the cuDNN backend's backward for FLUX.1-dev's
attention failed (``mha_graph.execute(...).is_good()`` false), and the illegal memory access it
left behind broke every later CUDA call of the process (coatflux bench, 2026-11-26). PyTorch
prefers cuDNN on Hopper when it is enabled, so a run would die at its first backward. Flash
attention handles FLUX's head size (128) in bf16, but skipping cuDNN costs speed; the trainer's
``model.cudnn_attention: true`` and the bench's ``--allow-cudnn-attention`` keep it.

The likely cause, found afterwards on the CPU: FLUX's single blocks concatenate the attention
output with the MLP branch before ``proj_out``, so the gradient SDPA's backward receives there is
a column slice of a 15,360-wide tensor (row stride 15,360, where the output's is 3,072); the
double blocks hand it a contiguous one. PyTorch (cuDNN >= 9.5.1) passes such a gradient to cuDNN
as it is, and caches cuDNN's backward graph under a key of the shapes and the q/k/v strides, not
the gradient's strides (``MHAParams`` in PyTorch's ``aten/src/ATen/native/cudnn/MHA.cpp``; later
versions check each tensor against the cached graph, "to catch cache-key bugs"). The backward
graph built for the single blocks, which run their backward first, is then reused by the double
blocks with a gradient five times narrower than it reads: an illegal memory access. Not yet
confirmed on a GPU. The isolated attention of ``benchmarks/attention_backends.py`` (one
layout) was correct and ran 1.9x faster than FlashAttention-2 on the same H200 (2026-11-27).

:func:`keep_attention_grads_contiguous` is the remedy the trainer and the bench install when
cuDNN is allowed: a forward hook on every FLUX block's attention module whose output then hands
its gradient on contiguous, so every SDPA backward sees a gradient with its output's strides.
It costs one copy of that gradient in the single blocks (4,608 x 3,072 bf16 at 1024 px). The
alternative, making the gradient contiguous inside PyTorch's SDPA, is not ours to change; giving
FLUX a processor of our own would copy diffusers' attention code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def attention_policy(allow_cudnn: bool) -> Iterator[None]:
    """Disable the cuDNN SDPA backend for the enclosed code unless ``allow_cudnn``; restore it after."""
    toggle = getattr(torch.backends.cuda, "enable_cudnn_sdp", None)
    if toggle is None or allow_cudnn:
        yield
        return
    previous = torch.backends.cuda.cudnn_sdp_enabled()
    toggle(False)
    try:
        yield
    finally:
        toggle(previous)


def attention_backends() -> str:
    """Which ``scaled_dot_product_attention`` backends PyTorch may pick right now, e.g. for a report."""
    cuda = torch.backends.cuda
    checks = {"flash": "flash_sdp_enabled", "memory-efficient": "mem_efficient_sdp_enabled",
              "math": "math_sdp_enabled", "cuDNN": "cudnn_sdp_enabled"}
    state = {name: getattr(cuda, fn)() for name, fn in checks.items() if hasattr(cuda, fn)}
    allowed = [name for name, on in state.items() if on]
    disabled = [name for name, on in state.items() if not on]
    text = ", ".join(allowed) + " allowed" if allowed else "none allowed"
    if "cuDNN" in disabled:
        text += "; cuDNN disabled (its backward failed on an H200, torch 2.11 + CUDA 13; --allow-cudnn-attention keeps it)"
    elif disabled:
        text += "; " + ", ".join(disabled) + " disabled"
    return text


class _ContiguousGrad(torch.autograd.Function):
    """The identity forward; backward hands the gradient on contiguous (a no-op when it is)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _contiguous_grads(module: nn.Module, args: tuple, output):
    if isinstance(output, tuple):
        return tuple(_with_contiguous_grad(t) for t in output)
    return _with_contiguous_grad(output)


def _with_contiguous_grad(value):
    if isinstance(value, torch.Tensor) and value.requires_grad:
        return _ContiguousGrad.apply(value)
    return value


def keep_attention_grads_contiguous(transformer: nn.Module) -> int:
    """Make the gradient of every FLUX block's attention output contiguous; returns the hook count.

    Idempotent: a module hooked before is not hooked twice. Install it before the blocks are
    compiled, so the hook is traced into their graphs rather than making them recompile.
    """
    blocks = [*getattr(transformer, "transformer_blocks", []),
              *getattr(transformer, "single_transformer_blocks", [])]
    attentions = [block.attn for block in blocks if isinstance(getattr(block, "attn", None), nn.Module)]
    if not attentions:
        raise ValueError(f"{type(transformer).__name__} has no FLUX blocks with an `attn` module to hook")
    for attn in attentions:
        if _contiguous_grads not in attn._forward_hooks.values():
            attn.register_forward_hook(_contiguous_grads)
    return len(attentions)
