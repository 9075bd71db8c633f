"""Memory reporting: the per-step lines of the user's guide and one start-of-run table.

What: :func:`memory_line` formats ``📊 [stage] Step N: Allocated: X GB, Reserved: Y GB`` exactly as
the guide shows it. On CUDA the figures are ``torch.cuda.memory_allocated`` / ``memory_reserved``;
on the CPU there is no allocator to ask, so "Allocated" is the process's resident set (psutil RSS)
and "Reserved" its peak RSS, and the line says ``(CPU RSS)`` so nobody compares it with a GPU log.

:class:`MemoryTable` collects where memory goes -- frozen weights, trainable LoRA weights,
optimizer state (read from the optimizer after its first step, since lazily created state does not
exist before) and the activations a forward saves for backward -- and :func:`format_table` prints
it. Activation figures are measured with :func:`coatflux.core.accounting.saved_activation_bytes`,
never estimated from formulas. The "with vs without COAT" comparison would need a second copy of
the model for the variant not being trained, so it is measured on one double-stream and one
single-stream block (each run both ways on the inputs they saw in the first batch) and scaled by
the block counts; the table labels those rows as such.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass, field

import torch

GB = 1024**3


def _cpu_rss() -> tuple[float, float]:
    import psutil

    rss = psutil.Process().memory_info().rss
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak *= 1 if sys.platform == "darwin" else 1024  # Linux reports KiB, macOS bytes
    return rss / GB, max(peak, rss) / GB


def memory_line(stage: str, step: int, device: torch.device) -> str:
    """One report line for ``stage`` (before_forward, after_forward, after_backward, after_optimizer_step)."""
    if device.type == "cuda":
        allocated = torch.cuda.memory_allocated(device) / GB
        reserved = torch.cuda.memory_reserved(device) / GB
        suffix = ""
    else:
        allocated, reserved = _cpu_rss()
        suffix = " (CPU RSS)"
    return f"📊 [{stage}] Step {step}: Allocated: {allocated:.2f}GB, Reserved: {reserved:.2f}GB{suffix}"


@dataclass
class MemoryTable:
    """Byte counts of one run; ``None`` means not measured (yet)."""

    frozen_weights: int = 0
    trainable_weights: int = 0
    trainable_params: int = 0
    optimizer_state: int | None = None
    optimizer_name: str = ""
    activations_measured: int | None = None
    coat_on: bool = False
    blocks_plain: int | None = None
    blocks_coat: int | None = None
    block_note: str = ""
    notes: list[str] = field(default_factory=list)


def _fmt(value: int | None) -> str:
    if value is None:
        return "n/a"
    return f"{value / GB:.3f} GB" if value >= GB / 10 else f"{value / 1024**2:.2f} MB"


def format_table(table: MemoryTable) -> str:
    variant = "COAT FP8" if table.coat_on else "no COAT"
    per_param = (f" ({table.optimizer_state / max(table.trainable_params, 1):.2f} B/param)"
                 if table.optimizer_state is not None else "")
    rows = [
        ("frozen weights (transformer)", _fmt(table.frozen_weights)),
        (f"trainable LoRA weights ({table.trainable_params:,} params)", _fmt(table.trainable_weights)),
        (f"optimizer state, {table.optimizer_name}, measured after step 1", _fmt(table.optimizer_state) + per_param),
        (f"saved activations, whole model, first batch ({variant}, measured)", _fmt(table.activations_measured)),
        (f"saved activations, blocks, without COAT ({table.block_note})", _fmt(table.blocks_plain)),
        (f"saved activations, blocks, with COAT ({table.block_note})", _fmt(table.blocks_coat)),
    ]
    width = max(len(name) for name, _ in rows)
    lines = ["Memory: where it goes", "-" * (width + 16)]
    lines += [f"{name:<{width}}  {value:>12}" for name, value in rows]
    if table.blocks_plain and table.blocks_coat:
        lines.append(f"COAT keeps {table.blocks_coat / table.blocks_plain:.0%} of the blocks' saved activations")
    lines += table.notes
    return "\n".join(lines)
