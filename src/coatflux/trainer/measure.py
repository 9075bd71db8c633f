"""The memory table's measurements: bytes saved for backward, measured on the run's first batch.

What: :func:`measure_memory` fills a :class:`~coatflux.trainer.report.MemoryTable` with the
frozen and trained weight bytes, the bytes the whole model saves for backward on the first batch,
and, for the first double and first single block, the bytes saved with and without COAT on the
same captured inputs (scaled by the block counts). :func:`block_copies` keeps unconverted copies
of those two blocks before COAT converts the model.

Why measure instead of estimate: what a configuration saves depends on the model, the sequence
length and which tensors autograd keeps; the seed guide's promise is a measured table, so the
trainer runs one forward under saved-tensor accounting and prints what it saw.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from coatflux.core.accounting import module_bytes, saved_activation_bytes
from coatflux.flux.lora import find_lora_targets, inject_lora
from coatflux.trainer.config import TrainJobConfig
from coatflux.trainer.data import Item
from coatflux.trainer.encoding import BatchEncoder
from coatflux.trainer.network import BLOCKS
from coatflux.trainer.objective import flow_matching_loss
from coatflux.trainer.report import MemoryTable


def block_copies(transformer: nn.Module) -> dict[str, nn.Module]:
    """Unconverted copies of the first double and single block (CPU), for the COAT comparison."""
    return {name: copy.deepcopy(getattr(transformer, name)[0]) for name in BLOCKS if len(getattr(transformer, name))}


class _OneBlock(nn.Module):
    """A block under its real attribute name, so apply_coat / find_lora_targets see the same paths."""

    def __init__(self, attr: str, block: nn.Module) -> None:
        super().__init__()
        self.attr = attr
        setattr(self, attr, nn.ModuleList([block]))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self, self.attr)[0](*args, **kwargs)


def _capture_block_inputs(transformer: nn.Module) -> tuple[dict[str, tuple], list]:
    captured: dict[str, tuple] = {}

    def hook(name):
        def store(_module, args, kwargs):
            captured.setdefault(name, (args, kwargs))
        return store
    handles = [getattr(transformer, n)[0].register_forward_pre_hook(hook(n), with_kwargs=True)
               for n in BLOCKS if len(getattr(transformer, n))]
    return captured, handles


def _leaf(value: Any) -> Any:
    if torch.is_tensor(value) and value.is_floating_point() and value.dim() == 3:
        return value.detach().clone().requires_grad_(True)  # hidden states: as in training, need grad
    if isinstance(value, tuple):
        return tuple(_leaf(v) for v in value)
    return value.detach() if torch.is_tensor(value) else value


def _block_bytes(cfg: TrainJobConfig, attr: str, block: nn.Module, inputs: tuple, coat: bool,
                 device: torch.device) -> int:
    from coatflux.core.api import apply_coat

    model = _OneBlock(attr, copy.deepcopy(block) if coat else block).to(device)
    full = cfg.network.type == "full"
    model.requires_grad_(full)  # a full fine-tune trains the block's own weights (all, here)
    if coat:
        # eager COAT even with compile_blocks: compiling a block copy for one measurement would
        # cost a compilation; the whole-model figure of the table is the compiled one
        activation = replace(cfg.coat.activation, compile_blocks=False)
        apply_coat(model, replace(cfg.coat, enabled=True, include=BLOCKS, activation=activation))
    if not full:
        inject_lora(model, cfg.network.linear, cfg.network.alpha, find_lora_targets(model), dtype=torch.float32)
    args, kwargs = _leaf(inputs[0]), {k: _leaf(v) for k, v in inputs[1].items()}
    return saved_activation_bytes(model, lambda: model(*args, **kwargs))


def measure_memory(cfg: TrainJobConfig, transformer: nn.Module, params: list[nn.Parameter],
                    copies: dict[str, nn.Module], caches: BatchEncoder, batch: list[Item],
                    device: torch.device) -> MemoryTable:
    table = MemoryTable(frozen_weights=module_bytes(transformer, trainable=False),
                        trainable_weights=sum(p.numel() * p.element_size() for p in params),
                        trainable_params=sum(p.numel() for p in params), coat_on=cfg.coat.enabled and cfg.coat.activation.use_fp8,
                        optimizer_name=cfg.train.optimizer)
    captured, handles = _capture_block_inputs(transformer)
    latents, text = caches.latents(batch), caches.text_embeddings(batch)
    generator = torch.Generator().manual_seed(0)  # never the training generator
    try:
        table.activations_measured = saved_activation_bytes(
            transformer, lambda: flow_matching_loss(transformer, latents, text, cfg, generator, device))
    finally:
        for handle in handles:
            handle.remove()
    counts = {"transformer_blocks": transformer.config.num_layers,
              "single_transformer_blocks": transformer.config.num_single_layers}
    plain = coat = 0
    for attr, block in copies.items():
        if attr in captured:
            coat += _block_bytes(cfg, attr, block, captured[attr], True, device) * counts[attr]
            plain += _block_bytes(cfg, attr, block, captured[attr], False, device) * counts[attr]
    table.blocks_plain, table.blocks_coat = plain, coat
    table.block_note = f"block 0 of each kind x {counts['transformer_blocks']}+{counts['single_transformer_blocks']}"
    if getattr(getattr(transformer, "coat_context", None), "compiled_blocks", None):
        table.block_note += "; COAT per block measured eagerly (the run's blocks are compiled)"
    return table
