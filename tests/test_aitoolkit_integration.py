"""The extension inside a real ostris/ai-toolkit checkout (skipped unless ``AI_TOOLKIT_PATH`` is set).

ai-toolkit is not on PyPI, so these tests run only when ``AI_TOOLKIT_PATH`` points at a checkout
whose requirements are installed in the Python named by ``AI_TOOLKIT_PYTHON`` (default: this one),
with coatflux importable there too. They re-check the interfaces the shim relies on (observed at
ai-toolkit 27a03a91f23e, 2026-08-21) and run ai-toolkit's own ``run.py`` on the tiny FLUX model:

- ``coat_sd_trainer`` + ``coat_fp8_adamw`` + ``coat.activation.use_fp8``: two steps and a save, then
  a resume to four steps that must read the step from the LoRA file and continue the FP8 optimizer
  state reloaded from ``optimizer.pt`` (ai-toolkit: ``torch.load(weights_only=True)``);
- ``coat_diffusion_trainer`` with ``model.quantize: true`` (optimum-quanto) under the FP8 bases.

The extension folder is installed for the test and removed afterwards unless it was there before.
The device is ``cpu`` unless ``AI_TOOLKIT_DEVICE`` says otherwise (e.g. ``cuda:0``).

    AI_TOOLKIT_PATH=/path/to/ai-toolkit AI_TOOLKIT_PYTHON=/path/to/venv/bin/python \\
        python -m pytest tests/test_aitoolkit_integration.py -m aitoolkit -v
"""

from __future__ import annotations

import json
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
DEVICE = os.environ.get("AI_TOOLKIT_DEVICE", "cpu")
pytestmark = [
    pytest.mark.aitoolkit,
    pytest.mark.skipif(not AITK, reason="AI_TOOLKIT_PATH is not set: needs an ai-toolkit checkout with its "
                                        "requirements installed (ai-toolkit is not on PyPI)"),
]

#: Run before ai-toolkit's code in every subprocess. Why: ai-toolkit imports *every* built-in
#: extension for every ``job: extension`` run, and at 27a03a9 one of them queries the GPU while it is
#: being imported -- ``extensions_built_in/diffusion_models/omnigen2/src/ops/triton/layer_norm.py``
#: line 46, ``torch.cuda.get_device_properties(torch.cuda.current_device())``, reached at import by
#: the ``@triton.autotune(configs=triton_autotune_configs())`` on line 174 -- so on a host without
#: CUDA ``run.py`` dies before it reads any config, whatever ``device:`` says. On such a host only,
#: those two queries get stand-ins (a warp size of 32, the value that code defaults to, and a device
#: name, which inductor's cache key reads from the same query on a CUDA build of torch); nothing else
#: changes, and with CUDA present ai-toolkit runs exactly as it is.
PRELUDE = """\
import runpy, sys, types
import torch
if not torch.cuda.is_available():
    torch.cuda.current_device = lambda: 0
    torch.cuda.get_device_properties = lambda device=None: types.SimpleNamespace(
        warp_size=32, name='no CUDA device')
"""


def _run(code: str, *args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-c", PRELUDE + textwrap.dedent(code), *args], cwd=AITK,
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONPATH=AITK))


@pytest.fixture(scope="module")
def installed() -> Iterator[Path]:
    root = Path(AITK)
    had_it = (root / "extensions" / "coatflux" / MANIFEST_NAME).exists()
    target = install(root)
    yield target
    if not had_it:
        uninstall(root)


def test_observed_interfaces_still_hold(installed: Path) -> None:
    result = _run("""
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
    - type: {process}
      training_folder: {out}
      device: {device}
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
      model: {{name_or_path: {model}, is_flux: true, quantize: {quantize}{model_extra}}}
      coat:
        # min_quantized_numel 0: the tiny model's LoRA tensors (128 elements) would otherwise keep
        # fp32 moments, and optimizer.pt would hold no FP8 state to reload.
        optimizer: {{m2_format: e5m2, min_quantized_numel: 0}}
        activation: {{use_fp8: true}}
"""


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    import numpy as np
    from PIL import Image

    from coatflux.flux.tiny import make_tiny_flux

    root = tmp_path_factory.mktemp("aitk-inputs")
    model = make_tiny_flux(root / "tiny-flux")
    data = root / "data"
    data.mkdir()
    for i in range(3):
        pixels = (np.random.RandomState(i).rand(64, 64, 3) * 255).astype("uint8")
        Image.fromarray(pixels).save(data / f"img{i}.png")
        (data / f"img{i}.txt").write_text(f"a photo of [trigger] number {i}")
    return model, data


def _train(tmp_path: Path, inputs: tuple[Path, Path], steps: int, process: str = "coat_sd_trainer",
           quantize: bool = False, model_extra: str = "") -> str:
    model, data = inputs
    config = tmp_path / f"{process}_{steps}.yaml"
    config.write_text(CONFIG.format(process=process, out=tmp_path / "output", device=DEVICE, data=data,
                                    model=model, steps=steps, quantize=str(quantize).lower(),
                                    model_extra=model_extra))
    # why run.py through runpy: the same file and entry point as `python run.py CONFIG`, after PRELUDE
    result = _run("sys.argv[0] = 'run.py'; runpy.run_path('run.py', run_name='__main__')", str(config))
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "Error running job" not in log, log[-4000:]
    return log


def _optimizer_state(path: Path) -> dict:
    import torch

    # as ai-toolkit reloads it (BaseSDTrainProcess.run: torch.load(..., weights_only=True))
    return torch.load(path, weights_only=True)


def _lora_file(path: Path) -> tuple[list[str], dict, float]:
    """Keys, ``training_info`` metadata and the largest |lora_B| of a saved ai-toolkit LoRA."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        info = json.loads(f.metadata()["training_info"])
        lora_b = max(float(f.get_tensor(k).abs().max()) for k in keys if ".lora_B." in k)
    return keys, info, lora_b


@pytest.mark.slow
def test_train_save_and_resume_with_fp8_adamw(installed: Path, tmp_path: Path,
                                              model_and_data: tuple[Path, Path]) -> None:
    import torch

    first = _train(tmp_path, model_and_data, steps=2)
    assert "Using FP8AdamW" in first
    assert "FP8 weights + FP8 GEMMs + FP8-saved inputs on 40 LoRA base linears" in first
    assert "the gradients of 4 attention modules are made contiguous" in first  # 2 double + 2 single blocks
    run_dir = tmp_path / "output" / "coat_tiny"
    lora, optimizer_file = run_dir / "coat_tiny.safetensors", run_dir / "optimizer.pt"
    assert lora.exists() and optimizer_file.exists() and (run_dir / "config.yaml").exists()

    keys, info, lora_b = _lora_file(lora)
    assert keys and all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    assert info["step"] == 2
    assert lora_b > 0, "lora_B starts at zero: the LoRA did not train through the FP8 bases"
    state = _optimizer_state(optimizer_file)["state"]
    assert len(state) == len(keys)  # one entry per LoRA A/B tensor
    fp8 = {torch.float8_e4m3fn, torch.float8_e5m2}
    assert all(s["exp_avg"].dtype in fp8 and s["exp_avg_sq"].dtype == torch.float8_e5m2 for s in state.values())
    assert {float(s["step"]) for s in state.values()} == {2.0}

    second = _train(tmp_path, model_and_data, steps=4)
    assert f"RESUMING FROM {lora}" in second
    assert "Found step 2 in metadata" in second
    assert f"Loading optimizer state from {optimizer_file}" in second
    assert "Failed to load optimizer state" not in second
    assert _lora_file(lora)[1]["step"] == 4
    # a fresh optimizer would have counted 2 steps; 4 means the reloaded FP8 state was continued
    assert {float(s["step"]) for s in _optimizer_state(optimizer_file)["state"].values()} == {4.0}


@pytest.mark.slow
def test_diffusion_trainer_with_quanto_base(installed: Path, tmp_path: Path,
                                            model_and_data: tuple[Path, Path]) -> None:
    if _run("import optimum.quanto").returncode != 0:
        pytest.skip("optimum-quanto is not installed in ai-toolkit's environment (model.quantize needs it)")
    log = _train(tmp_path, model_and_data, steps=2, process="coat_diffusion_trainer", quantize=True)
    assert "Quantizing transformer" in log
    assert "COATDiffusionTrainer: coat.enabled=True" in log
    assert "replaced optimum-quanto weights of 40 linears with coatflux FP8" in log
    assert "Using FP8AdamW" in log
    run_dir = tmp_path / "output" / "coat_tiny"
    assert (run_dir / "coat_tiny.safetensors").exists() and (run_dir / "optimizer.pt").exists()
    assert _lora_file(run_dir / "coat_tiny.safetensors")[1]["step"] == 2


@pytest.mark.slow
def test_aitoolkit_compile_runs_coat_compiled_blocks(installed: Path, tmp_path: Path,
                                                     model_and_data: tuple[Path, Path]) -> None:
    """ai-toolkit's own ``model.compile`` with COAT: coatflux compiles the blocks, the LoRA trains."""
    log = _train(tmp_path, model_and_data, steps=2, model_extra=", compile: true, block_compile: true")
    assert "coatflux compiles each transformer block with COAT inside it" in log
    assert "compiled 4 transformer blocks with COAT inside them" in log
    assert "Compiled " not in log and "Failed to compile" not in log  # ai-toolkit's compile stayed off
    _, info, lora_b = _lora_file(tmp_path / "output" / "coat_tiny" / "coat_tiny.safetensors")
    assert info["step"] == 2
    assert lora_b > 0, "lora_B starts at zero: the LoRA did not train through the compiled blocks"
