"""Typed configuration of the COAT core, mirroring the ``coat:`` YAML block of the user's guide.

What: three frozen dataclasses -- :class:`FP8QuantizationConfig` (optimizer states),
:class:`ActivationConfig` (saved activations and FP8 GEMMs) and :class:`COATConfig` (both, plus
``enabled`` and module filters) -- each validated on construction, and ``from_dict`` loaders that
reject unknown keys with the key's dotted path and the closest valid name.

Why frozen dataclasses and not pydantic: the core must stay importable with torch alone, the
schema is small, and hand-written checks let every message name the allowed values exactly the way
the YAML spells them. Defaults live here and nowhere else; the trainer and the ai-toolkit extension
read them from these classes.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from coatflux.core.formats import FORMAT_NAMES

GRANULARITIES = ("per_tensor", "per_group")


class ConfigError(ValueError):
    """A configuration value is invalid; the message starts with the key's dotted path."""


def _closest(name: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else f" (valid keys: {', '.join(sorted(valid))})"


def check_known_keys(data: Mapping[str, Any], valid: list[str], path: str) -> None:
    """Raise :class:`ConfigError` for the first key of ``data`` that is not in ``valid``."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping, got {type(data).__name__}")
    for key in data:
        if key not in valid:
            raise ConfigError(f"{path}.{key}: unknown key{_closest(str(key), valid)}")


def _check_choice(value: Any, allowed: tuple[str, ...], path: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{path}: {value!r} is not allowed; choose one of {', '.join(allowed)}")


def _check_bool(value: Any, path: str) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{path}: expected true or false, got {value!r}")


def _check_power_of_two(value: Any, path: str, low: int = 1, high: int = 1 << 20) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or value > high or value & (value - 1):
        raise ConfigError(f"{path}: expected a power of two between {low} and {high}, got {value!r}")


@dataclass(frozen=True)
class FP8QuantizationConfig:
    """How :class:`~coatflux.core.optim.FP8AdamW` stores the two AdamW moments.

    ``block_size`` elements of the flattened parameter share one set of quantization
    statistics. ``use_dynamic_range_expansion`` raises each block to the power ``k`` that fills
    the FP8 format's range before quantizing (COAT's DRE). ``min_quantized_numel`` is the size
    below which a tensor keeps fp32 moments: for a few thousand elements the saving is a few KB
    and not worth any error (bitsandbytes and torchao use the same 4096 rule).
    """

    use_fp8_m1: bool = True
    use_fp8_m2: bool = True
    m1_format: str = "e4m3"
    m2_format: str = "e4m3"
    block_size: int = 128
    use_dynamic_range_expansion: bool = True
    min_quantized_numel: int = 4096

    def __post_init__(self) -> None:
        self.validate("fp8_config")

    def validate(self, path: str) -> None:
        _check_bool(self.use_fp8_m1, f"{path}.use_fp8_m1")
        _check_bool(self.use_fp8_m2, f"{path}.use_fp8_m2")
        _check_choice(self.m1_format, FORMAT_NAMES, f"{path}.m1_format")
        _check_choice(self.m2_format, FORMAT_NAMES, f"{path}.m2_format")
        _check_power_of_two(self.block_size, f"{path}.block_size", low=16, high=1 << 16)
        _check_bool(self.use_dynamic_range_expansion, f"{path}.use_dynamic_range_expansion")
        if isinstance(self.min_quantized_numel, bool) or not isinstance(self.min_quantized_numel, int) \
                or self.min_quantized_numel < 0:
            raise ConfigError(f"{path}.min_quantized_numel: expected an integer >= 0, "
                              f"got {self.min_quantized_numel!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: str = "coat.optimizer") -> FP8QuantizationConfig:
        """Load the seed's ``coat.optimizer`` block; ``use_fp8`` sets both moments at once."""
        valid = [f.name for f in fields(cls)] + ["use_fp8"]
        check_known_keys(data, valid, path)
        values = dict(data)
        if "use_fp8" in values:
            use = values.pop("use_fp8")
            _check_bool(use, f"{path}.use_fp8")
            values.setdefault("use_fp8_m1", use)
            values.setdefault("use_fp8_m2", use)
        return _build(cls, values, path)


@dataclass(frozen=True)
class ActivationConfig:
    """How activations saved for backward and the linear layers' GEMMs are compressed.

    Linear inputs default to ``per_tensor`` scaling (one scale, so the FP8 tensor-core GEMM needs
    no rescaling inside its K loop); inputs of non-linear ops default to ``per_group`` 1 x
    ``group_size`` scaling, which follows local outliers (COAT's mixed granularity).
    ``fp8_fast_accumulation`` lets the FP8 tensor-core GEMMs keep the tensor cores' own accumulator
    over the whole sum (``torch._scaled_mm(use_fast_accum=True)``) rather than promote partial sums
    to fp32 at intervals, in all three GEMMs. That is what COAT's own GEMMs do on Hopper (Triton
    dots of FP8 on sm_90 accumulate without promotion unless told otherwise), so COAT's H100 results
    were measured with it; torchao's float8 training does it in the forward GEMM. False
    gives cuBLAS's promoted accumulation, slower and more exact over FLUX's long sums (K up to
    15,360). ``benchmarks/fp8_accumulation.py`` measures both: on an H200 (2026-11-27 14:35) fast
    accumulation took 83.6 against 88.4 ms of a 1024 px FLUX.1-dev step's FP8 GEMMs, at 49 to 54 dB
    SQNR against 55.6 for promoted accumulation (both against the fp32 product). cuBLAS documents the mode as faster
    "on some GPUs"; where the tensor cores have no such mode (Triton promotes on Ada, sm_89) it
    need not change anything.
    ``keep_attention_bf16`` leaves scaled-dot-product attention's saved tensors untouched, as COAT
    does; ``gemm_autotune`` times the FP8 and the plain GEMM once per shape on the GPU and keeps
    the faster (small GEMMs do not gain from FP8; in compiled blocks, planned per linear and row
    count before they compile); ``fused_nonlinear`` swaps LayerNorm, RMSNorm and GELU modules for versions that save
    one FP8 input and recompute their output (:mod:`coatflux.core.nonlinear`);
    ``min_saved_numel`` skips tiny saved tensors (per-sample modulation vectors, norm statistics)
    whose compression saves nothing. ``compile_blocks`` compiles the model's repeated blocks with
    ``torch.compile`` and compresses what each compiled block saves inside its graph
    (:mod:`coatflux.core.compiled`); it needs per-tensor linear inputs and per-group saved
    activations, and replaces ``fused_nonlinear`` (the compiler fuses those ops itself).
    """

    use_fp8: bool = True
    linear_granularity: str = "per_tensor"
    nonlinear_granularity: str = "per_group"
    group_size: int = 16
    fp8_gemm: bool = True
    fp8_fast_accumulation: bool = True
    gemm_autotune: bool = True
    keep_attention_bf16: bool = True
    fused_nonlinear: bool = True
    min_saved_numel: int = 4096
    compile_blocks: bool = False

    def __post_init__(self) -> None:
        self.validate("activation")

    def validate(self, path: str) -> None:
        _check_bool(self.use_fp8, f"{path}.use_fp8")
        _check_choice(self.linear_granularity, GRANULARITIES, f"{path}.linear_granularity")
        _check_choice(self.nonlinear_granularity, GRANULARITIES, f"{path}.nonlinear_granularity")
        _check_power_of_two(self.group_size, f"{path}.group_size", low=2, high=4096)
        _check_bool(self.fp8_gemm, f"{path}.fp8_gemm")
        _check_bool(self.fp8_fast_accumulation, f"{path}.fp8_fast_accumulation")
        _check_bool(self.gemm_autotune, f"{path}.gemm_autotune")
        _check_bool(self.keep_attention_bf16, f"{path}.keep_attention_bf16")
        _check_bool(self.fused_nonlinear, f"{path}.fused_nonlinear")
        _check_bool(self.compile_blocks, f"{path}.compile_blocks")
        if self.compile_blocks and (self.linear_granularity, self.nonlinear_granularity) != ("per_tensor", "per_group"):
            raise ConfigError(f"{path}.compile_blocks: compiled blocks quantize linear inputs per tensor and saved "
                              f"activations per group; got linear_granularity={self.linear_granularity!r}, "
                              f"nonlinear_granularity={self.nonlinear_granularity!r}")
        if isinstance(self.min_saved_numel, bool) or not isinstance(self.min_saved_numel, int) \
                or self.min_saved_numel < 0:
            raise ConfigError(f"{path}.min_saved_numel: expected an integer >= 0, got {self.min_saved_numel!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: str = "coat.activation") -> ActivationConfig:
        check_known_keys(data, [f.name for f in fields(cls)], path)
        return _build(cls, data, path)


@dataclass(frozen=True)
class COATConfig:
    """The whole ``coat:`` block: optimizer, activations, and which modules are converted.

    ``include`` / ``exclude`` are substrings of module names (``exclude`` wins); an empty
    ``include`` means every module. ``performance_log_every`` overrides the trainer's memory-report
    period when set.
    """

    enabled: bool = True
    optimizer: FP8QuantizationConfig = field(default_factory=FP8QuantizationConfig)
    activation: ActivationConfig = field(default_factory=ActivationConfig)
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    performance_log_every: int | None = None

    def __post_init__(self) -> None:
        self.validate("coat")

    def validate(self, path: str) -> None:
        _check_bool(self.enabled, f"{path}.enabled")
        if not isinstance(self.optimizer, FP8QuantizationConfig):
            raise ConfigError(f"{path}.optimizer: expected FP8QuantizationConfig")
        if not isinstance(self.activation, ActivationConfig):
            raise ConfigError(f"{path}.activation: expected ActivationConfig")
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{path}.{name}: expected a list of module-name substrings, got {value!r}")
        every = self.performance_log_every
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ConfigError(f"{path}.performance_log_every: expected a positive integer, got {every!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, path: str = "coat") -> COATConfig:
        """Load the seed's ``coat:`` YAML block (absent keys take the defaults above)."""
        data = {} if data is None else data
        check_known_keys(data, [f.name for f in fields(cls)], path)
        enabled = data.get("enabled", True)
        _check_bool(enabled, f"{path}.enabled")
        include, exclude = (_as_tuple(data.get(k, ()), f"{path}.{k}") for k in ("include", "exclude"))
        config = cls.__new__(cls)
        object.__setattr__(config, "enabled", enabled)
        object.__setattr__(config, "optimizer",
                           FP8QuantizationConfig.from_dict(data.get("optimizer") or {}, f"{path}.optimizer"))
        object.__setattr__(config, "activation",
                           ActivationConfig.from_dict(data.get("activation") or {}, f"{path}.activation"))
        object.__setattr__(config, "include", include)
        object.__setattr__(config, "exclude", exclude)
        object.__setattr__(config, "performance_log_every", data.get("performance_log_every"))
        config.validate(path)
        return config

    def to_dict(self) -> dict[str, Any]:
        """The YAML form, for ``config.yaml`` next to the outputs."""
        return {
            "enabled": self.enabled,
            "optimizer": {f.name: getattr(self.optimizer, f.name) for f in fields(self.optimizer)},
            "activation": {f.name: getattr(self.activation, f.name) for f in fields(self.activation)},
            "include": list(self.include),
            "exclude": list(self.exclude),
            "performance_log_every": self.performance_log_every,
        }


def _build(cls: type, values: Mapping[str, Any], path: str) -> Any:
    """An instance of the frozen dataclass ``cls`` from ``values`` (defaults for absent keys),
    validated with ``path`` in its messages rather than the class's own default path."""
    config = cls.__new__(cls)
    for f in fields(cls):
        object.__setattr__(config, f.name, values.get(f.name, f.default))
    config.validate(path)
    return config


def _as_tuple(value: Any, path: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{path}: expected a list of strings, got {value!r}")
    return tuple(value)
