"""Dynamic Range Expansion (DRE): COAT's FP8 encoding of optimizer moments.

What: a block of ``B`` moment values spans a narrow dynamic range (about 1e3 for Adam's first
moment, 1e1 for the second), so plain absmax scaling leaves most of FP8's exponents unused.
DRE divides the block's magnitudes by a centre ``c`` near sqrt(min * max) of its non-zero values,
raises them to a power ``k`` chosen so that the block's range ``R = max / min`` becomes
``R**k ~= target``, scales the largest to the format maximum and rounds to FP8. The inverse is
``x = sign(q) * c * (|q| * s) ** (1 / k)``; a rounding error of the FP8 code shrinks by ``1 / k``
on the way back, which is why larger ``k`` means smaller error.

Choices, against the reference implementation (NVlabs/COAT keeps ``s``, ``k`` and ``c`` as three
fp32 numbers per block, 2.19 bytes/param for both moments):

* ``k`` is a multiple of 1/16 in ``[1/16, 16]`` and is stored as one ``uint8`` (``16 k - 1``).
  ``k < 1`` is allowed (the reference code does too, torchao's port clamps to ``k >= 1``):
  a block whose non-zero values span more than the format can hold is *compressed* instead of
  flushing its smallest second-moment entries to zero, which would turn ``m / sqrt(v)`` into
  ``m / eps``. ``k <= 16`` keeps ``(|x|/c) ** k`` far inside fp32.
* ``c`` and ``s`` are powers of two stored as ``int8`` exponents. The range ``R ** k`` does not
  depend on ``c`` at all -- ``c`` only keeps the powers of ``|x| / c`` near 1 so that fp32 neither
  overflows nor underflows -- so rounding it to a power of two costs nothing; a power-of-two ``s``
  leaves at most the top binade unused. Total: 3 bytes per block per moment, 2.047 bytes/param
  with ``B = 128`` (codes plus metadata of both moments).
* the target range is ``max / min_normal`` of the format (E4M3: 28672, E5M2: ~9.4e8): the
  block's smallest magnitude lands on the format's smallest *normal* number, so it keeps the
  full mantissa rather than the one or two bits a subnormal has. This applies to every format
  pair, not only E4M3/E4M3.
* zeros are excluded from the minimum and stay exactly zero; an all-zero block (LoRA's B matrix
  starts at zero) stores ``k = 1, c = s = 1`` and all-zero codes; a constant block has ``R = 1``
  and takes the largest ``k``; NaN propagates, as it would in ``torch.optim.AdamW``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from coatflux.core.formats import FP8Format, cast_to_fp8, get_format

K_STEPS = 16  # k is a multiple of 1/K_STEPS
K_MIN = 1.0 / K_STEPS
K_MAX = 16.0


def target_range(fmt: FP8Format) -> float:
    """Dynamic range an expanded block is stretched to: largest finite over smallest normal."""
    return fmt.max / fmt.min_normal


@dataclass
class DREBlocks:
    """One tensor encoded with DRE: FP8 codes shaped like the tensor plus 3 bytes per block."""

    codes: torch.Tensor  # float8, same shape as the original tensor
    k_code: torch.Tensor  # uint8 [blocks]: k = (k_code + 1) / 16
    center_exp: torch.Tensor  # int8 [blocks]: c = 2 ** center_exp
    scale_exp: torch.Tensor  # int8 [blocks]: s = 2 ** scale_exp


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    flat = x.reshape(-1).float()
    pad = (-flat.numel()) % block
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, block)


def choose_k(ratio: torch.Tensor, fmt: FP8Format) -> torch.Tensor:
    """Largest multiple of 1/16 in [1/16, 16] with ``ratio ** k <= target_range(fmt)``."""
    log_ratio = torch.log2(ratio.clamp(min=1.0))
    k = torch.floor(K_STEPS * math.log2(target_range(fmt)) / log_ratio) / K_STEPS
    k = torch.where(log_ratio > 0, k, torch.full_like(k, K_MAX))  # constant or empty block
    return k.clamp(K_MIN, K_MAX)


def dre_quantize(x: torch.Tensor, fmt: str | FP8Format, block: int) -> DREBlocks:
    """Encode ``x`` block by block (blocks of the flattened tensor, the last one padded)."""
    fmt = get_format(fmt)
    values = _blocks(x, block)
    mag = values.abs()
    finite = torch.isfinite(mag)
    amax = torch.where(finite, mag, 0.0).amax(dim=1)
    amin = torch.where(finite & (mag > 0), mag, math.inf).amin(dim=1)
    empty = amax == 0
    amin = torch.where(empty, torch.ones_like(amin), amin)
    amax = torch.where(empty, torch.ones_like(amax), amax)

    k = torch.where(empty, torch.ones_like(amax), choose_k(amax / amin, fmt))
    center_exp = torch.round(0.5 * (torch.log2(amax) + torch.log2(amin))).clamp(-127, 127)
    center_exp = torch.where(empty, torch.zeros_like(center_exp), center_exp)
    center = torch.exp2(center_exp)
    ymax = (amax / center) ** k
    scale_exp = torch.ceil(torch.log2(ymax / fmt.max)).clamp(-127, 127)
    scale_exp = torch.where(empty, torch.zeros_like(scale_exp), scale_exp)
    # ceil(log2) of a non-power-of-two can land an ulp low: make sure ymax still fits.
    scale_exp = torch.where(ymax / torch.exp2(scale_exp) > fmt.max, scale_exp + 1, scale_exp)

    expanded = (mag / center[:, None]) ** k[:, None] / torch.exp2(scale_exp)[:, None]
    codes = cast_to_fp8(torch.copysign(expanded, values), fmt)
    return DREBlocks(
        codes=codes.reshape(-1)[: x.numel()].reshape(x.shape),
        k_code=(k * K_STEPS - 1).round().to(torch.uint8),
        center_exp=center_exp.to(torch.int8),
        scale_exp=scale_exp.to(torch.int8),
    )


def dre_dequantize(enc: DREBlocks, block: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode :func:`dre_quantize`'s output back to a tensor of the codes' shape."""
    q = _blocks(enc.codes, block)
    k = (enc.k_code.float() + 1) / K_STEPS
    scale = torch.exp2(enc.scale_exp.float())
    center = torch.exp2(enc.center_exp.float())
    mag = (q.abs() * scale[:, None]) ** (1.0 / k[:, None]) * center[:, None]
    out = torch.copysign(mag, q)
    return out.reshape(-1)[: enc.codes.numel()].reshape(enc.codes.shape).to(dtype)


def metadata_bytes_per_block() -> int:
    """Bytes of statistics stored per block per moment (k, centre and scale exponents)."""
    return 3
