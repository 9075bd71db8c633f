"""What the run trains: LoRA adapters (``network.type: lora``) or the transformer's own weights (``full``).

What: :func:`build_network` prepares the transformer for one of the two and returns an object
with the same five answers the loop needs: the parameters to optimize, their exact state for a
checkpoint (and loading it back), the file written every ``save_every`` steps, and the final
output.

* **LoRA**: adapters wrap the block linears *after* COAT has made them FP8 linears, so one FP8
  copy of each input serves the frozen GEMM and the adapter (see :mod:`coatflux.flux.lora`). Files
  are diffusers/PEFT LoRA safetensors, as ai-toolkit writes them.
* **Compilation** (ai-toolkit's ``model.compile`` / ``block_compile``) happens with the FP8
  conversion: with COAT the blocks compile with COAT inside them (``coat.activation.compile_blocks``).
* **Full fine-tune**: the selected weights (``network.network_kwargs`` filters, matched against
  ``transformer.<parameter name>``; all weights by default) are made trainable *before* COAT, so
  COAT keeps them as high-precision parameters with FP8 GEMMs and FP8 saved activations while the
  rest become frozen FP8 buffers. ``FP8AdamW``'s two FP8 moments are what make this fit: about 2
  bytes of optimizer state per weight instead of AdamW's 8, on top of the weights and gradients.
  Step files hold the trained tensors only (diffusers key names, ``save.dtype``); the final output
  is a complete diffusers transformer folder, ``FluxTransformer2DModel.from_pretrained``-loadable.

Why the final folder re-reads the frozen weights from the base model instead of writing the live
ones: a frozen weight under COAT is an FP8 buffer, a lossy copy; the user's base weights must
come out of a fine-tune unchanged where they were not trained.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from coatflux.atomic import atomic_write_dir
from coatflux.flux.lora import (
    KEY_PREFIX,
    find_lora_targets,
    inject_lora,
    load_lora_state_dict,
    lora_parameters,
    lora_state_dict,
    read_lora,
    save_lora,
)
from coatflux.trainer.config import TrainJobConfig

BLOCKS = ("transformer_blocks", "single_transformer_blocks")

logger = logging.getLogger(__name__)


class TrainedNetwork(Protocol):
    """What the loop asks of whatever it trains."""

    def parameters(self) -> list[nn.Parameter]: ...

    def raw_state(self) -> dict[str, torch.Tensor]: ...

    def load_raw_state(self, state: dict[str, torch.Tensor]) -> None: ...

    def save_step(self, path: Path, dtype: torch.dtype, metadata: dict[str, str]) -> Path: ...

    def save_final(self, output_dir: Path, name: str, dtype: torch.dtype, metadata: dict[str, str]) -> Path: ...


def _compile_options(cfg: TrainJobConfig) -> dict[str, object]:
    model = cfg.model
    return {"mode": model.compile_mode, "dynamic": model.compile_dynamic, "fullgraph": model.compile_fullgraph}


def compiles_with_cudagraphs(cfg: TrainJobConfig) -> bool:
    """Whether the transformer's compiled graphs replay as CUDA graphs (``model.compile_mode``
    ``reduce-overhead`` or ``max-autotune``): the step loop then marks each step's start and
    keeps gradient buffers stable (see ``coatflux.core.compiled.uses_cudagraphs``)."""
    from coatflux.core.compiled import uses_cudagraphs

    compiled = cfg.model.compile or (cfg.coat.enabled and cfg.coat.activation.compile_blocks)
    return bool(compiled) and uses_cudagraphs(_compile_options(cfg))


def _convert_and_compile(transformer: nn.Module, cfg: TrainJobConfig, device: torch.device) -> None:
    """COAT (FP8 linears + compressed activations), or FP8 weights alone with ``model.quantize``.

    ``model.compile`` with COAT compiles per block whatever ``block_compile`` says: a whole-model
    graph would have to trace COAT's own forward hooks (see :mod:`coatflux.core.compiled`).
    """
    from coatflux.core.api import apply_coat, replace_linear_with_fp8

    if cfg.coat.enabled and cfg.coat.activation.use_fp8:
        coat = replace(cfg.coat, include=BLOCKS)
        if cfg.model.compile:
            if not cfg.model.block_compile:
                logger.info("model.compile with COAT: compiling each transformer block (coat.activation."
                            "compile_blocks), not the whole model")
            coat = replace(coat, activation=replace(coat.activation, compile_blocks=True))
        apply_coat(transformer, coat, device=device, compile_options=_compile_options(cfg))
        return
    if cfg.model.quantize:
        replace_linear_with_fp8(transformer, replace(cfg.coat, enabled=True, include=BLOCKS), device=device)
    if cfg.model.compile:
        _compile_plain(transformer, cfg)


def _compile_plain(transformer: nn.Module, cfg: TrainJobConfig) -> None:
    """ai-toolkit's ``compile`` without COAT: per block with ``block_compile``, else the whole model."""
    from coatflux.core.compiled import compile_blocks, compile_module

    if cfg.model.block_compile:
        names = compile_blocks(transformer, **_compile_options(cfg))
        logger.info("model.block_compile: %d transformer blocks compiled", len(names))
    else:
        compile_module(transformer, **_compile_options(cfg))
        logger.info("model.compile: the whole transformer compiled")


def _move_small_parts(transformer: nn.Module, device: torch.device) -> None:
    # Small parts first, so the FP8 conversion sees the target device; the big blocks are
    # quantized where they are (CPU) and moved already in FP8: bf16 FLUX never has to fit.
    for name, child in transformer.named_children():
        if name not in BLOCKS:
            child.to(device)


def build_network(transformer: nn.Module, cfg: TrainJobConfig, device: torch.device, seed: int) -> TrainedNetwork:
    """Freeze, select what trains, convert to FP8 as configured, move to ``device``."""
    transformer.requires_grad_(False)
    _move_small_parts(transformer, device)
    if cfg.network.type == "full":
        network: TrainedNetwork = FullNetwork(transformer, cfg)
        _convert_and_compile(transformer, cfg, device)
    else:
        _convert_and_compile(transformer, cfg, device)
        network = LoRANetwork(transformer, cfg, seed)
    if cfg.train.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.to(device)
    transformer.train()
    return network


class LoRANetwork:
    """Adapters on the block linears (ai-toolkit's FLUX targets, filtered by ``network_kwargs``)."""

    def __init__(self, transformer: nn.Module, cfg: TrainJobConfig, seed: int) -> None:
        self.transformer = transformer
        kwargs = cfg.network.network_kwargs
        targets = find_lora_targets(transformer, kwargs.only_if_contains, kwargs.ignore_if_contains)
        # LoRA A is initialized randomly: seed it so the same training_seed gives the same run,
        # without touching the caller's global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            inject_lora(transformer, cfg.network.linear, cfg.network.alpha, targets, dtype=torch.float32)
        if cfg.network.pretrained_lora_path:
            load_lora_state_dict(transformer, read_lora(cfg.network.pretrained_lora_path)[0])

    def parameters(self) -> list[nn.Parameter]:
        return lora_parameters(self.transformer)

    def raw_state(self) -> dict[str, torch.Tensor]:
        return lora_state_dict(self.transformer, raw=True)

    def load_raw_state(self, state: dict[str, torch.Tensor]) -> None:
        load_lora_state_dict(self.transformer, state, folded=False)

    def save_step(self, path: Path, dtype: torch.dtype, metadata: dict[str, str]) -> Path:
        return save_lora(path, lora_state_dict(self.transformer, dtype), metadata, overwrite=True)

    def save_final(self, output_dir: Path, name: str, dtype: torch.dtype, metadata: dict[str, str]) -> Path:
        return self.save_step(output_dir / f"{name}.safetensors", dtype, metadata)


class FullNetwork:
    """The transformer's own weights, those matching ``network_kwargs`` (all by default)."""

    def __init__(self, transformer: nn.Module, cfg: TrainJobConfig) -> None:
        self.transformer, self.cfg = transformer, cfg
        if cfg.model.is_single_file:
            # Checked now, not at the final save hours later: the saved folder is the base model's
            # own transformer with the trained weights in it, and we need its diffusers folder.
            raise ValueError("network.type: full needs model.name_or_path to be a diffusers folder or hub id "
                             f"(not the single file {cfg.model.name_or_path}): the final transformer folder "
                             "is written from it")
        kwargs = cfg.network.network_kwargs
        only, ignore = kwargs.only_if_contains, kwargs.ignore_if_contains
        self.names: list[str] = []
        for name, p in transformer.named_parameters():
            full = KEY_PREFIX + name
            if (only and not any(s in full for s in only)) or any(s in full for s in ignore):
                continue
            p.requires_grad_(True)
            self.names.append(name)
        if not self.names:
            raise ValueError("network.network_kwargs: no transformer weight matches only_if_contains "
                             f"{list(only)} and ignore_if_contains {list(ignore)}; nothing to train")

    def _named(self) -> dict[str, nn.Parameter]:
        # Looked up again each time: COAT replaces modules (an nn.Linear by an FP8Linear that keeps
        # the same Parameter object under the same name), so names are stable, objects are reused.
        params = dict(self.transformer.named_parameters())
        return {name: params[name] for name in self.names}

    def parameters(self) -> list[nn.Parameter]:
        return list(self._named().values())

    def raw_state(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().to("cpu", copy=True) for name, p in self._named().items()}

    def load_raw_state(self, state: dict[str, torch.Tensor]) -> None:
        named = self._named()
        if set(state) != set(named):
            missing = sorted(set(named) - set(state)) or sorted(set(state) - set(named))
            raise KeyError(f"checkpoint weights do not match the trained weights (first: {missing[0]!r})")
        with torch.no_grad():
            for name, p in named.items():
                if state[name].shape != p.shape:
                    raise ValueError(f"{name}: shape {tuple(state[name].shape)} in the checkpoint, "
                                     f"{tuple(p.shape)} in the model")
                p.copy_(state[name])

    def _trained(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {name: p.detach().to("cpu", dtype, copy=True).contiguous() for name, p in self._named().items()}

    def save_step(self, path: Path, dtype: torch.dtype, metadata: dict[str, str]) -> Path:
        # save_lora is the project's one atomic safetensors writer; the tensors need not be a LoRA.
        return save_lora(path, self._trained(dtype), metadata, overwrite=True)

    def save_final(self, output_dir: Path, name: str, dtype: torch.dtype, metadata: dict[str, str]) -> Path:
        trained = self._trained(dtype)
        base = load_base_transformer(self.cfg, dtype)
        state = base.state_dict()
        for key in trained:
            if key not in state:
                raise KeyError(f"trained weight {key!r} is not in the base transformer of {self.cfg.model.name_or_path}")
        state.update(trained)
        base.load_state_dict(state, strict=True)

        def write(folder: Path) -> None:
            base.save_pretrained(folder, safe_serialization=True)
            (folder / "coatflux.json").write_text(json.dumps(metadata, indent=2, sort_keys=True), encoding="utf-8")
        return atomic_write_dir(output_dir / "transformer", write)


def load_base_transformer(cfg: TrainJobConfig, dtype: torch.dtype) -> nn.Module:
    """The untouched base transformer from ``model.name_or_path`` on the CPU (for the final save)."""
    from diffusers import FluxTransformer2DModel

    from coatflux.flux.loading import _resolve_source

    base, local = _resolve_source(cfg.model.name_or_path)
    return FluxTransformer2DModel.from_pretrained(base, subfolder="transformer", torch_dtype=dtype,
                                                  local_files_only=local)
