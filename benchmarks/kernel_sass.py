"""Instructions per element of the Triton kernels of FLUX.1-dev's compiled blocks, compiled for a Hopper GPU on a CPU.

What: generates inductor's Triton code for one double and one single block of FLUX.1-dev (as
``kernel_launches.py`` does: hidden 3072, random weights, the bench's rank-16 LoRA, one forward
and backward), compiles each kernel with Triton's own compiler and bundled ``ptxas`` for
``sm_90`` (H100/H200) and disassembles it with the bundled ``cuobjdump``. For each kernel it
counts the SASS instructions one element costs (the instructions of its loop body, or of the whole
kernel where it has no loop, over the elements one thread handles in them), multiplies by the
elements of each call at the given resolution and sums over FLUX.1-dev's 19 double and 38 single
blocks: the warp instructions a step issues in inductor's kernels, and the time they take at
``--sms`` streaming multiprocessors issuing one warp instruction per cycle per scheduler (four per
SM) at ``--clock-ghz``.

Why: on the H200 (2026-11-27 06:10) the compiled COAT step spent 101 ms in inductor's kernels
against 55 ms for compiled bf16, while the bytes they move bound that time from below at about a
quarter of it. The single block's GELU backward took 0.37 ms per call for some 290 MB, about five
times its bandwidth bound: if the kernels are limited by the instructions they issue, a CPU can
count them. Not a time: what the instructions would take at the full issue rate (no stall, no
memory wait, no launch), to compare formulations of the same kernel and to rank kernels before
GPU time is spent on them. Counted with the GPU image's inductor (torch 2.11.0, Triton 3.6.0) on
the code of the H200 run of 2026-11-27 06:10, that run's profile took 1.39x the count over all of
inductor's kernels (100.6 against 72.6 ms) and 0.71x to 3.2x it in seven of the largest
(``docs/benchmarks-notes.md``): neither a bound nor a prediction of any one kernel.

How, and what it does not see: the code is what inductor writes for a CPU device
(``cpu_backend="triton"``). A GPU autotunes among the configurations inductor's heuristics offer
(block sizes, warps); this counts each and takes the least. Inductor also stores a reused
``tanh`` for a CPU device where a GPU recomputes it (see ``kernel_launches.py``). The loop body
is the longest backward branch's range; a kernel whose loop ``ptxas`` unrolled counts as having
none. Each kernel is compiled with the alignment hints inductor passes to Triton
(``tt.divisibility`` of its pointers and sizes), as on a GPU: without them Triton cannot prove a
load aligned, and, for one, lays each group of 16 of a per-group quantizer over 16 threads instead
of one thread's registers (64 against 28 instructions per element; counts before 2026-11-27 21:00
were made without the hints and are higher, 67.35 G against 48.78 G for the same COAT step).

    pip install triton
    python benchmarks/kernel_sass.py [--resolution 1024] [--recipes coat-compiled bf16-compiled] [--top 15]
        [--coat-option realize_opcount_threshold=30] [--pow2 product] [--without-split-pass]

The last three count a variant of COAT's code or options, one change at a time against the default.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import re
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from coatflux.bench.model import FLUX_DEV_CONFIG
from kernel_launches import RECIPES, _generate_only, _run
from pow2_formulations import FORMULATIONS, formulation

GRAPHS = ("double forward", "double backward", "single forward", "single backward")
_BLOCK_KEYS = ("XBLOCK", "YBLOCK", "R0_BLOCK")


@dataclass
class Kernel:
    name: str
    per_element: float  # SASS instructions per element
    looped: bool
    elements: int  # per block, summed over its calls
    calls: int
    registers: int  # per thread, of the configuration counted
    threads: int  # per program (thread block), of the configuration counted


def kernel_sources(code: str) -> dict[str, str]:
    """The Triton source of each kernel defined in a graph's wrapper code, by name."""
    pattern = r"^(\w+) = async_compile\.triton\('\w+', '''(.*?)''', device_str='\w+'\)"
    return {m.group(1): m.group(2) for m in re.finditer(pattern, code, re.M | re.S)}


def _load(name: str, source: str, folder: Path) -> object:
    """The kernel's CachingAutotuner: Triton's ``@jit`` wants its function in a file."""
    path = folder / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def source_arguments(tuner: object, config: object) -> dict:
    """``triton.compiler.ASTSource``'s arguments for the tuner's kernel in this configuration, as
    inductor gives them when it compiles for a GPU: the configuration's block sizes as constants,
    and the alignment hints (``tt.divisibility`` of pointers and sizes) of ``triton_meta``, without
    which the count comes out too high (see the module docstring)."""
    fn = tuner.fn
    signature = dict(tuner.triton_meta["signature"])
    constants = {**tuner.triton_meta.get("constants", {}), **config.kwargs}
    for arg in fn.arg_names:
        if arg in constants or arg not in signature:
            signature[arg] = "constexpr"
    return {"fn": fn, "signature": signature, "attrs": (tuner.triton_meta.get("configs") or [{}])[0],
            "constexprs": {(fn.arg_names.index(k),): v for k, v in constants.items() if k in fn.arg_names}}


def _sass(tuner: object, config: object, tools: Path) -> tuple[list[tuple[int, str]], int]:
    """``([(address, instruction)], registers per thread)`` of the tuner's kernel in this configuration, on sm_90."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(**source_arguments(tuner, config))
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        listing = subprocess.run([str(tools / "cuobjdump"), "-sass", cubin.name], capture_output=True, text=True,
                                 check=True).stdout
        usage = subprocess.run([str(tools / "cuobjdump"), "-res-usage", cubin.name], capture_output=True, text=True,
                               check=True).stdout
    instructions = [(int(a, 16), op) for a, op in re.findall(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", listing, re.M)]
    return instructions, int(re.search(r"REG:(\d+)", usage).group(1))


def _loop_body(instructions: list[tuple[int, str]]) -> list[tuple[int, str]] | None:
    """The instructions of the longest loop: from a backward branch's target to the branch."""
    best = None
    for address, op in instructions:
        target = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", op)
        if target and int(target.group(1), 16) < address:
            body = [i for i in instructions if int(target.group(1), 16) <= i[0] <= address]
            if best is None or len(body) > len(best):
                best = body
    return best


def per_element(name: str, source: str, tuner: object, tools: Path) -> tuple[float, bool, int, int]:
    """SASS instructions one element costs in this kernel, whether they were counted in a loop, and
    the registers per thread and threads per program of the configuration counted.

    The least over the configurations inductor's heuristics offer: a GPU autotunes among them (a
    CPU device takes the first), and the cheapest in instructions is the likeliest winner.
    """
    fixed_blocks = re.findall(r"^\s+(R0_BLOCK|XBLOCK|YBLOCK): tl\.constexpr = (\d+)$", source, re.M)
    fixed_rows = re.search(r"^\s+r0_numel = (\d+)$", source, re.M)
    costs = []
    for config in tuner.configs:
        instructions, registers = _sass(tuner, config, tools)
        blocks = {**config.kwargs, **{key: int(size) for key, size in fixed_blocks}}  # a persistent R0_BLOCK
        per_program = 1
        for key in _BLOCK_KEYS:
            per_program *= blocks.get(key, 1)
        body = _loop_body(instructions)
        if body is None and name.startswith("triton_red"):  # a loop ptxas unrolled: the program covers whole rows
            per_program = blocks.get("XBLOCK", 1) * (int(fixed_rows.group(1)) if fixed_rows else blocks.get("R0_BLOCK", 1))
        counted = body if body is not None else instructions
        costs.append((len(counted) * 32 * config.num_warps / per_program, body is not None, registers,
                      32 * config.num_warps))
    return min(costs)


def call_elements(code: str) -> dict[str, tuple[int, int]]:
    """``{kernel: (elements over its calls, calls)}`` from the wrapper's ``.run`` arguments.

    A launch's last positional arguments are its element counts, one per ``*numel`` parameter of
    the kernel (y, x, reduction): integers, expressions of the graph's size symbols (whose values
    ``_hints`` recorded), or variables the wrapper assigned from them.
    """
    call = code[code.find("def call("):]
    names = {sym: int(value) for sym, value in re.findall(r"^# hint: (\w+) (\d+)$", code, re.M)}
    for var, expr in re.findall(r"^\s+(\w+numel) = (.+)$", call, re.M):
        names[var] = _evaluate(expr, names)
    dims = {name: len(re.findall(r"\b\w*numel\b", re.search(r"def \w+\((.*?)\)\s*:", source, re.S).group(1)))
            for name, source in kernel_sources(code).items()}
    totals: dict[str, tuple[int, int]] = {}
    for kernel, args in re.findall(r"^\s+(triton_\w+)\.run\((.*)\)$", call, re.M):
        positional = [a.strip() for a in args.split(",") if "=" not in a]
        count = 1
        for numel in positional[len(positional) - dims[kernel]:]:
            count *= _evaluate(numel, names)
        elements, calls = totals.get(kernel, (0, 0))
        totals[kernel] = (elements + count, calls + 1)
    return totals


def _evaluate(expr: str, names: dict[str, int]) -> int:
    return int(eval(expr, {"__builtins__": {}}, names))  # inductor's own size expressions, no builtins


def _hints() -> None:
    """Have each graph's code end with ``# hint: <symbol> <value>`` lines: its size symbols' values."""
    from torch._inductor import graph as inductor_graph

    codegen = inductor_graph.GraphLowering.codegen

    def with_hints(self: inductor_graph.GraphLowering) -> tuple:
        out = codegen(self)
        hints = "".join(f"\n# hint: {sym} {val}" for sym, val in self.sizevars.shape_env.var_to_val.items())
        out[0].value += hints + "\n"
        return out

    inductor_graph.GraphLowering.codegen = with_hints


def analyse(code: str, folder: Path, tools: Path) -> list[Kernel]:
    launches = call_elements(code)
    kernels = []
    for name, source in kernel_sources(code).items():
        cost, looped, registers, threads = per_element(name, source, _load(name, source, folder), tools)
        elements, calls = launches.get(name, (0, 0))
        kernels.append(Kernel(name, cost, looped, elements, calls, registers, threads))
    return kernels


def _coat_options(pairs: list[str], parser: argparse.ArgumentParser) -> dict[str, int]:
    """``NAME=INT`` entries that replace COAT's inductor options (:data:`COAT_INDUCTOR_OPTIONS`) here."""
    from coatflux.core.compiled import COAT_INDUCTOR_OPTIONS

    numeric = sorted(name for name, value in COAT_INDUCTOR_OPTIONS.items() if isinstance(value, int))  # not the pass
    options = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in numeric or not value.lstrip("-").isdigit():
            parser.error(f"--coat-option {pair!r}: expected NAME=INT with NAME one of {numeric}")
        options[name] = int(value)
    if options:
        print(f"kernel_sass: COAT's inductor options {dict(COAT_INDUCTOR_OPTIONS)}, here with {options}")
    return options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--recipes", nargs="+", choices=RECIPES, default=["coat-compiled"])
    parser.add_argument("--top", type=int, default=12, help="list the N kernels that issue the most per step")
    parser.add_argument("--sms", type=int, default=132, help="streaming multiprocessors (H100 SXM and H200: 132)")
    parser.add_argument("--clock-ghz", type=float, default=1.98, help="SM clock (H100 SXM and H200 boost: 1.98)")
    parser.add_argument("--coat-option", action="append", default=[], metavar="NAME=INT",
                        help="replace one of core.compiled.COAT_INDUCTOR_OPTIONS in this count, e.g. "
                             "realize_opcount_threshold=30 (repeatable)")
    parser.add_argument("--pow2", choices=sorted(FORMULATIONS), default="exp2",
                        help="how the per-group scales' powers of two are computed (benchmarks/pow2_formulations.py)")
    parser.add_argument("--without-split-pass", action="store_true",
                        help="compile COAT's blocks without core.passes.SplitConcatenatedOperand")
    args = parser.parse_args()
    coat_options = _coat_options(args.coat_option, parser)
    if args.without_split_pass:
        coat_options["post_grad_custom_pre_pass"] = None
    if importlib.util.find_spec("triton") is None:
        sys.exit("kernel_sass: needs Triton to generate and compile inductor's GPU code (pip install triton)")
    import triton

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    _hints()  # before _generate_only wraps codegen, so the code it keeps carries the hints
    codes = _generate_only()
    issue_rate = args.sms * 4 * args.clock_ghz * 1e9
    print(f"kernel_sass: {platform.machine()}, torch {torch.__version__}, Triton {triton.__version__} for sm_90, "
          f"FLUX.1-dev width, LoRA rank 16, {args.resolution} px, batch 1; issue rate of {args.sms} SMs x 4 "
          f"schedulers x {args.clock_ghz} GHz; COAT's _pow2: {args.pow2}"
          f"{', without the split pass' if args.without_split_pass else ''}")
    per_block = {"double": FLUX_DEV_CONFIG["num_layers"], "single": FLUX_DEV_CONFIG["num_single_layers"]}
    with tempfile.TemporaryDirectory() as scratch, formulation(FORMULATIONS[args.pow2]):
        for recipe in args.recipes:
            start = len(codes)
            torch._dynamo.reset()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _run(recipe, args.resolution, None, codes, coat_options)
            generated = codes[start:]
            if len(generated) != len(GRAPHS):
                sys.exit(f"kernel_sass: {recipe} compiled {len(generated)} graphs, expected {len(GRAPHS)}")
            rows = []
            for graph, code in zip(GRAPHS, generated, strict=True):
                blocks = per_block[graph.split()[0]]
                for kernel in analyse(code, Path(scratch), tools):
                    rows.append((kernel.per_element * kernel.elements * blocks / 32, graph, blocks, kernel))
            total = sum(row[0] for row in rows)
            print(f"{recipe}: {total / 1e9:.2f} G warp instructions per step in {len(rows)} kernels: "
                  f"{total / issue_rate * 1e3:.1f} ms at the issue rate")
            rows.sort(key=lambda row: -row[0])
            for warp_instructions, graph, blocks, k in rows[:args.top]:
                print(f"  {warp_instructions / issue_rate * 1e3:6.2f} ms  {k.per_element:6.1f}/element "
                      f"({'loop' if k.looped else 'whole'}, {k.registers} registers x {k.threads} threads)  "
                      f"{k.elements / 1e6:7.1f} M elements x {k.calls} call(s) x {blocks} blocks  {graph}: {k.name}")


if __name__ == "__main__":
    main()
