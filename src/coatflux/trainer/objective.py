"""The training objective: FLUX's rectified-flow (flow-matching) loss on one micro-batch.

What: :func:`flow_matching_loss` draws timesteps and noise for a batch of latents, runs the
transformer on the noisy packed latents and returns the mean-squared error against the velocity
``noise - latents`` (:mod:`coatflux.trainer.timesteps` has the schedule). :func:`noise_generator`
gives each micro-batch its own generator, seeded by the run's seed and the micro-batch's global
index.

Why one generator per micro-batch rather than one for the run: the same micro-batch then gets the
same noise on any process of a data-parallel run, after any resume, and when it is replayed to
find where a non-finite value came from; nothing but the seed and the index needs saving.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from coatflux.flux.packing import pack_latents, prepare_latent_image_ids, prepare_text_ids, unpack_latents
from coatflux.trainer.config import TrainJobConfig
from coatflux.trainer.timesteps import noisy_latents, sample_sigmas


def noise_generator(seed: int, micro_batch: int) -> torch.Generator:
    # One generator per global micro-batch: the same micro-batch gets the same noise on any
    # process, after any resume, and when it is replayed to find a non-finite value.
    digest = hashlib.sha256(f"{seed}:{micro_batch}".encode()).hexdigest()
    return torch.Generator().manual_seed(int(digest[:15], 16))


def flow_matching_loss(transformer: nn.Module, latents: torch.Tensor, text: dict[str, torch.Tensor],
                       cfg: TrainJobConfig, generator: torch.Generator, device: torch.device,
                       model: nn.Module | None = None) -> torch.Tensor:
    """Mean-squared error between the predicted and the true velocity ``noise - latents``.

    ``model`` is what is called (a DDP wrapper of ``transformer``, say); ``transformer`` answers
    questions about the architecture.
    """
    dtype = next(p.dtype for n, p in transformer.named_parameters() if "lora_" not in n)
    b, _, h, w = latents.shape
    seq_len = (h // 2) * (w // 2)
    sigmas = sample_sigmas(b, cfg.train.timestep_type, seq_len, generator)
    noisy, target = noisy_latents(latents.to(device), sigmas, generator, cfg.train.noise_offset)
    prompt = text["prompt_embeds"].to(device, dtype)
    guidance = (torch.full((b,), cfg.train.cfg_scale, device=device)
                if transformer.config.guidance_embeds else None)
    pred = (model or transformer)(
        hidden_states=pack_latents(noisy).to(dtype), encoder_hidden_states=prompt,
        pooled_projections=text["pooled_prompt_embeds"].to(device, dtype), timestep=sigmas.to(device, dtype),
        img_ids=prepare_latent_image_ids(h // 2, w // 2, device, dtype),
        txt_ids=prepare_text_ids(prompt.shape[1], device, dtype), guidance=guidance, return_dict=False)[0]
    return torch.nn.functional.mse_loss(unpack_latents(pred, h, w).float(), target)
