"""Compiled COAT: each repeated block of a model is one ``torch.compile`` graph, and the activations
that graph saves for backward are compressed to FP8 inside it.

What: :func:`compile_blocks` compiles every module of the model's repeated block classes
(diffusers models list them in ``_repeated_blocks``; FLUX's double and single blocks).
:class:`SavedTensorCompression` provides ``saved_tensors_hooks`` whose pack stores a saved
activation as E4M3 codes with one power-of-two scale per 1 x G group (int8 exponents, the eager
compressor's format) and whose unpack restores it. :func:`coatflux.core.api.apply_coat` with
``activation.compile_blocks: true`` uses both; :class:`~coatflux.core.linear.FP8Linear` then
runs a traceable forward inside the compiled blocks (FP8 GEMMs as ``torch._scaled_mm`` nodes).

Why: eager COAT issues about 3,000 compiled-kernel calls per FLUX.1-dev step (quantize, GEMM,
dequantize, the saved-tensor hooks), each with 20-40 us of host time; on an H200 that bound the
step to the host (1.10 s at 1024 px, 0.96 s at 512 px, against 0.55 s for bf16). One graph per
block lets inductor fuse the quantization into the kernels that produce each tensor (what COAT's
hand-fused kernels do for Llama, here for any architecture) and leaves the host a few calls per
block.

How the saved activations are compressed: PyTorch's AOTAutograd inlines ``saved_tensors_hooks``
into a compiled graph when both hooks are ``torch.fx.GraphModule`` objects: pack becomes the end
of the forward graph, unpack the start of the backward graph, applied to the graph's own
intermediates only ("donated" buffers: never parameters or block inputs). Our GraphModules call
:func:`pack` and :func:`unpack`, which AOTAutograd traces once per saved tensor with that
tensor's node of the forward graph at hand, so what to compress is decided per node at compile
time and costs nothing at run time:

* tensors that scaled-dot-product attention saves or that feed it through views and element-wise
  ops (q, k, v, its output and log-sum-exp) stay as they are, as COAT keeps attention in bf16;
* FP8 and integer tensors, tensors below ``min_saved_numel`` elements (at the sizes first traced:
  the test is not a guard, so another batch or resolution reuses the graph) and tensors whose
  last dimension is not a multiple of the group (per-row norm statistics) stay as they are;
* everything else is stored in FP8 per group.

Outside the compiled blocks (FLUX's embedders, final norm and projection) the same GraphModules
run as ordinary hooks; there pack decides from the tensor alone (parameters and constants pass
through) and quantizes with :func:`coatflux.core.formats.quantize`, the same bytes.

What we chose against:

* Writing FP8 "saves" into the graph with custom autograd functions: AOTAutograd's min-cut
  partitioner recomputes cheap element-wise ops instead of saving their outputs. Tried on a
  LayerNorm-linear-GELU-linear block, it saved the bf16 GEMM output and moved our FP8 casts into
  the backward graph, so nothing FP8 was stored. Compressing after the partitioner compresses
  exactly what it decided to store.
* Capturing eager COAT in CUDA graphs: no host time either, but every quantization stays a
  separate pass over memory, and the eager path's weak-keyed caches and hooks would have to be
  made replay-safe.

What the partitioner stores is steered three times, for COAT's blocks only: :data:`COAT_PARTITIONER`
lets it recompute element-wise outputs that backward materialises, :data:`COAT_RECOMPUTE` has it
recompute a concatenation that feeds a linear (FLUX's single block) from the parts it keeps anyway,
as eager COAT stores such a concatenation, and the casts of trainable parameters (the LoRA weights)
are saved rather than cast again (all through the :class:`PartitioningBackend`). Inductor compiles
COAT's blocks with :data:`COAT_INDUCTOR_OPTIONS`, which keeps each unpacked activation one kernel
and has backward multiply a recomputed concatenation part by part (:mod:`coatflux.core.passes`).

Two things keep the compile cost to one graph per block class: :class:`UniformStreamInputs`
gives the first block of each class the input layout the later ones see, and models with equal
activation configs share one pair of hooks (dynamo guards on the hooks' identity). And
:func:`compile_module` has each graph traced once, not twice, under dynamic shapes.

Limits: the per-node context is PyTorch's private API (``_get_saved_tensor_hook_context``, "may
change without backward compatibility"; torch 2.11 and 2.13 have it). :func:`inline_hooks_available`
checks for it and :func:`~coatflux.core.api.apply_coat` raises when it is missing rather than
running with uncompressed activations.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import operator
import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import fx, nn

from coatflux.core.activation import is_weight_or_constant
from coatflux.core.config import ActivationConfig
from coatflux.core.formats import E4M3, quantize
from coatflux.core.passes import SplitConcatenatedOperand

_GEMM_NAMES = ("aten.mm", "aten.addmm", "aten.bmm", "aten._scaled_mm", "aten.convolution", "aten.linear")
# In-place GEMMs, which reach the graph wrapped in ``auto_functionalized``: the LoRA up-projection
# of :func:`coatflux.core.linear.lora_addmm_`.
_FUNCTIONALIZED_GEMM_NAMES = ("coatflux.lora_addmm_",)
_VIEW_NAMES = ("aten.view", "aten._unsafe_view", "aten.reshape", "aten.permute", "aten.transpose", "aten.t.",
               "aten.unsqueeze", "aten.squeeze", "aten.expand", "aten.clone", "aten.slice", "aten.select",
               "aten.alias", "aten.detach", "aten.contiguous")
FEED_DEPTH = 8  # element-wise steps from a saved tensor to attention (RMSNorm and rotary embedding)


def _hook_context() -> dict[str, Any] | None:
    """AOTAutograd's per-saved-tensor context while it inlines hooks (``None`` when running eagerly)."""
    try:
        from torch._functorch._aot_autograd.graph_compile import _get_saved_tensor_hook_context
    except ImportError:
        return None
    return _get_saved_tensor_hook_context()


def inline_hooks_available() -> tuple[bool, str]:
    """Whether this torch inlines GraphModule saved-tensor hooks with a per-node context."""
    try:
        from torch._functorch._aot_autograd import graph_compile
    except ImportError as err:
        return False, f"torch {torch.__version__} has no AOTAutograd graph_compile module ({err})"
    needed = ("_get_saved_tensor_hook_context", "maybe_inline_graph_saved_tensors_hooks")
    missing = [name for name in needed if not hasattr(graph_compile, name)]
    if missing:
        return False, (f"torch {torch.__version__} does not inline saved-tensor hooks into compiled graphs "
                       f"(missing {', '.join(missing)}; torch 2.11 and later have them)")
    return True, ""


def _target_is(node: fx.Node, names: tuple[str, ...]) -> bool:
    return node.op == "call_function" and str(node.target).startswith(names)


def _is_gemm(node: fx.Node) -> bool:
    if _target_is(node, _GEMM_NAMES):
        return True
    return (node.op == "call_function" and str(node.target).startswith("auto_functionalized") and bool(node.args)
            and str(node.args[0]).startswith(_FUNCTIONALIZED_GEMM_NAMES))


def _is_attention_op(node: fx.Node) -> bool:
    return node.op == "call_function" and "scaled_dot_product" in str(node.target)


def _feeds_attention(node: fx.Node, depth: int = FEED_DEPTH) -> bool:
    """``node`` reaches an attention op through at most ``depth`` ops, none of them a GEMM.

    That is a query, key or value, also one the partitioner keeps before the head transpose, the
    QK RMSNorm or the rotary embedding (and recomputes those in backward).
    """
    frontier, seen = {node}, {node}
    for _ in range(depth):
        users = {user for n in frontier for user in n.users} - seen
        if any(_is_attention_op(user) for user in users):
            return True
        seen |= users
        frontier = {user for user in users if not _is_gemm(user)}
    return False


def _through_views(node: fx.Node) -> fx.Node:
    """The node ``node`` is a view of (``node`` itself if it is no view)."""
    while _target_is(node, _VIEW_NAMES) and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _attention_output(node: fx.Node) -> bool:
    """``node`` is an output of an attention op, or a view of one (before the output projection)."""
    node = _through_views(node)
    return (node.op == "call_function" and node.target is operator.getitem
            and isinstance(node.args[0], fx.Node) and _is_attention_op(node.args[0]))


def touches_attention(node: fx.Node | None) -> bool:
    """Whether a saved node is attention's: an output of it, or an input within reach (see above)."""
    return node is not None and (_attention_output(node) or _feeds_attention(node))


def _must_save(node: fx.Node | None) -> bool:
    """A saved node (or a view of one) the partitioner was told to save: a trainable parameter's
    cast (see :class:`PartitioningBackend`), a weight's copy, not an activation; it stays exact."""
    from torch.utils.checkpoint import CheckpointPolicy

    return node is not None and _through_views(node).meta.get("recompute") == CheckpointPolicy.MUST_SAVE


def _compressible(t: torch.Tensor, group: int, min_numel: int) -> bool:
    if not t.is_floating_point() or t.element_size() == 1 or t.dim() == 0 or t.shape[-1] % group:
        return False
    return _unguarded_value(t.numel()) >= max(min_numel, 1)


def _unguarded_value(size: int | torch.SymInt) -> int:
    """A size as traced, without a guard on it: under dynamic shapes, its value at the first call.

    Whether to compress is a choice per saved tensor, correct either way; comparing a symbolic
    size would make the comparison a guard of the graph, and a batch or resolution on its other
    side would compile the block again. An unbacked size (no value known) counts as large.
    """
    if isinstance(size, int):
        return size
    hint = size.node.hint
    return int(hint) if hint is not None else sys.maxsize


def pack(t: torch.Tensor, *, group: int, min_numel: int, keep_attention: bool) -> tuple[torch.Tensor, ...]:
    """A saved tensor as ``(codes, int8 exponents, dtype marker)``, or ``(t,)`` where it stays as it is."""
    context = _hook_context()
    if context is None:  # eager: decided from the tensor, as the eager compressor decides
        if is_weight_or_constant(t):
            return (t,)
    elif (keep_attention and touches_attention(context.get("_node"))) or _must_save(context.get("_node")):
        return (t,)
    if not _compressible(t, group, min_numel):
        return (t,)
    rows = t.reshape(-1, t.shape[-1])
    if context is None:
        q = quantize(rows.detach(), E4M3, "group", group, pow2_scales=True)
        codes, exponent = q.data, q.scale
    else:
        from coatflux.kernels.quant import group_pow2_ops

        codes, exponent = group_pow2_ops(rows, E4M3, group)
    return codes.reshape(t.shape), exponent, t.new_empty(0)


def unpack(packed: tuple[torch.Tensor, ...], *, group: int) -> torch.Tensor:
    """Inverse of :func:`pack` (the original dtype, FP8-rounded values)."""
    if len(packed) == 1:
        return packed[0]
    from coatflux.kernels.quant import group_pow2_values_ops

    codes, exponent, marker = packed
    values = group_pow2_values_ops(codes.reshape(-1, codes.shape[-1]), exponent, group, marker.dtype)
    return values.reshape(codes.shape)


def _graph_module(fn: Any, **kwargs: Any) -> fx.GraphModule:
    """A one-node GraphModule calling ``fn(arg, **kwargs)``: inlineable by AOTAutograd, which traces
    it, and through it our Python, once per saved tensor."""
    graph = fx.Graph()
    arg = graph.placeholder("saved")
    graph.output(graph.call_function(fn, (arg,), kwargs))
    return fx.GraphModule(nn.Module(), graph)


# The meter of :meth:`SavedTensorCompression.metering`: scoped to the ``with`` block (and its
# thread or task), so the hooks themselves can be shared by every model (see below).
_EAGER_METER: contextvars.ContextVar[Any] = contextvars.ContextVar("coatflux_eager_saved_meter", default=None)


def _pack_and_count(t: torch.Tensor, **options: Any) -> tuple[torch.Tensor, ...]:
    packed = pack(t, **options)
    meter = _EAGER_METER.get()
    if meter is not None and _hook_context() is None:
        for stored in packed:
            meter.add(stored)
    return packed


@functools.cache
def _hook_modules(group: int, min_numel: int, keep_attention: bool) -> tuple[fx.GraphModule, fx.GraphModule]:
    """The pack and unpack GraphModules for these options, one pair per process.

    Dynamo guards every compiled graph on the identity of the saved-tensor hooks around it, so
    each model having its own pair made a second model (the bench's batch search, a rebuilt
    model) compile every block again. The pair holds no state: it is a function of the options.
    """
    options = {"group": group, "min_numel": min_numel, "keep_attention": keep_attention}
    return _graph_module(_pack_and_count, **options), _graph_module(unpack, group=group)


class SavedTensorCompression:
    """The FP8 pack/unpack hooks for a model's activation config (shared by equal configs).

    :meth:`metering` counts what the eager parts of the model store (used by
    :func:`coatflux.core.accounting.saved_activation_bytes`); the compiled graphs' share is read
    from the autograd graph (:func:`compiled_saved_tensors`).
    """

    def __init__(self, config: ActivationConfig) -> None:
        self.config = config
        self.pack_gm, self.unpack_gm = _hook_modules(config.group_size, config.min_saved_numel,
                                                     config.keep_attention_bf16)

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with torch.autograd.graph.saved_tensors_hooks(self.pack_gm, self.unpack_gm):
            yield

    @staticmethod
    @contextlib.contextmanager
    def metering(meter: Any) -> Iterator[None]:
        """Within the block, the eager parts' packs add what they store to ``meter``."""
        token = _EAGER_METER.set(meter)
        try:
            yield
        finally:
            _EAGER_METER.reset(token)


def compiled_saved_tensors(root: torch.Tensor) -> list[torch.Tensor]:
    """The tensors the compiled graphs under ``root``'s autograd graph keep for backward, as stored.

    Their packing happens inside the graphs, where no Python runs; this is how they are counted.
    """
    seen, stack, saved = set(), [root.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "CompiledFunction" in type(node).__name__:
            saved.extend(node.saved_tensors)
        stack.extend(fn for fn, _ in node.next_functions)
    return saved


STREAM_INPUTS = ("hidden_states", "encoder_hidden_states")  # diffusers' name for a block's residual stream


def compile_blocks(model: nn.Module, block_classes: Iterable[str] | None = None,
                   stream_inputs: Iterable[str] = STREAM_INPUTS, partitioner: Mapping[str, Any] | None = None,
                   recompute: Iterable[Any] = (), save_parameter_casts: bool = False,
                   **compile_kwargs: Any) -> list[str]:
    """``torch.compile`` every module whose class name is in ``block_classes``; returns their names.

    ``block_classes`` defaults to the model's ``_repeated_blocks`` (diffusers' convention). Each
    module compiles its own call (``nn.Module.compile``): hooks around it, such as gradient
    checkpointing's, stay outside the graph. A model with neither raises rather than compiling
    everything, whose forward hooks (COAT's own) cannot be traced.

    The arguments named in ``stream_inputs`` (the residual stream one block hands the next) are
    made uniform before each call, see :class:`UniformStreamInputs`: every block of a class then
    runs the same graph, where otherwise the first block of each class compiles a second one.
    ``partitioner`` overrides ``torch._functorch.config`` while the blocks compile (see
    :data:`COAT_PARTITIONER`); ``recompute`` names ops backward recomputes (see :data:`COAT_RECOMPUTE`);
    ``save_parameter_casts`` has backward reuse the forward's casts of trainable parameters (see
    :class:`PartitioningBackend`).
    """
    classes = tuple(block_classes if block_classes is not None else getattr(model, "_repeated_blocks", ()) or ())
    if not classes:
        raise ValueError(f"compile_blocks: {type(model).__name__} lists no _repeated_blocks; "
                         "name the block classes to compile")
    names = [name for name, module in model.named_modules() if type(module).__name__ in classes]
    if not names:
        raise ValueError(f"compile_blocks: no module of class {', '.join(classes)} in {type(model).__name__}")
    uniform = UniformStreamInputs(tuple(stream_inputs))
    for name in names:
        block = model.get_submodule(name)
        uniform.attach(block)
        compile_module(block, partitioner=partitioner, recompute=recompute,
                       save_parameter_casts=save_parameter_casts, **compile_kwargs)
    return names


#: How COAT's compiled blocks are partitioned into forward and backward (``torch._functorch.config``).
#: By default AOTAutograd's min-cut partitioner never recomputes in backward a tensor that backward
#: has to materialise anyway, such as the input of a GEMM: so it stores the GELU output that feeds
#: the down projection (whose LoRA weight gradient reads it) beside the GELU input, and the bf16
#: copies of the LoRA weights. COAT stores the GELU input (backward needs it) and recomputes the
#: output, as its hand-fused kernels do. Allowing that recomputation stores 88 MiB less per FLUX.1-dev
#: double block at 1024 px and 15 MiB less per single block (``benchmarks/flux_block_memory.py``); the
#: recomputed tensors are element-wise, so the extra backward work is a pass over memory (its GPU
#: time not yet measured). Plain (bf16) compiled blocks keep PyTorch's default.
COAT_PARTITIONER: Mapping[str, Any] = {"ban_recompute_materialized_backward": False}

#: Ops of COAT's blocks that backward recomputes instead of storing (see :class:`PartitioningBackend`).
#: FLUX's single block concatenates the attention output with the GELU output (four times wider)
#: and feeds the result to ``proj_out``, whose LoRA weight gradient reads it. ``cat`` is not on the
#: partitioner's recompute allowlist, so the block stored an FP8 copy of the whole concatenation
#: beside the GELU input and the attention output it is made of (as eager COAT did before it stored
#: a concatenation as its parts). Recomputed, it is not even rebuilt: inductor's pass in
#: :data:`COAT_INDUCTOR_OPTIONS` multiplies each part where it lies.
COAT_RECOMPUTE: tuple[Any, ...] = (torch.cat, torch.concat, torch.concatenate)


#: Inductor settings for COAT's blocks. Inductor stores a point-wise result in its own buffer
#: (a kernel of its own) once its expression exceeds ``realize_opcount_threshold`` operations (30).
#: The power-of-two scale of each unpacked activation crossed it when
#: :func:`coatflux.kernels.quant._pow2` was a product of exact factors (some 60 operations on an
#: int8 exponent), so each unpack took two kernels: the scales, then the multiplication. Above the
#: chain's size it is computed where it is used: 874 fewer kernel launches per FLUX.1-dev step at
#: 512 px, 9,937 to 9,063 (``benchmarks/kernel_launches.py``), with the same values. ``_pow2`` is
#: three operations now (an ``exp2``), and the threshold still pays: at the default 30 inductor makes
#: 132 kernels of the two blocks and 45.07 G warp instructions per step at 1024 px, against 127 and
#: 43.60 G at 128 (``benchmarks/kernel_sass.py``, sm_90 code compiled on a CPU; 43.1 against 41.7 ms
#: at the H200's issue rate). ``force_pointwise_cat`` has every
#: concatenation computed element by element where it is read rather than copied into place: FLUX's
#: single block concatenates the attention output with the GELU output and feeds ``proj_out``,
#: whose per-tensor scale needs the maximum of each row; as a point-wise expression the GELU, the
#: concatenation and the row maxima are one kernel, where before the maxima read the whole
#: concatenation again (512 px, per step: 87.5 to 85.9 GB in inductor's kernels, 7,049 to 6,859
#: launches).
#: ``post_grad_custom_pre_pass`` splits a product whose right operand is a concatenation into one
#: product per part (:class:`coatflux.core.passes.SplitConcatenatedOperand`): the single block's
#: backward no longer rebuilds its concatenation for the LoRA gradient of ``proj_out``, and its GELU
#: part is computed in the GELU backward's kernel (46.36 to 43.60 G warp instructions per step at
#: 1024 px, 128 to 127 kernels, by the same count, ``--without-split-pass`` for the first).
COAT_INDUCTOR_OPTIONS: Mapping[str, Any] = {"realize_opcount_threshold": 128, "force_pointwise_cat": True,
                                            "post_grad_custom_pre_pass": SplitConcatenatedOperand()}


def coat_compile_options(compile_options: Mapping[str, Any]) -> dict[str, Any]:
    """``compile_options`` for COAT's blocks: :data:`COAT_INDUCTOR_OPTIONS` under the caller's own
    ``options`` when the backend is inductor (the default); other backends take no inductor options."""
    merged = dict(compile_options)
    if merged.get("backend", "inductor") == "inductor":
        merged["options"] = {**COAT_INDUCTOR_OPTIONS, **(merged.get("options") or {})}
    return merged


#: ``torch.compile`` modes under which inductor replays each compiled graph as a CUDA graph.
CUDAGRAPH_MODES = frozenset({"reduce-overhead", "max-autotune"})


def uses_cudagraphs(compile_options: Mapping[str, Any]) -> bool:
    """Whether graphs compiled with ``compile_options`` replay as CUDA graphs on a GPU.

    Why it matters to a training loop: a compiled step is bound by the host when it launches
    thousands of small kernels (on an H100, a FLUX.1-dev step compiled per block took about 45 us
    per Triton launch, see ``docs/benchmarks-notes.md``); a CUDA graph replays a block's kernels
    with one launch. In exchange the loop must say where a step begins
    (``torch.compiler.cudagraph_mark_step_begin``) and must not keep a graph's outputs, parameter
    gradients included, across the next replay (see the trainer's gradient handling).
    """
    options = compile_options.get("options") or {}
    if "triton.cudagraphs" in options:
        return bool(options["triton.cudagraphs"])
    return compile_options.get("backend", "inductor") == "inductor" and compile_options.get("mode") in CUDAGRAPH_MODES


class PartitioningBackend:
    """A ``torch.compile`` backend that steers how AOTAutograd splits a block into forward and
    backward, then compiles the graph with ``backend`` (a name, as ``torch.compile`` takes it, or a
    backend callable).

    Three levers, all applied while the graph compiles (partitioning happens then, once per graph,
    so the step itself pays nothing): ``partitioner`` overrides ``torch._functorch.config`` (see
    :data:`COAT_PARTITIONER`), and the ops in ``ops`` that feed a GEMM are marked to be recomputed
    in backward (see :data:`COAT_RECOMPUTE`). The mark is the one activation checkpointing leaves
    (``node.meta["recompute"]``), which AOTAutograd copies to the ops it traces from that node and
    its min-cut partitioner honours with any backend built on it (inductor, ``aot_eager``). Chosen
    against wrapping the blocks in ``torch.utils.checkpoint`` with a selective policy, which would
    also put every other op of the block in a checkpoint region, and against inductor's
    ``joint_custom_pre_pass``, which other backends do not run. One instance serves every block
    (see :func:`partitioning_backend`): dynamo compares backends when it reuses a graph.

    ``save_parameter_casts`` marks the other way, ``MUST_SAVE``, each dtype cast of a trainable
    parameter (a LoRA weight, fp32, multiplied in bf16): backward reuses the forward's cast, exact
    (:func:`pack` leaves what is marked so uncompressed), instead of casting again. With
    :data:`COAT_PARTITIONER` the partitioner would recompute those casts, one small kernel each;
    reusing them launches 969 fewer kernels per FLUX.1-dev step at 512 px, 9,063 to 8,094
    (``benchmarks/kernel_launches.py``). The cost is their bf16 bytes for the step, half the
    adapters' fp32 bytes.
    """

    def __init__(self, ops: Iterable[Any], backend: Any = "inductor", mode: str | None = None,
                 options: Mapping[str, Any] | None = None, dynamic: bool | None = None,
                 partitioner: Mapping[str, Any] | None = None, save_parameter_casts: bool = False) -> None:
        self.ops = frozenset(ops)
        self.partitioner = dict(partitioner or {})
        self.save_parameter_casts = save_parameter_casts
        if callable(backend):
            if mode is not None or options:
                raise ValueError("PartitioningBackend: mode and options go with a backend name, not a backend callable")
            self.inner = backend
        elif backend == "inductor":
            self.inner = torch._TorchCompileInductorWrapper(mode, dict(options or {}), dynamic)
        else:
            self.inner = torch._TorchCompileWrapper(backend, mode, dict(options or {}), dynamic)

    def __call__(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Any:
        from torch.utils.checkpoint import CheckpointPolicy

        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in self.ops and _feeds_gemm(node):
                node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
            elif self.save_parameter_casts and _casts_trainable_parameter(node):
                node.meta["recompute"] = CheckpointPolicy.MUST_SAVE
        with torch._functorch.config.patch(**self.partitioner):
            return self.inner(gm, example_inputs)

    def __getattr__(self, name: str) -> Any:  # reset(), get_compiler_config(): dynamo asks the backend
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def _casts_trainable_parameter(node: fx.Node) -> bool:
    """``node`` is ``parameter.to(...)`` of a parameter that requires grad (dynamo's example values
    keep the ``nn.Parameter`` type)."""
    if not (node.op == "call_method" and node.target == "to" and node.args and isinstance(node.args[0], fx.Node)):
        return False
    value = node.args[0].meta.get("example_value")
    return isinstance(value, nn.Parameter) and value.requires_grad


_GEMMS = (torch.matmul, operator.matmul, torch.mm, torch.addmm, torch.bmm, torch.nn.functional.linear)
_RESHAPES = ("reshape", "view", "flatten", "contiguous", "to")


def _feeds_gemm(node: fx.Node, depth: int = 3) -> bool:
    """Whether ``node``'s value is a GEMM operand (a linear's input), directly or through reshapes.

    Only such ops are recomputed: backward has to materialise a GEMM operand anyway, which is why
    the partitioner stores it. FLUX's double blocks also concatenate (text and image queries, keys
    and values along the tokens); those feed attention, and marking them stored 24 MiB more per
    double block (``benchmarks/flux_block_memory.py``).
    """
    for user in node.users:
        if user.op == "call_function" and user.target in _GEMMS:
            return True
        if depth and user.op == "call_method" and user.target in _RESHAPES and _feeds_gemm(user, depth - 1):
            return True
        if _multiplied_inside(user, node, depth):
            return True
    return False


def _multiplied_inside(user: fx.Node, node: fx.Node, depth: int) -> bool:
    """Whether ``user`` applies an ``autograd.Function`` whose forward multiplies ``node``.

    Dynamo traces ``Function.apply`` as one ``autograd_function_apply`` node whose first argument
    names its forward graph and whose operands follow, one placeholder of that graph each (torch
    2.11 and 2.13). The FP8 linear of a compiled block is such a function
    (:class:`~coatflux.core.linear._TracedFP8Function`): its adapter's down-projection multiplies
    the input inside it.
    """
    apply = getattr(torch.ops.higher_order, "autograd_function_apply", None)
    if apply is None or user.op != "call_function" or user.target is not apply:
        return False
    forward = getattr(user.graph.owning_module, str(user.args[0].target), None)
    if not isinstance(forward, fx.GraphModule):
        return False
    operands = user.args[2:]
    placeholders = [p for p in forward.graph.nodes if p.op == "placeholder"]
    if len(placeholders) != len(operands):
        return False
    return any(operand is node and _feeds_gemm(p, depth) for operand, p in zip(operands, placeholders, strict=True))


@functools.cache
def _shared_backend(ops: tuple[Any, ...], backend: Any, mode: str | None, options: tuple[tuple[str, Any], ...],
                    dynamic: bool | None, partitioner: tuple[tuple[str, Any], ...],
                    save_parameter_casts: bool) -> PartitioningBackend:
    return PartitioningBackend(ops, backend, mode, dict(options), dynamic, dict(partitioner), save_parameter_casts)


def partitioning_backend(ops: Iterable[Any], backend: Any = "inductor", mode: str | None = None,
                         options: Mapping[str, Any] | None = None, dynamic: bool | None = None,
                         partitioner: Mapping[str, Any] | None = None,
                         save_parameter_casts: bool = False) -> PartitioningBackend:
    """The :class:`PartitioningBackend` for these arguments, one instance per distinct set of them."""
    return _shared_backend(tuple(ops), backend, mode, tuple(sorted((options or {}).items())), dynamic,
                           tuple(sorted((partitioner or {}).items())), save_parameter_casts)


def compile_module(module: nn.Module, partitioner: Mapping[str, Any] | None = None,
                   recompute: Iterable[Any] = (), save_parameter_casts: bool = False,
                   **compile_kwargs: Any) -> None:
    """``module.compile(**compile_kwargs)``, tracing every Python float it reads as a constant.

    Why: with dynamic shapes (``dynamic=True``, ai-toolkit's ``compile_dynamic`` default) dynamo
    first traces a module's Python floats -- the norms' ``eps``, dropout's ``p``, the LoRA scale --
    as symbolic inputs, finds after the whole trace that the operators need them as numbers, and
    traces the module a second time with them fixed. Those floats are constants of the model, so
    they are taken as constants from the start (a changed value fails a guard and recompiles, as
    any constant does); sizes stay dynamic. Dynamo's config patch is thread-local and lasts for
    each call only. It wraps the callable that ``nn.Module.compile`` keeps on the module: this is
    the one place that slot is touched. ``partitioner`` (``torch._functorch.config`` keys) and
    ``recompute`` (ops backward recomputes rather than stores) and ``save_parameter_casts`` steer the
    forward/backward split through :func:`partitioning_backend`, which takes the ``backend``,
    ``mode`` and ``options`` given.
    """
    recompute = tuple(recompute)
    if partitioner or recompute or save_parameter_casts:
        backend_args = {key: compile_kwargs.pop(key) for key in ("backend", "mode", "options") if key in compile_kwargs}
        compile_kwargs["backend"] = partitioning_backend(recompute, dynamic=compile_kwargs.get("dynamic"),
                                                         partitioner=partitioner,
                                                         save_parameter_casts=save_parameter_casts, **backend_args)
    module.compile(**compile_kwargs)
    module._compiled_call_impl = torch._dynamo.config.patch(specialize_float=True)(module._compiled_call_impl)


class UniformStreamInputs:
    """Forward pre-hook that gives every block of a class residual-stream inputs with equal guards.

    Why: dynamo guards a compiled graph on each input's ``requires_grad`` and strides. In FLUX the
    first double block's inputs come from frozen embedders (no grad) and every later one's from a
    block (grad), and the first single block gets contiguous tensors where the later ones get
    views into the previous block's joint sequence (another batch stride, even at batch 1). Each
    difference compiles the whole block a second time: four graphs instead of two, and the
    compile time of COAT's blocks is the largest fixed cost of a run.

    What it does, only while autograd records, whether the block is called with keywords (as
    diffusers' FLUX does) or positionally (as gradient checkpointing does): a stream input that
    does not require grad becomes a detached leaf that does (the price: one input-gradient GEMM
    per linear of the first block of each class, computed and dropped), and a stream input laid
    out unlike a fresh tensor is made so: a view of the same memory when only size-1 dimensions
    differ (squeeze and unsqueeze), else a contiguous copy. Values are untouched. Chosen against
    ``torch._dynamo.mark_dynamic`` and ``dynamic=True``, which relax sizes, not strides or
    ``requires_grad``.
    """

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self._positions: dict[type, frozenset[int]] = {}  # per block class: indices of the stream arguments

    def attach(self, block: nn.Module) -> None:
        """Register on ``block`` once (idempotent: a second call leaves the first hook)."""
        if self.names and not getattr(block, "_coatflux_uniform_inputs", False):
            block.register_forward_pre_hook(self, with_kwargs=True)
            block._coatflux_uniform_inputs = True

    @torch.compiler.disable
    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        # Runs before the compiled frame's guards (``nn.Module.compile`` compiles the hooks with
        # the forward; disabled, this hook ends the empty graph before the block's).
        if not torch.is_grad_enabled():
            return None
        positions = self._stream_positions(type(module))
        args = tuple(_uniform(value) if i in positions else value for i, value in enumerate(args))
        kwargs = {key: _uniform(value) if key in self.names else value for key, value in kwargs.items()}
        return args, kwargs

    def _stream_positions(self, block_class: type) -> frozenset[int]:
        """Where the stream arguments sit when the block is called positionally (as gradient
        checkpointing calls it)."""
        if block_class not in self._positions:
            parameters = list(inspect.signature(block_class.forward).parameters)[1:]  # without self
            self._positions[block_class] = frozenset(i for i, name in enumerate(parameters) if name in self.names)
        return self._positions[block_class]


def _uniform(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return uniform_stream_tensor(value)
    return value


def uniform_stream_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` with a fresh tensor's strides and ``requires_grad`` (see :class:`UniformStreamInputs`)."""
    if tensor.stride() != _contiguous_strides(tensor.shape):
        if tensor.is_contiguous():  # only size-1 dimensions have other strides: re-view, no copy
            for dim in (d for d, size in enumerate(tensor.shape) if size == 1):
                tensor = tensor.squeeze(dim).unsqueeze(dim)
        else:
            tensor = tensor.contiguous()
    if not tensor.requires_grad:
        tensor = tensor.detach().requires_grad_()
    return tensor


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))
