"""The tiny FLUX pipeline, latent packing and component loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from coatflux.flux.convert import bfl_to_diffusers, diffusers_to_bfl
from coatflux.flux.loading import (
    denormalize_latents,
    load_flux_components,
    load_transformer_single_file,
    normalize_latents,
    vae_latent_params,
)
from coatflux.flux.packing import pack_latents, prepare_latent_image_ids, unpack_latents
from coatflux.flux.tiny import FLUX_DEV_SCHEDULER_CONFIG, make_tiny_flux


def _generate(pipe, seed: int = 0) -> torch.Tensor:
    return pipe(
        "a photo of a cat",
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=3.5,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
        max_sequence_length=32,
    ).images


def test_layout_size_and_scheduler(tiny_flux_dir: Path) -> None:
    index = json.loads((tiny_flux_dir / "model_index.json").read_text())
    for part in (
        "transformer",
        "vae",
        "text_encoder",
        "tokenizer",
        "text_encoder_2",
        "tokenizer_2",
        "scheduler",
    ):
        assert part in index and (tiny_flux_dir / part).is_dir()
    total = sum(f.stat().st_size for f in tiny_flux_dir.rglob("*") if f.is_file())
    assert total < 5 * 2**20
    sched = json.loads((tiny_flux_dir / "scheduler" / "scheduler_config.json").read_text())
    for key, value in FLUX_DEV_SCHEDULER_CONFIG.items():
        assert sched[key] == value, key
    assert not list(tiny_flux_dir.parent.glob(".*tmp")), "temporary build dir left behind"


def test_tokenizers_load_offline(tiny_flux_dir: Path) -> None:
    from transformers import CLIPTokenizer, T5TokenizerFast

    clip = CLIPTokenizer.from_pretrained(tiny_flux_dir, subfolder="tokenizer", local_files_only=True)
    t5 = T5TokenizerFast.from_pretrained(tiny_flux_dir, subfolder="tokenizer_2", local_files_only=True)
    ids = clip("A cat!", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == clip.bos_token_id and clip.eos_token_id in ids
    t5_ids = t5("A cat!").input_ids
    assert t5_ids[-1] == t5.eos_token_id and t5.unk_token_id not in t5_ids
    assert (tiny_flux_dir / "tokenizer" / "vocab.json").is_file()


def test_pipeline_generates_deterministically(tiny_flux_pipe) -> None:
    a, b = _generate(tiny_flux_pipe), _generate(tiny_flux_pipe)
    assert a.shape == (1, 3, 64, 64) and torch.isfinite(a).all()
    assert a.std() > 1e-3
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, _generate(tiny_flux_pipe, seed=1))


def test_overwrite_rules_and_seed_determinism(tiny_flux_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "tiny"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        make_tiny_flux(target)
    make_tiny_flux(target, seed=0, overwrite=True)
    assert not (target / "keep.txt").exists()
    name = "transformer/diffusion_pytorch_model.safetensors"
    assert (target / name).read_bytes() == (tiny_flux_dir / name).read_bytes()


@pytest.mark.parametrize(("c", "h", "w"), [(16, 8, 8), (16, 4, 6), (3, 2, 2)])
def test_packing_matches_diffusers(c: int, h: int, w: int) -> None:
    from diffusers import FluxPipeline

    latents = torch.randn(2, c, h, w)
    packed = pack_latents(latents)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(latents, 2, c, h, w), rtol=0, atol=0)
    # _unpack_latents takes pixel sizes and the VAE factor (8).
    torch.testing.assert_close(
        unpack_latents(packed, h, w), FluxPipeline._unpack_latents(packed, h * 8, w * 8, 8)
    )
    torch.testing.assert_close(unpack_latents(packed, h, w), latents, rtol=0, atol=0)
    ids = prepare_latent_image_ids(h // 2, w // 2)
    torch.testing.assert_close(
        ids, FluxPipeline._prepare_latent_image_ids(2, h // 2, w // 2, "cpu", torch.float32)
    )


def test_packing_rejects_odd_sizes() -> None:
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.zeros(1, 16, 5, 4))
    with pytest.raises(ValueError, match="do not form"):
        unpack_latents(torch.zeros(1, 4, 64), 8, 8)


def test_load_components_and_latent_scaling(tiny_flux_dir: Path) -> None:
    parts = load_flux_components(str(tiny_flux_dir), torch.bfloat16, "cpu")
    assert parts.transformer.dtype == torch.bfloat16 and parts.text_encoder_2.dtype == torch.bfloat16
    assert parts.scheduler.config.shift == 3.0 and parts.tokenizer.model_max_length == 77
    shift, scale = vae_latent_params(parts.vae)
    assert (shift, scale) == pytest.approx((0.1159, 0.3611))
    z = torch.randn(1, 16, 4, 4)
    torch.testing.assert_close(denormalize_latents(normalize_latents(z, shift, scale), shift, scale), z)


def test_load_errors(tiny_flux_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_flux_components(str(tmp_path / "nope"), torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"model_index\.json"):
        load_flux_components(str(tmp_path), torch.float32, "cpu")
    with pytest.raises(ValueError, match="single_file_config"):
        load_flux_components(str(tmp_path / "x.safetensors"), torch.float32, "cpu")


def _transformer_inputs(config) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(1, 16, config.in_channels, generator=g),
        "encoder_hidden_states": torch.randn(1, 8, config.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=g),
        "timestep": torch.tensor([0.7]),
        "guidance": torch.tensor([3.5]),
        "img_ids": prepare_latent_image_ids(4, 4),
        "txt_ids": torch.zeros(8, 3),
    }


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_single_file_bfl_checkpoint_round_trip(tiny_flux_dir: Path, tmp_path: Path, prefix: str) -> None:
    from diffusers import FluxTransformer2DModel

    ref = FluxTransformer2DModel.from_pretrained(
        tiny_flux_dir, subfolder="transformer", local_files_only=True
    )
    bfl = diffusers_to_bfl(ref.state_dict())
    assert "double_blocks.0.img_attn.qkv.weight" in bfl and "single_blocks.1.linear1.weight" in bfl
    path = tmp_path / "flux-tiny.safetensors"
    save_file({prefix + k: v.to(torch.bfloat16) for k, v in bfl.items()}, str(path))
    model = load_transformer_single_file(path, tiny_flux_dir, torch.float32)
    inputs = _transformer_inputs(ref.config)
    with torch.no_grad():
        want = ref.to(torch.bfloat16).float()(**inputs).sample  # same bf16 rounding of the weights
        got = model(**inputs).sample
    torch.testing.assert_close(got, want)
    bad = tmp_path / "bad.safetensors"
    save_file({k: v for k, v in bfl.items() if not k.startswith("guidance_in")}, str(bad))
    with pytest.raises(ValueError, match=r"missing 'time_text_embed\.guidance_embedder"):
        load_transformer_single_file(bad, tiny_flux_dir, torch.float32)


def test_bfl_mapping_agrees_with_diffusers_at_flux1_size() -> None:
    """Key names and shapes at FLUX.1-dev size, on the meta device (no memory, no weights)."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    with init_empty_weights():
        model = FluxTransformer2DModel(guidance_embeds=True, num_layers=2, num_single_layers=2)
    ours_bfl = diffusers_to_bfl(model.state_dict())
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(ours_bfl))
    ours = bfl_to_diffusers(ours_bfl)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert set(ours) == set(model.state_dict())
