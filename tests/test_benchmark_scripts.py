"""The benchmark scripts still run (on the tiny FLUX, in seconds); their figures are not checked here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def test_flux_block_memory_runs_and_coat_saves_less_than_bf16() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "flux_block_memory.py"), "--width", "tiny", "--resolution", "64",
         "--recipes", "bf16", "coat"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.startswith(("bf16", "coat"))}
    assert set(rows) == {"bf16", "coat"}, result.stdout
    assert "2 + 2 blocks" in result.stdout
    # columns: recipe, double, single, rest, blocks total, + weights
    assert 0 < float(rows["coat"][4]) < float(rows["bf16"][4])


def test_attention_backends_measures_each_backend_in_its_own_process(tmp_path) -> None:
    import json

    out = tmp_path / "attention.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "attention_backends.py"), "--device", "cpu", "--backends", "flash",
         "math", "efficient", "--tokens", "80", "--heads", "2", "--head-dim", "32", "--repeats", "2",
         "--layouts", "flux-single", "contiguous", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {(row["backend"], row["layout"]): row for row in json.loads(out.read_text())["rows"]}
    assert len(rows) == 6
    for name in ("flash", "math"):  # bf16 against the fp32 reference: close, not equal
        for layout in ("flux-single", "contiguous"):
            row = rows[name, layout]
            assert row["ms"] > 0 and 35 < min(row["sqnr_db"].values()) < 100, row
    # no CPU kernel for the memory-efficient backend: its child fails, the run goes on and says so
    assert all("No viable backend" in rows["efficient", layout]["error"] for layout in ("flux-single", "contiguous"))
    assert "efficient  flux-single        failed" in result.stdout


@pytest.mark.parametrize("layout", ["contiguous", "flux-double", "flux-single", "flux-single-fixed"])
def test_attention_layouts_keep_the_values_and_set_the_strides(layout) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from attention_backends import in_layout
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    base = [torch.randn(1, 3, 7, 4) for _ in range(4)]
    out = in_layout(layout, *base)
    assert all(torch.equal(a, b) for a, b in zip(base, out, strict=True))
    q, grad = out[0], out[3]
    tokens_major = (7 * 3 * 4, 4, 3 * 4, 1)
    assert q.stride() == ((7 * 4 * 3, 7 * 4, 4, 1) if layout == "contiguous" else tokens_major)
    expected = {"contiguous": (84, 28, 4, 1), "flux-double": tokens_major,
                "flux-single": (7 * 5 * 12, 4, 5 * 12, 1), "flux-single-fixed": tokens_major}[layout]
    assert grad.stride() == expected
