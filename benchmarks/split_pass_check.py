"""One training step of the tiny FLUX with COAT's compiled blocks, with and without the graph pass of ``core/passes.py``.

What: builds the bench's tiny preset, applies COAT with compiled blocks and a rank-16 LoRA, and
runs one forward and backward three times: traced op by op (``aot_eager``, where the pass does not
run), compiled by inductor with COAT's options, and compiled by inductor with the pass switched off.
It prints how many products the pass rewrote and the SQNR of the LoRA gradients between the runs.

Why: the suite's compiled-FLUX tests use ``aot_eager`` for time, so this is where the pass meets a
whole model under inductor. Inductor's FX graph cache is turned off here: a cache hit skips the
post-grad passes, and a cached graph would compare nothing.

    python benchmarks/split_pass_check.py
"""

from __future__ import annotations

import argparse
import copy
import platform
import warnings

import torch
from torch import nn

from coatflux.bench.model import PRESETS, build_transformer, loss_of, make_batch
from coatflux.core import passes
from coatflux.core.api import apply_coat
from coatflux.core.config import ActivationConfig, COATConfig
from coatflux.core.formats import sqnr_db
from coatflux.flux.lora import find_lora_targets, inject_lora, lora_parameters


class CountingSplit(passes.SplitConcatenatedOperand):
    """COAT's pass, counting the products it adds (one more per part than it removes)."""

    def __init__(self) -> None:
        self.added = 0

    def __call__(self, graph: torch.fx.Graph) -> None:
        before = len(graph.find_nodes(op="call_function", target=torch.ops.aten.mm.default))
        super().__call__(graph)
        self.added += len(graph.find_nodes(op="call_function", target=torch.ops.aten.mm.default)) - before


def lora_gradients(base: nn.Module, compile_options: dict, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    torch._dynamo.reset()
    model = copy.deepcopy(base)
    apply_coat(model, COATConfig(activation=ActivationConfig(compile_blocks=True)), compile_options=compile_options)
    torch.manual_seed(1)
    inject_lora(model, 16, 16.0, find_lora_targets(model))
    params = lora_parameters(model)
    for p in params:
        nn.init.normal_(p, std=0.05)
    loss_of(model.train(), batch).backward()
    return torch.cat([p.grad.flatten() for p in params])


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # no options; --help says what it does
    torch._inductor.config.fx_graph_cache = False
    counting = CountingSplit()
    runs = {"aot_eager": {"backend": "aot_eager"},
            "inductor": {"backend": "inductor", "options": {"post_grad_custom_pre_pass": counting}},
            "inductor without the pass": {"backend": "inductor", "options": {"post_grad_custom_pre_pass": None}}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = build_transformer(PRESETS["tiny"], "cpu").requires_grad_(False)
        batch = make_batch(PRESETS["tiny"], 32, 1, "cpu")
        grads = {name: lora_gradients(base, options, batch) for name, options in runs.items()}
    print(f"split_pass_check: {platform.machine()}, torch {torch.__version__}, tiny preset, 32 px, batch 1")
    print(f"  products the pass added (one per part, less the product it split): {counting.added}")
    for name in ("inductor", "inductor without the pass"):
        print(f"  LoRA gradients, {name} against aot_eager: {sqnr_db(grads['aot_eager'], grads[name]):.1f} dB")
    print(f"  inductor with against without the pass: {sqnr_db(grads['inductor without the pass'], grads['inductor']):.1f} dB")


if __name__ == "__main__":
    main()
