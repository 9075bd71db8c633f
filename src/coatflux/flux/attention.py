"""Which ``scaled_dot_product_attention`` backends FLUX training may use on a GPU.

What: :func:`attention_policy` disables PyTorch's cuDNN attention backend for the code it
encloses (flash, memory-efficient and math stay allowed) and restores the previous setting after.
Both the trainer and ``coatflux bench`` run inside it.

Why: on an NVIDIA H200 with torch 2.11 + CUDA 13 the cuDNN backend's backward for FLUX.1-dev's
attention failed (``mha_graph.execute(...).is_good()`` false), and the illegal memory access it
left behind broke every later CUDA call of the process (coatflux bench, 2026-11-26). PyTorch
prefers cuDNN on Hopper when it is enabled, so a run would die at its first backward. Flash
attention handles FLUX's head size (128) in bf16, so nothing is lost by skipping cuDNN; the
trainer's ``model.cudnn_attention: true`` and the bench's ``--allow-cudnn-attention`` keep it for
a torch build where it works.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


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
