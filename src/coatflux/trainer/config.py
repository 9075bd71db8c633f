"""Load an ostris/ai-toolkit job file (YAML or JSON) into typed, validated dataclasses.

What: :func:`load_config` reads ``job: extension`` / ``config: {name, process: [...]}`` /
``meta:`` files exactly as ai-toolkit writes them, applies ai-toolkit's loader rules (``${ENV}``
and ``[name]`` substitution, ``1e-4`` read as a float), and returns a :class:`TrainJobConfig`
whose sections (:class:`NetworkConfig`, :class:`SaveConfig`, :class:`DatasetConfig`,
:class:`TrainConfig`, :class:`ModelConfig`, :class:`SampleConfig` and the core's
:class:`~coatflux.core.config.COATConfig`) hold every value with its type checked.

Why: a FLUX run spends minutes loading 30 GB of weights; a typo found after that is a wasted
start. So everything, including that dataset folders exist, is checked here, and every message
starts with the key's dotted path (``config.process[0].train.lr: ...``).

Keys come in three kinds, and the choice between them is deliberate:

* implemented keys are dataclass fields; their defaults are **ai-toolkit's class defaults** (not
  the example file's values: ``lr`` is 1e-6, ``dtype`` fp32) and live only in the field defaults;
* keys ai-toolkit knows but coatflux does not implement (the ``*_IGNORED`` tables below) are
  accepted, collected in :attr:`TrainJobConfig.ignored_keys` and reported in one warning, so an
  ai-toolkit config runs unchanged and the user still learns what had no effect;
* any other key is an error with the closest valid name. ai-toolkit silently ignores unknown keys,
  which turns ``lrr: 1e-4`` into a run at the default 1e-6; we prefer to stop.

Deviations from ai-toolkit, each on purpose: ``network.linear_alpha`` is honoured (ai-toolkit forces
alpha = rank for FLUX; we default alpha to the rank, so its files are reproduced when it is
absent or equal); ``noise_scheduler``/``sampler: ddpm`` are accepted but FLUX always uses flow
matching; the legacy ``gradient_accumulation_steps`` means true accumulation, like
``gradient_accumulation``; ``model.dtype`` is replaced by ``train.dtype`` as ai-toolkit does.
Relative paths are resolved against the current directory, as in ai-toolkit.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from coatflux.core.config import COATConfig, ConfigError, check_known_keys

__all__ = [
    "ConfigError",
    "ConfigWarning",
    "DatasetConfig",
    "EMAConfig",
    "ModelConfig",
    "NetworkConfig",
    "NetworkKwargs",
    "SampleConfig",
    "SampleItem",
    "SaveConfig",
    "TrainConfig",
    "TrainJobConfig",
    "load_config",
]


class ConfigWarning(UserWarning):
    """A config value is accepted but has no effect or a different meaning than it suggests."""


# ----------------------------------------------------------------------------------------------
# Value checks. Each returns the normalized value or raises ConfigError naming the path.

Check = Callable[[Any, str], Any]

OPTIMIZERS = ("coat_fp8_adamw", "adamw", "adamw8bit", "adafactor")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "linear")
TIMESTEP_TYPES = ("sigmoid", "linear", "shift", "flux_shift")
# Canonical names are torch's, so the trainer can use getattr(torch, name).
DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16"}
MIN_RESOLUTION = 64
# Images are never upscaled, so a huge resolution trains big photos at full size: 4096 px (16 MP)
# is already 8x FLUX.1's ~2 MP training size; anything above is a typo, not a plan.
MAX_RESOLUTION = 4096
MAX_SANE_LR = 1.0  # above this ConfigWarning says the run will diverge (see _train)


def _fail(path: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"{path}: expected {expected}, got {value!r}")


def _bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(path, "true or false", value)
    return value


def _str(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise _fail(path, "a string", value)
    return value


def _optional(check: Check) -> Check:
    return lambda value, path: None if value is None else check(value, path)


def _int(low: int, high: int | None = None) -> Check:
    def check(value: Any, path: str) -> int:
        # An integral float (1e3 from the float resolver) is an int; 2.5 steps is not.
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
            raise _fail(path, f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]", value)
        return value
    return check


def _number(low: float = -math.inf, high: float = math.inf, positive: bool = False) -> Check:
    def check(value: Any, path: str) -> float:
        if isinstance(value, str):  # quoted '1e-4' (or JSON from elsewhere): ai-toolkit reads a float
            try:
                value = float(value)
            except ValueError:
                raise _fail(path, "a number", value) from None
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise _fail(path, "a number", value)
        if value < low or value > high or (positive and value <= 0):
            bounds = "> 0" if positive else f"in [{low:g}, {high:g}]" if high < math.inf else f">= {low:g}"
            raise _fail(path, f"a number {bounds}", value)
        return float(value)
    return check


_rate = _number(0.0, 1.0)


def _choice(*allowed: str, lower: bool = True) -> Check:
    def check(value: Any, path: str) -> str:
        text = _str(value, path)
        text = text.lower() if lower else text
        if text not in allowed:
            raise ConfigError(f"{path}: {value!r} is not supported; choose one of {', '.join(allowed)}")
        return text
    return check


def _dtype(value: Any, path: str) -> str:
    return DTYPES[_choice(*DTYPES)(value, path)]


def _str_tuple(value: Any, path: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise _fail(path, "a list of strings", value)
    return tuple(value)


def _mapping(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise _fail(path, "a mapping", value)
    return dict(value)


def _path(value: Any, path: str) -> Path:
    return Path(_str(value, path)).expanduser()


def _existing_dir(value: Any, path: str) -> Path:
    folder = _path(value, path)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{path}: '{folder}' is a file, not a folder")
    if not folder.is_dir():
        raise ConfigError(f"{path}: folder '{folder}' does not exist")
    return folder


def _existing_file(value: Any, path: str) -> str:
    if not Path(_str(value, path)).expanduser().is_file():
        raise ConfigError(f"{path}: file '{value}' does not exist")
    return value


def _model_path(value: Any, path: str) -> str:
    # A hub id cannot be checked offline, but a single-file checkpoint is a local file.
    return _existing_file(value, path) if _str(value, path).endswith(".safetensors") else value


def _caption_ext(value: Any, path: str) -> str:
    text = _str(value, path).strip()
    if not text.strip("."):
        raise _fail(path, "a file extension such as 'txt'", value)
    return text if text.startswith(".") else "." + text


def _resolutions(value: Any, path: str) -> tuple[int, ...]:
    # ai-toolkit accepts any size and snaps buckets to 32 px; below 64 px FLUX has 2x2 latent tokens.
    # The upper bound catches typos (100000) before they turn into an out-of-memory error mid-run.
    items = value if isinstance(value, list | tuple) else [value]
    check = _int(MIN_RESOLUTION, MAX_RESOLUTION)
    if not items:
        raise _fail(path, "a size or a list of sizes", value)
    return tuple(check(v, f"{path}[{i}]" if isinstance(value, list | tuple) else path)
                 for i, v in enumerate(items))


def _meta(check: Check, required: bool = False) -> dict[str, Any]:
    return {"check": check, "required": required}


def _spec(default: Any, check: Check, *, required: bool = False) -> Any:
    """A dataclass field read from the YAML key of the same name, with its check."""
    return field(default=default, metadata=_meta(check, required))


# ----------------------------------------------------------------------------------------------
# Sections. Field defaults are ai-toolkit's class defaults.

NETWORK_IGNORED = ("conv", "conv_alpha", "dropout", "lokr_full_rank", "lokr_factor", "old_lokr_format",
                   "all_layers", "layer_offloading")
NETWORK_KWARGS_IGNORED = ("full_if_contains",)
SAVE_IGNORED = ("save_format", "push_to_hub", "hf_repo_id", "hf_private")
DATASET_IGNORED = ("dataset_path", "token_dropout_rate", "bucket_tolerance", "square_crop", "random_scale",
                   "scale", "is_reg", "network_weight", "loss_multiplier", "random_triggers", "control_path",
                   "mask_path", "alpha_mask", "inpaint_path", "prefetch_factor", "batch_size", "num_workers")
TRAIN_IGNORED = ("unet_lr", "text_encoder_lr", "force_first_sample", "linear_timesteps",
                 "bypass_guidance_embedding", "unload_text_encoder", "min_snr_gamma", "snr_gamma",
                 "diff_output_preservation", "diff_output_preservation_class",
                 "diff_output_preservation_multiplier", "blank_prompt_preservation", "attention_backend",
                 "xformers", "sdp", "start_step", "validation_config", "weight_jitter", "content_or_style")
MODEL_IGNORED = ("qtype_te", "quantize_kwargs", "assistant_lora_path", "attn_masking", "split_model_over_gpus",
                 "cache_size_limit", "layer_offloading",
                 "layer_offloading_transformer_percent", "layer_offloading_text_encoder_percent",
                 "text_encoder_bits", "model_kwargs", "quantize_te", "low_vram", "vae_path", "lora_path")
# FLUX.1-dev is guidance-distilled: sampling has no negative-prompt pass, so ``neg`` does nothing.
SAMPLE_IGNORED = ("sample_start_step", "neg")
SAMPLE_ITEM_IGNORED = ("ctrl_img", "neg")
PROCESS_IGNORED = ("sqlite_db_path", "first_sample", "logging", "adapter", "embedding", "decorator",
                   "guidance", "do_lorm", "torch_profiler")


@dataclass(frozen=True)
class NetworkKwargs:
    """Which modules get LoRA: substrings of dotted names such as
    ``transformer.single_transformer_blocks.7.proj_out``; ``ignore_if_contains`` wins."""

    only_if_contains: tuple[str, ...] = _spec((), _str_tuple)
    ignore_if_contains: tuple[str, ...] = _spec((), _str_tuple)


@dataclass(frozen=True)
class NetworkConfig:
    """``network:``. ``linear`` (alias ``rank``) is the LoRA rank; ``linear_alpha`` (alias
    ``alpha``) defaults to the rank, i.e. scale 1, which is what ai-toolkit always uses for FLUX.

    ``type: full`` is coatflux's full fine-tune: the transformer's own weights are trained (those
    whose names match ``network_kwargs``, all of them by default) instead of adapters; rank and
    alpha are then unused."""

    type: str = _spec("lora", _choice("lora", "full"))
    linear: int = _spec(4, _int(1))
    linear_alpha: float | None = _spec(None, _optional(_number(positive=True)))
    network_kwargs: NetworkKwargs = field(default_factory=NetworkKwargs)
    transformer_only: bool = _spec(True, _bool)
    pretrained_lora_path: str | None = _spec(None, _optional(_existing_file))

    @property
    def alpha(self) -> float:
        return float(self.linear) if self.linear_alpha is None else self.linear_alpha

    @property
    def scale(self) -> float:
        """The LoRA branch multiplier alpha / rank."""
        return self.alpha / self.linear


@dataclass(frozen=True)
class SaveConfig:
    """``save:``: LoRA file dtype, period in steps and how many step files to keep."""

    dtype: str = _spec("float16", _dtype)
    save_every: int = _spec(1000, _int(1))
    max_step_saves_to_keep: int = _spec(5, _int(1))
    # coatflux: resumable checkpoints kept (newest first); an unreadable newest one falls back to
    # the next, so keep at least two where disk allows.
    max_checkpoints_to_keep: int = _spec(2, _int(1))


@dataclass(frozen=True)
class DatasetConfig:
    """One ``datasets[]`` entry. ``resolution`` is always a tuple: every image is trained at
    every size in it. ``trigger_word`` inherits the process-level one."""

    folder_path: Path = field(default=None, metadata=_meta(_existing_dir, required=True))
    caption_ext: str = _spec(".txt", _caption_ext)
    caption_dropout_rate: float = _spec(0.0, _rate)
    shuffle_tokens: bool = _spec(False, _bool)
    keep_tokens: int = _spec(0, _int(0))
    cache_latents: bool = _spec(False, _bool)
    cache_latents_to_disk: bool = _spec(False, _bool)
    cache_text_embeddings: bool = _spec(False, _bool)
    resolution: tuple[int, ...] = _spec((512,), _resolutions)
    buckets: bool = _spec(True, _bool)
    flip_x: bool = _spec(False, _bool)
    flip_y: bool = _spec(False, _bool)
    num_repeats: int = _spec(1, _int(1))
    default_caption: str | None = _spec(None, _optional(_str))
    trigger_word: str | None = _spec(None, _optional(_str))
    random_crop: bool = _spec(False, _bool)


@dataclass(frozen=True)
class EMAConfig:
    """``train.ema_config:``."""

    use_ema: bool = _spec(False, _bool)
    ema_decay: float = _spec(0.999, _rate)


@dataclass(frozen=True)
class TrainConfig:
    """``train:``. ``gradient_accumulation`` micro-batches make one optimizer step;
    ``dtype`` is the compute dtype of the frozen model (canonical torch names)."""

    batch_size: int = _spec(1, _int(1))
    steps: int = _spec(1000, _int(1))
    lr: float = _spec(1e-6, _number(positive=True))
    optimizer: str = _spec("adamw", _choice(*OPTIMIZERS))
    optimizer_params: dict[str, Any] = field(default_factory=dict, metadata=_meta(_mapping))
    lr_scheduler: str = _spec("constant", _choice(*LR_SCHEDULERS))
    lr_scheduler_params: dict[str, Any] = field(default_factory=dict, metadata=_meta(_mapping))
    gradient_accumulation: int = _spec(1, _int(1))
    gradient_checkpointing: bool = _spec(True, _bool)
    noise_scheduler: str = _spec("flowmatch", _choice("flowmatch", "ddpm"))
    dtype: str = _spec("float32", _dtype)
    max_grad_norm: float = _spec(1.0, _number(0.0))
    timestep_type: str = _spec("sigmoid", _choice(*TIMESTEP_TYPES))
    cfg_scale: float = _spec(1.0, _number(0.0))
    ema_config: EMAConfig = field(default_factory=EMAConfig)
    skip_first_sample: bool = _spec(False, _bool)
    disable_sampling: bool = _spec(False, _bool)
    cache_text_embeddings: bool = _spec(False, _bool)
    train_unet: bool = _spec(True, _bool)
    train_text_encoder: bool = _spec(False, _bool)
    noise_offset: float = _spec(0.0, _number(0.0))
    loss_type: str = _spec("mse", _choice("mse"))
    # coatflux: optimizer steps with a non-finite loss or gradient are skipped; this many in a row
    # stop the run with a checkpoint and a diagnosis.
    max_nonfinite_steps: int = _spec(5, _int(1))


@dataclass(frozen=True)
class ModelConfig:
    """``model:``. ``name_or_path`` is a hub id, a diffusers folder or a single ``.safetensors``
    transformer checkpoint. ``quantize`` stores the frozen transformer in FP8 (coatflux's own
    FP8 linears take the place of optimum-quanto's ``qfloat8``); text encoders are not quantized."""

    name_or_path: str = _spec(None, _model_path, required=True)
    is_flux: bool = _spec(True, _bool)
    arch: str = _spec("flux", _choice("flux"))
    quantize: bool = _spec(False, _bool)
    qtype: str = _spec("qfloat8", _str)
    dtype: str = _spec("float16", _dtype)
    # coatflux's own key: keep PyTorch's cuDNN attention backend, with the hook that makes its backward
    # correct in FLUX; false runs flash attention instead (see coatflux.flux.attention)
    cudnn_attention: bool = _spec(True, _bool)
    # ai-toolkit's torch.compile keys: ``compile`` turns it on, ``block_compile`` per transformer block
    # (with COAT always per block: coat.activation.compile_blocks); the rest go to torch.compile.
    compile: bool = _spec(False, _bool)
    block_compile: bool = _spec(False, _bool)
    compile_mode: str = _spec("default", _choice("default", "reduce-overhead", "max-autotune",
                                                 "max-autotune-no-cudagraphs"))
    compile_dynamic: bool = _spec(True, _bool)
    compile_fullgraph: bool = _spec(False, _bool)

    @property
    def is_single_file(self) -> bool:
        return self.name_or_path.endswith(".safetensors")


@dataclass(frozen=True)
class SampleItem:
    """One sample image to draw; every field is resolved (section defaults, ``walk_seed``)."""

    prompt: str = _spec(None, _str, required=True)
    width: int = _spec(512, _int(MIN_RESOLUTION))
    height: int = _spec(512, _int(MIN_RESOLUTION))
    seed: int = _spec(0, _int(0))
    guidance_scale: float = _spec(7.0, _number(0.0))
    sample_steps: int = _spec(20, _int(1))
    network_multiplier: float = _spec(1.0, _number())


@dataclass(frozen=True)
class SampleConfig:
    """``sample:``. Give ``prompts: [str]`` or ``samples: [{prompt, width, ...}]``; both become
    :attr:`samples`. FLUX always samples with the flow-matching Euler sampler."""

    sampler: str = _spec("flowmatch", _choice("flowmatch", "ddpm"))
    sample_every: int = _spec(100, _int(1))
    width: int = _spec(512, _int(MIN_RESOLUTION))
    height: int = _spec(512, _int(MIN_RESOLUTION))
    prompts: tuple[str, ...] = _spec((), _str_tuple)
    seed: int = _spec(0, _int(0))
    walk_seed: bool = _spec(False, _bool)
    guidance_scale: float = _spec(7.0, _number(0.0))
    sample_steps: int = _spec(20, _int(1))
    format: str = _spec("jpg", _choice("jpg", "jpeg", "png", "webp"))
    network_multiplier: float = _spec(1.0, _number())
    samples: tuple[SampleItem, ...] = ()


@dataclass(frozen=True)
class TrainJobConfig:
    """The whole job: ``config.name``, the (single) process's fields, ``meta`` and bookkeeping.

    ``raw`` is the config after substitutions (write it as ``config.yaml`` next to the outputs);
    ``ignored_keys`` lists the dotted paths of accepted ai-toolkit keys that have no effect.
    """

    name: str
    training_folder: Path = field(default=None, metadata=_meta(_path, required=True))
    type: str = _spec("sd_trainer", _choice("sd_trainer", "diffusion_trainer", "ui_trainer"))
    device: str = _spec("cuda", _str)
    trigger_word: str | None = _spec(None, _optional(_str))
    performance_log_every: int = _spec(0, _int(0))
    log_dir: str | None = _spec(None, _optional(_str))
    training_seed: int | None = _spec(None, _optional(_int(0)))
    network: NetworkConfig = field(default_factory=NetworkConfig)
    save: SaveConfig = field(default_factory=SaveConfig)
    datasets: tuple[DatasetConfig, ...] = ()
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelConfig | None = None
    sample: SampleConfig = field(default_factory=SampleConfig)
    coat: COATConfig = field(default_factory=lambda: COATConfig(enabled=False))
    meta: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    ignored_keys: tuple[str, ...] = ()

    @property
    def output_dir(self) -> Path:
        return self.training_folder / self.name


# ----------------------------------------------------------------------------------------------
# Generic section builder.


@dataclass
class _Context:
    """What a load collects on the way: ignored keys and warnings, reported once at the end."""

    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _build(cls: type, data: Any, path: str, ctx: _Context, ignored: tuple[str, ...] = (),
           aliases: Mapping[str, str] | None = None, nested: tuple[str, ...] = (), **derived: Any) -> Any:
    """Check ``data`` against the YAML fields of ``cls`` and construct it.

    ``nested`` are keys of ``data`` the caller parsed itself (sub-sections); ``derived`` are the
    constructor arguments it built from them or from elsewhere.
    """
    data = {} if data is None else data
    aliases = dict(aliases or {})
    yaml_fields = {f.name: f for f in fields(cls) if f.metadata.get("check")}
    check_known_keys(data, [*yaml_fields, *nested, *aliases, *ignored], path)
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key in ignored:
            ctx.ignored.append(f"{path}.{key}")
        elif key not in nested:
            name = aliases.get(key, key)
            if name in values:
                raise ConfigError(f"{path}.{key}: given twice (also as '{name}' or its alias)")
            values[name] = yaml_fields[name].metadata["check"](value, f"{path}.{key}")
    for name, spec in yaml_fields.items():
        if spec.metadata["required"] and name not in values:
            raise ConfigError(f"{path}.{name}: required key is missing")
    return cls(**values, **derived)


def _section(data: Mapping[str, Any], key: str, path: str) -> Any:
    value = data.get(key)
    return None if value is None else _mapping(value, f"{path}.{key}")


def _network(data: Any, path: str, ctx: _Context) -> NetworkConfig:
    data = _mapping(data, path)
    kwargs = _build(NetworkKwargs, _section(data, "network_kwargs", path), f"{path}.network_kwargs", ctx,
                    NETWORK_KWARGS_IGNORED)
    if isinstance(data.get("type"), str) and data["type"].lower() not in ("lora", "full"):
        raise ConfigError(f"{path}.type: {data['type']!r} is not supported; coatflux trains plain LoRA "
                          "(type: lora) or the transformer's own weights (type: full)")
    return _build(NetworkConfig, data, path, ctx, NETWORK_IGNORED, {"rank": "linear", "alpha": "linear_alpha"},
                  ("network_kwargs",), network_kwargs=kwargs)


def _train(data: Any, path: str, ctx: _Context) -> TrainConfig:
    data = dict(_mapping(data, path)) if data is not None else {}
    if "gradient_accumulation_steps" in data:
        ctx.notes.append(f"{path}.gradient_accumulation_steps is the legacy name; it is read as "
                         "gradient_accumulation (true accumulation over that many batches)")
    if str(data.get("noise_scheduler", "")).lower() == "ddpm":
        ctx.notes.append(f"{path}.noise_scheduler: 'ddpm' ignored; FLUX always trains with flow matching")
    ema = _build(EMAConfig, _section(data, "ema_config", path), f"{path}.ema_config", ctx)
    train = _build(TrainConfig, data, path, ctx, TRAIN_IGNORED,
                   {"gradient_accumulation_steps": "gradient_accumulation"}, ("ema_config",), ema_config=ema)
    if train.train_text_encoder:
        raise ConfigError(f"{path}.train_text_encoder: training the text encoders is not supported; "
                          "set it to false (the LoRA goes on the transformer)")
    if not train.train_unet:
        raise ConfigError(f"{path}.train_unet: false leaves nothing to train; set it to true")
    if train.lr > MAX_SANE_LR:  # possible, so not an error, but every optimizer here diverges at once
        ctx.notes.append(f"{path}.lr: {train.lr:g} is far above any LoRA learning rate (1e-5 to 1e-3 are "
                         "usual); expect the loss to diverge")
    return replace(train, noise_scheduler="flowmatch")


def _model(data: Any, path: str, ctx: _Context) -> ModelConfig:
    if data is None:
        raise ConfigError(f"{path}: required section is missing (model: {{name_or_path: ...}})")
    model = _build(ModelConfig, _mapping(data, path), path, ctx, MODEL_IGNORED)
    if not model.is_flux:
        raise ConfigError(f"{path}.is_flux: coatflux trains FLUX.1 only; set it to true or remove it")
    return model


def _sample(data: Any, path: str, ctx: _Context) -> SampleConfig:
    data = dict(_mapping(data, path)) if data is not None else {}
    raw_items = data.pop("samples", None)
    base = _build(SampleConfig, data, path, ctx, SAMPLE_IGNORED)
    if raw_items is not None and base.prompts:
        raise ConfigError(f"{path}.samples: give either prompts or samples, not both")
    if raw_items is None:
        raw_items = [{"prompt": p} for p in base.prompts]
    elif not isinstance(raw_items, list):
        raise _fail(f"{path}.samples", "a list of {prompt: ...} mappings", raw_items)
    inherited = {"width": base.width, "height": base.height, "sample_steps": base.sample_steps,
                 "guidance_scale": base.guidance_scale, "network_multiplier": base.network_multiplier}
    items = []
    for i, item in enumerate(raw_items):
        item_path = f"{path}.samples[{i}]"
        seed = base.seed + i if base.walk_seed else base.seed
        items.append(_build(SampleItem, {**inherited, "seed": seed, **_mapping(item, item_path)}, item_path, ctx,
                            SAMPLE_ITEM_IGNORED))
    return replace(base, samples=tuple(items))


def _datasets(data: Any, path: str, ctx: _Context, trigger: str | None, cache_te: bool) -> tuple[DatasetConfig, ...]:
    if not isinstance(data, list) or not data:
        raise _fail(path, "a non-empty list of {folder_path: ...} entries", data)
    out = []
    for i, entry in enumerate(data):
        dataset = _build(DatasetConfig, _mapping(entry, f"{path}[{i}]"), f"{path}[{i}]", ctx, DATASET_IGNORED)
        out.append(replace(dataset, trigger_word=dataset.trigger_word if dataset.trigger_word is not None else trigger,
                           cache_text_embeddings=dataset.cache_text_embeddings or cache_te))
    return tuple(out)


SECTIONS = ("network", "save", "datasets", "train", "model", "sample", "coat")


def _job(name: str, process: Mapping[str, Any], meta: Any, raw: dict[str, Any], ctx: _Context) -> TrainJobConfig:
    path = "config.process[0]"
    scalar_fields = [f.name for f in fields(TrainJobConfig) if f.metadata.get("check")]
    check_known_keys(process, [*scalar_fields, *SECTIONS, *PROCESS_IGNORED], path)
    if process.get("type") is None:
        raise ConfigError(f"{path}.type: required key is missing (sd_trainer or diffusion_trainer)")
    if process.get("network") is None:
        raise ConfigError(f"{path}.network: required section is missing; coatflux trains LoRAs "
                          "(network: {type: lora, linear: 16})")
    train = _train(process.get("train"), f"{path}.train", ctx)
    model = _model(process.get("model"), f"{path}.model", ctx)
    trigger = _optional(_str)(process.get("trigger_word"), f"{path}.trigger_word")
    coat = process.get("coat")
    return _build(
        TrainJobConfig, process, path, ctx, PROCESS_IGNORED, nested=SECTIONS,
        name=name, meta=_mapping(meta or {}, "meta"), raw=raw, train=train,
        model=replace(model, dtype=train.dtype),  # as ai-toolkit: train.dtype overrides model.dtype
        network=_network(process["network"], f"{path}.network", ctx),
        save=_build(SaveConfig, _section(process, "save", path), f"{path}.save", ctx, SAVE_IGNORED),
        sample=_sample(process.get("sample"), f"{path}.sample", ctx),
        coat=COATConfig(enabled=False) if coat is None
        else COATConfig.from_dict(_mapping(coat, f"{path}.coat"), path=f"{path}.coat"),
        datasets=_datasets(process.get("datasets"), f"{path}.datasets", ctx, trigger, train.cache_text_embeddings),
    )


# ----------------------------------------------------------------------------------------------
# Reading the file: YAML float resolver, overrides, ${ENV} and [name] substitution.


class _Loader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where ``1e-4`` (no dot) is a string; ai-toolkit reads a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _read(path: Path) -> Any:
    try:
        # utf-8-sig: Windows editors often write a BOM, which json.loads would refuse.
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset "
                          f"{error.start}); save the file as UTF-8") from None
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}: cannot parse: {error}") from None
    stream = io.StringIO(text)
    stream.name = str(path)  # type: ignore[misc]  # PyYAML's error marks name the stream: file and line
    try:
        return yaml.load(stream, Loader=_Loader)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: cannot parse: {error}") from None


def _map_strings(value: Any, path: str, fn: Callable[[str, str], str]) -> Any:
    """Apply ``fn(text, dotted_path)`` to every string value, recursively, returning a copy."""
    if isinstance(value, str):
        return fn(value, path)
    if isinstance(value, Mapping):
        return {k: _map_strings(v, f"{path}.{k}" if path else str(k), fn) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_strings(v, f"{path}[{i}]", fn) for i, v in enumerate(value)]
    return value


def _substitute_env(text: str, path: str) -> str:
    def lookup(match: re.Match[str]) -> str:
        if match.group(1) not in os.environ:
            raise ConfigError(f"{path}: environment variable '{match.group(1)}' is not set")
        return os.environ[match.group(1)]
    return _ENV.sub(lookup, text)


def _apply_override(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``dotted`` (e.g. ``train.steps``, ``config.name``) in the raw dict.

    Paths starting with ``job``, ``config`` or ``meta`` are absolute; any other path is relative to
    ``config.process[0]``, which is where nearly every override goes.
    """
    parts = dotted.split(".")
    node: Any = data if parts[0] in ("job", "config", "meta") else data["config"]["process"][0]
    for part in parts[:-1]:
        match = re.fullmatch(r"(\w+)\[(\d+)\]", part)
        node = node.setdefault(match.group(1), [])[int(match.group(2))] if match else node.setdefault(part, {})
    node[parts[-1]] = value


def _top_level(data: Any, source: Path) -> tuple[str, dict[str, Any]]:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping with job, config and meta at the top level")
    try:
        check_known_keys(data, ["job", "config", "meta"], "")
    except ConfigError as error:  # the top level has no path: drop the separator's leading dot
        raise ConfigError(str(error).removeprefix(".")) from None
    if data.get("job") != "extension":
        raise ConfigError(f"job: {data.get('job')!r} is not supported; ai-toolkit training files use "
                          "'job: extension'")
    config = _mapping(data.get("config"), "config")
    check_known_keys(config, ["name", "process"], "config")
    name = config.get("name")
    if not isinstance(name, str) or not name.strip():
        raise _fail("config.name", "a non-empty string (the run's name)", name)
    processes = config.get("process")
    if not isinstance(processes, list) or not processes:
        raise _fail("config.process", "a list with one process", processes)
    if len(processes) > 1:
        raise ConfigError(f"config.process: {len(processes)} processes given; coatflux runs one process per "
                          "file (split them into several files)")
    return name, _mapping(processes[0], "config.process[0]")


def load_config(path: Path, overrides: dict[str, Any] | None = None) -> TrainJobConfig:
    """Read, substitute, validate and type an ai-toolkit job file.

    ``overrides`` maps dotted paths to values (``{"train.steps": 10, "config.name": "x"}``) and is
    applied before substitution, so ``config.name`` also changes every ``[name]``. Raises
    :class:`ConfigError` on the first problem; warns once (:class:`ConfigWarning`) with the
    ignored keys and reinterpreted values.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a config file")
    if not path.is_file():
        raise ConfigError(f"{path}: config file does not exist")
    data = _read(path)
    for dotted, value in (overrides or {}).items():
        try:
            _apply_override(data, dotted, value)
        except (KeyError, IndexError, TypeError, AttributeError):
            raise ConfigError(f"{dotted}: cannot apply override") from None
    data = _map_strings(data, "", _substitute_env)
    name, _ = _top_level(data, path)
    data = _map_strings(data, "", lambda text, _p: text.replace("[name]", name))
    _, process = _top_level(data, path)
    ctx = _Context()
    job = _job(name, process, data.get("meta"), data, ctx)
    job = replace(job, ignored_keys=tuple(ctx.ignored))
    _report(ctx)
    return job


def _report(ctx: _Context) -> None:
    lines = list(ctx.notes)
    if ctx.ignored:
        lines.append("accepted but not implemented by coatflux (no effect): " + ", ".join(ctx.ignored))
    if lines:
        warnings.warn("; ".join(lines), ConfigWarning, stacklevel=3)
