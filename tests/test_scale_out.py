"""Growing past one LoRA on one GPU: full fine-tuning, and data parallelism with 2 CPU processes (gloo)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from coatflux.flux.lora import read_lora
from test_train_loop import job_dict, run_job

FULL_TRAIN = {"steps": 4, "lr": 1e-3, "optimizer": "coat_fp8_adamw", "dtype": "bf16", "gradient_checkpointing": True,
              "disable_sampling": True, "lr_scheduler": "constant"}


def _full_job(tiny_flux_dir: Path, root: Path, **network) -> dict:
    job = job_dict(tiny_flux_dir, root, train=dict(FULL_TRAIN), network={"type": "full", **network},
                   save={"dtype": "float32", "save_every": 2, "max_step_saves_to_keep": 2})
    return job


def _transformer_state(folder: Path) -> dict[str, torch.Tensor]:
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(folder, torch_dtype=torch.float32)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_full_fine_tune_saves_a_diffusers_transformer_and_resumes_exactly(tmp_path: Path, tiny_flux_dir: Path) -> None:
    job = _full_job(tiny_flux_dir, tmp_path / "a")
    run_job(tmp_path, job, {"train.steps": 2})
    resumed = run_job(tmp_path, job)
    assert resumed.resumed_from == 2 and resumed.lora_path == tmp_path / "a" / "output" / "run" / "transformer"
    straight = run_job(tmp_path, _full_job(tiny_flux_dir, tmp_path / "b"))
    a, b = _transformer_state(resumed.lora_path), _transformer_state(straight.lora_path)
    base = _transformer_state(tiny_flux_dir / "transformer")
    assert a.keys() == b.keys() == base.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    changed = [k for k in a if not torch.equal(a[k], base[k].to(torch.bfloat16).float())]
    assert len(changed) > 0.9 * len(a)  # every weight trains (a few zero-initialised ones may not move)
    # The saved folder holds exactly the trained tensors of the checkpoint (bf16 master weights).
    ckpt = torch.load(resumed.checkpoint, weights_only=True)
    for key, value in ckpt["weights"].items():
        assert torch.equal(a[key], value.float()), key
    step_file = load_file(straight.output_dir / "run_000000002.safetensors")
    assert set(step_file) == set(ckpt["weights"])


def test_full_fine_tune_of_selected_weights_keeps_the_rest_exactly(tmp_path: Path, tiny_flux_dir: Path) -> None:
    job = _full_job(tiny_flux_dir, tmp_path, network_kwargs={"only_if_contains": ["transformer.transformer_blocks.0.attn.to_"]})
    result = run_job(tmp_path, job)
    saved, base = _transformer_state(result.lora_path), _transformer_state(tiny_flux_dir / "transformer")
    trained = {k for k in saved if not torch.equal(saved[k], base[k])}
    assert trained and all(k.startswith("transformer_blocks.0.attn.to_") for k in trained)
    # Frozen linears ran as FP8 during training; the saved model has the user's weights, not FP8 copies.
    assert torch.equal(saved["single_transformer_blocks.0.proj_out.weight"],
                       base["single_transformer_blocks.0.proj_out.weight"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path: Path, tiny_flux_dir: Path) -> None:
    """2 ranks x batch 1 x accumulation 1 against 1 process x batch 1 x accumulation 2.

    Both see the same micro-batches with the same noise (the global sequence is split round-robin,
    and each micro-batch's generator is seeded by its global index), and each micro-batch is its
    own forward, so COAT's per-tensor FP8 scales are the same too. What differs is the order of
    the gradient sum: ``(g0 + g1) / 2`` after the all-reduce against ``g0 / 2 + g1 / 2``, a last-bit
    difference, which two amplifiers can grow. AdamW's ``g / (sqrt(v) + eps)`` is steep for a
    gradient near zero: with its usual ``eps`` one weight moved 1.5 ``lr`` apart in a CI run
    (2026-11-27; how much depends on the latents, whose draws are seeded by a cache key that names
    the model's folder, a new temporary one per test session),
    so this test takes ``eps = 1e-3``, where the update is about linear in small gradients. And
    COAT's FP8 rounding is a step function: a last bit in a weight can move an activation across a
    rounding boundary, one FP8 step. Measured over ten runs here: at most 2.5e-6 (0.0025 ``lr``)
    apart, 2.7e-8 on average. A wrong split (both ranks on the same batch, or a micro-batch
    dropped) moves them 1.9e-3 apart at most and 5.6e-5 on average (measured with one micro-batch
    per step instead of two): the bounds sit between, about 40x from each.
    """
    steps, lr = 4, 1e-3
    train = {"steps": steps, "lr": lr, "optimizer": "adamw", "optimizer_params": {"eps": 1e-3}, "dtype": "float32",
             "gradient_checkpointing": False, "disable_sampling": True, "batch_size": 1}
    single = run_job(tmp_path, job_dict(tiny_flux_dir, tmp_path / "one", train={**train, "gradient_accumulation": 2}))
    job = job_dict(tiny_flux_dir, tmp_path / "one", train={**train, "gradient_accumulation": 1})
    job["config"]["name"] = "ddp"
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(job), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(_free_port()), "-m", "coatflux", "train", str(config)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes, global batch 2 (batch 1 x accumulation 1 x 2)" in done.stdout + done.stderr
    assert done.stdout.count("LoRA: ") == 1  # only rank 0 reports (and writes)
    a, _ = read_lora(single.lora_path)
    b, _ = read_lora(single.output_dir.parent / "ddp" / "ddp.safetensors")
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    moved = torch.cat([a[k].abs().flatten() for k in a if k.endswith("lora_B.weight")])
    assert moved.mean() > 0.1 * lr  # the LoRA did train (B starts at zero)
    assert diff.max() <= 0.1 * lr and diff.mean() <= 1e-3 * lr, (diff.max(), diff.mean())


@pytest.mark.parametrize("world", [1])
def test_runtime_single_process_is_plain(world: int) -> None:
    from coatflux.trainer.distributed import make_runtime

    runtime = make_runtime(torch.device("cpu"))
    model = torch.nn.Linear(2, 2)
    assert runtime.world_size == world and runtime.is_main and runtime.wrap(model) is model
    assert runtime.mean(3.0) == 3.0 and runtime.any(True) and not runtime.any(False)
