"""diffusers <-> kohya FLUX LoRA conversion, checked against diffusers' own kohya loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from coatflux.flux.convert import convert_lora_file, diffusers_lora_to_kohya, kohya_lora_to_diffusers
from coatflux.flux.lora import (
    find_lora_targets,
    inject_lora,
    lora_metadata,
    lora_state_dict,
    read_lora,
    save_lora,
)


def _random_lora(tiny_flux_dir: Path, ignore=None, rank: int = 4) -> dict[str, torch.Tensor]:
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(
        tiny_flux_dir, subfolder="transformer", local_files_only=True
    )
    modules = inject_lora(
        model, rank=rank, alpha=rank / 2, targets=find_lora_targets(model, ignore_if_contains=ignore)
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in modules.values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.3)
    return lora_state_dict(model, torch.float32)


def _deltas(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        k[: -len(".lora_A.weight")]: sd[k.replace("lora_A", "lora_B")] @ sd[k]
        for k in sd
        if k.endswith("lora_A.weight")
    }


def test_kohya_layout_fused_deltas_and_round_trip(tiny_flux_dir: Path) -> None:
    sd = _random_lora(tiny_flux_dir)
    kohya = diffusers_lora_to_kohya(sd)
    assert len(kohya) == 3 * (2 * 10 + 2 * 3)
    assert kohya["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape == (16, 32)  # 4 parts x rank 4
    assert kohya["lora_unet_single_blocks_0_linear1.alpha"].item() == 16.0
    assert kohya["lora_unet_double_blocks_1_img_mod_lin.alpha"].item() == 4.0
    fused = (
        kohya["lora_unet_single_blocks_0_linear1.lora_up.weight"]
        @ kohya["lora_unet_single_blocks_0_linear1.lora_down.weight"]
    )
    d = _deltas(sd)
    parts = [
        f"transformer.single_transformer_blocks.0.{p}"
        for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
    ]
    torch.testing.assert_close(fused, torch.cat([d[p] for p in parts]))
    back = kohya_lora_to_diffusers(kohya)
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)  # lossless, not merely close


def test_partial_qkv_and_kohya_alpha(tiny_flux_dir: Path) -> None:
    sd = _random_lora(tiny_flux_dir, ignore=["to_k", "add_k_proj"])
    back = kohya_lora_to_diffusers(diffusers_lora_to_kohya(sd))
    assert set(back) == set(sd) and not any("to_k" in k for k in back)
    d, db = _deltas(sd), _deltas(back)
    for k in d:
        torch.testing.assert_close(db[k], d[k])
    kohya = diffusers_lora_to_kohya(sd)
    kohya["lora_unet_double_blocks_0_img_mlp_0.alpha"] = torch.tensor(2.0)  # rank 4 -> scale 0.5
    halved = kohya_lora_to_diffusers(kohya)
    key = "transformer.transformer_blocks.0.ff.net.0.proj.lora_B.weight"
    torch.testing.assert_close(halved[key], sd[key] * 0.5)


def _generate(pipe) -> torch.Tensor:
    return pipe(
        "a photo of a cat",
        height=64,
        width=64,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        max_sequence_length=32,
    ).images


def test_kohya_file_loads_in_diffusers_like_the_original(
    tiny_flux_dir: Path, tmp_path: Path, load_lora_no_warnings
) -> None:
    """diffusers' kohya loader hard-codes FLUX.1's 3072-wide linear1 split, so the single-block
    q/k/v/mlp LoRAs (fused into linear1) are left out here; the test above covers them exactly."""
    pytest.importorskip("peft", reason="diffusers needs peft for load_lora_weights")
    from diffusers import FluxPipeline

    sd = _random_lora(
        tiny_flux_dir,
        ignore=["single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn", "proj_mlp"],
    )
    src = save_lora(tmp_path / "d.safetensors", sd, lora_metadata(7, 1, trigger_word="sks"))
    dst = convert_lora_file(src, tmp_path / "k.safetensors", to="kohya")
    assert read_lora(dst)[1] == read_lora(src)[1]  # metadata preserved
    outputs = []
    for path in (src, dst):
        pipe = FluxPipeline.from_pretrained(tiny_flux_dir, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        base = _generate(pipe)
        load_lora_no_warnings(pipe, path)
        outputs.append(_generate(pipe))
        assert (outputs[-1] - base).abs().mean() > 1e-2
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-4)


def test_file_errors(tiny_flux_dir: Path, tmp_path: Path) -> None:
    src = save_lora(tmp_path / "d.safetensors", _random_lora(tiny_flux_dir), {"a": "b"})
    dst = convert_lora_file(src, tmp_path / "k.safetensors", to="kohya")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        convert_lora_file(src, dst, to="kohya")
    back = convert_lora_file(dst, tmp_path / "d2.safetensors", to="diffusers")
    assert read_lora(back)[1] == {"a": "b"}
    with pytest.raises(ValueError, match="'kohya' or 'diffusers'"):
        convert_lora_file(src, tmp_path / "x.safetensors", to="comfy")
    bad = tmp_path / "bad.safetensors"
    save_file({"lora_unet_double_blocks_0_img_attn_nope.lora_down.weight": torch.zeros(2, 2)}, str(bad))
    with pytest.raises(ValueError, match="lora_unet_double_blocks_0_img_attn_nope"):
        convert_lora_file(bad, tmp_path / "y.safetensors", to="diffusers")
    save_file(
        {"transformer.x_embedder.lora_A.weight": torch.zeros(2, 2), "unet.foo": torch.zeros(1)}, str(bad)
    )
    with pytest.raises(ValueError, match=r"unet\.foo"):
        convert_lora_file(bad, tmp_path / "z.safetensors", to="kohya")
