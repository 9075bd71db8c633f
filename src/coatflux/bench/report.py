"""Results: one row per measured cell, the derived columns, and the console / JSON / markdown outputs.

Every figure in the outputs comes from a measurement of this run; a cell that was not measured
says why (an error, out of memory, a missing package, the time budget) instead of carrying a
number. The markdown is written whole by the program -- docs/benchmarks.md is its output, never
edited by hand -- with the card, driver, torch version, date and command line that produced it.
"""

from __future__ import annotations

import json
import platform
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from coatflux.atomic import atomic_write
from coatflux.bench.measure import MatmulRates
from coatflux.bench.model import StepFlops


@dataclass
class Row:
    """One measured (or unmeasured) cell: a config at a resolution and batch size."""

    config: str
    resolution: int
    batch: int | None
    kind: str  # "batch 1" or "max batch"
    status: str = "ok"  # ok | error | oom | skipped | not installed
    step_s: float | None = None
    optimizer_s: float | None = None
    first_step_s: float | None = None  # the first warm-up step: compilation, allocation, autotuning
    steps: int = 0
    peak_gb: float | None = None
    max_batch: str | None = None
    flops: float | None = None
    floor_bf16: float | None = None  # compute floor at the bf16 rate / step time
    floor_fp8: float | None = None  # compute floor with linears at the FP8 rate / step time
    speedup: float | None = None  # samples/s relative to bf16 at batch 1, same resolution
    note: str = ""


@dataclass
class Report:
    """Everything one run produced."""

    environment: dict[str, Any]
    rates: MatmulRates | None
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    profiles: list[dict[str, Any]] = field(default_factory=list)  # coatflux.bench.profile summaries

    def derive(self, flops: dict[int, StepFlops]) -> None:
        """Fill the floor fractions and speed-ups from the measured times and the FLOP counts."""
        base = {r.resolution: r for r in self.rows if r.config == "bf16" and r.batch == 1 and r.step_s}
        for row in self.rows:
            if not row.step_s or not row.batch or row.resolution not in flops:
                continue
            f = flops[row.resolution].scaled(row.batch)
            row.flops = f.total
            if self.rates and self.rates.bf16:
                row.floor_bf16 = f.total / self.rates.bf16 / row.step_s
                fp8_rate = self.rates.fp8 or self.rates.bf16
                row.floor_fp8 = (f.linear / fp8_rate + f.attention / self.rates.bf16) / row.step_s
            ref = base.get(row.resolution)
            if ref is not None:
                row.speedup = (row.batch / row.step_s) / (1 / ref.step_s)

    def to_json(self) -> dict[str, Any]:
        return {"environment": self.environment, "rates": asdict(self.rates) if self.rates else None,
                "rows": [asdict(r) for r in self.rows], "notes": self.notes, "profiles": self.profiles}

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str) -> Report:
        """The report a run wrote with :meth:`to_json`; ``source`` names the file in errors."""
        try:
            rates = MatmulRates(**data["rates"]) if data.get("rates") else None
            rows = [Row(**row) for row in data["rows"]]
            return cls(dict(data["environment"]), rates, rows, list(data.get("notes", [])),
                       list(data.get("profiles", [])))
        except (KeyError, TypeError) as err:
            raise ValueError(f"{source}: not a coatflux bench JSON report ({type(err).__name__}: {err})") from err


def environment(device: torch.device, preset: str, argv: list[str]) -> dict[str, Any]:
    """Card, driver, versions, date and command line of this run."""
    env: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(device),
        "preset": preset,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "command": shlex.join(argv),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["card"] = props.name
        env["memory_gb"] = round(props.total_memory / 2**30, 1)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        env["driver"] = _nvidia_driver()
    else:
        env["card"] = f"CPU: {platform.processor() or platform.machine()}"
        env["driver"] = None
    return env


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True)
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def _num(value: float | None, fmt: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, fmt)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


HEADER = ("| config | res | batch | step s (median, n) | optimizer s | first step s | peak GiB | max batch | "
          "floor/step bf16 · FP8 | samples/s vs bf16 | note |")


def table(rows: list[Row]) -> str:
    """The results as one markdown table."""
    lines = [HEADER, "|" + "---|" * (HEADER.count("|") - 1)]
    for r in rows:
        step = r.status if r.status != "ok" else f"{_num(r.step_s, '.3f')} (n={r.steps})"
        name = r.config if r.kind == "batch 1" else f"{r.config}, largest batch"
        lines.append(
            f"| {name} | {r.resolution} | {r.batch if r.batch is not None else '-'} | {step} | "
            f"{_num(r.optimizer_s, '.3f', '-')} | {_num(r.first_step_s, '.1f', '-')} | {_num(r.peak_gb, '.1f')} | "
            f"{r.max_batch or '-'} | "
            f"{_pct(r.floor_bf16)} · {_pct(r.floor_fp8)} | {_num(r.speedup, '.2f', '-')}x | "
            f"{r.note.replace('|', '/')} |")
    return "\n".join(lines)


def _rates_line(rates: MatmulRates | None, env: dict[str, Any]) -> str:
    if rates is None:
        return "not measured"
    fp8 = f"{rates.fp8 / 1e12:.3g} TFLOP/s" if rates.fp8 else (rates.fp8_note or "unavailable")
    # runs that record COAT's accumulation measured the FP8 rate with fast accumulation; earlier ones did not
    accumulation = "fast" if "fp8_accumulation" in env else "promoted"
    return f"bf16 {_num(rates.bf16 and rates.bf16 / 1e12, '.3g')} TFLOP/s, FP8 (E4M3 _scaled_mm, {accumulation} " \
           f"accumulation) {fp8} ({rates.size}^3 GEMMs)"


def markdown(report: Report, flops: dict[int, StepFlops]) -> str:
    """The whole docs/benchmarks.md text for this run."""
    return markdown_runs([(report, flops)])


def markdown_runs(runs: list[tuple[Report, dict[int, StepFlops]]], rendered: str | None = None) -> str:
    """The whole docs/benchmarks.md text for one run or several, each with its machine and table.

    Several runs of one session (e.g. a baseline under other attention backends, another
    resolution) stay separate sections: their rows are never merged into one table, since a
    speed-up compares rows of the same run only. ``rendered`` says when and how saved runs were
    written out again.
    """
    envs = [report.environment for report, _ in runs]
    out = ["# Benchmarks", "",
           "Written by `coatflux bench`; do not edit by hand (rerun the command below instead).", ""]
    if rendered:
        out += [rendered, ""]
    if not all(env["device"].startswith("cuda") for env in envs):
        out += ["**No GPU run yet: every GPU row is not yet measured.** The table below is a CPU run of a "
                f"reduced preset (`{envs[0]['preset']}`); it shows that the benchmark code runs, not how fast "
                "FLUX.1-dev trains. Step times on a CPU say nothing about a GPU, and the CPU has no "
                "allocator statistics, so memory is n/a.", ""]
    if len(runs) > 1:
        out += [f"{len(runs)} runs, one section each; samples/s vs bf16 compares rows of the same run.", ""]
    for i, (report, _) in enumerate(runs, 1):
        title = f"Run {i} of {len(runs)}: {report.environment['date']}" if len(runs) > 1 else None
        out += _run_section(report, title)
    absent = not_in_run([row for report, _ in runs for row in report.rows])
    if absent:
        out += [f"Not in {'this run' if len(runs) == 1 else 'any of these runs'}, so not measured on this card:", ""]
        out += [f"- `{name}`: {description}" for name, description in absent] + [""]
    flops = {res: f for _, run_flops in runs for res, f in run_flops.items()}
    out += ["FLOPs per training step at batch 1 (LoRA, no recomputation): " + ", ".join(
        f"{res}px {f.total / 1e12:.3g} TFLOP ({f.attention / f.total:.0%} attention)" for res, f in sorted(flops.items()))
        + ".", ""]
    out += ["## How to read it", "",
            "- step s: median wall time of one training step (forward, backward, optimizer step) over n timed "
            "steps after warm-up; CUDA events on a GPU. optimizer s: the optimizer-step part of it. first step s: "
            "host wall time of the first warm-up step, which pays for compilation (torch.compile for the "
            "compiled configs, Triton kernels for the others), allocation and autotuning.",
            "- peak GiB: `torch.cuda.max_memory_allocated` over the timed steps (weights, adapters, optimizer "
            "state, activations).",
            "- max batch: the largest batch that ran one training step at that resolution (doubling, then "
            "bisection, bounded by the preset's cap; `>=` means the cap or the time budget stopped the search).",
            "- floor/step: the compute floor divided by the step time (100% = matmul-bound at the measured rate). "
            "The floor counts forward 2·M·N·K per linear, input-gradient 2·M·N·K for every linear and "
            "weight-gradient only for LoRA, attention 4·B·H·L²·D forward and twice that backward, at the "
            "measured bf16 rate (first figure) or with the linears at the measured FP8 rate (second).",
            "- samples/s vs bf16: throughput relative to the bf16 row at batch 1 and the same resolution.",
            "- Every recipe trains the same rank-16 LoRA (fp32 weights, multiplied in bf16) on ai-toolkit's targets; the model has "
            "random weights (timing and memory depend on shapes only). No figure here is estimated.", ""]
    return "\n".join(out)


def _run_section(report: Report, title: str | None) -> list[str]:
    """One run's machine, table, notes and profiles; under ``title`` (a level-2 heading) when given."""
    env = report.environment
    gpu = env["device"].startswith("cuda")
    sub = "###" if title else "##"
    out = [f"## {title}", ""] if title else []
    out += [f"{sub} Machine", "",
            f"- card: {env.get('card')}" + (f" ({env.get('memory_gb')} GiB, sm {env.get('capability')})" if gpu else ""),
            f"- driver: {env.get('driver') or 'n/a'}; CUDA (torch build): {env.get('cuda') or 'n/a'}",
            f"- torch {env['torch']}, Python {env['python']}, {env['platform']}",
            f"- date: {env['date']}",
            f"- command: `{env['command']}`",
            f"- measured matmul rates: {_rates_line(report.rates, env)}",
            f"- attention (SDPA) backends: {env.get('attention', 'not recorded')}",
            f"- COAT's FP8 GEMM accumulation: {env.get('fp8_accumulation', 'precise (promoted; before the option)')}"]
    if env.get("rendered"):
        out += [f"- {env['rendered']}"]
    out += ["", f"{sub} Results", "", table(report.rows), ""]
    if report.notes:
        out += [f"{sub} Notes from this run", ""] + [f"- {n}" for n in report.notes] + [""]
    if report.profiles:
        out += [f"{sub} Profiled steps", "", "One step after the timed ones, under `torch.profiler` (its own "
                "overhead included in the step), GPU kernel time by category:", ""]
        out += [_profile_line(p) for p in report.profiles] + [""]
    return out


def _profile_line(summary: dict[str, Any]) -> str:
    from coatflux.bench.profile import headline

    categories = ", ".join(f"{label} {ms:.1f} ms" for label, ms in summary["by_category_ms"].items())
    return f"- {summary.get('resolution', '?')} px, {headline(summary)}" + (f"; {categories}" if categories else "")


def not_in_run(rows: list[Row]) -> list[tuple[str, str]]:
    """The bench's configurations (name, description) that have no row in ``rows``."""
    from coatflux.bench.configs import CONFIGS

    present = {row.config for row in rows}
    return [(name, config.description) for name, config in CONFIGS.items() if name not in present]


def write_outputs(report: Report, flops: dict[int, StepFlops], json_path: str | None,
                  markdown_path: str | None) -> None:
    """Write the JSON and markdown atomically: a run killed while writing keeps the previous file."""
    if json_path:
        write_text(json_path, json.dumps(report.to_json(), indent=2) + "\n")
    if markdown_path:
        write_text(markdown_path, markdown(report, flops))


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


def command_line() -> list[str]:
    """The command as a user would type it (``python -m coatflux.bench`` shows up as its file path)."""
    program = sys.argv[0] if sys.argv else ""
    if program.endswith(("coatflux", "cli.py", "coatflux/__main__.py")):
        return ["coatflux", *sys.argv[1:]]
    if program.endswith(("bench/__main__.py", "coatflux-bench")):
        return ["python", "-m", "coatflux.bench", *sys.argv[1:]]
    return sys.argv
