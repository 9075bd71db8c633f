"""Shared fixtures: a tiny random FLUX pipeline built once per test session (no network)."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import pytest

# Tests must never reach the hub; make any accidental download fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# scripts/test.sh runs two pytest-xdist workers on CI's two cores: one compute thread each, since two
# workers with a thread per core each oversubscribe the cores and OpenMP's waiting threads spin.
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a tiny FLUX pipeline in diffusers layout (read-only by convention: copy before editing)."""
    from coatflux.flux.tiny import make_tiny_flux

    return make_tiny_flux(tmp_path_factory.mktemp("tiny_flux") / "pipeline", seed=0)


@pytest.fixture
def tiny_flux_pipe(tiny_flux_dir: Path):
    """A freshly loaded FluxPipeline (fp32, CPU) over :func:`tiny_flux_dir`; cheap (~50 ms)."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_flux_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _load_without_warnings(pipe, path: Path) -> None:
    """``pipe.load_lora_weights(path)``; fails on any warning (unexpected/missing keys are warnings).

    The one notice allowed says the file has no text-encoder keys, which is true of every
    transformer-only LoRA (ai-toolkit's included).
    """
    capture = _Capture()
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    for lg in loggers:
        lg.addHandler(capture)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(path))
    finally:
        for lg in loggers:
            lg.removeHandler(capture)
    messages = capture.messages + [str(w.message) for w in caught]
    messages = [m for m in messages if not m.startswith("No LoRA keys associated to CLIPTextModel")]
    assert not messages, messages


@pytest.fixture
def load_lora_no_warnings():
    """``fn(pipe, path)``: ``pipe.load_lora_weights(path)`` that fails the test on any key warning."""
    return _load_without_warnings


@pytest.fixture(autouse=True)
def _private_plan_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test gets its own GEMM row-plan cache folder: none writes to the user's home, and none
    reads plans another test (or a real run) left (``coatflux.core.gemm.PlanCache``)."""
    monkeypatch.setenv("COATFLUX_CACHE_DIR", str(tmp_path_factory.mktemp("coatflux-cache")))
