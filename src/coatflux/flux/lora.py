"""LoRA adapters for the FLUX transformer: targets, injection, state dicts and safetensors files.

What: :func:`find_lora_targets` picks the linears to adapt (ai-toolkit's FLUX default: every linear
inside ``transformer_blocks`` and ``single_transformer_blocks``, 14 per double block and 6 per single
block, 494 in FLUX.1), :func:`inject_lora` swaps each for a :class:`LoRALinear` that keeps the frozen
base and adds ``scale * multiplier * B(A(x))``, and :func:`lora_state_dict` / :func:`save_lora`
write the diffusers/PEFT layout that ai-toolkit writes for FLUX
(``transformer.<module path>.lora_A.weight`` / ``.lora_B.weight``), which diffusers'
``FluxPipeline.load_lora_weights`` and ComfyUI load as they are.

Why in-place module swapping and not PEFT: the base linear may be a coatflux ``FP8Linear`` whose
forward takes the LoRA matrices as arguments, so one FP8 copy of the input serves both the base
GEMM and the LoRA branch in backward (COAT section 7.3). PEFT's wrappers call the base and the
adapter separately and would save the input twice. For a plain ``nn.Linear`` base we fall back to
the textbook two-GEMM branch.

Choices:

* LoRA weights default to fp32 whatever the base dtype (as ai-toolkit does): rank-r updates are
  tiny and bf16 rounding of ``lr * update`` would stall them; the cost is ~2x of a few hundred MB.
  The branch is *multiplied* in the activation dtype, with A and B cast to it on each call (what
  ``torch.autocast`` does to an fp32 layer), rather than casting the input up to fp32 (PEFT's
  way): on an H200 the fp32 way cost a FLUX.1-dev LoRA step at 1024 px about 190 of 660 ms of GPU
  time (rank-16 fp32 GEMMs run on CUDA cores, plus an fp32 copy of every input, which autograd
  also keeps for backward). Gradients reach the fp32 weights through the cast.
* ``A`` gets PyTorch's default ``Linear`` init (kaiming-uniform with a=sqrt(5), as PEFT and the LoRA
  reference code use) and ``B`` zeros, so an injected model starts equal to the base.
* Files carry no ``alpha`` keys: ``scale = alpha / rank`` is folded into ``lora_B`` (consumers that
  read no alpha use scale 1, so every loader agrees). That fold is not bit-exact to undo, so for
  resume :func:`lora_state_dict` has ``raw=True`` (A and B exactly as trained) and
  :func:`load_lora_state_dict` takes ``folded`` to say which kind it is given: a folded file loaded
  into modules with scale ``s`` has its ``B`` divided by ``s``.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from coatflux.atomic import atomic_write
from coatflux.core.linear import FP8Linear

BLOCK_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.")
KEY_PREFIX = "transformer."


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear | FP8Linear)


def _module_device(module: nn.Module) -> torch.device:
    # FP8Linear.weight dequantizes, so ask the stored tensors rather than `.weight`.
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        return tensor.device
    return torch.device("cpu")


class LoRALinear(nn.Module):
    """``y = base(x) + scale * multiplier * B(A(x))`` around a frozen linear ``base``.

    ``scale = alpha / rank``; ``multiplier`` scales the adapter at sampling time (ai-toolkit's
    ``network_multiplier``) and ``enabled=False`` bypasses it without touching the weights.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        device = _module_device(base)
        self.base = base
        self.rank = rank
        self.alpha = float(alpha)
        self.scale = self.alpha / rank
        self.multiplier = 1.0
        self.enabled = True
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.multiplier == 0:
            return self.base(x)
        scale = self.scale * self.multiplier
        if isinstance(self.base, FP8Linear):
            # One saved FP8 copy of x serves the base GEMM and both LoRA GEMMs in backward.
            return self.base(x, self.lora_A.weight, self.lora_B.weight, scale)
        out = self.base(x)
        h = nn.functional.linear(x, self.lora_A.weight.to(x.dtype))
        return out + nn.functional.linear(h * scale, self.lora_B.weight.to(x.dtype)).to(out.dtype)

    def extra_repr(self) -> str:
        return (
            f"rank={self.rank}, alpha={self.alpha:g}, multiplier={self.multiplier:g}, enabled={self.enabled}"
        )


def find_lora_targets(
    transformer: nn.Module,
    only_if_contains: Iterable[str] | None = None,
    ignore_if_contains: Iterable[str] | None = None,
) -> list[str]:
    """Dotted names of the linears inside the FLUX blocks to adapt, in module order.

    Filters are substrings matched against ``"transformer." + name`` (the file-key form, e.g.
    ``transformer.single_transformer_blocks.7.proj_out``); a name must contain one of
    ``only_if_contains`` (if given) and none of ``ignore_if_contains`` -- ignore wins.
    """
    only = list(only_if_contains or [])
    ignore = list(ignore_if_contains or [])
    inside_lora = {f"{name}." for name, m in transformer.named_modules() if isinstance(m, LoRALinear)}
    targets = []
    for name, module in transformer.named_modules():
        if not name.startswith(BLOCK_PREFIXES) or not _is_linear(module):
            continue
        if any(name.startswith(prefix) for prefix in inside_lora):
            continue
        full = KEY_PREFIX + name
        if only and not any(s in full for s in only):
            continue
        if any(s in full for s in ignore):
            continue
        targets.append(name)
    return targets


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def lora_modules(transformer: nn.Module) -> dict[str, LoRALinear]:
    """The injected adapters by module path (empty if none)."""
    return {name: m for name, m in transformer.named_modules() if isinstance(m, LoRALinear)}


def inject_lora(
    transformer: nn.Module,
    rank: int,
    alpha: float,
    targets: Iterable[str],
    dtype: torch.dtype = torch.float32,
) -> dict[str, LoRALinear]:
    """Wrap each target linear in a :class:`LoRALinear`, in place; bases are frozen.

    Raises ``RuntimeError`` if the transformer already has adapters (call :func:`remove_lora`
    first) and ``ValueError`` for a target that is missing or not a linear.
    """
    if lora_modules(transformer):
        raise RuntimeError("the transformer already has LoRA adapters; call remove_lora() first")
    targets = list(targets)
    if not targets:
        raise ValueError("no LoRA targets given (check only_if_contains / ignore_if_contains)")
    bases = {}
    for name in targets:
        try:
            bases[name] = transformer.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(f"LoRA target {name!r} is not a submodule of the transformer") from exc
        if not _is_linear(bases[name]):
            raise ValueError(f"LoRA target {name!r} is a {type(bases[name]).__name__}, not a linear layer")
    injected = {}
    for name, base in bases.items():
        base.requires_grad_(False)
        injected[name] = LoRALinear(base, rank, alpha, dtype=dtype)
        _set_submodule(transformer, name, injected[name])
    return injected


def remove_lora(transformer: nn.Module) -> int:
    """Put every wrapped base linear back (the adapters are dropped); returns how many."""
    modules = lora_modules(transformer)
    for name, module in modules.items():
        _set_submodule(transformer, name, module.base)
    return len(modules)


def lora_parameters(transformer: nn.Module) -> list[nn.Parameter]:
    """All trainable LoRA parameters (A and B of every adapter), for the optimizer."""
    return [p for m in lora_modules(transformer).values() for p in (m.lora_A.weight, m.lora_B.weight)]


def set_lora_multiplier(transformer: nn.Module, multiplier: float) -> None:
    for module in lora_modules(transformer).values():
        module.multiplier = float(multiplier)


def set_lora_enabled(transformer: nn.Module, enabled: bool) -> None:
    for module in lora_modules(transformer).values():
        module.enabled = enabled


def lora_state_dict(
    transformer: nn.Module, dtype: torch.dtype | None = None, *, raw: bool = False
) -> dict[str, torch.Tensor]:
    """``transformer.<path>.lora_A.weight`` / ``.lora_B.weight`` tensors on CPU.

    By default ``alpha / rank`` is folded into ``lora_B`` (the file format, scale 1); ``raw=True``
    keeps B as trained, for exact resume. ``dtype=None`` keeps the training dtype.
    """
    modules = lora_modules(transformer)
    if not modules:
        raise RuntimeError("the transformer has no LoRA adapters")
    out = {}
    for name, module in modules.items():
        a = module.lora_A.weight.detach()
        b = module.lora_B.weight.detach()
        if not raw:
            b = b.float() * module.scale
        dt = dtype or module.lora_A.weight.dtype
        # copy=True: the result must not alias the live parameters that training keeps updating.
        out[f"{KEY_PREFIX}{name}.lora_A.weight"] = a.to("cpu", dt, copy=True).contiguous()
        out[f"{KEY_PREFIX}{name}.lora_B.weight"] = b.to("cpu", dt, copy=True).contiguous()
    return out


def load_lora_state_dict(
    transformer: nn.Module, state_dict: Mapping[str, torch.Tensor], *, folded: bool = True
) -> None:
    """Copy a :func:`lora_state_dict` back into the injected adapters (strict).

    ``folded=True`` (files written by :func:`save_lora`) divides each ``B`` by its module's scale;
    ``folded=False`` expects ``raw=True`` tensors. Every adapter must be covered and every key used.
    """
    modules = lora_modules(transformer)
    if not modules:
        raise RuntimeError("the transformer has no LoRA adapters; call inject_lora() first")
    expected = {f"{KEY_PREFIX}{n}.lora_{ab}.weight": (m, ab) for n, m in modules.items() for ab in "AB"}
    unexpected = sorted(set(state_dict) - set(expected))
    if unexpected:
        raise KeyError(f"LoRA key {unexpected[0]!r} matches no adapter ({len(unexpected)} unexpected keys)")
    missing = sorted(set(expected) - set(state_dict))
    if missing:
        raise KeyError(f"LoRA key {missing[0]!r} is missing ({len(missing)} missing keys)")
    with torch.no_grad():
        for key, (module, ab) in expected.items():
            param = module.lora_A.weight if ab == "A" else module.lora_B.weight
            value = state_dict[key]
            if value.shape != param.shape:
                raise ValueError(
                    f"{key}: shape {tuple(value.shape)} does not match the adapter's {tuple(param.shape)} "
                    f"(was the LoRA trained with another rank?)"
                )
            value = value.to(param.device, torch.float32)
            if ab == "B" and folded:
                value = value / module.scale
            param.copy_(value)


def coatflux_version() -> str:
    """Installed coatflux version, or "0.1.0" when running from a source tree."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("coatflux")
    except PackageNotFoundError:
        return "0.1.0"


def lora_metadata(
    step: int,
    epoch: int,
    trigger_word: str | None = None,
    name: str | None = None,
    extra_meta: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """safetensors metadata in ai-toolkit's shape; every value is a string, nested ones JSON.

    ``training_info`` (``{"step", "epoch"}``) is what resume reads. ``[name]`` inside
    ``extra_meta`` strings is replaced by ``name``, as ai-toolkit does; our keys win over
    ``extra_meta``'s.
    """
    meta = {}
    for key, value in (extra_meta or {}).items():
        if isinstance(value, str):
            meta[key] = value.replace("[name]", name) if name else value
        else:
            meta[key] = json.dumps(value)
    meta["training_info"] = json.dumps({"step": int(step), "epoch": int(epoch)})
    meta["ss_base_model_version"] = "flux.1"
    if name:
        meta["ss_output_name"] = name
    if trigger_word:
        meta["trigger_word"] = trigger_word
        # kohya's shape, {dataset: {tag: count}}; Civitai & co. show these as the trained words.
        meta["ss_tag_frequency"] = json.dumps({name or "dataset": {trigger_word: 1}})
    meta["software"] = json.dumps({"name": "coatflux", "version": coatflux_version()})
    meta["format"] = "pt"
    return meta


def save_lora(
    path: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write a safetensors file atomically (:func:`coatflux.atomic.atomic_write`) and return its path.

    Metadata values that are not strings are JSON-encoded (safetensors stores strings only).
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a LoRA safetensors file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    return tensors, metadata


def training_step(metadata: Mapping[str, str]) -> int | None:
    """The step recorded in ``training_info`` (ai-toolkit's resume key), or None."""
    try:
        return int(json.loads(metadata["training_info"])["step"])
    except (KeyError, ValueError, TypeError):
        return None
