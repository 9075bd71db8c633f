"""Which ``scaled_dot_product_attention`` backends FLUX training may use on a GPU, and the hook
that lets it use cuDNN's.

What: :func:`keep_attention_grads_contiguous` hooks FLUX's attention modules so that the gradient
each SDPA backward receives is laid out like its output. :func:`attention_policy` disables
PyTorch's cuDNN attention backend for the code it encloses (flash, memory-efficient and math stay
allowed) unless told to keep it, and restores the previous setting after. The trainer keeps cuDNN
and installs the hook (``model.cudnn_attention``, default true); ``coatflux bench`` disables
cuDNN unless ``--allow-cudnn-attention``, which installs the hook, so its rows stay comparable
with the runs before the hook.

Why: PyTorch prefers cuDNN's attention on Hopper (recent cuDNN), and there it breaks FLUX's
backward. FLUX's single blocks concatenate the attention output with the MLP branch before
``proj_out``, so the gradient SDPA's backward receives there is a column slice of a 15,360-wide
tensor (row stride 15,360, where the output's is 3,072); the double blocks hand it a contiguous
one. PyTorch passes such a gradient to cuDNN as it is and caches cuDNN's backward graph under a
key of the shapes and the q/k/v strides, not the gradient's (``MHAParams`` in PyTorch's
``aten/src/ATen/native/cudnn/MHA.cpp``). Whichever block class runs its backward first fixes the
graph the other reuses. Measured on an H200 (torch 2.11 + CUDA 13, cuDNN 9.19, 2026-11-27 06:10,
``benchmarks/attention_backends.py``, FLUX's shape at 1024 px): the single block's layout and then
the double block's, as in a FLUX backward, is an illegal memory access that breaks every later
CUDA call of the process; the double block's and then the single block's runs, but its input
gradients are wrong (SQNR -0.8 dB against fp32, where every correct run has 52.5 dB), silently.
With the gradient contiguous every layout gives 52.5 dB, and cuDNN runs FLUX's attention (forward
and backward) in 1.70 ms against FlashAttention-2's 3.15 ms; an eager bf16 FLUX.1-dev step at
1024 px took 0.504 s with cuDNN and the hook against 0.556 s with flash (same machine, 06:11-06:12).

The hook costs one copy of that gradient in each single block (4,608 x 3,072 bf16 at 1024 px)
and nothing in the double blocks, whose gradient is already contiguous. Chosen against the
alternatives: making the gradient contiguous inside PyTorch's SDPA is not ours to change; giving
FLUX an attention processor of our own would copy diffusers' attention code; keeping cuDNN off
(flash only) is correct but gives up the faster kernel.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def attention_policy(allow_cudnn: bool) -> Iterator[None]:
    """Disable the cuDNN SDPA backend for the enclosed code unless ``allow_cudnn``; restore it after.

    For FLUX, allow cuDNN only once the transformer is hooked by :func:`keep_attention_grads_contiguous`.
    """
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
        text += ("; cuDNN disabled (FLUX's single blocks break its backward unless coatflux's hook is installed; "
                 "--allow-cudnn-attention installs it)")
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
