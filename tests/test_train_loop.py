"""The training loop on the tiny FLUX model: COAT vs no COAT, outputs, LoRA loading, bad input."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from PIL import Image

from coatflux.core.config import ConfigError
from coatflux.flux.lora import read_lora
from coatflux.trainer.config import load_config
from coatflux.trainer.loop import train
from coatflux.trainer.optimizers import lr_factor
from coatflux.trainer.timesteps import flux_mu, noisy_latents, sample_sigmas, shift_sigmas

COLORS = [(200, 30, 30), (30, 160, 40), (40, 60, 200), (220, 200, 40)]


def make_dataset(folder: Path) -> Path:
    """Four 64x64 images with captions: small enough for a step in ~50 ms on the CPU."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, color in enumerate(COLORS):
        image = Image.new("RGB", (64, 64), color)
        image.paste((255, 255, 255), (16 + 4 * i, 16, 40, 48))
        image.save(folder / f"img_{i}.png")
        (folder / f"img_{i}.txt").write_text(f"a [trigger] block, color {i}", encoding="utf-8")
    return folder


def job_dict(tiny_flux_dir: Path, root: Path, **process: Any) -> dict[str, Any]:
    """An ai-toolkit job for the tiny model; ``process`` entries replace whole sections/keys."""
    data = root / "data"
    if not data.exists():
        make_dataset(data)
    proc: dict[str, Any] = {
        "type": "sd_trainer", "training_folder": str(root / "output"), "device": "cpu",
        "trigger_word": "zxq", "training_seed": 7,
        "network": {"type": "lora", "linear": 4, "linear_alpha": 4},
        "save": {"dtype": "float32", "save_every": 1000, "max_step_saves_to_keep": 2},
        "datasets": [{"folder_path": str(data), "cache_latents": True, "cache_text_embeddings": True,
                      "resolution": [64]}],
        "train": {"batch_size": 2, "steps": 4, "lr": 1e-3, "optimizer": "coat_fp8_adamw",
                  "gradient_checkpointing": False, "dtype": "bf16", "disable_sampling": True},
        "model": {"name_or_path": str(tiny_flux_dir), "is_flux": True},
        "sample": {"sample_every": 1000, "width": 64, "height": 64, "prompts": ["a [trigger] block"],
                   "sample_steps": 2, "guidance_scale": 3.5, "format": "png"},
        "coat": {"enabled": True},
    }
    proc.update(process)
    return {"job": "extension", "config": {"name": "run", "process": [proc]}, "meta": {"name": "[name]"}}


def load_job(tmp_path: Path, job: dict[str, Any], overrides: dict[str, Any] | None = None):
    path = tmp_path / f"job_{len(list(tmp_path.glob('job_*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(job), encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_config(path, overrides)


def run_job(tmp_path: Path, job: dict[str, Any], overrides: dict[str, Any] | None = None, **kwargs: Any):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train(load_job(tmp_path, job, overrides), **kwargs)


# ----------------------------------------------------------------------------------------------


def test_timesteps_and_flow_matching_target() -> None:
    g = torch.Generator().manual_seed(0)
    for kind in ("sigmoid", "linear", "shift", "flux_shift"):
        s = sample_sigmas(1000, kind, 1024, g)
        assert ((s > 0) & (s < 1)).all()
    assert flux_mu(256) == pytest.approx(0.5) and flux_mu(4096) == pytest.approx(1.15)
    assert shift_sigmas(torch.tensor([0.5]), 1.0).item() == pytest.approx(torch.e / (torch.e + 1))
    x0 = torch.randn(2, 16, 4, 4)
    noisy, target = noisy_latents(x0, torch.tensor([0.0, 1.0]), torch.Generator().manual_seed(1))
    noise = target + x0
    assert torch.allclose(noisy[0], x0[0]) and torch.allclose(noisy[1], noise[1], atol=1e-6)


def test_lr_schedules() -> None:
    assert lr_factor(0, "constant_with_warmup", 100, 10) == pytest.approx(0.1)
    assert lr_factor(50, "constant_with_warmup", 100, 10) == 1.0
    assert lr_factor(0, "constant", 100, 10) == 1.0
    assert lr_factor(10, "cosine", 110, 10) == pytest.approx(1.0)
    assert lr_factor(110, "cosine", 110, 10) == pytest.approx(0.0)
    assert lr_factor(60, "linear", 110, 10) == pytest.approx(0.5)


def _tail_mean(losses: list[float], n: int = 10) -> float:
    return sum(losses[-n:]) / n


def test_coat_and_plain_bf16_reach_the_same_loss(tmp_path: Path, tiny_flux_dir: Path) -> None:
    steps = {"steps": 30, "lr": 1e-3, "dtype": "bf16", "gradient_checkpointing": False, "disable_sampling": True,
             "batch_size": 2}
    coat = run_job(tmp_path, job_dict(tiny_flux_dir, tmp_path / "coat", train={**steps, "optimizer": "coat_fp8_adamw"}))
    plain = run_job(tmp_path, job_dict(tiny_flux_dir, tmp_path / "plain", train={**steps, "optimizer": "adamw"},
                                       coat={"enabled": False}))
    a, b = _tail_mean(coat.losses), _tail_mean(plain.losses)
    print(f"mean loss of the last 10 of 30 steps: COAT {a:.5f}, bf16 {b:.5f} ({abs(a - b) / b:.2%} apart)")
    assert abs(a - b) / b < 0.02
    assert coat.memory.blocks_coat < coat.memory.blocks_plain


def test_outputs_layout_metadata_and_checkpoint(tmp_path: Path, tiny_flux_dir: Path) -> None:
    job = job_dict(tiny_flux_dir, tmp_path, train={"steps": 6, "lr": 1e-3, "optimizer": "adamw", "dtype": "bf16",
                                                  "gradient_checkpointing": True, "gradient_accumulation": 2,
                                                  "lr_scheduler": "cosine", "timestep_type": "flux_shift",
                                                  "ema_config": {"use_ema": True, "ema_decay": 0.9},
                                                  "skip_first_sample": False},
                   save={"dtype": "float16", "save_every": 2, "max_step_saves_to_keep": 2})
    job["config"]["process"][0]["sample"]["sample_every"] = 3
    job["config"]["process"][0]["log_dir"] = str(tmp_path / "tb")
    result = run_job(tmp_path, job)
    out = tmp_path / "output" / "run"
    assert result.lora_path == out / "run.safetensors"
    assert sorted(p.name for p in out.glob("run_*.safetensors")) == ["run_000000002.safetensors",
                                                                     "run_000000004.safetensors"]
    assert sorted(p.name for p in (out / "samples").iterdir()) == [
        "000000000_0.png", "000000003_0.png", "000000006_0.png"]
    tensors, meta = read_lora(result.lora_path)
    assert all(t.dtype == torch.float16 for t in tensors.values())
    assert all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)
    assert json.loads(meta["training_info"])["step"] == 6 and meta["ss_base_model_version"] == "flux.1"
    assert meta["trigger_word"] == "zxq" and json.loads(meta["software"])["name"] == "coatflux"
    # newest max_checkpoints_to_keep (2) checkpoints kept: steps 4 and 6 (the final one)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000000004.pt", "step_000000006.pt"]
    ckpt = torch.load(out / "checkpoints" / "step_000000006.pt", weights_only=True)
    assert result.checkpoint == out / "checkpoints" / "step_000000006.pt"
    assert ckpt["step"] == 6 and ckpt["ema"] is not None and isinstance(ckpt["rng"]["python_random"], list)
    assert yaml.safe_load((out / "config.yaml").read_text())["config"]["name"] == "run"
    assert not list(out.rglob(".*.tmp"))
    assert list((tmp_path / "tb" / "run").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("optimizer", ["adafactor", "coat_fp8_adamw"])
def test_other_optimizers_and_fp8_quantize_without_coat(tmp_path: Path, tiny_flux_dir: Path, optimizer: str) -> None:
    job = job_dict(tiny_flux_dir, tmp_path, train={"steps": 2, "lr": 1e-3, "optimizer": optimizer, "dtype": "bf16",
                                                  "gradient_checkpointing": False, "disable_sampling": True},
                   coat={"enabled": False})
    job["config"]["process"][0]["model"]["quantize"] = True
    result = run_job(tmp_path, job)
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))


def test_adamw8bit_without_bitsandbytes_names_the_key(tmp_path: Path, tiny_flux_dir: Path) -> None:
    pytest.importorskip("torch")
    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes is installed")
    except ImportError:
        pass
    job = job_dict(tiny_flux_dir, tmp_path, train={"steps": 1, "optimizer": "adamw8bit", "disable_sampling": True})
    with pytest.raises(ConfigError, match=r"train\.optimizer.*coatflux\[bnb\]"):
        run_job(tmp_path, job)


def test_trained_lora_loads_in_pipeline_and_changes_output(tmp_path: Path, tiny_flux_dir: Path, tiny_flux_pipe,
                                                           load_lora_no_warnings) -> None:
    job = job_dict(tiny_flux_dir, tmp_path, train={"steps": 8, "lr": 1e-2, "optimizer": "coat_fp8_adamw",
                                                  "dtype": "fp32", "gradient_checkpointing": False,
                                                  "disable_sampling": True})
    result = run_job(tmp_path, job)

    def draw():
        return tiny_flux_pipe("a zxq block", height=64, width=64, num_inference_steps=2, guidance_scale=3.5,
                              generator=torch.Generator().manual_seed(0), output_type="pt").images
    before = draw()
    load_lora_no_warnings(tiny_flux_pipe, result.lora_path)
    after = draw()
    change = (after - before).abs().mean().item()
    print(f"mean absolute pixel change from the LoRA: {change:.4f}")
    assert change > 1e-3


def test_missing_dataset_folder_is_a_config_error(tmp_path: Path, tiny_flux_dir: Path) -> None:
    job = job_dict(tiny_flux_dir, tmp_path)
    job["config"]["process"][0]["datasets"][0]["folder_path"] = str(tmp_path / "nope")
    with pytest.raises(ConfigError, match=r"datasets\[0\]\.folder_path.*does not exist"):
        load_job(tmp_path, job)


def test_dataset_removed_after_load_fails_before_model_load(tmp_path: Path, tiny_flux_dir: Path, monkeypatch) -> None:
    import shutil

    from coatflux.trainer import loop
    from coatflux.trainer.data import DatasetError

    cfg = load_job(tmp_path, job_dict(tiny_flux_dir, tmp_path))
    shutil.rmtree(tmp_path / "data")
    monkeypatch.setattr(loop, "load_flux_components", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(DatasetError, match="does not exist"):
        train(cfg)


def test_finished_run_is_not_overwritten_silently(tmp_path: Path, tiny_flux_dir: Path) -> None:
    job = job_dict(tiny_flux_dir, tmp_path, train={"steps": 2, "optimizer": "adamw", "disable_sampling": True,
                                                  "gradient_checkpointing": False})
    first = run_job(tmp_path, job)
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_job(tmp_path, job)
    assert first.lora_path.is_file()
    again = run_job(tmp_path, job, overwrite=True)
    assert again.resumed_from is None and again.steps == 2


@pytest.mark.parametrize("allow", [False, True, None])
def test_training_keeps_cudnn_attention_unless_told_not_to(tmp_path: Path, tiny_flux_dir: Path, monkeypatch,
                                                          allow: bool | None) -> None:
    """cuDNN SDPA stays allowed by default (None: the key left out); ``false`` turns it off for the
    run, and the setting is restored afterwards."""
    from coatflux.trainer import loop

    seen = []
    monkeypatch.setattr(loop, "_train", lambda *args: seen.append(torch.backends.cuda.cudnn_sdp_enabled()))
    before = torch.backends.cuda.cudnn_sdp_enabled()
    model = {"name_or_path": str(tiny_flux_dir), "is_flux": True}
    if allow is not None:
        model["cudnn_attention"] = allow
    train(load_job(tmp_path, job_dict(tiny_flux_dir, tmp_path, model=model)))
    assert seen == [allow is not False and before]
    assert torch.backends.cuda.cudnn_sdp_enabled() == before


@pytest.mark.parametrize("allow", [False, True])
def test_cudnn_attention_trains_with_contiguous_attention_gradients(tmp_path: Path, tiny_flux_dir: Path,
                                                                   monkeypatch, allow: bool) -> None:
    """With ``model.cudnn_attention`` every block's attention hands SDPA a gradient laid out like its
    output (``coatflux.flux.attention``), hooked before training; without it nothing is hooked."""
    from coatflux.trainer import loop

    hooked, original = [], loop.keep_attention_grads_contiguous

    def keep(transformer):
        hooked.append(original(transformer))
        return hooked[-1]

    monkeypatch.setattr(loop, "keep_attention_grads_contiguous", keep)
    model = {"name_or_path": str(tiny_flux_dir), "is_flux": True, "cudnn_attention": allow}
    job = job_dict(tiny_flux_dir, tmp_path, model=model,
                   train={"steps": 1, "optimizer": "adamw", "disable_sampling": True})
    assert run_job(tmp_path, job).steps == 1
    assert hooked == ([4] if allow else [])  # the tiny FLUX's 2 double + 2 single blocks


@pytest.mark.parametrize("coat", [pytest.param(True, marks=pytest.mark.slow), False])  # ~60 s: dynamic shapes
def test_ai_toolkit_block_compile_compiles_the_blocks(tmp_path: Path, tiny_flux_dir: Path, monkeypatch, capsys,
                                                      coat: bool) -> None:
    """``model.compile`` + ``block_compile``: COAT's compiled blocks, or plain per-block compile without COAT.

    Traced with the aot_eager backend (no code generation) to keep the test short; the options
    from the YAML reach ``torch.compile``.
    """
    from coatflux.core import api, compiled

    calls, compile_blocks = [], compiled.compile_blocks

    def spy(model, block_classes=None, **options):
        calls.append(options)
        traced = {key: value for key, value in options.items() if key != "options"}  # inductor's, not aot_eager's
        return compile_blocks(model, block_classes, **{**traced, "backend": "aot_eager"})

    monkeypatch.setattr(api if coat else compiled, "compile_blocks", spy)
    # with COAT compile_dynamic stays at ai-toolkit's default (true): symbolic shapes once broke the
    # trace of the FP8 linear's backward (a float attribute became a symbolic input)
    model = {"name_or_path": str(tiny_flux_dir), "is_flux": True, "compile": True, "block_compile": True,
             **({} if coat else {"compile_dynamic": False})}
    job = job_dict(tiny_flux_dir, tmp_path, model=model, coat={"enabled": coat},
                   train={"batch_size": 2, "steps": 2, "lr": 1e-3, "dtype": "bf16", "disable_sampling": True,
                          "optimizer": "coat_fp8_adamw" if coat else "adamw", "gradient_checkpointing": False})
    result = run_job(tmp_path, job)
    partitioner = {"partitioner": compiled.COAT_PARTITIONER, "recompute": compiled.COAT_RECOMPUTE,
                   "save_parameter_casts": True, "options": dict(compiled.COAT_INDUCTOR_OPTIONS)} if coat else {}
    assert calls == [{"mode": "default", "dynamic": coat, "fullgraph": False, **partitioner}]
    assert result.steps == 2 and result.lora_path.is_file()
    out = capsys.readouterr().out
    assert "The first step compiles the transformer blocks" in out  # the user knows why it is slow
    assert out.count("compilation included") == 1
    assert all(torch.isfinite(t).all() for t in read_lora(result.lora_path)[0].values())


def test_cudagraph_compile_mode_marks_steps_and_keeps_gradient_buffers(tmp_path: Path, tiny_flux_dir: Path,
                                                                        monkeypatch) -> None:
    """``compile_mode: reduce-overhead`` replays the blocks as CUDA graphs: every micro-batch starts a
    new step for inductor's graph trees, and with accumulation the gradients live in buffers of
    their own (a graph replay would overwrite gradients it allocated). Traced with aot_eager."""
    from coatflux.core import compiled
    from coatflux.trainer import loop

    compile_blocks, marks, policies = compiled.compile_blocks, [], []
    monkeypatch.setattr(compiled, "compile_blocks", lambda model, block_classes=None, **options: compile_blocks(
        model, block_classes, **{**options, "backend": "aot_eager", "mode": None}))
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    zero_gradients = loop.zero_gradients

    def spy(optimizer, params, keep_buffers):
        policies.append(keep_buffers)
        zero_gradients(optimizer, params, keep_buffers)
        assert all((p.grad is not None) is keep_buffers for p in params)
        assert all(p.grad is None or not p.grad.any() for p in params)

    monkeypatch.setattr(loop, "zero_gradients", spy)
    model = {"name_or_path": str(tiny_flux_dir), "is_flux": True, "compile": True, "block_compile": True,
             "compile_mode": "reduce-overhead", "compile_dynamic": False}
    sample = {"sample_every": 2, "width": 64, "height": 64, "prompts": ["a [trigger] block"], "sample_steps": 2,
              "guidance_scale": 3.5, "format": "png"}
    job = job_dict(tiny_flux_dir, tmp_path, model=model, coat={"enabled": False}, sample=sample,
                   train={"batch_size": 1, "steps": 2, "gradient_accumulation": 2, "lr": 1e-3, "dtype": "bf16",
                          "optimizer": "adamw", "gradient_checkpointing": False})
    result = run_job(tmp_path, job)
    images = list((tmp_path / "output" / "run" / "samples").glob("*.png"))
    # 2 steps x 2 micro-batches, and per sample one mark before the pipeline and one per denoising step
    assert result.steps == 2 and images and len(marks) == 4 + 3 * len(images) and policies == [True, True]


def test_zero_gradients_drops_or_zeroes_in_place() -> None:
    from coatflux.trainer.loop import zero_gradients

    params = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2, 2))]
    optimizer = torch.optim.SGD(params, lr=0.1)
    zero_gradients(optimizer, params, keep_buffers=True)
    buffers = [p.grad for p in params]
    assert all(b is not None and not b.any() for b in buffers)
    sum(p.sum() for p in params).backward()
    assert all(p.grad is b and bool((b == 1).all()) for p, b in zip(params, buffers, strict=True))  # added in place
    zero_gradients(optimizer, params, keep_buffers=True)
    assert all(p.grad is b and not b.any() for p, b in zip(params, buffers, strict=True))
    zero_gradients(optimizer, params, keep_buffers=False)
    assert all(p.grad is None for p in params)


class _ScalarReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts ``.item()``/``float()``/``bool()`` on tensors, which on a GPU wait for its queue to drain,
    except of the optimizer's step counters: those live on the CPU, as in ``torch.optim``."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        super().__init__()
        self.optimizer, self.reads = optimizer, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            counters = [state.get("step") for state in self.optimizer.state.values()]
            self.reads += not any(args[0] is counter for counter in counters)
        return func(*args, **(kwargs or {}))


def test_a_step_reads_its_loss_and_gradient_norm_in_one_transfer(tmp_path: Path, tiny_flux_dir: Path,
                                                                 monkeypatch) -> None:
    """One host read per step (``tolist`` of both numbers, which the mode does not see): the loop
    used to read the loss, then the norm's finiteness, and a GPU idled after each."""
    from coatflux.trainer import loop

    reads, tolists, original_step, original_tolist = [], [0], loop._Loop.step, torch.Tensor.tolist

    def counted_step(self, state, stream):
        with _ScalarReads(self.run_.optimizer) as mode:
            value = original_step(self, state, stream)
        reads.append(mode.reads)
        return value

    def counted_tolist(self):
        tolists[0] += 1
        return original_tolist(self)
    monkeypatch.setattr(loop._Loop, "step", counted_step)
    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    result = run_job(tmp_path, job_dict(tiny_flux_dir, tmp_path, train={
        "steps": 3, "lr": 1e-3, "optimizer": "coat_fp8_adamw", "max_grad_norm": 1.0, "dtype": "bf16",
        "gradient_checkpointing": False, "disable_sampling": True, "batch_size": 2}))
    assert result.steps == 3 and all(map(math.isfinite, result.losses))
    assert reads == [0, 0, 0]
    assert tolists[0] == 3
