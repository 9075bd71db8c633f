"""The attention-gradient layout hook (``coatflux.flux.attention.keep_attention_grads_contiguous``).

cuDNN's SDPA backward caches its graph under the q/k/v shapes and strides only, so every call must
hand it a gradient laid out like its output. FLUX's single blocks do not (their attention output is
concatenated with the MLP branch); these tests watch the strides SDPA's backward receives on the
CPU, where the same graph runs with the CPU flash kernel.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from coatflux.bench.model import PRESETS, build_transformer, loss_of, make_batch
from coatflux.core.compiled import compile_blocks
from coatflux.flux.attention import keep_attention_grads_contiguous
from coatflux.flux.lora import find_lora_targets, inject_lora, lora_parameters


class _SdpaBackwardStrides(TorchDispatchMode):
    """Records (grad_out strides, out strides) of every SDPA backward call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "scaled_dot_product" in str(func) and "backward" in str(func):
            grad_out, out = args[0], args[4]  # (grad_out, query, key, value, out, ...) for every backend
            self.calls.append((grad_out.stride(), out.stride()))
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def tiny_lora():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_transformer(PRESETS["tiny"], "cpu").requires_grad_(False)
    torch.manual_seed(0)
    inject_lora(model, 4, 4.0, find_lora_targets(model))
    for p in lora_parameters(model):
        nn.init.normal_(p, std=0.05)
    return model.train()


def _step(model: nn.Module, data) -> tuple[torch.Tensor, torch.Tensor, list]:
    with _SdpaBackwardStrides() as seen:
        loss = loss_of(model, data)
        loss.backward()
    params = lora_parameters(model)
    grads = torch.cat([p.grad.flatten() for p in params])
    for p in params:
        p.grad = None
    return loss.detach(), grads, seen.calls


def test_every_sdpa_backward_gets_its_outputs_layout_and_nothing_else_changes(tiny_lora):
    data = make_batch(PRESETS["tiny"], 32, 1, "cpu")
    loss, grads, calls = _step(tiny_lora, data)
    blocks = len(tiny_lora.transformer_blocks) + len(tiny_lora.single_transformer_blocks)
    assert len(calls) == blocks
    mismatched = [c for c in calls if c[0] != c[1]]
    assert len(mismatched) == len(tiny_lora.single_transformer_blocks)  # what the hook is for

    hooked = copy.deepcopy(tiny_lora)
    assert keep_attention_grads_contiguous(hooked) == blocks
    assert keep_attention_grads_contiguous(hooked) == blocks  # idempotent: one hook per module
    assert all(len(block.attn._forward_hooks) == 1
               for block in [*hooked.transformer_blocks, *hooked.single_transformer_blocks])
    hooked_loss, hooked_grads, hooked_calls = _step(hooked, data)
    assert len(hooked_calls) == blocks and all(g == o for g, o in hooked_calls), hooked_calls
    assert torch.equal(loss, hooked_loss) and torch.equal(grads, hooked_grads)


def _sdpa_backward_strides_in(graph: torch.fx.GraphModule) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    nodes = [n for n in graph.graph.nodes if "scaled_dot_product" in str(n.target) and "backward" in str(n.target)]
    return [(n.args[0].meta["val"].stride(), n.args[4].meta["val"].stride()) for n in nodes]


@pytest.mark.parametrize("hooked", [False, True])
def test_the_hook_is_traced_into_compiled_blocks(tiny_lora, hooked):
    """In compiled blocks the layout is decided by the backward graph: read it from the graph itself."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.utils import counters
    from torch._functorch.aot_autograd import make_boxed_func

    backward_graphs: list[torch.fx.GraphModule] = []

    def keep_backward(gm: torch.fx.GraphModule, example_inputs):
        backward_graphs.append(gm)
        return make_boxed_func(gm)

    data = make_batch(PRESETS["tiny"], 32, 1, "cpu")
    loss, grads, _ = _step(tiny_lora, data)
    model = copy.deepcopy(tiny_lora)
    if hooked:
        keep_attention_grads_contiguous(model)
    torch._dynamo.reset()
    counters.clear()
    try:
        compile_blocks(model, backend=aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm), bw_compiler=keep_backward),
                       dynamic=True)
        compiled_loss = loss_of(model, data)
        compiled_loss.backward()
        assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]
    finally:
        torch._dynamo.reset()
    compiled_grads = torch.cat([p.grad.flatten() for p in lora_parameters(model)])
    torch.testing.assert_close(compiled_loss.detach(), loss)
    torch.testing.assert_close(compiled_grads, grads)
    strides = [s for graph in backward_graphs for s in _sdpa_backward_strides_in(graph)]
    assert len(strides) == 2  # one double-block and one single-block graph
    assert all(g == o for g, o in strides) == hooked, strides


def test_a_model_without_flux_blocks_is_refused():
    with pytest.raises(ValueError, match="Linear has no FLUX blocks"):
        keep_attention_grads_contiguous(nn.Linear(2, 2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cudnn_attention_trains_the_hooked_flux_like_flash_attention():
    """On a GPU: with the hook, FLUX's backward through cuDNN's attention runs (an illegal memory
    access without it, H200 2026-11-27) and gives FlashAttention's LoRA gradients."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from coatflux.core.formats import sqnr_db

    data = make_batch(PRESETS["tiny"], 64, 1, "cuda")
    grads = []
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        model = build_transformer(PRESETS["tiny"], "cuda").requires_grad_(False)
        torch.manual_seed(0)
        inject_lora(model, 4, 4.0, find_lora_targets(model))
        for p in lora_parameters(model):
            nn.init.normal_(p, std=0.05)
        keep_attention_grads_contiguous(model)
        with sdpa_kernel([backend]):
            loss_of(model.train(), data).backward()
        torch.cuda.synchronize()
        grads.append(torch.cat([p.grad.flatten() for p in lora_parameters(model)]).float().cpu())
    assert sqnr_db(grads[0], grads[1]) > 30
