"""LoRA targets, injection, state dicts, files, and loading our files with diffusers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from coatflux.flux import lora as lora_mod
from coatflux.flux.lora import (
    LoRALinear,
    find_lora_targets,
    inject_lora,
    load_lora_state_dict,
    lora_metadata,
    lora_modules,
    lora_parameters,
    lora_state_dict,
    read_lora,
    remove_lora,
    save_lora,
    set_lora_enabled,
    set_lora_multiplier,
    training_step,
)


@pytest.fixture
def transformer(tiny_flux_dir: Path):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_pretrained(
        tiny_flux_dir, subfolder="transformer", local_files_only=True
    )


def _randomize_b(transformer, seed: int = 0, std: float = 0.5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(transformer).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * std)


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


def test_targets_match_ai_toolkit_default(transformer) -> None:
    targets = find_lora_targets(transformer)
    assert len(targets) == 2 * 14 + 2 * 6
    assert "transformer_blocks.0.norm1_context.linear" in targets
    assert "single_transformer_blocks.1.proj_mlp" in targets
    assert not any(t.startswith(("x_embedder", "proj_out", "norm_out", "time_text")) for t in targets)
    single = find_lora_targets(transformer, only_if_contains=["single_transformer_blocks"])
    assert len(single) == 12
    mixed = find_lora_targets(
        transformer,
        only_if_contains=["transformer.single_transformer_blocks.1"],
        ignore_if_contains=["proj_out", "1"],
    )
    assert mixed == []  # ignore wins over only
    assert "single_transformer_blocks.1.proj_out" not in find_lora_targets(
        transformer, ignore_if_contains=[".1.proj_out"]
    )


def test_inject_starts_at_identity_and_freezes_base(transformer) -> None:
    x = torch.randn(1, 16, 64), torch.randn(1, 8, 32)
    kwargs = {
        "pooled_projections": torch.randn(1, 32),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([1.0]),
        "img_ids": torch.zeros(16, 3),
        "txt_ids": torch.zeros(8, 3),
    }
    with torch.no_grad():
        before = transformer(hidden_states=x[0], encoder_hidden_states=x[1], **kwargs).sample
    base = transformer.get_submodule("transformer_blocks.0.attn.to_q")
    injected = inject_lora(
        transformer, rank=4, alpha=2.0, targets=find_lora_targets(transformer), dtype=torch.float32
    )
    assert len(injected) == 40 and injected["transformer_blocks.0.attn.to_q"].base is base
    assert all(not p.requires_grad for m in injected.values() for p in m.base.parameters())
    assert len(lora_parameters(transformer)) == 80 and all(
        p.requires_grad for p in lora_parameters(transformer)
    )
    with torch.no_grad():
        torch.testing.assert_close(
            transformer(hidden_states=x[0], encoder_hidden_states=x[1], **kwargs).sample, before
        )
    with pytest.raises(RuntimeError, match="already has LoRA"):
        inject_lora(transformer, 4, 4, ["transformer_blocks.0.attn.to_k"])
    assert find_lora_targets(transformer) == []  # the wrapped bases are not targets again
    assert remove_lora(transformer) == 40
    assert transformer.get_submodule("transformer_blocks.0.attn.to_q") is base


def test_inject_rejects_bad_targets(transformer) -> None:
    with pytest.raises(ValueError, match="not a submodule"):
        inject_lora(transformer, 4, 4, ["transformer_blocks.9.attn.to_q"])
    with pytest.raises(ValueError, match="not a linear"):
        inject_lora(transformer, 4, 4, ["transformer_blocks.0.attn"])


def test_lora_linear_math_multiplier_and_bf16_base() -> None:
    base = nn.Linear(8, 6).to(torch.bfloat16)
    layer = LoRALinear(base, rank=2, alpha=4.0)
    assert layer.scale == 2.0 and layer.lora_A.weight.dtype == torch.float32
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    delta = (x.float() @ layer.lora_A.weight.T) @ layer.lora_B.weight.T
    a, b = layer.lora_A.weight.bfloat16(), layer.lora_B.weight.bfloat16()
    with torch.no_grad():
        out = layer(x)
        assert out.dtype == torch.bfloat16
        # multiplied in the activation dtype (fp32 weights cast per call), close to the fp32 math
        assert torch.equal(out, base(x) + ((x @ a.T) * 2.0) @ b.T)
        torch.testing.assert_close(out.float(), (base(x) + 2.0 * delta.to(torch.bfloat16)).float(),
                                   atol=0.05, rtol=0.02)
        layer.multiplier = 0.5
        assert torch.equal(layer(x), base(x) + (x @ a.T) @ b.T)
        layer.enabled = False
        torch.testing.assert_close(layer(x), base(x))


def test_fp8_base_gets_lora_matrices(monkeypatch: pytest.MonkeyPatch) -> None:
    """The FP8Linear contract: forward(x, lora_A, lora_B, lora_scale) -- checked with a recording double."""

    class RecordingFP8(nn.Linear):
        def forward(self, x, lora_A=None, lora_B=None, lora_scale=1.0):
            self.seen = (lora_A, lora_B, lora_scale)
            return super().forward(x)

    monkeypatch.setattr(lora_mod, "FP8Linear", RecordingFP8)
    base = RecordingFP8(8, 4)
    layer = LoRALinear(base, rank=2, alpha=1.0)
    layer.multiplier = 0.5
    layer(torch.randn(2, 8))
    a, b, scale = base.seen
    assert a is layer.lora_A.weight and b is layer.lora_B.weight and scale == pytest.approx(0.25)


def test_state_dict_fold_raw_and_resume(transformer) -> None:
    inject_lora(transformer, rank=4, alpha=8.0, targets=find_lora_targets(transformer))
    _randomize_b(transformer)
    folded, raw = lora_state_dict(transformer, torch.float32), lora_state_dict(transformer, raw=True)
    key = "transformer.single_transformer_blocks.1.proj_out.lora_B.weight"
    assert len(folded) == 80 and not any("alpha" in k for k in folded)
    torch.testing.assert_close(folded[key], raw[key] * 2.0)
    assert lora_state_dict(transformer, torch.bfloat16)[key].dtype == torch.bfloat16
    trained = {k: v.clone() for k, v in raw.items()}
    for m in lora_modules(transformer).values():
        nn.init.zeros_(m.lora_A.weight)
    load_lora_state_dict(transformer, raw, folded=False)
    assert all(torch.equal(v, trained[k]) for k, v in lora_state_dict(transformer, raw=True).items())
    load_lora_state_dict(transformer, folded)  # folded: B divided by the scale again
    torch.testing.assert_close(lora_state_dict(transformer, raw=True)[key], trained[key])
    with pytest.raises(KeyError, match="missing"):
        load_lora_state_dict(transformer, {k: v for k, v in raw.items() if k != key})
    with pytest.raises(ValueError, match="another rank"):
        load_lora_state_dict(transformer, {**raw, key: torch.zeros(3, 3)})


def test_save_metadata_and_overwrite(transformer, tmp_path: Path) -> None:
    inject_lora(transformer, rank=2, alpha=2.0, targets=find_lora_targets(transformer))
    meta = lora_metadata(
        step=120, epoch=3, trigger_word="sks", name="mylora", extra_meta={"note": "[name] v1", "n": {"a": 1}}
    )
    assert all(isinstance(v, str) for v in meta.values())
    assert json.loads(meta["software"])["name"] == "coatflux" and meta["format"] == "pt"
    assert meta["ss_base_model_version"] == "flux.1" and meta["note"] == "mylora v1"
    path = save_lora(
        tmp_path / "out" / "mylora.safetensors", lora_state_dict(transformer, torch.float16), meta
    )
    tensors, read_meta = read_lora(path)
    assert read_meta == meta and training_step(read_meta) == 120 and len(tensors) == 80
    assert next(iter(tensors.values())).dtype == torch.float16
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_lora(path, tensors, meta)
    save_lora(path, tensors, {"x": 1}, overwrite=True)
    assert read_lora(path)[1] == {"x": "1"}
    assert [p.name for p in path.parent.iterdir()] == ["mylora.safetensors"]


def test_saved_lora_loads_in_diffusers_and_matches_ours(
    tiny_flux_pipe, tiny_flux_dir: Path, tmp_path: Path, load_lora_no_warnings
) -> None:
    pytest.importorskip("peft", reason="diffusers needs peft for load_lora_weights")
    from diffusers import FluxPipeline

    baseline = _generate(tiny_flux_pipe)
    ours = FluxPipeline.from_pretrained(tiny_flux_dir, local_files_only=True)
    ours.set_progress_bar_config(disable=True)
    inject_lora(ours.transformer, rank=4, alpha=2.0, targets=find_lora_targets(ours.transformer))
    _randomize_b(ours.transformer, std=0.3)
    with torch.no_grad():
        ours_out = _generate(ours)
    path = save_lora(
        tmp_path / "l.safetensors", lora_state_dict(ours.transformer, torch.float32), lora_metadata(1, 0)
    )

    load_lora_no_warnings(tiny_flux_pipe, path)
    theirs = _generate(tiny_flux_pipe)
    assert (theirs - baseline).abs().mean() > 1e-2  # the LoRA does something measurable
    torch.testing.assert_close(theirs, ours_out, rtol=1e-4, atol=1e-4)  # and the same thing as ours
    set_lora_multiplier(ours.transformer, 0.0)
    torch.testing.assert_close(_generate(ours), baseline, rtol=1e-5, atol=1e-5)
    set_lora_multiplier(ours.transformer, 1.0)
    set_lora_enabled(ours.transformer, False)
    torch.testing.assert_close(_generate(ours), baseline, rtol=1e-5, atol=1e-5)


def test_real_fp8_linear_base_trains_lora() -> None:
    linear_mod = pytest.importorskip("coatflux.core.linear")
    torch.manual_seed(0)
    dense = nn.Linear(64, 32)
    layer = LoRALinear(linear_mod.FP8Linear.from_linear(dense), rank=4, alpha=4.0)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(8, 64)
    out = layer(x)
    want = dense(x) + (x @ layer.lora_A.weight.T) @ layer.lora_B.weight.T
    assert (out - want).abs().max() < 0.05 * want.abs().max()  # FP8 rounding only
    out.sum().backward()
    assert layer.lora_A.weight.grad.abs().sum() > 0 and layer.lora_B.weight.grad.abs().sum() > 0
