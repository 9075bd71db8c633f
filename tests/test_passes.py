"""The graph rewrite of COAT's compiled blocks (``coatflux.core.passes``): a product with a
concatenated right operand, split per part."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from coatflux.core.compiled import (
    COAT_INDUCTOR_OPTIONS,
    COAT_PARTITIONER,
    COAT_RECOMPUTE,
    partitioning_backend,
)
from coatflux.core.formats import sqnr_db
from coatflux.core.linear import FP8Linear
from coatflux.core.passes import SplitConcatenatedOperand

_mm = torch.ops.aten.mm.default


def _lora_gradient(g, a, b):
    """The LoRA down-projection's weight gradient of FLUX's ``proj_out``: ``g^T @ cat([a, gelu(b)])``."""
    x = torch.cat([a, F.gelu(b, approximate="tanh")], dim=-1)
    return g.t() @ x.reshape(-1, x.shape[-1])


def _rewritten(fn, *inputs):
    gm = make_fx(fn, tracing_mode="fake")(*inputs)  # static shapes: the part widths are ints, as a FLUX block's are
    before = len(gm.graph.find_nodes(op="call_function", target=_mm))
    SplitConcatenatedOperand()(gm.graph)
    gm.recompile()
    return gm, before, len(gm.graph.find_nodes(op="call_function", target=_mm))


def test_the_split_product_equals_the_product_of_the_concatenation():
    torch.manual_seed(0)
    g, a, b = torch.randn(2 * 5, 4), torch.randn(2, 5, 16), torch.randn(2, 5, 32)
    gm, before, after = _rewritten(_lora_gradient, g, a, b)
    assert (before, after) == (1, 2)
    joins = gm.graph.find_nodes(op="call_function", target=torch.ops.aten.cat.default)
    assert [join.args[1] for join in joins] == [1]  # only the products' columns are concatenated
    fresh = torch.randn(2 * 5, 4), torch.randn(2, 5, 16), torch.randn(2, 5, 32)
    torch.testing.assert_close(gm(*fresh), _lora_gradient(*fresh), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", ["along tokens", "read twice", "left operand", "one part"])
def test_other_products_are_left_as_they_are(case):
    g, a, b = torch.randn(10, 4), torch.randn(2, 5, 16), torch.randn(2, 5, 32)

    def fn(g, a, b):
        if case == "along tokens":  # concatenated along the rows: the product's reduction
            return torch.cat([a, b[..., :16]], dim=1).reshape(-1, 16).t() @ torch.randn(20, 3)
        if case == "read twice":  # the concatenation is kept for another reader anyway
            x = torch.cat([a, b], dim=-1)
            return g.t() @ x.reshape(-1, 48), x.sum()
        if case == "left operand":
            return torch.cat([a, b], dim=-1).reshape(-1, 48) @ torch.randn(48, 3)
        return g.t() @ torch.cat([a], dim=-1).reshape(-1, 16)

    _, before, after = _rewritten(fn, g, a, b)
    assert before == after == 1


CUDA_FP8 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not CUDA_FP8, reason="needs a CUDA GPU with FP8 tensor cores (sm_89+)")])])
def test_compiled_block_computes_the_lora_gradient_without_rebuilding_the_concatenation(device):
    """FLUX's single block in small: ``cat([attention, gelu(mlp)])`` into an FP8 linear with LoRA,
    partitioned as COAT's blocks are (the concatenation recomputed in backward). With COAT's inductor
    options backward multiplies each part; no kernel rebuilds the concatenation, and the gradients
    match eager's."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    layer = FP8Linear.from_linear(nn.Linear(80, 48, dtype=torch.bfloat16, device=device)).requires_grad_(False)
    layer.fp8_gemm_in_graph = True
    a = (torch.randn(8, 80, device=device) / 8).requires_grad_()
    b = (torch.randn(48, 8, device=device) / 8).requires_grad_()
    attention = torch.randn(2, 24, 16, dtype=torch.bfloat16, device=device, requires_grad=True)
    mlp = torch.randn(2, 24, 64, dtype=torch.bfloat16, device=device, requires_grad=True)

    def block(attention, mlp):
        return layer(torch.cat([attention, F.gelu(mlp, approximate="tanh")], dim=-1), a, b, 0.5)

    def run(fn):
        fn(attention, mlp).float().square().sum().backward()
        grads = [t.grad.clone() for t in (attention, mlp, a, b)]
        for t in (attention, mlp, a, b):
            t.grad = None
        return grads

    eager = run(block)
    backend = partitioning_backend(COAT_RECOMPUTE, "inductor", options=COAT_INDUCTOR_OPTIONS,
                                   partitioner=COAT_PARTITIONER)
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled, (_, backward_code) = run_and_get_code(run, torch.compile(block, backend=backend, fullgraph=True))
    kernels = re.findall(r"^(\w+) = async_compile\.", backward_code, re.M)  # C++ on a CPU, Triton on a GPU
    assert kernels and not [name for name in kernels if "cat" in name], kernels
    assert backward_code.count("extern_kernels.mm(") >= 2  # one product per part
    for e, c in zip(eager, compiled, strict=True):
        assert sqnr_db(e, c) > 30
