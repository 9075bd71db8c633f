"""FLUX latent packing: 2x2 latent patches <-> transformer tokens, and their RoPE position ids.

What: the FLUX transformer does not see the VAE latent ``[B, C, H, W]`` directly. Each 2x2 patch of
latent pixels becomes one token of ``4*C`` channels (channel-major inside the token: ``c, dy, dx``),
laid out row by row, giving ``[B, (H/2)*(W/2), 4*C]``. Each token gets a 3-component position id
``(0, row, col)``; the first axis is reserved for the text/reference-image index and is 0 for the
generated image.

Why our own copy: the trainer packs latents on every step, and diffusers keeps these helpers as
private static methods of ``FluxPipeline`` (``_pack_latents`` & co.) whose signatures changed between
releases. The tests pin ours to the installed diffusers bit for bit, so a silent layout change there
fails loudly here. We chose ``reshape``/``permute`` over ``einops`` to avoid a dependency, and take
*latent* sizes (not pixel sizes plus a VAE factor, as ``_unpack_latents`` does) so nothing here needs
to know the VAE.
"""

from __future__ import annotations

import torch


def _check_even(height: int, width: int) -> None:
    if height % 2 or width % 2:
        raise ValueError(f"latent height and width must be even to form 2x2 patches, got {height}x{width}")


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` latents -> ``[B, (H/2)*(W/2), 4*C]`` tokens (the FluxPipeline layout)."""
    if latents.ndim != 4:
        raise ValueError(f"expected latents of shape [B, C, H, W], got {tuple(latents.shape)}")
    b, c, h, w = latents.shape
    _check_even(h, w)
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2)
    # token index = (row, col); channel index inside a token = (c, dy, dx)
    x = x.permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents`; ``height``/``width`` are the *latent* sizes (pixels / 8)."""
    if tokens.ndim != 3:
        raise ValueError(f"expected tokens of shape [B, N, 4*C], got {tuple(tokens.shape)}")
    _check_even(height, width)
    b, n, d = tokens.shape
    if n != (height // 2) * (width // 2) or d % 4:
        raise ValueError(f"{n} tokens of {d} channels do not form a {height}x{width} latent of 2x2 patches")
    x = tokens.reshape(b, height // 2, width // 2, d // 4, 2, 2)
    x = x.permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def prepare_latent_image_ids(
    height: int,
    width: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Position ids ``[(height)*(width), 3]`` = ``(0, row, col)`` for a grid of *packed* tokens.

    ``height``/``width`` count tokens (latent size / 2), matching ``FluxPipeline._prepare_latent_image_ids``.
    The ids are 2-D (no batch axis) because current FLUX transformers broadcast them over the batch.
    """
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1)
    return ids.to(device=device, dtype=dtype)


def prepare_text_ids(
    seq_len: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """All-zero position ids ``[seq_len, 3]`` for the T5 tokens, as FluxPipeline.encode_prompt makes them."""
    return torch.zeros(seq_len, 3, device=device, dtype=dtype)
