"""Loading FLUX.1 components: diffusers folders, hub ids, and single-file transformer checkpoints.

What: :func:`load_flux_components` returns the seven parts of a FLUX pipeline (transformer, VAE,
CLIP + tokenizer, T5 + tokenizer, scheduler) as a :class:`FluxComponents`, loading each with its own
``from_pretrained``. :func:`load_transformer_single_file` reads a single ``.safetensors`` transformer
(BFL / ComfyUI layout, e.g. ``flux1-dev.safetensors``, or diffusers layout) against a diffusers
config. :func:`normalize_latents` / :func:`denormalize_latents` apply the VAE's shift and scale.

Why per component and not ``FluxPipeline.from_pretrained``: a trainer wants different dtypes and
devices per part (T5 may stay on CPU or be dropped after caching), and the pipeline object would
pull in image-encoder slots and hooks we never use. A local folder is loaded with
``local_files_only=True`` so a typo never turns into a hub download attempt.

Why not ``FluxTransformer2DModel.from_single_file``: its BFL converter hard-codes FLUX.1's hidden
size 3072 when splitting the fused single-block ``linear1``, so it fails on any other size
(including the tiny model our tests use) and our code path would go untested. We convert keys with
:func:`coatflux.flux.convert.bfl_to_diffusers` (sizes read from the tensors), build the model on the
meta device from the folder's ``transformer/config.json`` and load the weights strictly, naming any
missing or unexpected key.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class FluxComponents:
    """The parts of a FLUX.1 pipeline, loaded and placed."""

    transformer: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    text_encoder_2: Any
    tokenizer_2: Any
    scheduler: Any


def _resolve_source(name_or_path: str | os.PathLike) -> tuple[str, bool]:
    """``(source, is_local)``; ValueError / FileNotFoundError for what is neither a folder nor a hub id."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "model_index.json").is_file():
            raise ValueError(
                f"{path} is a folder but has no model_index.json; expected a diffusers FLUX folder"
            )
        return str(path), True
    if text.startswith(("/", ".", "~")) or not _HUB_ID.match(text):
        raise FileNotFoundError(
            f"{text!r} does not exist and is not a hub id like 'black-forest-labs/FLUX.1-dev'"
        )
    return text, False


def _transformers_dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    # transformers 5 renamed torch_dtype to dtype; 4.x only knows torch_dtype.
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}


def load_flux_components(
    name_or_path: str | os.PathLike,
    dtype: torch.dtype,
    device: torch.device | str,
    single_file_config: str | None = None,
) -> FluxComponents:
    """Load all FLUX components in ``dtype`` onto ``device``.

    ``name_or_path`` is a diffusers folder, a hub id, or a single ``.safetensors`` transformer file;
    for the latter, ``single_file_config`` (a diffusers folder or hub id) provides the transformer
    config and every other component.
    """
    source = Path(str(name_or_path)).expanduser()
    if source.suffix in (".safetensors", ".sft"):
        if single_file_config is None:
            raise ValueError(
                f"{source} is a single-file transformer; pass single_file_config (a diffusers folder or hub id)"
            )
        if not source.is_file():
            raise FileNotFoundError(f"transformer checkpoint {source} does not exist")
        base, local = _resolve_source(single_file_config)
        transformer = load_transformer_single_file(source, base, dtype)
    else:
        base, local = _resolve_source(name_or_path)
        transformer = None
    return _load_parts(base, local, dtype, torch.device(device), transformer)


def _load_parts(
    base: str, local: bool, dtype: torch.dtype, device: torch.device, transformer
) -> FluxComponents:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    common = {"local_files_only": local}
    tdtype = _transformers_dtype_kwarg(dtype)
    if transformer is None:
        transformer = FluxTransformer2DModel.from_pretrained(
            base, subfolder="transformer", torch_dtype=dtype, **common
        )
    return FluxComponents(
        transformer=transformer.to(device),
        vae=AutoencoderKL.from_pretrained(base, subfolder="vae", torch_dtype=dtype, **common).to(device),
        text_encoder=CLIPTextModel.from_pretrained(base, subfolder="text_encoder", **tdtype, **common).to(
            device
        ),
        tokenizer=CLIPTokenizer.from_pretrained(base, subfolder="tokenizer", **common),
        text_encoder_2=T5EncoderModel.from_pretrained(
            base, subfolder="text_encoder_2", **tdtype, **common
        ).to(device),
        tokenizer_2=T5TokenizerFast.from_pretrained(base, subfolder="tokenizer_2", **common),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler", **common),
    )


def _transformer_config(config_dir_or_repo: str | os.PathLike) -> dict[str, Any]:
    from diffusers import FluxTransformer2DModel

    path = Path(str(config_dir_or_repo)).expanduser()
    if path.is_dir() and (path / "config.json").is_file() and not (path / "model_index.json").is_file():
        return FluxTransformer2DModel.load_config(str(path))  # the transformer/ folder itself
    base, local = _resolve_source(config_dir_or_repo)
    return FluxTransformer2DModel.load_config(base, subfolder="transformer", local_files_only=local)


def load_transformer_single_file(
    path: str | os.PathLike, config_dir_or_repo: str | os.PathLike, dtype: torch.dtype
):
    """A ``FluxTransformer2DModel`` from one safetensors file in BFL/ComfyUI or diffusers key layout.

    Weights stored in another dtype (e.g. ComfyUI's float8 ``flux1-dev-fp8``) are cast to ``dtype``.
    """
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    from coatflux.flux.convert import bfl_to_diffusers, is_bfl_layout

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"transformer checkpoint {path} does not exist")
    config = _transformer_config(config_dir_or_repo)
    state = load_file(str(path))
    if is_bfl_layout(state):
        state = bfl_to_diffusers(state)
    state = {k: v.to(dtype) for k, v in state.items()}
    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        first = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise ValueError(
            f"{path} does not match the transformer config of {config_dir_or_repo}: {first} "
            f"({len(missing)} missing, {len(unexpected)} unexpected keys; schnell vs dev guidance_in?)"
        )
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(dtype).eval()


def vae_latent_params(vae) -> tuple[float, float]:
    """``(shift_factor, scaling_factor)`` of a FLUX VAE (0.1159, 0.3611 for FLUX.1)."""
    shift = getattr(vae.config, "shift_factor", None)
    scale = getattr(vae.config, "scaling_factor", None)
    if scale is None:
        raise ValueError("the VAE config has no scaling_factor")
    return float(shift or 0.0), float(scale)


def normalize_latents(latents: torch.Tensor, shift_factor: float, scaling_factor: float) -> torch.Tensor:
    """VAE latent -> the transformer's space: ``(z - shift) * scale`` (what training noises)."""
    return (latents - shift_factor) * scaling_factor


def denormalize_latents(latents: torch.Tensor, shift_factor: float, scaling_factor: float) -> torch.Tensor:
    """Inverse of :func:`normalize_latents`, before ``vae.decode`` (as FluxPipeline does)."""
    return latents / scaling_factor + shift_factor


@torch.no_grad()
def encode_images(vae, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pixels in [-1, 1], ``[B, 3, H, W]`` -> normalized latents ``[B, 16, H/8, W/8]`` (sampled, not mode)."""
    shift, scale = vae_latent_params(vae)
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return normalize_latents(dist.sample(generator), shift, scale)
