"""Compiled COAT (``activation.compile_blocks``): the FP8 pack/unpack hooks, the traced FP8 linear,
and the tiny FLUX with its blocks compiled, against eager COAT and the plain-PyTorch references.

Most tests compile with ``backend="aot_eager"``: AOTAutograd traces, partitions and inlines the
hooks exactly as for inductor, without generating code (seconds instead of a minute on 2 cores).
The inductor tests compare the generated code with the same graph run eagerly.
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from coatflux.bench.model import PRESETS, build_transformer, loss_of, make_batch
from coatflux.core import compiled as compiled_mod
from coatflux.core.accounting import saved_activation_bytes
from coatflux.core.api import apply_coat
from coatflux.core.compiled import (
    SavedTensorCompression,
    compile_blocks,
    compiled_saved_tensors,
    pack,
    uniform_stream_tensor,
    unpack,
)
from coatflux.core.config import ActivationConfig, COATConfig, ConfigError
from coatflux.core.formats import E4M3, dequantize_reference, quantize_reference, sqnr_db
from coatflux.core.linear import FP8Linear
from coatflux.flux.lora import find_lora_targets, inject_lora, lora_parameters

GROUP = 16
CUDA_FP8 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# --- pack / unpack ---------------------------------------------------------------------------


def test_eager_pack_is_the_reference_group_quantization():
    x = (torch.randn(6, 64, dtype=torch.bfloat16) * 3).requires_grad_()
    h = x * 1.5  # an activation: it has autograd history
    codes, exponent, marker = pack(h, group=GROUP, min_numel=0, keep_attention=True)
    ref = quantize_reference(h.detach(), E4M3, "group", GROUP, pow2_scales=True)
    assert torch.equal(codes.view(torch.uint8), ref.data.view(torch.uint8))
    assert torch.equal(exponent, ref.scale) and marker.dtype == torch.bfloat16 and marker.numel() == 0
    restored = unpack((codes, exponent, marker), group=GROUP)
    assert torch.equal(restored, dequantize_reference(ref))


@pytest.mark.parametrize("case", ["parameter", "constant", "fp8", "ragged", "small"])
def test_eager_pack_keeps_what_is_not_an_activation(case):
    base = torch.randn(4, 64, requires_grad=True)
    t = {"parameter": nn.Parameter(torch.randn(4, 64)),
         "constant": torch.randn(4, 64),
         "fp8": torch.randn(4, 64).to(torch.float8_e4m3fn),
         "ragged": (base[:, :40] * 2),  # last dim not a multiple of the group: row statistics and the like
         "small": base * 2}[case]
    packed = pack(t, group=GROUP, min_numel=1024 if case == "small" else 0, keep_attention=True)
    assert len(packed) == 1 and packed[0] is t
    assert unpack(packed, group=GROUP) is t


def _mlp(x, w1, w2):
    h = F.layer_norm(x, x.shape[-1:])
    return x + F.gelu(h @ w1.t(), approximate="tanh") @ w2.t()


def _mlp_inputs(device: str = "cpu"):
    torch.manual_seed(0)
    x = torch.randn(2, 24, 64, dtype=torch.bfloat16, device=device, requires_grad=True)
    w1 = (torch.randn(128, 64, dtype=torch.bfloat16, device=device) / 8).requires_grad_()
    w2 = (torch.randn(64, 128, dtype=torch.bfloat16, device=device) / 8).requires_grad_()
    return x, w1, w2


def _mlp_grads(fn, hooks: SavedTensorCompression | None, device: str = "cpu"):
    inputs = _mlp_inputs(device)
    with hooks() if hooks is not None else contextlib.nullcontext():
        out = fn(*inputs)
    saved = compiled_saved_tensors(out)
    out.float().square().sum().backward()
    return [t.grad for t in inputs], saved


def test_inlined_hooks_store_fp8_and_cost_what_the_eager_hooks_cost():
    """Inlined into the graph, the hooks store FP8 codes; the gradients lose no more than eagerly."""
    hooks = SavedTensorCompression(ActivationConfig(min_saved_numel=0))
    plain, _ = _mlp_grads(_mlp, None)
    eager, _ = _mlp_grads(_mlp, hooks)
    compiled, saved = _mlp_grads(torch.compile(_mlp, backend="aot_eager", fullgraph=True), hooks)
    assert any(t.dtype == torch.float8_e4m3fn for t in saved), [t.dtype for t in saved]
    assert not any(t.dtype == torch.bfloat16 and t.numel() == 48 * 128 for t in saved)  # the GELU input
    for p, e, c in zip(plain, eager, compiled, strict=True):
        # the partitioner stores other tensors than eager autograd does, so the errors differ
        assert sqnr_db(p, c) > min(sqnr_db(p, e) - 3, 25)


@pytest.mark.parametrize("options", [None, compiled_mod.COAT_INDUCTOR_OPTIONS], ids=["default", "coat"])
def test_inductor_code_matches_the_traced_graph_with_hooks(options):
    """The fast path (inductor's generated code, with PyTorch's settings and with COAT's blocks')
    against its reference (the same graph, op by op)."""
    hooks = SavedTensorCompression(ActivationConfig(min_saved_numel=0))
    traced, _ = _mlp_grads(torch.compile(_mlp, backend="aot_eager", fullgraph=True), hooks)
    torch._dynamo.reset()
    generated, saved = _mlp_grads(torch.compile(_mlp, backend="inductor", fullgraph=True, options=options), hooks)
    assert any(t.dtype == torch.float8_e4m3fn for t in saved)
    for t, g in zip(traced, generated, strict=True):
        assert sqnr_db(t, g) > 40


def test_attention_tensors_stay_bf16_in_a_compiled_block():
    torch.manual_seed(0)
    q_proj = (torch.randn(64, 64, dtype=torch.bfloat16) / 8).requires_grad_()

    def attention_block(x):
        q = (x @ q_proj.t()).unflatten(-1, (4, 16)).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, q * 0.5, q).transpose(1, 2).flatten(-2)
        return F.gelu(out @ q_proj, approximate="tanh")  # the GELU input is not attention's

    x = torch.randn(1, 32, 64, dtype=torch.bfloat16, requires_grad=True)
    with SavedTensorCompression(ActivationConfig(min_saved_numel=0))():
        out = torch.compile(attention_block, backend="aot_eager", fullgraph=True)(x)
    saved = compiled_saved_tensors(out)
    four_d = [t for t in saved if t.dim() == 4]
    assert four_d and all(t.dtype != torch.float8_e4m3fn for t in four_d)  # q, k, v, output, lse
    assert any(t.dtype == torch.float8_e4m3fn for t in saved)  # the GELU input is compressed
    out.float().sum().backward()
    assert torch.isfinite(x.grad).all()


def test_lora_down_projection_of_a_query_is_compressed_like_any_gemm_input():
    """The LoRA up-projection reaches the graph as an auto-functionalized in-place op; it counts as a
    GEMM, so the adapter's down-projection of a query is stored in FP8, not kept as attention's."""
    torch.manual_seed(0)
    layer = FP8Linear.from_linear(nn.Linear(64, 64, dtype=torch.bfloat16).requires_grad_(False))
    lora_a = (torch.randn(16, 64) / 8).requires_grad_()
    lora_b = (torch.randn(64, 16) / 8).requires_grad_()

    def attention_block(x):
        q = layer(x, lora_a, lora_b, 1.0).unflatten(-1, (4, 16)).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q, q)

    x = torch.randn(1, 32, 64, dtype=torch.bfloat16, requires_grad=True)
    with SavedTensorCompression(ActivationConfig(min_saved_numel=0))():
        out = torch.compile(attention_block, backend="aot_eager", fullgraph=True)(x)
    saved = compiled_saved_tensors(out)
    down = [t for t in saved if tuple(t.shape) == (32, 16)]  # h = x @ lora_a.T
    assert down and all(t.dtype == torch.float8_e4m3fn for t in down), [(t.shape, t.dtype) for t in saved]
    assert all(t.dtype != torch.float8_e4m3fn for t in saved if t.dim() == 4)  # q stays attention's


# --- the traced FP8 linear --------------------------------------------------------------------


@pytest.mark.parametrize(("trainable", "scaled_mm", "backend"), [
    (False, False, "aot_eager"), (False, True, "aot_eager"), (True, False, "aot_eager"), (True, True, "aot_eager"),
    (False, True, "inductor"), (True, False, "inductor")])
def test_traced_fp8_linear_matches_eager(trainable, scaled_mm, backend):
    _traced_against_eager(trainable, scaled_mm, backend, "cpu")  # torch._scaled_mm runs on CPU too


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA_FP8, reason="needs a CUDA GPU with FP8 tensor cores (sm_89+)")
@pytest.mark.parametrize("trainable", [False, True])
def test_traced_fp8_linear_matches_eager_on_gpu(trainable):
    """Inductor's Triton quantization and torch._scaled_mm in the graph against the eager layer."""
    _traced_against_eager(trainable, True, "inductor", "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_traced_linear_without_scaled_mm_matches_eager_on_gpu():
    """A GPU multiplies in bf16 where torch._scaled_mm is not in the graph (an unsupported shape, a
    card without FP8): the case that got zero input gradients under torch 2.11 (see above)."""
    _traced_against_eager(False, False, "aot_eager", "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA_FP8, reason="needs a CUDA GPU with FP8 tensor cores (sm_89+)")
def test_inductor_hooks_on_gpu_match_the_traced_graph():
    hooks = SavedTensorCompression(ActivationConfig(min_saved_numel=0))
    traced, _ = _mlp_grads(torch.compile(_mlp, backend="aot_eager", fullgraph=True), hooks, "cuda")
    torch._dynamo.reset()
    generated, saved = _mlp_grads(torch.compile(_mlp, backend="inductor", fullgraph=True), hooks, "cuda")
    assert any(t.dtype == torch.float8_e4m3fn for t in saved)
    for t, g in zip(traced, generated, strict=True):
        assert sqnr_db(t, g) > 40


@pytest.mark.parametrize("lora", [False, True])
def test_traced_fp8_linear_that_multiplies_in_its_output_dtype_matches_eager(lora):
    """fp32 on a CPU, like bf16 on a GPU without torch._scaled_mm in the graph, multiplies in the
    output's dtype, so no cast is left to do. Under torch 2.11 a forward that still called ``.to``
    returned that same tensor again, and torch.compile gave the input a gradient of zeros."""
    _traced_against_eager(False, False, "aot_eager", "cpu", torch.float32, lora)


def _traced_against_eager(trainable: bool, scaled_mm: bool, backend: str, device: str,
                          dtype: torch.dtype = torch.bfloat16, lora: bool = True) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, dtype=dtype, device=device).requires_grad_(trainable)
    layer = FP8Linear.from_linear(linear)
    layer.fp8_gemm_in_graph = scaled_mm
    a = (torch.randn(8, 64, device=device) / 8).requires_grad_()
    b = (torch.randn(48, 8, device=device) / 8).requires_grad_()
    x = torch.randn(3, 16, 64, dtype=dtype, device=device, requires_grad=True)

    def run(fn):
        y = fn(x, a, b, 0.5) if lora else fn(x)
        y.float().square().sum().backward()
        params = [x] + ([a, b] if lora else []) + ([layer.weight, layer.bias] if trainable else [])  # bias: in the GEMM epilogue
        grads = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        return [y.detach(), *grads]

    eager = run(layer)
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    if backend == "inductor":
        from torch._inductor.utils import run_and_get_code

        traced, (forward_code, backward_code) = run_and_get_code(run, compiled)
        # the LoRA up-projection (scale 0.5) accumulates into the GEMM's output in place, not through
        # an out-of-place addmm that first copies it (an addmm of the base GEMM's bias may remain);
        # backward adds grad_h @ A into the input gradient in place, and no addmm copies it either
        assert "torch.ops.coatflux.lora_addmm_.default(" in forward_code
        assert "alpha=0.5" not in forward_code
        assert "torch.ops.coatflux.lora_addmm_.default(" in backward_code
        assert "extern_kernels.addmm(" not in backward_code
        if scaled_mm:  # the layer's default, fp8_fast_accumulation, reaches the GEMM in the graph
            assert "use_fast_accum=True" in forward_code
    else:
        traced = run(compiled)
    for e, t in zip(eager, traced, strict=True):
        assert e.shape == t.shape and sqnr_db(e, t) > 30


def test_compiled_linear_multiplies_plainly_below_its_planned_rows():
    """Under its row plan a compiled layer multiplies the unquantized input with the upcast FP8 weight
    (and keeps only the FP8 weight for backward); above it, the FP8 GEMM. The boundary is a guard."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    layer = FP8Linear.from_linear(nn.Linear(64, 48, dtype=torch.bfloat16).requires_grad_(False))
    layer.fp8_gemm_in_graph = True
    unplanned = copy.deepcopy(layer)
    layer.row_plan = ((1, False), (64, True))

    def run(fn, rows):
        torch.manual_seed(rows)
        x = torch.randn(rows, 64, dtype=torch.bfloat16, requires_grad=True)
        y = fn(x)
        saved = compiled_saved_tensors(y)
        y.backward(torch.ones_like(y))
        return y.detach(), x.grad, saved

    reference = torch.compile(unplanned, backend="aot_eager", dynamic=True, fullgraph=True)
    expected = {rows: run(reference, rows) for rows in (128, 256)}
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager_decomp_partition")  # inductor's partitioner
    backend = compiled_mod.PartitioningBackend((), counter, partitioner=compiled_mod.COAT_PARTITIONER)
    compiled = torch.compile(layer, backend=backend, dynamic=True, fullgraph=True)
    graphs = []
    for rows in (128, 256):  # FP8: the layer without a plan, byte for byte
        y, grad, _ = run(compiled, rows)
        assert torch.equal(y, expected[rows][0]) and torch.equal(grad, expected[rows][1])
        graphs.append(counter.frame_count)
    assert graphs[0] == graphs[1]  # the same side of the plan's boundary: no new graph
    y, grad, saved = run(compiled, 32)  # plain: x @ W^T + b (one GEMM) and g @ W with the upcast weight
    torch.manual_seed(32)
    x = torch.randn(32, 64, dtype=torch.bfloat16)
    w = layer.weight  # the upcast FP8 weight
    assert torch.equal(y, F.linear(x, w, layer.bias)) and torch.equal(grad, torch.ones(32, 48, dtype=torch.bfloat16) @ w)
    assert counter.frame_count == graphs[1] + 1  # the plan's boundary compiled the layer once more
    assert not any(t.dtype == torch.bfloat16 and t.shape == (48, 64) for t in saved)  # no bf16 weight kept
    assert any(t.dtype == torch.float8_e4m3fn and t.shape == (48, 64) for t in saved)


def test_apply_coat_plans_each_linear_of_compiled_blocks_by_rows(monkeypatch, tiny_base):
    from coatflux.core import api
    from coatflux.core.gemm import GemmPlanner, GemmSupport

    timed = []

    def faster(self, device, m, n, k, dtype):
        timed.append((n, k))
        return m >= 1024

    monkeypatch.setattr(api, "fp8_gemm_support", lambda device: GemmSupport(True, ""))
    monkeypatch.setattr(GemmPlanner, "_fp8_linear_is_faster", faster)
    model = copy.deepcopy(tiny_base)
    apply_coat(model, COMPILED, compile_options={"backend": "aot_eager"})
    layers = [m for m in model.modules() if isinstance(m, FP8Linear)]
    assert layers and all(m.fp8_gemm_in_graph and m.row_plan == ((1, False), (1024, True)) for m in layers)
    shapes = {(m.out_features, m.in_features) for m in layers}
    assert len(timed) == len(shapes) * 9  # each shape once, at every rung
    outside = model.coat_context.fp8_linear(nn.Linear(32, 16).requires_grad_(False))  # ai-toolkit's bases
    assert outside.row_plan == ((1, False), (1024, True))
    model = copy.deepcopy(tiny_base)
    apply_coat(model, COATConfig(activation=ActivationConfig(compile_blocks=True, gemm_autotune=False)),
               compile_options={"backend": "aot_eager"})
    assert all(m.row_plan is None for m in model.modules() if isinstance(m, FP8Linear))


# --- the tiny FLUX, blocks compiled -----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_base():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_transformer(PRESETS["tiny"], "cpu").requires_grad_(False)


def _tiny(base, coat: COATConfig | None, backend: str = "aot_eager", checkpointing: bool = False):
    model = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "FP8 GEMMs need a CUDA GPU"
        if coat is not None:
            apply_coat(model, coat, compile_options={"backend": backend})
    torch.manual_seed(1)
    inject_lora(model, 16, 16.0, find_lora_targets(model))
    params = lora_parameters(model)
    for p in params:
        nn.init.normal_(p, std=0.05)
    if checkpointing:
        model.enable_gradient_checkpointing()
    return model.train(), params


def _step(model, params, data):
    loss = loss_of(model, data)
    saved = compiled_saved_tensors(loss)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in params])
    for p in params:
        p.grad = None
    return loss.detach(), grads, saved


COMPILED = COATConfig(activation=ActivationConfig(compile_blocks=True))


@pytest.mark.slow  # ~40 s of tracing: AOTAutograd traces the pack and unpack hooks once per saved tensor
def test_compiled_blocks_train_like_eager_coat_with_and_without_checkpointing(tiny_base):
    """One compiled tiny FLUX: its loss and gradients against eager COAT, what it stores, and checkpointing.

    ``min_saved_numel`` is 0 because at the tiny model's sizes every activation is below the default.
    """
    data = make_batch(PRESETS["tiny"], 64, 1, "cpu")
    activation = {"min_saved_numel": 0}
    eager = _step(*_tiny(tiny_base, COATConfig(activation=ActivationConfig(**activation))), data)
    model, params = _tiny(tiny_base, COATConfig(activation=ActivationConfig(compile_blocks=True, **activation)))
    assert model.coat_context.compiled_blocks == [f"transformer_blocks.{i}" for i in range(2)] + \
        [f"single_transformer_blocks.{i}" for i in range(2)]
    assert model.coat_context.compressor is None and not model.coat_context.fused
    _step(model, params, data)
    loss, grads, saved = _step(model, params, data)  # the second step reuses the graphs
    assert sqnr_db(eager[0], loss) > 40 and sqnr_db(eager[1], grads) > 25

    # backward reuses the forward's bf16 casts of the LoRA weights (save_parameter_casts), kept exact:
    # neither the fp32 parameters nor an FP8 copy of them are saved
    lora = {p.untyped_storage().data_ptr() for p in params}
    assert not any(t.untyped_storage().data_ptr() in lora for t in saved)
    def is_cast(t, p):
        return t.dtype == torch.bfloat16 and any(
            v.shape == t.shape and torch.equal(v, t) for v in (p.detach().bfloat16(), p.detach().bfloat16().t()))

    casts = [t for t in saved if any(is_cast(t, p) for p in params)]
    blocks = ("transformer_blocks.", "single_transformer_blocks.")
    lora_b = [p for name, p in model.named_parameters() if name.startswith(blocks) and ".lora_B." in name]
    assert lora_b and all(any(is_cast(t, p) for t in casts) for p in lora_b)  # each one's bf16 cast, exact
    activations = [t for t in saved if not any(t is c for c in casts)]
    fp8 = sum(t.numel() for t in activations if t.dtype == torch.float8_e4m3fn)
    wide = sum(t.numel() * t.element_size() for t in activations if t.dtype in (torch.bfloat16, torch.float32))
    assert fp8 > 4 * wide  # the blocks keep FP8, but for attention's tensors:
    # q, k and v of every block; the single blocks' attention output is saved as the (batch, tokens,
    # width) view that their concatenation, recomputed in backward (COAT_RECOMPUTE), is made from
    attention = [t for t in saved if t.dim() == 4 and t.shape[1] == 4]  # (batch, heads, tokens, head dim)
    assert len(attention) >= 4 * 3 and all(t.dtype == torch.bfloat16 for t in attention)
    tokens = data["hidden_states"].shape[1] + data["encoder_hidden_states"].shape[1]
    concatenation = (tokens, 64 + 4 * 64)  # a single block's attention output and GELU output, side by side
    assert not any(tuple(t.shape[-2:]) == concatenation for t in saved)

    # the accounting sees what the compiled graphs keep (read from the autograd graph) and the eager rest
    eager_model, _ = _tiny(tiny_base, COATConfig(activation=ActivationConfig(**activation)))
    sizes = {name: saved_activation_bytes(m, lambda m=m: loss_of(m, data))
             for name, m in (("eager", eager_model), ("compiled", model), ("plain", _tiny(tiny_base, None)[0]))}
    assert 0 < sizes["compiled"] < 0.75 * sizes["plain"], sizes
    assert 0.25 * sizes["eager"] < sizes["compiled"] < 2 * sizes["eager"], sizes

    model.enable_gradient_checkpointing()
    checkpointed = _step(model, params, data)
    assert torch.equal(loss, checkpointed[0])
    assert sqnr_db(grads, checkpointed[1]) > 20  # recomputed exactly instead of stored in FP8


def test_every_block_of_a_class_runs_one_graph(tiny_base):
    """The first double block (inputs without grad) and the first single block (contiguous inputs,
    where later ones get views) would each compile a second graph; the stream inputs are made uniform."""
    from torch._dynamo.utils import clear_compilation_metrics, counters, get_compilation_metrics

    model, params = _tiny(tiny_base, None)
    compile_blocks(model, backend="aot_eager", dynamic=True)
    counters.clear()
    clear_compilation_metrics()
    for resolution in (32, 64):  # with dynamic shapes a second resolution reuses the graphs
        loss_of(model, make_batch(PRESETS["tiny"], resolution, 1, "cpu")).backward()
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]
    assert all(p.grad is not None for p in params)
    # traced once each: the norms' eps and the LoRA scale are constants, not symbolic floats
    assert [m.restart_reasons for m in get_compilation_metrics() if m.restart_reasons] == []

    torch._dynamo.reset()
    counters.clear()
    model.enable_gradient_checkpointing()  # the blocks are called positionally
    loss_of(model, make_batch(PRESETS["tiny"], 32, 1, "cpu")).backward()
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]


def test_compiled_coat_reuses_its_graphs_across_resolutions_and_batches(tiny_base):
    """With dynamic shapes, a new token count or batch must not compile the blocks again. Two size
    tests did: which saved tensors to compress (against ``min_saved_numel``) and the per-tensor
    scale's count of maximum blocks (one block is a size of 1, which dynamo specializes)."""
    from torch._dynamo.utils import counters

    model = copy.deepcopy(tiny_base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_coat(model, COMPILED, compile_options={"backend": "aot_eager", "dynamic": True})
    inject_lora(model, 16, 16.0, find_lora_targets(model))
    counters.clear()
    graphs = []
    for resolution, batch in ((32, 1), (64, 1), (32, 2), (64, 2), (32, 4)):
        loss_of(model, make_batch(PRESETS["tiny"], resolution, batch, "cpu")).backward()
        graphs.append(counters["stats"]["unique_graphs"])
    # dynamo always specializes a size of 1: leaving batch 1 compiles each block class once more
    assert graphs == [2, 2, 4, 4, 4] and not counters["graph_break"]


class _ScaledNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.eps, self.scale = 1e-6, 2.0

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return nn.functional.layer_norm(hidden_states, hidden_states.shape[-1:], eps=self.eps) * self.scale


def test_a_compiled_block_takes_its_floats_as_guarded_constants():
    """No second trace for the floats, and a changed float is a recompile, not a stale constant."""
    from torch._dynamo.utils import clear_compilation_metrics, counters, get_compilation_metrics

    model = nn.Sequential(_ScaledNorm())
    compile_blocks(model, block_classes=["_ScaledNorm"], backend="aot_eager", dynamic=True)
    counters.clear()
    clear_compilation_metrics()
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(model(x), model[0].forward(x))
    y = torch.randn(3, 7, 8)
    torch.testing.assert_close(model(y), model[0].forward(y))
    assert counters["stats"]["unique_graphs"] == 1  # another length reuses the graph
    model[0].scale = 3.0
    torch.testing.assert_close(model(x), model[0].forward(x))
    assert counters["stats"]["unique_graphs"] == 2
    assert [m.restart_reasons for m in get_compilation_metrics() if m.restart_reasons] == []
    assert not torch._dynamo.config.specialize_float  # the patch lasted for the calls only


def test_a_second_coat_model_reuses_the_compiled_graphs(tiny_base):
    """Dynamo guards on the saved-tensor hooks' identity: equal configs share them, so a rebuilt
    model (the bench's batch search, a reloaded model) does not compile its blocks again."""
    from torch._dynamo.utils import counters

    data = make_batch(PRESETS["tiny"], 32, 1, "cpu")
    counters.clear()
    graphs = []
    for _ in range(2):
        model, _ = _tiny(tiny_base, COMPILED)
        loss_of(model, data).backward()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs == [2, 2]
    other = SavedTensorCompression(ActivationConfig(compile_blocks=True, group_size=32))
    assert other.pack_gm is not model.coat_context.compression.pack_gm  # other options, other hooks


@pytest.mark.parametrize("case", ["batch-1 view", "batch-2 view", "no grad", "plain"])
def test_uniform_stream_tensor_keeps_values_and_gradient_flow(case):
    base = torch.randn(2 if case == "batch-2 view" else 1, 12, 8, requires_grad=case != "no grad")
    tensor = base[:, 4:] if "view" in case else base * 1 if case == "plain" else base
    out = uniform_stream_tensor(tensor)
    assert torch.equal(out, tensor) and out.requires_grad
    assert out.stride() == torch.empty(out.shape).stride()
    if case == "batch-1 view":
        assert out.data_ptr() == tensor.data_ptr()  # re-viewed, not copied
    if base.requires_grad:
        (out * 2).sum().backward()
        expected = torch.zeros_like(base)
        expected[:, 4:] = 2 if "view" in case else 0
        if "view" not in case:
            expected.fill_(2)
        assert torch.equal(base.grad, expected)


# --- bad input --------------------------------------------------------------------------------


def test_compile_blocks_needs_per_tensor_linears_and_per_group_activations():
    with pytest.raises(ConfigError, match=r"coat\.activation\.compile_blocks.*linear_granularity='per_group'"):
        COATConfig.from_dict({"activation": {"compile_blocks": True, "linear_granularity": "per_group"}})
    with pytest.raises(ConfigError, match=r"coat\.activation\.compile_blocks: expected"):
        COATConfig.from_dict({"activation": {"compile_blocks": "yes"}})


def test_compile_blocks_names_what_it_cannot_find():
    with pytest.raises(ValueError, match="lists no _repeated_blocks"):
        compile_blocks(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="no module of class Block"):
        compile_blocks(nn.Sequential(nn.Linear(4, 4)), ["Block"])


def test_apply_coat_refuses_a_torch_that_cannot_inline_hooks(monkeypatch, tiny_base):
    monkeypatch.setattr("coatflux.core.api.inline_hooks_available", lambda: (False, "torch 2.0 is too old"))
    model = copy.deepcopy(tiny_base)
    with pytest.raises(RuntimeError, match=r"compile_blocks: torch 2\.0 is too old.*compile_blocks: false"):
        apply_coat(model, COMPILED)
    assert getattr(model, "coat_context", None) is None


def test_this_torch_inlines_hooks():
    assert compiled_mod.inline_hooks_available() == (True, "")


def test_range_monitor_says_it_cannot_see_inside_compiled_blocks(tiny_base):
    from coatflux.core.stats import FP8RangeMonitor

    model, _ = _tiny(tiny_base, COMPILED)
    with pytest.warns(RuntimeWarning, match=r"FP8 linears inside compiled blocks are not counted"):
        monitor = FP8RangeMonitor(model, enabled=False)
    assert monitor.layers and not any(name.startswith(("transformer_blocks.", "single_transformer_blocks."))
                                      for name in monitor.layers)


class _LoraLinear(nn.Module):
    """A frozen FP8 linear with an fp32 LoRA, multiplied in bf16 (as FLUX's LoRA-wrapped linears are)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.base = FP8Linear.from_linear(nn.Linear(64, 64, dtype=torch.bfloat16).requires_grad_(False))
        self.lora_A = nn.Parameter(torch.randn(16, 64) / 8)
        self.lora_B = nn.Parameter(torch.randn(64, 16) / 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.base(x, self.lora_A, self.lora_B, 0.5))


def test_saved_parameter_casts_are_reused_exactly_not_cast_again():
    """With ``save_parameter_casts`` backward reuses the forward's bf16 casts of the LoRA weights, which
    the hooks leave uncompressed; without it they are cast again in backward. Same gradients."""
    hooks = SavedTensorCompression(ActivationConfig(min_saved_numel=0))
    lora_shapes = {(16, 64), (64, 16)}

    def run(save: bool):
        torch._dynamo.reset()
        module = _LoraLinear()
        compiled_mod.compile_module(module, partitioner=compiled_mod.COAT_PARTITIONER, save_parameter_casts=save,
                                    backend="aot_eager_decomp_partition", dynamic=True)
        x = torch.randn(4, 32, 64, dtype=torch.bfloat16, requires_grad=True)
        with hooks():
            y = module(x)
        saved = [t for t in compiled_saved_tensors(y) if tuple(t.shape) in lora_shapes]
        y.float().square().sum().backward()
        return saved, [module.lora_A.grad, module.lora_B.grad, x.grad]

    kept, grads_kept = run(True)
    recast, grads_recast = run(False)
    assert kept and all(t.dtype == torch.bfloat16 for t in kept)  # the casts, exact
    assert all(t.dtype == torch.float32 for t in recast)  # the fp32 parameters: backward casts them again
    for a, b in zip(grads_kept, grads_recast, strict=True):
        assert torch.equal(a, b)


def test_coat_blocks_get_coat_inductor_options_under_their_own():
    from coatflux.core.compiled import COAT_INDUCTOR_OPTIONS, coat_compile_options

    assert coat_compile_options({"dynamic": True}) == {"dynamic": True, "options": dict(COAT_INDUCTOR_OPTIONS)}
    mine = coat_compile_options({"backend": "inductor", "options": {"realize_opcount_threshold": 10, "max_autotune": True}})
    assert mine["options"] == {**COAT_INDUCTOR_OPTIONS, "realize_opcount_threshold": 10, "max_autotune": True}
    assert coat_compile_options({"backend": "aot_eager"}) == {"backend": "aot_eager"}


def test_recompute_backend_marks_only_concatenations_that_feed_a_gemm():
    """The mark goes on a ``cat`` whose value reaches a matmul (through a reshape), not on one that
    only feeds element-wise ops; one backend instance per set of arguments (dynamo compares them)."""
    from torch.utils.checkpoint import CheckpointPolicy

    from coatflux.core.compiled import COAT_RECOMPUTE, PartitioningBackend, partitioning_backend

    def block(a, b, w):
        feeds_gemm = torch.cat([a, b], dim=-1).reshape(-1, 8) @ w
        elementwise = torch.cat([a, b], dim=0) * 2
        return feeds_gemm, elementwise

    marks = []

    def inner(gm, example_inputs):
        marks.extend((node.target, node.meta.get("recompute")) for node in gm.graph.nodes if node.target is torch.cat)
        return gm.forward

    backend = PartitioningBackend(COAT_RECOMPUTE, inner)
    a, b, w = torch.randn(3, 4), torch.randn(3, 4), torch.randn(8, 5)
    torch._dynamo.reset()
    out = torch.compile(block, backend=backend, fullgraph=True)(a, b, w)
    torch.testing.assert_close(out, block(a, b, w))
    assert sorted(str(mark) for _, mark in marks) == sorted([str(CheckpointPolicy.MUST_RECOMPUTE), "None"])
    assert partitioning_backend(COAT_RECOMPUTE, "aot_eager", dynamic=True) is partitioning_backend(
        COAT_RECOMPUTE, "aot_eager", dynamic=True)
    with pytest.raises(ValueError, match="mode and options go with a backend name"):
        PartitioningBackend(COAT_RECOMPUTE, inner, mode="max-autotune")


@pytest.mark.parametrize(("options", "expected"), [
    ({"mode": "reduce-overhead"}, True),
    ({"mode": "max-autotune", "dynamic": True}, True),
    ({"mode": "default"}, False),
    ({}, False),
    ({"backend": "aot_eager", "mode": "reduce-overhead"}, False),  # only inductor makes CUDA graphs
    ({"mode": "reduce-overhead", "options": {"triton.cudagraphs": False}}, False),
    ({"options": {"triton.cudagraphs": True}}, True),
])
def test_uses_cudagraphs_follows_torch_compile_modes(options, expected):
    assert compiled_mod.uses_cudagraphs(options) is expected


def test_cudagraph_mode_reaches_inductor_with_coat_options():
    """``mode`` travels through COAT's partitioning backend to inductor, beside COAT's own options."""
    backend = compiled_mod.partitioning_backend(
        compiled_mod.COAT_RECOMPUTE, **compiled_mod.coat_compile_options({"mode": "reduce-overhead"}))
    assert backend.inner.config["triton.cudagraphs"] is True
    assert backend.inner.config["realize_opcount_threshold"] == compiled_mod.COAT_INDUCTOR_OPTIONS[
        "realize_opcount_threshold"]
    plain = compiled_mod.partitioning_backend(compiled_mod.COAT_RECOMPUTE, **compiled_mod.coat_compile_options({}))
    assert "triton.cudagraphs" not in plain.inner.config
