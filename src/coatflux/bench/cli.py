"""``coatflux bench`` arguments and the run plan: every config at batch 1, then the batch searches.

Plan, in priority order so a time budget cuts the least useful work first:

1. matmul-rate probe and FLOP counts (seconds);
2. for each config, a fresh model: batch 1 at each resolution, ``--warmup`` + ``--steps`` steps;
3. for the ``--max-batch-configs`` (default bf16, coat, bf16+ckpt, coat+ckpt) at the largest
   resolution, a fresh model again: the largest batch up to the preset's cap, then
   ``--max-batch-steps`` timed steps at that batch.

``--budget-s`` bounds the whole run: a cell whose predicted cost (steps x the last step time of
that config, scaled by FLOPs and batch) does not fit in what is left is skipped and its row says
so; a timing loop stops between steps once the budget is spent. Any failure in a config (an
error, out of memory) is written into its row and the run goes on with the next one.
"""

from __future__ import annotations

import argparse
import logging
import time
import traceback
from dataclasses import dataclass, field

import torch

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
    parser.add_argument("--budget-s", type=float, default=None,
                        help="total time budget in seconds; remaining work is skipped and the rows say so")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--json", dest="json_path", default=None, help="write the results as JSON here")
    parser.add_argument("--markdown", dest="markdown_path", default=None,
                        help="write docs/benchmarks.md-style markdown here")


@dataclass
class _Plan:
    """The parsed arguments plus the run's clock and what it has measured so far."""

    args: argparse.Namespace
    device: torch.device
    deadline: float | None
    step_time: dict[tuple[str, int], float] = field(default_factory=dict)  # (config, res) -> bs1 s

    def remaining(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()


def _fused_default(args: argparse.Namespace, device: torch.device) -> bool:
    if args.fused_optimizer is not None:
        return bool(args.fused_optimizer)
    return device.type == "cuda"


def _build(name: str, plan: _Plan):  # -> (model, optimizer)
    from coatflux.bench.configs import CONFIGS
    from coatflux.bench.model import PRESETS, build_transformer

    preset = PRESETS[plan.args.preset]
    model = build_transformer(preset, plan.device)
    optimizer = CONFIGS[name].setup(model, preset.lora_rank, _fused_default(plan.args, plan.device))
    return model, optimizer


def _step_fns(model, optimizer, data):
    from coatflux.bench.model import loss_of

    def forward_backward() -> None:
        loss_of(model, data).backward()

    def optimizer_step() -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return forward_backward, optimizer_step


def _time_cell(model, optimizer, plan: _Plan, row, steps: int, warmup: int) -> None:
    from coatflux.bench.measure import peak_gb, reset_peak, time_steps
    from coatflux.bench.model import PRESETS, make_batch

    data = make_batch(PRESETS[plan.args.preset], row.resolution, row.batch, plan.device)
    reset_peak(plan.device)
    times = time_steps(*_step_fns(model, optimizer, data), plan.device, steps, warmup, plan.deadline)
    row.step_s, row.optimizer_s, row.steps = times.median(), times.median_optimizer(), len(times.step)
    row.peak_gb = peak_gb(plan.device)
    if times.stopped_early:
        row.note = (row.note + "; " if row.note else "") + f"time budget: {row.steps} of {steps} steps"
    if row.step_s is None:
        row.status, row.note = "skipped", "time budget"


def _fail(row, exc: BaseException) -> None:
    from coatflux.bench.measure import is_oom

    row.status = "oom" if is_oom(exc) else "error"
    row.note = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    logger.warning("bench %s @%d bs%s: %s", row.config, row.resolution, row.batch, row.note)
    logger.debug("%s", traceback.format_exc())


def _predict(plan: _Plan, config: str, res: int, flops, batch: int = 1) -> float:
    """Seconds one step of ``config`` at ``res`` should take, from what was measured (0 if unknown)."""
    known = [(r, t) for (c, r), t in plan.step_time.items() if c == config]
    if not known:
        known = [(r, t * 2) for (c, r), t in plan.step_time.items() if c == "bf16"]
    if not known:
        return 0.0
    r0, t0 = known[-1]
    return t0 * flops[res].total / flops[r0].total * batch


def _run_batch1(plan: _Plan, name: str, resolutions: list[int], flops, rows: list) -> None:
    from coatflux.bench.configs import CONFIGS
    from coatflux.bench.measure import free_memory
    from coatflux.bench.report import Row

    cells = [Row(name, res, 1, "batch 1") for res in resolutions]
    rows.extend(cells)
    reason = CONFIGS[name].unavailable()
    if reason:
        for row in cells:
            row.status, row.note = reason, CONFIGS[name].description
        return
    steps, warmup = plan.args.steps, plan.args.warmup
    model = optimizer = None
    try:
        for row in cells:
            cost = (steps + warmup) * _predict(plan, name, row.resolution, flops)
            if cost > plan.remaining() or plan.remaining() <= 0:
                row.status, row.note = "skipped", f"time budget (needs ~{cost:.0f} s)"
                continue
            if model is None:
                model, optimizer = _build(name, plan)
            try:
                _time_cell(model, optimizer, plan, row, steps, warmup)
                if row.step_s:
                    plan.step_time[(name, row.resolution)] = row.step_s
            except Exception as exc:
                _fail(row, exc)
                optimizer.zero_grad(set_to_none=True)
            free_memory(plan.device)
    except Exception as exc:  # the build itself failed: every remaining row says so
        for row in cells:
            if row.status == "ok" and row.step_s is None:
                _fail(row, exc)
    finally:
        del model, optimizer
        free_memory(plan.device)


def _probe(model, optimizer, plan: _Plan, res: int, t1: float):
    from coatflux.bench.measure import free_memory, is_oom
    from coatflux.bench.model import PRESETS, make_batch

    def fits(batch: int) -> bool | None:
        if t1 * batch * 1.5 > plan.remaining():
            return None
        ok = True
        try:
            data = make_batch(PRESETS[plan.args.preset], res, batch, plan.device)
            forward_backward, optimizer_step = _step_fns(model, optimizer, data)
            forward_backward()
            optimizer_step()
            del data
        except Exception as exc:
            if not is_oom(exc):
                raise
            ok = False
        optimizer.zero_grad(set_to_none=True)
        free_memory(plan.device)
        logger.info("bench: batch %d at %dpx %s", batch, res, "fits" if ok else "is out of memory")
        return ok

    return fits


def _run_max_batch(plan: _Plan, name: str, res: int, flops, rows: list) -> None:
    from coatflux.bench.measure import find_max_batch, free_memory
    from coatflux.bench.model import PRESETS
    from coatflux.bench.report import Row

    row = Row(name, res, None, "max batch")
    rows.append(row)
    t1 = plan.step_time.get((name, res))
    if t1 is None:
        row.status, row.note = "skipped", "no batch-1 measurement to start from (time budget or failure)"
        return
    cap = plan.args.max_batch_cap or PRESETS[plan.args.preset].max_batch_cap
    model = optimizer = None
    try:
        model, optimizer = _build(name, plan)
        search = find_max_batch(_probe(model, optimizer, plan, res, t1), cap)
        row.batch, row.max_batch, row.note = search.max_batch, search.label(), search.note
        steps = plan.args.max_batch_steps
        if search.max_batch and search.max_batch > 1:
            if (steps + 1) * t1 * search.max_batch > plan.remaining():
                row.note = (row.note + "; " if row.note else "") + "step not timed: time budget"
                row.status = "skipped"
            else:
                _time_cell(model, optimizer, plan, row, steps, 1)
        elif search.max_batch == 1:
            row.status, row.note = "skipped", (row.note or "batch 2 does not fit: see the batch-1 row")
    except Exception as exc:
        _fail(row, exc)
    finally:
        del model, optimizer
        free_memory(plan.device)


def _label_max_batches(rows: list) -> None:
    found = {(r.config, r.resolution): r.max_batch for r in rows if r.kind == "max batch" and r.max_batch}
    for r in rows:
        if r.kind == "batch 1" and (r.config, r.resolution) in found:
            r.max_batch = found[(r.config, r.resolution)]


def run(args: argparse.Namespace) -> int:
    from coatflux.bench.measure import free_memory, measure_matmul_rates
    from coatflux.bench.model import PRESETS, count_step_flops
    from coatflux.bench.report import Report, command_line, environment, table, write_outputs

    start = time.monotonic()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset = PRESETS[args.preset]
    resolutions = list(args.resolutions or preset.resolutions)
    plan = _Plan(args, device, None if args.budget_s is None else start + args.budget_s)
    report = Report(environment(device, args.preset, command_line()), None)
    report.rates = measure_matmul_rates(device, 8192 if device.type == "cuda" else 256)
    flops = {res: count_step_flops(preset, res) for res in resolutions}
    logger.info("bench: %s on %s; rates %s", preset.name, report.environment["card"], report.rates)
    free_memory(device)

    def save_partial() -> None:  # a run killed from outside still leaves what it measured
        report.derive(flops)
        write_outputs(report, flops, args.json_path, args.markdown_path)

    for name in args.configs:
        logger.info("bench: %s at batch 1 (%.0f s elapsed)", name, time.monotonic() - start)
        _run_batch1(plan, name, resolutions, flops, report.rows)
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
    skipped = sum(r.status == "skipped" for r in report.rows)
    if skipped:
        report.notes.append(f"{skipped} cells were not measured (see their rows), budget {args.budget_s} s")
    report.notes.append(f"whole run took {time.monotonic() - start:.0f} s")
    print(table(report.rows))
    write_outputs(report, flops, args.json_path, args.markdown_path)
    return 0
