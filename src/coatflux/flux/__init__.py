"""The FLUX.1 model layer: loading, latent packing, LoRA adapters and LoRA file formats.

Submodules: :mod:`~coatflux.flux.loading` (components, single-file checkpoints, latent scaling),
:mod:`~coatflux.flux.packing` (2x2 latent patches <-> tokens), :mod:`~coatflux.flux.lora`
(targets, injection, state dicts, saving), :mod:`~coatflux.flux.convert` (diffusers <-> kohya/BFL
keys) and :mod:`~coatflux.flux.tiny` (a small random pipeline for tests). Importing this package
imports torch only; diffusers and transformers load when a function needs them.
"""

from coatflux.flux.convert import convert_lora_file
from coatflux.flux.loading import (
    FluxComponents,
    denormalize_latents,
    encode_images,
    load_flux_components,
    load_transformer_single_file,
    normalize_latents,
    vae_latent_params,
)
from coatflux.flux.lora import (
    LoRALinear,
    find_lora_targets,
    inject_lora,
    load_lora_state_dict,
    lora_metadata,
    lora_parameters,
    lora_state_dict,
    read_lora,
    remove_lora,
    save_lora,
    set_lora_enabled,
    set_lora_multiplier,
    training_step,
)
from coatflux.flux.packing import pack_latents, prepare_latent_image_ids, prepare_text_ids, unpack_latents
from coatflux.flux.tiny import make_tiny_flux

__all__ = [
    "FluxComponents",
    "LoRALinear",
    "convert_lora_file",
    "denormalize_latents",
    "encode_images",
    "find_lora_targets",
    "inject_lora",
    "load_flux_components",
    "load_lora_state_dict",
    "load_transformer_single_file",
    "lora_metadata",
    "lora_parameters",
    "lora_state_dict",
    "make_tiny_flux",
    "normalize_latents",
    "pack_latents",
    "prepare_latent_image_ids",
    "prepare_text_ids",
    "read_lora",
    "remove_lora",
    "save_lora",
    "set_lora_enabled",
    "set_lora_multiplier",
    "training_step",
    "unpack_latents",
    "vae_latent_params",
]
