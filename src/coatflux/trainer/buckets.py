"""Aspect-ratio buckets, crops and image -> tensor conversion.

What: :func:`bucket_size` picks, for an image and a training resolution ``res``, the size it is
trained at: the pixel count is ``min(image pixels, res**2)`` (an image is never upscaled), the
aspect ratio is kept, and both sides are floored to multiples of 32 (FLUX: the VAE divides by 8
and the transformer packs 2 x 2 latents; ai-toolkit adds one more factor 2, kept for
compatibility). :func:`plan_crop` scales the image to *cover* that bucket and crops the
overflow, centred unless ``random_crop``; :func:`load_image` applies that plan and returns a CHW
float tensor in [-1, 1], the VAE's input range. Any PIL mode becomes RGB as ai-toolkit does
(alpha is dropped, palettes and CMYK are converted), except 16-bit grayscale, which is scaled to 8
bits rather than clipped (:func:`to_rgb`).

Why cover-and-crop rather than pad or stretch: padding teaches the model borders and stretching
distorts garments; flooring to 32 loses at most 31 px per side, which a centred crop spreads
evenly. Resampling is Lanczos, the sharpest of PIL's filters for downscaling, which is the only
direction we resize in (up to the few pixels a cover needs).

A :class:`Crop` is a plain value (sizes and offsets) so it can be part of a cache key: the same
image under a different crop or flip is a different latent.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

BUCKET_DIVISIBILITY = 32
MIN_BUCKET_SIDE = 64


def bucket_size(width: int, height: int, resolution: int, *, buckets: bool = True,
                divisibility: int = BUCKET_DIVISIBILITY) -> tuple[int, int]:
    """(width, height) of the bucket for an image of ``width`` x ``height`` at ``resolution``.

    With ``buckets=False`` every image is cropped to a square of side ``resolution`` (or its
    shorter side, if smaller), floored to ``divisibility``.
    """
    if not buckets:
        side = min(resolution, width, height) // divisibility * divisibility
        return side, side
    scale = min(1.0, math.sqrt(resolution * resolution / (width * height)))
    return (int(width * scale) // divisibility * divisibility,
            int(height * scale) // divisibility * divisibility)


@dataclass(frozen=True)
class Crop:
    """Resize the image to ``scaled`` then keep ``bucket`` pixels from (``left``, ``top``)."""

    bucket: tuple[int, int]
    scaled: tuple[int, int]
    left: int
    top: int


def plan_crop(width: int, height: int, bucket: tuple[int, int], rng: random.Random | None = None) -> Crop:
    """Cover ``bucket`` with the image and crop: centred, or at a random offset if ``rng`` is given."""
    scale = max(bucket[0] / width, bucket[1] / height)
    # ceil, so float error never leaves the scaled image a pixel short of the bucket.
    scaled = (max(bucket[0], math.ceil(width * scale - 1e-6)), max(bucket[1], math.ceil(height * scale - 1e-6)))
    spare_x, spare_y = scaled[0] - bucket[0], scaled[1] - bucket[1]
    if rng is None:
        return Crop(bucket, scaled, spare_x // 2, spare_y // 2)
    return Crop(bucket, scaled, rng.randint(0, spare_x), rng.randint(0, spare_y))


def oriented_size(image: Image.Image) -> tuple[int, int]:
    """The size after applying the EXIF orientation (phone photos are often stored rotated)."""
    orientation = image.getexif().get(0x0112, 1)
    width, height = image.size
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


#: Revision of the decoding from file to pixels; part of the latent cache key, so a change to what a
#: file decodes to re-encodes the latents an older decoder cached. 2: 16-bit grayscale is scaled to
#: 8 bits, where revision 1 (coatflux 0.1) clipped it to white.
PIXEL_DECODER_REVISION = 2

# Integer modes of 16-bit grayscale files (PNG's "I;16"; some decoders give "I" with the same range).
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB.

    PIL's ``convert("RGB")`` clips 16-bit grayscale values at 255 instead of scaling them, which
    turns all but the darkest 0.4 % of such an image white; those modes are scaled by 255/65535.
    """
    if image.mode in _SIXTEEN_BIT_MODES:
        array = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8))  # mode L
    return image.convert("RGB")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 CHW tensor in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).div(127.5).sub(1.0).contiguous()


def load_image(path: Path, crop: Crop, flip_x: bool = False, flip_y: bool = False) -> torch.Tensor:
    """Decode ``path``, apply EXIF orientation, ``crop`` and flips; return CHW in [-1, 1]."""
    with Image.open(path) as raw:
        image = to_rgb(ImageOps.exif_transpose(raw))
    image = image.resize(crop.scaled, Image.Resampling.LANCZOS)
    width, height = crop.bucket
    image = image.crop((crop.left, crop.top, crop.left + width, crop.top + height))
    if flip_x:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if flip_y:
        image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    return to_tensor(image)
