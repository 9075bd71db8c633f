"""Timestep sampling and flow-matching noising for FLUX LoRA training.

What: FLUX.1 is a rectified-flow model. A training example is the straight line between the clean
latent ``x0`` and Gaussian noise ``e``: ``x_s = (1 - s) * x0 + s * e`` for a noise level
``s`` in (0, 1), and the transformer learns the line's velocity ``e - x0`` (the loss target).
:func:`sample_sigmas` draws ``s`` per example; :func:`noisy_latents` builds ``x_s`` and the target.

How ``s`` is drawn (``train.timestep_type``, ai-toolkit's names):

* ``sigmoid`` (default): ``sigmoid(N(0, 1))``, which concentrates samples around the middle of the
  trajectory where the velocity is hardest to predict (the SD3 "logit-normal" choice);
* ``linear``: uniform in (0, 1);
* ``shift`` / ``flux_shift``: uniform, then shifted toward high noise by the same
  resolution-dependent rule FLUX.1-dev's scheduler uses at inference: ``mu`` is interpolated
  linearly in the image token count between 0.5 at 256 tokens and 1.15 at 4096 tokens, and
  ``s -> e^mu / (e^mu + 1/s - 1)``. Larger images spend more steps at high noise, so training
  should too.

The transformer receives ``s`` itself as its timestep (it multiplies by 1000 internally, as the
diffusers pipeline expects). All randomness comes from a caller-owned ``torch.Generator`` so a run
can checkpoint and restore it exactly; we draw on the CPU and move the result, because CPU and CUDA
generators produce different streams and the CPU stream makes CPU and GPU runs comparable.
"""

from __future__ import annotations

import math

import torch

BASE_SEQ_LEN, MAX_SEQ_LEN = 256, 4096
BASE_SHIFT, MAX_SHIFT = 0.5, 1.15
_EPS = 1e-5  # keep s away from exactly 0 and 1, where the target or input degenerates


def flux_mu(image_seq_len: int) -> float:
    """FLUX.1-dev's resolution-dependent shift exponent for ``image_seq_len`` packed tokens."""
    slope = (MAX_SHIFT - BASE_SHIFT) / (MAX_SEQ_LEN - BASE_SEQ_LEN)
    return BASE_SHIFT + slope * (image_seq_len - BASE_SEQ_LEN)


def shift_sigmas(sigmas: torch.Tensor, mu: float) -> torch.Tensor:
    """The time shift ``e^mu / (e^mu + 1/s - 1)`` (identity for ``mu = 0``)."""
    return math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))


def sample_sigmas(batch: int, timestep_type: str, image_seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """``batch`` noise levels in (0, 1), float32 on the CPU."""
    if timestep_type == "sigmoid":
        sigmas = torch.sigmoid(torch.randn(batch, generator=generator))
    elif timestep_type in ("linear", "shift", "flux_shift"):
        sigmas = torch.rand(batch, generator=generator)
    else:
        raise ValueError(f"unknown timestep_type {timestep_type!r}")
    sigmas = sigmas.clamp(_EPS, 1.0 - _EPS)
    if timestep_type in ("shift", "flux_shift"):
        sigmas = shift_sigmas(sigmas, flux_mu(image_seq_len))
    return sigmas


def noisy_latents(
    latents: torch.Tensor, sigmas: torch.Tensor, generator: torch.Generator, noise_offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_s, target)`` for clean ``latents`` [B, C, H, W] and per-example ``sigmas`` [B].

    ``noise_offset`` adds a per-channel constant to the noise (ai-toolkit's option), which lets the
    model shift overall brightness.
    """
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator)
    noise = noise.to(latents.device)
    x0 = latents.float()
    s = sigmas.to(latents.device).view(-1, 1, 1, 1)
    return (1.0 - s) * x0 + s * noise, noise - x0
