"""Prompt encoding and sample images during training.

What: :func:`encode_prompts` runs the two FLUX text encoders (CLIP pooled + T5 sequence) through
diffusers' own ``FluxPipeline.encode_prompt``, so training captions and sample prompts are encoded
exactly as at inference. :class:`Sampler` draws the configured sample images with a
``FluxPipeline`` assembled from the components already in memory -- the transformer *with its
LoRA in place* (and FP8 linears under COAT), the VAE and the scheduler.

Why prompt embeddings are computed once at the start: after caching the captions' embeddings the
trainer frees the text encoders (T5-XXL alone is ~9.5 GB in bf16). Reloading them for every
sample would cost minutes and the memory we just freed, so the sample prompts are encoded together
with the captions and the pipeline is called with ``prompt_embeds=`` / ``pooled_prompt_embeds=``
and no text encoders at all. The VAE stays loaded when sampling is on (it is needed to decode).

FLUX.1-dev is guidance-distilled: ``guidance_scale`` goes into the transformer's guidance
embedding and there is no negative prompt pass, so ``neg`` has no effect (as in ai-toolkit for
FLUX). Images go to ``samples/<step:09d>_<index>.<format>``; every sample uses its own seeded CPU
generator, so sampling never consumes the training RNG and the same seed gives the same image at
every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from coatflux.flux.lora import set_lora_multiplier
from coatflux.trainer.captions import inject_trigger
from coatflux.trainer.config import SampleItem

T5_MAX_LENGTH = 512  # FLUX.1-dev's training length, as ai-toolkit uses


def _text_pipeline(components):
    from diffusers import FluxPipeline

    return FluxPipeline(scheduler=components.scheduler, vae=None, text_encoder=components.text_encoder,
                        tokenizer=components.tokenizer, text_encoder_2=components.text_encoder_2,
                        tokenizer_2=components.tokenizer_2, transformer=None)


@torch.no_grad()
def encode_prompts(components, prompts: Sequence[str], device: torch.device,
                   dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``{"prompt_embeds": [B, L, D], "pooled_prompt_embeds": [B, P]}`` on the CPU, in ``dtype``."""
    pipe = _text_pipeline(components)
    embeds, pooled, _ = pipe.encode_prompt(prompt=list(prompts), prompt_2=None, device=device,
                                           max_sequence_length=T5_MAX_LENGTH)
    return {"prompt_embeds": embeds.to("cpu", dtype), "pooled_prompt_embeds": pooled.to("cpu", dtype)}


def sample_prompts(items: Sequence[SampleItem], trigger: str | None) -> list[str]:
    """The sample prompts with ``[trigger]`` replaced (never prepended, as ai-toolkit)."""
    return [inject_trigger(item.prompt, trigger, add_if_absent=False) for item in items]


def _mark_cudagraph_step(pipe, step: int, timestep, callback_kwargs: dict) -> dict:
    """diffusers' ``callback_on_step_end``: the next denoising step's transformer call starts a new
    step for inductor's CUDA graph trees (this step's outputs have been consumed)."""
    torch.compiler.cudagraph_mark_step_begin()
    return callback_kwargs


class Sampler:
    """Draws the configured samples from precomputed prompt embeddings."""

    def __init__(self, components, items: Sequence[SampleItem], embeddings: dict[str, torch.Tensor],
                 folder: Path, image_format: str, device: torch.device, cudagraphs: bool = False) -> None:
        self.components, self.items, self.embeddings = components, list(items), embeddings
        self.folder, self.format, self.device = Path(folder), image_format, device
        self.cudagraphs = cudagraphs  # the transformer's blocks replay as CUDA graphs: mark each call

    def _pipeline(self):
        from diffusers import FluxPipeline

        c = self.components
        pipe = FluxPipeline(scheduler=c.scheduler, vae=c.vae, text_encoder=None, tokenizer=None,
                            text_encoder_2=None, tokenizer_2=None, transformer=c.transformer)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def sample(self, step: int) -> list[Path]:
        """Draw every sample with the transformer in eval mode; returns the image paths."""
        transformer = self.components.transformer
        was_training = transformer.training
        transformer.eval()
        pipe, written = self._pipeline(), []
        try:
            for index, item in enumerate(self.items):
                written.append(self._one(pipe, step, index, item))
        finally:
            set_lora_multiplier(transformer, 1.0)
            transformer.train(was_training)
        return written

    def _one(self, pipe, step: int, index: int, item: SampleItem) -> Path:
        from coatflux.atomic import atomic_write

        set_lora_multiplier(pipe.transformer, item.network_multiplier)
        dtype = next(p.dtype for p in self.components.vae.parameters())
        marks = {}
        if self.cudagraphs:  # each transformer call is a new step for the graph trees, as in training
            torch.compiler.cudagraph_mark_step_begin()
            marks["callback_on_step_end"] = _mark_cudagraph_step
        image = pipe(
            prompt_embeds=self.embeddings["prompt_embeds"][index:index + 1].to(self.device, dtype),
            pooled_prompt_embeds=self.embeddings["pooled_prompt_embeds"][index:index + 1].to(self.device, dtype),
            width=item.width, height=item.height, num_inference_steps=item.sample_steps,
            guidance_scale=item.guidance_scale, generator=torch.Generator("cpu").manual_seed(item.seed), **marks,
        ).images[0]
        path = self.folder / f"{step:09d}_{index}.{self.format}"
        kind = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[self.format]
        return atomic_write(path, lambda tmp: image.convert("RGB").save(tmp, format=kind))
