import warnings

import pytest
import torch
from torch import nn

from coatflux import (
    ActivationConfig,
    COATConfig,
    COATTrainer,
    ConfigError,
    FP8AdamW,
    FP8Linear,
    FP8QuantizationConfig,
    apply_coat,
    replace_linear_with_fp8,
)


def _model():
    return nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Sequential(nn.Linear(32, 16)))


def test_replace_linear_with_fp8_converts_all_linears():
    with pytest.warns(RuntimeWarning, match="no FP8 speed-up"):
        model = replace_linear_with_fp8(_model())
    assert isinstance(model[0], FP8Linear) and isinstance(model[2][0], FP8Linear)
    assert not hasattr(model, "coat_context")


def test_apply_coat_filters_and_refuses_twice():
    cfg = COATConfig.from_dict({"include": ["2"], "exclude": []})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        model = apply_coat(_model(), cfg)
    assert isinstance(model[0], nn.Linear) and isinstance(model[2][0], FP8Linear)
    assert model.coat_context.converted == ["2.0"]
    with pytest.raises(RuntimeError, match="already"):
        apply_coat(model, cfg)
    exclude = COATConfig(include=("0", "2"), exclude=("2",))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        model = apply_coat(_model(), exclude)
    assert model.coat_context.converted == ["0"]


def test_disabled_config_leaves_model_alone():
    model = apply_coat(_model(), COATConfig(enabled=False))
    assert type(model[0]) is nn.Linear


def test_config_from_seed_yaml_block():
    cfg = COATConfig.from_dict({
        "enabled": True,
        "optimizer": {"use_fp8": True, "m1_format": "e4m3", "m2_format": "e5m2", "block_size": 64,
                      "use_dynamic_range_expansion": True},
        "activation": {"use_fp8": True, "linear_granularity": "per_tensor", "nonlinear_granularity": "per_group",
                       "group_size": 256},
    })
    assert cfg.optimizer.m2_format == "e5m2" and cfg.optimizer.use_fp8_m1 and cfg.optimizer.block_size == 64
    assert cfg.activation.group_size == 256
    assert COATConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("data,message", [
    ({"optimizer": {"m1_format": "e4m4"}}, r"coat\.optimizer\.m1_format: 'e4m4' is not allowed; choose one of e4m3, e5m2"),
    ({"optimizer": {"block_size": 96}}, r"coat\.optimizer\.block_size: expected a power of two"),
    ({"activation": {"granularity": "x"}}, r"coat\.activation\.granularity: unknown key"),
    ({"activation": {"linear_granularity": "per_row"}}, r"per_tensor, per_group"),
    ({"enabld": True}, r"coat\.enabld: unknown key \(did you mean 'enabled'\?\)"),
    ({"enabled": "yes"}, r"coat\.enabled: expected true or false"),
    ({"activation": {"fp8_fast_accumulation": 1}}, r"coat\.activation\.fp8_fast_accumulation: expected true or false"),
])
def test_config_errors_name_the_field(data, message):
    with pytest.raises(ConfigError, match=message):
        COATConfig.from_dict(data)


def test_coat_trainer_guide_example():
    trainer = COATTrainer(COATConfig())
    params = list(_model().parameters())
    opt = trainer.create_optimizer(params, lr=1e-4)
    assert isinstance(opt, FP8AdamW) and opt.param_groups[0]["lr"] == 1e-4
    plain = COATTrainer(COATConfig(optimizer=FP8QuantizationConfig(use_fp8_m1=False, use_fp8_m2=False)))
    assert type(plain.create_optimizer(params, lr=1e-4)) is torch.optim.AdamW
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        model = trainer.prepare_model(_model())
    assert isinstance(model[0], FP8Linear)


def test_activation_config_validation():
    with pytest.raises(ValueError, match="group_size"):
        ActivationConfig(group_size=3)


def test_attention_scope_is_opened_only_inside_attention_modules():
    """The SDPA-finding mode is active inside FluxAttention modules only; their SDPA tensors stay bf16."""
    from coatflux.bench.model import PRESETS, build_transformer, make_batch

    preset = PRESETS["tiny"]
    model = build_transformer(preset, "cpu").requires_grad_(False)
    with pytest.warns(RuntimeWarning, match="FP8 GEMMs need a CUDA GPU"):
        apply_coat(model)
    context = model.coat_context
    attention = [m for m in model.modules() if type(m).__name__ == "FluxAttention"]
    assert context.attention_modules == len(attention) > 0
    compressor, seen = context.compressor, []
    pack = compressor.pack
    compressor.pack = lambda t: (seen.append((compressor.attention_depth, pack(t))), seen[-1][1])[1]
    data = make_batch(preset, 256, 1, "cpu")  # 256 image tokens: tensors above min_saved_numel
    data.pop("target")
    x = data["hidden_states"].requires_grad_(True)
    model(**data, return_dict=False)[0].float().square().mean().backward()
    inside = [packed for depth, packed in seen if depth > 0]
    outside = [packed for depth, packed in seen if depth == 0]
    assert inside and all(torch.is_tensor(p) for p in inside)  # q, k, v, output, log-sum-exp as they are
    assert any(not torch.is_tensor(p) for p in outside)  # everything else is packed as usual
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert not context._scopes and not context._stacks  # every scope was closed
