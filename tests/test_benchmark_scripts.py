"""The benchmark scripts still run (on the tiny FLUX, in seconds); their figures are not checked here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
