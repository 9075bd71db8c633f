"""Kernel launches of FLUX.1-dev's compiled blocks, counted in inductor's generated GPU code on a CPU.

What: builds one double and one single block of the FLUX.1-dev architecture (hidden 3072, random
weights, the bench's rank-16 LoRA), compiles them as ``bf16-compiled`` or ``coat-compiled`` do, runs
one forward and backward at the given resolution, and reads the wrapper code inductor generates
for each graph: the Triton kernels it launches and the extern calls (cuBLAS GEMMs,
``torch._scaled_mm``, attention). It prints them per graph, per block class and summed over
FLUX.1-dev's 19 double and 38 single blocks, with the inductor settings each recipe compiles its
blocks with (:data:`coatflux.core.compiled.COAT_INDUCTOR_OPTIONS` for COAT). ``--plain-below R`` gives every FP8 linear the row
plan "plain below R rows, FP8 from R" (what ``GemmPlanner.row_plan`` measures on a GPU), so the
launches a plan saves can be counted too.

Why: on the H100 the compiled COAT step at 512 px took 0.447 s against 0.216 s for compiled bf16,
while the CPU's host-time proxy (``host_overhead.py``) put their host work within 1.2x of each
other. On a CPU inductor emits C++ loops whose calls cost little; on a GPU every Triton kernel is
a launch with its own host cost and a few microseconds of GPU time however small it is. This
counts the launches a GPU would get, without a GPU.

How: inductor can write Triton code for CPU tensors (``cpu_backend="triton"``); generating it needs
Triton installed (``pip install triton``) and asks Triton's active driver for a target, which a
machine without a GPU lacks. The script answers that one question itself (``_generate_only``) and
lets each graph's compilation fail after the code is generated, running the graph eagerly
instead. The counts are of the code inductor writes for a CPU device: its heuristics read the
device's properties (2 "SMs" here), so a GPU's split reductions may add a few kernels; and for a
CPU device inductor stores a reused ``tanh``, ``exp`` or ``sigmoid`` rather than recomputing it
(``StorageBox.should_realize_on_reuse``), which a GPU compile does not. Not a time: a launch count.

It also sums inductor's own estimate of the bytes each scheduled node reads and writes
(``get_read_write_buffers_sizes``, the model its scheduler ranks fusions with), for its generated
kernels and for the extern calls apart. On an H100 at 1024 px (2026-11-27) the compiled step was
GPU-bound with CUDA graphs and inductor's kernels took 105 ms of it: their bytes over the card's
memory bandwidth bound that time from below, and the difference between the recipes' bytes is
what COAT's quantization and compression cost in memory traffic.

    pip install triton
    python benchmarks/kernel_launches.py [--resolution 512] [--recipes bf16-compiled coat-compiled]
                                         [--plain-below 2048] [--top 20]

``--top N`` lists, per graph, the N scheduled nodes (a generated kernel or an extern call) that move
the most bytes, with the aten ops each was made from: where a recipe's extra bytes come from.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import re
import sys
import warnings
from collections.abc import Callable

import torch

from coatflux.bench.model import FLUX_DEV_CONFIG, Preset, build_transformer, loss_of, make_batch
from coatflux.core.compiled import compile_blocks
from coatflux.flux.lora import find_lora_targets, inject_lora

RECIPES = ("bf16-compiled", "coat-compiled")


def _generate_only() -> list[str]:
    """Have inductor write Triton code on a CPU; returns the list each graph's wrapper code goes to."""
    import torch._inductor.config as inductor_config
    import torch.utils._triton as triton_utils
    from torch._inductor import graph as inductor_graph

    inductor_config.cpu_backend = "triton"
    inductor_config.compile_threads = 1
    triton_utils.triton_backend = lambda: None  # the active driver's target: none without a GPU
    triton_utils.triton_hash_with_backend = lambda: "generate-only"
    codes: list[str] = []
    codegen = inductor_graph.GraphLowering.codegen

    def keep(self: inductor_graph.GraphLowering) -> tuple:
        out = codegen(self)
        codes.append(getattr(out[0], "value", str(out[0])) + _bytes_comment(self))
        return out

    inductor_graph.GraphLowering.codegen = keep
    return codes


def _bytes_comment(graph: object) -> str:
    """Inductor's own estimate of the bytes each scheduled node reads and writes (its bandwidth model,
    at the compile-time sizes), as trailing comments of the graph's code: one
    ``# node: <bytes> <kernel|extern> <aten ops it was made from>`` line per scheduled node, then
    the sums for the generated kernels and for the extern calls, ``# bytes: <kernels> <extern>``."""
    from torch._inductor.scheduler import ExternKernelSchedulerNode

    kernels = extern = 0
    lines = []
    for node in graph.scheduler.nodes:
        size = node.get_read_write_buffers_sizes()
        is_extern = isinstance(node, ExternKernelSchedulerNode)
        if is_extern:
            extern += size
        else:
            kernels += size
        lines.append(f"# node: {size} {'extern' if is_extern else 'kernel'} {' '.join(_origins(node))}")
    return "\n" + "\n".join(lines) + f"\n# bytes: {kernels} {extern}\n"


def _origins(node: object) -> list[str]:
    """The aten ops a scheduled (possibly fused) node was made from, without overload names."""
    ops = set()
    for part in node.get_nodes():
        for origin in getattr(getattr(part, "node", None), "origins", ()):
            if origin.op == "call_function":
                ops.add(str(origin.target).removeprefix("aten.").removeprefix("prims.").split(".")[0])
    return sorted(ops)


def _backend(codes: list[str], options: dict) -> Callable:
    """AOTAutograd with inductor's decompositions and partitioner; each graph's code generated (with
    inductor ``options``), then run eagerly."""
    from functorch.compile import min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func
    from torch._inductor.compile_fx import compile_fx_inner
    from torch._inductor.decomposition import select_decomp_table

    def compiler(gm: torch.fx.GraphModule, inputs: list) -> Callable:
        written = len(codes)
        try:
            with torch._inductor.config.patch(options):
                compile_fx_inner(gm, inputs)
        except Exception:
            if len(codes) == written:  # failed before its code was written: a real error
                raise
            # else loading the Triton kernels failed, as it must without a GPU: the code is what we want
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=compiler, bw_compiler=compiler, decompositions=select_decomp_table(),
                        partition_fn=min_cut_rematerialization_partition)


def _run(recipe: str, resolution: int, plain_below: int | None, codes: list[str],
         coat_options: dict | None = None) -> None:
    """One forward and backward of the recipe's model; ``coat_options`` override COAT's inductor options."""
    from coatflux.core.api import apply_coat
    from coatflux.core.config import ActivationConfig, COATConfig
    from coatflux.core.linear import FP8Linear

    preset = Preset("blocks", {**FLUX_DEV_CONFIG, "num_layers": 1, "num_single_layers": 1}, 512, ())
    model = build_transformer(preset, "cpu").requires_grad_(False)
    from coatflux.core.compiled import coat_compile_options

    inductor_options = coat_compile_options({"options": coat_options or {}})["options"] \
        if recipe == "coat-compiled" else {}
    options = {"backend": _backend(codes, inductor_options), "dynamic": True}
    if recipe == "coat-compiled":
        apply_coat(model, COATConfig(activation=ActivationConfig(compile_blocks=True)), compile_options=options)
        for layer in model.modules():
            if isinstance(layer, FP8Linear):  # as on an FP8 GPU: torch._scaled_mm in the graph
                layer.fp8_gemm_in_graph = True
                layer.row_plan = None if plain_below is None else ((1, False), (plain_below, True))
    inject_lora(model, 16, 16.0, find_lora_targets(model))
    if recipe == "bf16-compiled":
        compile_blocks(model, **options)
    batch = make_batch(preset, resolution, 1, "cpu")
    loss_of(model, batch).backward()


def _count(code: str) -> tuple[int, int]:
    call = code[code.find("def call("):]
    launches = len(re.findall(r"^\s+triton_\w+\.run\(", call, re.M))
    # extern_kernels.mm(...), and operators called by name: torch.ops.aten._scaled_dot_product_...default(...)
    extern = len(re.findall(r"^\s+(?:\w+ = )?(?:extern_kernels\.\w+|torch\.ops\.\w+\.\w+(?:\.\w+)?)\(", call, re.M))
    return launches, extern


def _bytes(code: str) -> tuple[int, int]:
    kernels, extern = re.findall(r"^# bytes: (\d+) (\d+)$", code, re.M)[-1]
    return int(kernels), int(extern)


def _top_nodes(code: str, count: int) -> list[str]:
    """The ``count`` scheduled nodes of a graph that move the most bytes, as printable lines."""
    nodes = [(int(size), kind, ops) for size, kind, ops in re.findall(r"^# node: (\d+) (\w+) ?(.*)$", code, re.M)]
    nodes.sort(key=lambda node: -node[0])
    return [f"  {size / 1e6:8.1f} MB  {kind:6s}  {ops}" for size, kind, ops in nodes[:count]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--recipes", nargs="+", choices=RECIPES, default=RECIPES)
    parser.add_argument("--plain-below", type=int, default=None,
                        help="coat-compiled: every FP8 linear multiplies plainly below this many rows")
    parser.add_argument("--top", type=int, default=0, metavar="N",
                        help="also list each graph's N scheduled nodes that move the most bytes, with their aten ops")
    args = parser.parse_args()
    if importlib.util.find_spec("triton") is None:
        sys.exit("kernel_launches: needs Triton to generate inductor's GPU code (pip install triton)")
    codes = _generate_only()
    print(f"kernel_launches: {platform.machine()}, torch {torch.__version__}, FLUX.1-dev width, LoRA rank 16, "
          f"{args.resolution} px, batch 1, 512 text tokens, dynamic shapes; plain below "
          f"{args.plain_below or '-'} rows")
    doubles, singles = FLUX_DEV_CONFIG["num_layers"], FLUX_DEV_CONFIG["num_single_layers"]
    for recipe in args.recipes:
        start = len(codes)
        torch._dynamo.reset()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "FP8 GEMMs need a CUDA GPU", diffusers' float32 note
            _run(recipe, args.resolution, args.plain_below, codes)
        generated = codes[start:]
        graphs = [_count(code) for code in generated]
        # compiled in call order: the double block's forward and backward, then the single block's
        # (attention's backward marks a backward graph; the double block, two streams, calls more GEMMs)
        order = [("_backward" in code) == (i % 2 == 1) for i, code in enumerate(generated)]
        if len(graphs) != 4 or not all(order) or graphs[0][1] <= graphs[2][1]:
            sys.exit(f"kernel_launches: {recipe} compiled {len(graphs)} graphs, expected the double block's "
                     "forward and backward, then the single block's")
        (df, dfx), (db, dbx), (sf, sfx), (sb, sbx) = graphs
        step = doubles * (df + db) + singles * (sf + sb)
        step_extern = doubles * (dfx + dbx) + singles * (sfx + sbx)
        print(f"{recipe:14s} double block: {df} + {db} Triton launches (forward + backward), {dfx} + {dbx} extern; "
              f"single block: {sf} + {sb}, {sfx} + {sbx} extern; per step ({doubles} + {singles} blocks): "
              f"{step} Triton launches, {step_extern} extern calls")
        moved = [_bytes(code) for code in generated]
        per_block = [doubles if i < 2 else singles for i in range(4)]
        kernel_gb = sum(n * k for n, (k, _) in zip(per_block, moved, strict=True)) / 1e9
        extern_gb = sum(n * e for n, (_, e) in zip(per_block, moved, strict=True)) / 1e9
        print(f"{recipe:14s} bytes read + written per step by inductor's estimate: {kernel_gb:.1f} GB in its "
              f"generated kernels, {extern_gb:.1f} GB in extern calls (GEMMs, attention)")
        for name, code in zip(("double forward", "double backward", "single forward", "single backward"),
                              generated, strict=True):
            if args.top:
                print(f"{recipe} {name}, the {args.top} nodes that move the most bytes:")
                print("\n".join(_top_nodes(code, args.top)))


if __name__ == "__main__":
    main()
