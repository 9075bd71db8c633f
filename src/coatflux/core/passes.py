"""A graph rewrite inductor applies to COAT's compiled blocks: a product with a concatenation as
its right operand becomes one product per part.

What: :class:`SplitConcatenatedOperand` is an inductor post-grad pass (it runs on the forward and
the backward graph of each compiled block, after AOTAutograd has partitioned them). It rewrites

    mm(G, reshape(cat([p_1, ..., p_n], dim=-1), [-1, K]))

into ``cat([mm(G, reshape(p_1, [-1, k_1])), ..., mm(G, reshape(p_n, [-1, k_n]))], dim=1)``, the
same values column by column, where the concatenation is read by that product alone.

Why: FLUX's single block feeds ``proj_out`` with ``cat([attention output, GELU output])``, and
the LoRA gradient of ``proj_out``'s down-projection is ``grad_h^T @ that concatenation``. COAT's
partitioner stores the parts, not the concatenation (:data:`coatflux.core.compiled.COAT_RECOMPUTE`),
so backward rebuilt it: a kernel that decoded the FP8 GELU input, applied the GELU and copied the
attention output into a bf16 buffer 15,360 columns wide. In ``benchmarks/kernel_sass.py``'s count of
a FLUX.1-dev step at 1024 px the split saves 2.76 G of 46.36 G warp instructions and one kernel,
and the H200 profile of 2026-11-27 06:10 timed the concatenation's kernel at 4.8 ms a step. Split, the
attention part is multiplied where it lies, and the GELU part is computed over the same elements as
the GELU backward, which reads the same FP8 input.

What we chose against: rewriting the joint graph before partitioning, which would reach the
``aot_eager`` backend too but changes what the partitioner decides to store; after partitioning the
rewrite only changes how backward computes what it already had. A change to FLUX's forward
(``proj_out`` applied per part) would need the block's code replaced. The pass touches only the
pattern above, with static part widths; anything else is left as it was.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

_aten = torch.ops.aten
_RESHAPES = (_aten.reshape.default, _aten.view.default, _aten._unsafe_view.default)


class SplitConcatenatedOperand(CustomGraphPass):
    """Inductor's ``post_grad_custom_pre_pass`` for COAT's blocks (see the module docstring).

    ``uuid`` is this file's hash, so that inductor's graph cache keys on the pass's code.
    """

    def __call__(self, graph: fx.Graph) -> None:
        products = list(graph.find_nodes(op="call_function", target=_aten.mm.default))  # the graph changes below
        if sum(split_concatenated_operand(graph, mm) for mm in products):
            graph.eliminate_dead_code()  # the concatenation and its reshape, now unread

    def uuid(self) -> Any:
        return get_hash_for_files((__file__,))


def split_concatenated_operand(graph: fx.Graph, mm: fx.Node) -> bool:
    """Rewrite ``mm`` as one product per part of its right operand's concatenation; whether it did."""
    parts = _concatenated_parts(mm)
    if parts is None:
        return False
    left = mm.args[0]
    with graph.inserting_before(mm), _fake_mode(parts[0]):
        products = []
        for part in parts:
            width = part.meta["val"].shape[-1]
            rows = _call(graph, _aten.reshape.default, part, [-1, width])
            products.append(_call(graph, _aten.mm.default, left, rows))
        joined = _call(graph, _aten.cat.default, products, 1)
    mm.replace_all_uses_with(joined)
    graph.erase_node(mm)
    return True


def _concatenated_parts(mm: fx.Node) -> list[fx.Node] | None:
    """The parts of ``mm``'s right operand, where it is the 2-D reshape of a concatenation along the
    last dimension read by nothing else, with static part widths; else None."""
    right = mm.args[1]
    if not (isinstance(right, fx.Node) and right.target in _RESHAPES and len(right.users) == 1):
        return None
    cat = right.args[0]
    if not (isinstance(cat, fx.Node) and cat.target is _aten.cat.default and len(cat.users) == 1):
        return None
    parts = cat.args[0]
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    joined, flat = cat.meta.get("val"), right.meta.get("val")
    if joined is None or flat is None or flat.dim() != 2 or dim % joined.dim() != joined.dim() - 1:
        return None
    widths = [part.meta["val"].shape[-1] if "val" in part.meta else None for part in parts]
    if len(parts) < 2 or not all(isinstance(width, int) for width in widths):
        return None
    if not isinstance(flat.shape[1], int) or flat.shape[1] != sum(widths):  # the reshape keeps the last dimension
        return None
    return list(parts)


def _fake_mode(node: fx.Node) -> Any:
    """The fake mode of ``node``'s example value, in which the new nodes' values are computed (a
    graph traced with real example values has none: they are computed as they are)."""
    from torch._guards import detect_fake_mode

    mode = detect_fake_mode([node.meta["val"]])
    return mode if mode is not None else contextlib.nullcontext()


def _call(graph: fx.Graph, target: Any, *args: Any) -> fx.Node:
    """A new node ``target(*args)`` with its example value, as inductor's lowering reads it."""
    node = graph.call_function(target, args)
    node.meta["val"] = target(*fx.node.map_arg(args, lambda arg: arg.meta["val"]))
    return node
