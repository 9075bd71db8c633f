"""``coatflux bench`` arguments and the run plan: every config at batch 1, then the batch searches.

Plan, in priority order so a time budget cuts the least useful work first:

1. matmul-rate probe and FLOP counts (seconds);
2. for each config, a fresh model: batch 1 at each resolution, ``--warmup`` + ``--steps`` steps
   (``--order resolution``: every config at the first resolution before any at the next, each
   cell with a fresh model, so that a budget cut drops the second resolution first);
3. for the ``--max-batch-configs`` (default bf16, coat, bf16+ckpt, coat+ckpt) at the largest
   resolution, a fresh model again: the largest batch up to the preset's cap, then
   ``--max-batch-steps`` timed steps at that batch.

``--budget-s`` bounds the whole run: a cell whose predicted cost (steps x the last step time of
that config, scaled by FLOPs and batch) does not fit in what is left is skipped and its row says
so; a timing loop stops between steps once the budget is spent. Any failure in a config (an
error, out of memory) is written into its row and the run goes on with the next one.

Out of memory: a step that runs out of memory leaves nothing behind. Each step runs in a function
whose locals (batch, loss, graph) die when it returns; the exception is caught, its message kept
as text and the exception (whose traceback references every frame of the failed step, and so
every activation) deleted; then the model and optimizer of that config are dropped, ``gc`` runs
and the CUDA cache is emptied, outside the ``except`` block, and the next probe builds a fresh
model. (On an H200 the earlier version, which kept the model across OOM probes, left the card
with 19 MiB free for every later config.)

Attention: the cuDNN backend of ``scaled_dot_product_attention`` is disabled for the run unless
``--allow-cudnn-attention``, which also installs the hook that makes it correct in FLUX
(:mod:`coatflux.flux.attention`); flash, memory-efficient and math stay allowed. Off by default so
that a run is comparable with the runs before the hook; the trainer keeps cuDNN. The Machine
section of the markdown records which backends were allowed.
"""

from __future__ import annotations

import argparse
import logging
import time
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from coatflux.bench.model import StepFlops
    from coatflux.bench.report import Report

logger = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_CONFIGS = ("bf16", "coat", "bf16+ckpt", "coat+ckpt")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from coatflux.bench.configs import CONFIGS
    from coatflux.bench.model import PRESETS

    parser.add_argument("--preset", choices=sorted(PRESETS), default="flux-dev",
                        help="model size: flux-dev (the real architecture, GPU) or tiny (CPU/CI)")
    parser.add_argument("--resolutions", type=int, nargs="+", default=None,
                        help="square image sizes in pixels (default: the preset's, 512 1024 for flux-dev)")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS),
                        help="configurations to run (default: all)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per cell (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    parser.add_argument("--order", choices=("config", "resolution"), default="config",
                        help="batch-1 cells config by config (one model each) or resolution by resolution")
    parser.add_argument("--max-batch-search", action=argparse.BooleanOptionalAction, default=True,
                        help="search the largest batch that fits (default on)")
    parser.add_argument("--max-batch-configs", nargs="+", choices=list(CONFIGS),
                        default=list(DEFAULT_MAX_BATCH_CONFIGS), help="configs whose largest batch is searched")
    parser.add_argument("--max-batch-resolution", type=int, default=None,
                        help="resolution of the batch search (default: the largest given)")
    parser.add_argument("--max-batch-cap", type=int, default=None, help="largest batch tried (default: preset's)")
    parser.add_argument("--max-batch-steps", type=int, default=3, help="timed steps at the largest batch")
    parser.add_argument("--fused-optimizer", action=argparse.BooleanOptionalAction, default=None,
                        help="COAT configs use the fused multi-tensor FP8AdamW (default: on CUDA only)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of the compiled configs (aot_eager: trace only, for tests)")
    parser.add_argument("--compile-dynamic", action=argparse.BooleanOptionalAction, default=True,
                        help="compile with dynamic shapes, as the trainer does by default (ai-toolkit's "
                             "compile_dynamic); --no-compile-dynamic specializes on each resolution")
    parser.add_argument("--profile", nargs="+", choices=list(CONFIGS), default=[], metavar="CONFIG",
                        help="after timing these configs at batch 1, profile one more step of the same model "
                             "(torch.profiler: GPU busy time, kernels, CPU operators) into the JSON and markdown")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="total time budget in seconds; remaining work is skipped and the rows say so")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--compile-cache", metavar="FILE", default=None,
                        help="load compiled graphs from FILE before the run (if it exists) and write this run's "
                             "into it at the end, replacing it: a warm start on a machine with an empty "
                             "cache (coatflux.core.compile_cache)")
    parser.add_argument("--allow-cudnn-attention", action="store_true",
                        help="keep PyTorch's cuDNN scaled-dot-product-attention backend, with the hook that makes "
                             "its backward correct in FLUX (coatflux.flux.attention), as the trainer does; off by "
                             "default (flash attention), as in the runs before the hook")
    parser.add_argument("--fp8-accumulation", choices=("fast", "precise"), default="fast",
                        help="how COAT's FP8 GEMMs accumulate (activation.fp8_fast_accumulation): fast, the "
                             "default since 2026-11-27, or precise (promoted to fp32), as in the runs before")
    parser.add_argument("--json", dest="json_path", default=None, help="write the results as JSON here")
    parser.add_argument("--markdown", dest="markdown_path", default=None,
                        help="write docs/benchmarks.md-style markdown here")
    parser.add_argument("--render", metavar="JSON", nargs="+", default=None,
                        help="measure nothing: write the markdown (--markdown) of saved JSON reports with this "
                             "version's layout, one section per run (e.g. a session's 1024 px and 512 px runs)")


@dataclass
class _Plan:
    """The parsed arguments plus the run's clock and what it has measured so far."""

    args: argparse.Namespace
    device: torch.device
    deadline: float | None
    step_time: dict[tuple[str, int], float] = field(default_factory=dict)  # (config, res) -> bs1 s
    profiles: list[dict] = field(default_factory=list)  # coatflux.bench.profile summaries

    def options(self):  # -> SetupOptions
        from coatflux.bench.configs import SetupOptions

        return SetupOptions(_fused_default(self.args, self.device), self.args.compile_backend,
                            self.args.compile_dynamic, fp8_fast_accumulation=self.args.fp8_accumulation == "fast")

    def remaining(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()


def _fused_default(args: argparse.Namespace, device: torch.device) -> bool:
    if args.fused_optimizer is not None:
        return bool(args.fused_optimizer)
    return device.type == "cuda"


def _build(name: str, plan: _Plan):  # -> (model, optimizer)
    from coatflux.bench.configs import CONFIGS
    from coatflux.bench.model import PRESETS, build_transformer
    from coatflux.flux.attention import keep_attention_grads_contiguous

    preset = PRESETS[plan.args.preset]
    model = build_transformer(preset, plan.device)
    if getattr(plan.args, "allow_cudnn_attention", False):
        keep_attention_grads_contiguous(model)  # see coatflux.flux.attention: cuDNN's graph cache
    optimizer = CONFIGS[name].setup(model, preset.lora_rank, plan.options())
    return model, optimizer


class _Trainee:
    """The model and optimizer of one config, built on first use and dropped after an OOM."""

    def __init__(self, name: str, plan: _Plan) -> None:
        from coatflux.bench.configs import CONFIGS

        self.name, self.plan = name, plan
        self.model = self.optimizer = None
        self.cudagraphs = CONFIGS[name].cudagraphs(plan.options())  # each step must be marked

    def get(self):  # -> (model, optimizer)
        if self.model is None:
            self.model, self.optimizer = _build(self.name, self.plan)
        return self.model, self.optimizer

    def drop(self) -> None:
        """Release the model, optimizer and everything they hold (call outside any ``except``)."""
        from coatflux.bench.measure import free_memory

        self.model = self.optimizer = None
        free_memory(self.plan.device)

    def finish(self) -> None:
        """Drop the config for good. A CUDA-graph config's graphs keep their memory pool (static
        inputs and outputs) after the model is gone, which would count in the next config's peak:
        ``torch._dynamo.reset`` shuts the graph trees down (the compiled code goes too; the next
        config compiles its own anyway, and inductor's disk cache stays)."""
        self.drop()
        if self.cudagraphs:
            from coatflux.bench.measure import free_memory

            torch._dynamo.reset()
            free_memory(self.plan.device)


def _time_cell(trainee: _Trainee, plan: _Plan, row, steps: int, warmup: int) -> None:
    from coatflux.bench.measure import peak_gb, reset_peak, time_steps
    from coatflux.bench.model import PRESETS, make_batch, step_functions

    model, optimizer = trainee.get()
    data = make_batch(PRESETS[plan.args.preset], row.resolution, row.batch, plan.device)
    reset_peak(plan.device)
    def on_first(seconds: float) -> None:
        logger.info("bench: %s at %d px: first step %.1f s", row.config, row.resolution, seconds)

    fns = step_functions(model, optimizer, data, trainee.cudagraphs)
    times = time_steps(*fns, plan.device, steps, warmup, plan.deadline, on_first)
    row.step_s, row.optimizer_s, row.steps = times.median(), times.median_optimizer(), len(times.step)
    row.first_step_s = times.first
    row.peak_gb = peak_gb(plan.device)
    if times.stopped_early:
        row.note = (row.note + "; " if row.note else "") + f"time budget: {row.steps} of {steps} steps"
    if row.step_s is None:
        row.status, row.note = "skipped", "time budget"
    elif row.kind == "batch 1" and row.config in plan.args.profile:
        _profile_cell(plan, row, fns)


def _profile_cell(plan: _Plan, row, fns) -> None:
    """One more step of the model just timed, under the profiler (after the timing: no distortion)."""
    from coatflux.bench.profile import format_summary, headline, profile_step

    forward_backward, optimizer_step = fns

    def step() -> None:
        forward_backward()
        optimizer_step()

    try:
        summary = profile_step(step, plan.device, row.config)
    except Exception as exc:  # the timing above stands; the row says why it has no profile
        message = f"profile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
        del exc
        logger.warning("bench %s @%d: %s", row.config, row.resolution, message)
        row.note = (row.note + "; " if row.note else "") + message
        return
    summary["resolution"], summary["batch"] = row.resolution, row.batch
    plan.profiles.append(summary)
    logger.info("bench: profile %s at %d px\n%s", row.config, row.resolution, format_summary(summary))
    row.note = (row.note + "; " if row.note else "") + "profiled: " + headline(summary).split(": ", 1)[1]


def _run_guarded(trainee: _Trainee, action, row) -> None:
    """``action()``; a failure goes into ``row`` and, for an OOM, the trainee is dropped afterwards.

    Only the message survives the ``except`` block: the exception and its traceback (every frame
    of the failed step, hence its activations) are deleted before memory is released.
    """

    failure = None
    try:
        action()
    except Exception as exc:
        failure = _failure(exc)
        del exc
    if failure is not None:
        _record(row, *failure)
        if failure[0] == "oom":
            trainee.drop()


def _failure(exc: BaseException) -> tuple[str, str]:
    """(status, note) of a failed cell; logs the traceback (an error's as a warning: the row keeps one line)."""
    from coatflux.bench.measure import is_oom

    oom = is_oom(exc)
    logger.log(logging.DEBUG if oom else logging.WARNING, "%s", "".join(traceback.format_exception(exc)))
    first_line = str(exc).splitlines()[0][:160] if str(exc) else ""
    return ("oom" if oom else "error"), f"{type(exc).__name__}: {first_line}"


def _record(row, status: str, note: str) -> None:
    row.status, row.note = status, note
    logger.warning("bench %s @%d bs%s: %s", row.config, row.resolution, row.batch, note)


def _predict(plan: _Plan, config: str, res: int, flops, batch: int = 1) -> float:
    """Seconds one step of ``config`` at ``res`` should take, from what was measured (0 if unknown)."""
    known = [(r, t) for (c, r), t in plan.step_time.items() if c == config]
    if not known:
        known = [(r, t * 2) for (c, r), t in plan.step_time.items() if c == "bf16"]
    if not known:
        return 0.0
    r0, t0 = known[-1]
    return t0 * flops[res].total / flops[r0].total * batch


def _note_compilation(notes: list[str]) -> None:
    """Record (and log) graph breaks of the compiled configs (each one splits a block's graph) and
    graphs that inductor did not capture as CUDA graphs in a ``+cudagraphs`` config."""
    from torch._dynamo.utils import counters

    skips = counters["inductor"]["cudagraph_skips"]
    if skips:
        prefix = "graphs not captured as CUDA graphs so far"
        note = f"{prefix}: {skips} (TORCH_LOGS=cudagraphs prints why)"
        if note not in notes:
            notes[:] = [n for n in notes if not n.startswith(prefix)] + [note]
            logger.warning("bench: %s", note)
    breaks = sum(counters["graph_break"].values())
    if not breaks:
        return
    reasons = "; ".join(f"{n}x {reason.splitlines()[0][:120]}" for reason, n in counters["graph_break"].items())
    prefix = "torch.compile graph breaks so far"
    note = f"{prefix}: {breaks} ({reasons})"
    if note not in notes:
        notes[:] = [n for n in notes if not n.startswith(prefix)] + [note]
        logger.warning("bench: %s", note)


def _run_batch1(plan: _Plan, name: str, resolutions: list[int], flops, rows: list) -> None:
    from coatflux.bench.configs import CONFIGS
    from coatflux.bench.report import Row

    cells = [Row(name, res, 1, "batch 1") for res in resolutions]
    rows.extend(cells)
    reason = CONFIGS[name].unavailable()
    if reason:
        for row in cells:
            row.status, row.note = reason, CONFIGS[name].description
        return
    steps, warmup = plan.args.steps, plan.args.warmup
    trainee = _Trainee(name, plan)
    for row in cells:
        cost = (steps + warmup) * _predict(plan, name, row.resolution, flops)
        if cost > plan.remaining() or plan.remaining() <= 0:
            row.status, row.note = "skipped", f"time budget (needs ~{cost:.0f} s)"
            continue
        _run_guarded(trainee, lambda row=row: _time_cell(trainee, plan, row, steps, warmup), row)
        if row.step_s:
            plan.step_time[(name, row.resolution)] = row.step_s
        if trainee.optimizer is not None:
            trainee.optimizer.zero_grad(set_to_none=True)
    trainee.finish()


def _train_step(trainee: _Trainee, plan: _Plan, res: int, batch: int) -> str | None:
    """One training step at ``batch``; None if it ran, the message if it ran out of memory.

    The batch, loss and graph are locals of this frame and die with it; an OOM drops the trainee
    (an interrupted step can leave gradients, optimizer state and allocator blocks behind).
    """
    from coatflux.bench.measure import is_oom
    from coatflux.bench.model import PRESETS, make_batch, step_functions

    model, optimizer = trainee.get()
    message = None
    try:
        data = make_batch(PRESETS[plan.args.preset], res, batch, plan.device)
        for part in step_functions(model, optimizer, data, trainee.cudagraphs):  # forward+backward, optimizer
            part()
    except Exception as exc:
        if not is_oom(exc):
            raise
        message = str(exc).splitlines()[0][:160] if str(exc) else "out of memory"
        del exc
    if message is not None:  # the step's optimizer part, which drops the gradients, did not run
        optimizer.zero_grad(set_to_none=True)
    del model, optimizer
    return message


def _probe(trainee: _Trainee, plan: _Plan, res: int, t1: float):
    from coatflux.bench.measure import free_memory

    def fits(batch: int) -> bool | None:
        if t1 * batch * 1.5 > plan.remaining():
            return None
        message = _train_step(trainee, plan, res, batch)
        if message is not None:
            trainee.drop()
        free_memory(plan.device)
        logger.info("bench: batch %d at %dpx %s", batch, res, "fits" if message is None else f"OOM ({message})")
        return message is None

    return fits


def _run_max_batch(plan: _Plan, name: str, res: int, flops, rows: list) -> None:
    from coatflux.bench.model import PRESETS
    from coatflux.bench.report import Row

    row = Row(name, res, None, "max batch")
    rows.append(row)
    t1 = plan.step_time.get((name, res))
    if t1 is None:
        row.status, row.note = "skipped", "no batch-1 measurement to start from (time budget or failure)"
        return
    cap = plan.args.max_batch_cap or PRESETS[plan.args.preset].max_batch_cap
    trainee = _Trainee(name, plan)
    _run_guarded(trainee, lambda: _search_and_time(trainee, plan, row, t1, cap), row)
    trainee.finish()


def _search_and_time(trainee: _Trainee, plan: _Plan, row, t1: float, cap: int) -> None:
    from coatflux.bench.measure import find_max_batch

    search = find_max_batch(_probe(trainee, plan, row.resolution, t1), cap)
    row.batch, row.max_batch, row.note = search.max_batch, search.label(), search.note
    steps = plan.args.max_batch_steps
    if search.max_batch and search.max_batch > 1:
        if (steps + 1) * t1 * search.max_batch > plan.remaining():
            row.note = (row.note + "; " if row.note else "") + "step not timed: time budget"
            row.status = "skipped"
        else:
            trainee.drop()  # time on a model that has seen no OOM and holds no probe's leftovers
            _time_cell(trainee, plan, row, steps, 1)
    elif search.max_batch == 1:
        row.status, row.note = "skipped", (row.note or "batch 2 does not fit: see the batch-1 row")


def _label_max_batches(rows: list) -> None:
    found = {(r.config, r.resolution): r.max_batch for r in rows if r.kind == "max batch" and r.max_batch}
    for r in rows:
        if r.kind == "batch 1" and (r.config, r.resolution) in found:
            r.max_batch = found[(r.config, r.resolution)]


def run(args: argparse.Namespace) -> int:
    from coatflux.flux.attention import attention_policy

    if getattr(args, "render", None):
        return _render(args)
    with attention_policy(getattr(args, "allow_cudnn_attention", False)):
        return _run(args)


def _render(args: argparse.Namespace) -> int:
    """``--render``: saved JSON reports as one markdown; the figures are the runs', untouched."""
    from datetime import datetime, timezone

    from coatflux.bench.report import command_line, markdown_runs, table, write_text

    if not args.markdown_path or args.json_path:
        raise ValueError("--render: give --markdown (where to write) and no --json (the JSONs are the input)")
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    runs = [_saved_run(path) for path in args.render]
    for report, _ in runs:
        print(table(report.rows))
    write_text(args.markdown_path, markdown_runs(runs, f"Rendered on {date} by `{' '.join(command_line())}`."))
    return 0


def _saved_run(path: str) -> tuple[Report, dict[int, StepFlops]]:
    """A saved JSON report and the step FLOPs of its resolutions, checked as it is read."""
    import json
    from pathlib import Path

    from coatflux.bench.model import PRESETS, count_step_flops
    from coatflux.bench.report import Report

    source = Path(path)
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{source}: not JSON ({err})") from err
    report = Report.from_json(data, str(source))
    preset = report.environment.get("preset")
    if preset not in PRESETS:
        raise ValueError(f"{source}: environment.preset {preset!r} is not one of {', '.join(sorted(PRESETS))}")
    flops = {res: count_step_flops(PRESETS[preset], res) for res in sorted({row.resolution for row in report.rows})}
    report.environment["rendered"] = f"rendered from {source.name}"
    return report, flops


def _run(args: argparse.Namespace) -> int:
    from coatflux.bench.measure import free_memory, measure_matmul_rates
    from coatflux.bench.model import PRESETS, count_step_flops
    from coatflux.bench.report import (
        Report,
        command_line,
        environment,
        table,
        write_outputs,
    )
    from coatflux.core.compile_cache import compile_cache_counts, load_compile_cache, save_compile_cache
    from coatflux.flux.attention import attention_backends

    start = time.monotonic()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset = PRESETS[args.preset]
    resolutions = list(args.resolutions or preset.resolutions)
    plan = _Plan(args, device, None if args.budget_s is None else start + args.budget_s)
    report = Report(environment(device, args.preset, command_line()), None)
    report.environment["attention"] = attention_backends()
    report.environment["fp8_accumulation"] = args.fp8_accumulation
    print(f"bench: scaled-dot-product attention backends: {report.environment['attention']}", flush=True)
    report.rates = measure_matmul_rates(device, 8192 if device.type == "cuda" else 256)
    flops = {res: count_step_flops(preset, res) for res in resolutions}
    logger.info("bench: %s on %s; rates %s", preset.name, report.environment["card"], report.rates)
    free_memory(device)

    cache = getattr(args, "compile_cache", None)
    if cache:
        report.notes.append(load_compile_cache(cache))
        print(f"bench: {report.notes[-1]}", flush=True)

    def save_partial() -> None:  # a run killed from outside still leaves what it measured
        report.derive(flops)
        report.profiles = plan.profiles
        write_outputs(report, flops, args.json_path, args.markdown_path)

    passes = [(name, resolutions) for name in args.configs] if args.order == "config" else \
        [(name, [res]) for res in resolutions for name in args.configs]
    for name, cells in passes:
        logger.info("bench: %s at batch 1, %s px (%.0f s elapsed)", name, cells, time.monotonic() - start)
        _run_batch1(plan, name, cells, flops, report.rows)
        _note_compilation(report.notes)
        save_partial()
    if args.max_batch_search:
        res = args.max_batch_resolution or max(resolutions)
        if res not in flops:
            flops[res] = count_step_flops(preset, res)
        for name in [c for c in args.max_batch_configs if c in args.configs]:
            logger.info("bench: %s largest batch at %dpx (%.0f s elapsed)", name, res, time.monotonic() - start)
            _run_max_batch(plan, name, res, flops, report.rows)
            save_partial()
    _label_max_batches(report.rows)
    report.derive(flops)
    report.profiles = plan.profiles
    skipped = sum(r.status == "skipped" for r in report.rows)
    if skipped:
        report.notes.append(f"{skipped} cells were not measured (see their rows), budget {args.budget_s} s")
    report.notes.append(f"whole run took {time.monotonic() - start:.0f} s")
    if cache:
        hits, misses = compile_cache_counts()
        report.notes.append(f"inductor graphs: {hits} found in the cache, {misses} compiled; "
                            f"{save_compile_cache(cache)}")
    print(table(report.rows))
    write_outputs(report, flops, args.json_path, args.markdown_path)
    return 0
