"""The extension inside a real ostris/ai-toolkit checkout (skipped unless ``AI_TOOLKIT_PATH`` is set).

ai-toolkit is not on PyPI, so these tests run only when ``AI_TOOLKIT_PATH`` points at a checkout
whose requirements are installed in the Python named by ``AI_TOOLKIT_PYTHON`` (default: this one),
with coatflux importable there too. They re-check the interfaces the shim relies on (observed at
ai-toolkit 27a03a91f23e, 2026-08-21) and run ``run.py`` with ``coat_sd_trainer`` +
``coat_fp8_adamw`` on the tiny FLUX model: a few steps, a save, then a resume that must reload
``optimizer.pt``. The extension folder is installed for the test and removed afterwards unless it
was there before.

    AI_TOOLKIT_PATH=/path/to/ai-toolkit AI_TOOLKIT_PYTHON=/path/to/venv/bin/python \\
        python -m pytest tests/test_aitoolkit_integration.py -m aitoolkit -v
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from coatflux.integrations.aitoolkit.install import MANIFEST_NAME, install, uninstall

AITK = os.environ.get("AI_TOOLKIT_PATH")
PYTHON = os.environ.get("AI_TOOLKIT_PYTHON", sys.executable)
pytestmark = [
    pytest.mark.aitoolkit,
    pytest.mark.skipif(not AITK, reason="AI_TOOLKIT_PATH is not set: needs an ai-toolkit checkout with its "
                                        "requirements installed (ai-toolkit is not on PyPI)"),
]


def _python(code: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-c", textwrap.dedent(code)], cwd=AITK, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONPATH=AITK))


@pytest.fixture(scope="module")
def installed() -> Iterator[Path]:
    root = Path(AITK)
    had_it = (root / "extensions" / "coatflux" / MANIFEST_NAME).exists()
    target = install(root)
    yield target
    if not had_it:
        uninstall(root)


def test_observed_interfaces_still_hold(installed: Path) -> None:
    result = _python("""
        import importlib, inspect
        from toolkit.extension import Extension, get_all_extensions_process_dict
        training = importlib.import_module("jobs.process.BaseSDTrainProcess")
        assert callable(training.get_optimizer)
        from toolkit.lora_special import LoRAModule
        assert "org_forward" in inspect.getsource(LoRAModule.apply_to)
        procs = get_all_extensions_process_dict()
        from extensions_built_in.sd_trainer.SDTrainer import SDTrainer
        from extensions_built_in.sd_trainer.DiffusionTrainer import DiffusionTrainer
        assert issubclass(procs["coat_sd_trainer"], SDTrainer)
        assert issubclass(procs["coat_diffusion_trainer"], DiffusionTrainer)
        assert hasattr(training.get_optimizer, "__coatflux_original__")
        print("ok")
    """)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok" in result.stdout


CONFIG = """\
job: extension
config:
  name: coat_tiny
  process:
    - type: coat_sd_trainer
      training_folder: {out}
      device: cpu
      trigger_word: tok
      network: {{type: lora, linear: 4, linear_alpha: 4}}
      save: {{dtype: float32, save_every: {steps}, max_step_saves_to_keep: 4}}
      datasets:
        - {{folder_path: {data}, caption_ext: txt, resolution: [64], num_workers: 0}}
      train:
        batch_size: 1
        steps: {steps}
        gradient_checkpointing: false
        noise_scheduler: flowmatch
        optimizer: coat_fp8_adamw
        lr: 1e-3
        dtype: fp32
        disable_sampling: true
      model: {{name_or_path: {model}, is_flux: true, quantize: false}}
      coat:
        optimizer: {{m2_format: e5m2}}
        activation: {{use_fp8: true}}
"""


def _dataset(folder: Path) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir()
    for i in range(3):
        pixels = (np.random.RandomState(i).rand(64, 64, 3) * 255).astype("uint8")
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a photo of [trigger] number {i}")
    return folder


def _train(tmp_path: Path, model: Path, data: Path, steps: int) -> str:
    config = tmp_path / f"coat_{steps}.yaml"
    config.write_text(CONFIG.format(out=tmp_path / "output", data=data, model=model, steps=steps))
    result = subprocess.run([PYTHON, "run.py", str(config)], cwd=AITK, capture_output=True, text=True,
                            timeout=1200)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    return log


@pytest.mark.slow
def test_train_save_and_resume_with_fp8_adamw(installed: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    from coatflux.flux.tiny import make_tiny_flux

    model = make_tiny_flux(tmp_path / "tiny-flux")
    data = _dataset(tmp_path / "data")
    first = _train(tmp_path, model, data, steps=2)
    assert "Using FP8AdamW" in first and "LoRA base linears" in first
    run_dir = tmp_path / "output" / "coat_tiny"
    assert (run_dir / "optimizer.pt").exists()
    lora = run_dir / "coat_tiny.safetensors"
    with safe_open(str(lora), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    second = _train(tmp_path, model, data, steps=4)
    assert "Loading optimizer state" in second
    assert "Failed to load optimizer state" not in second
