"""Stopping at a checkpoint and resuming gives bit-for-bit the LoRA of an uninterrupted run (CPU)."""

from __future__ import annotations

from pathlib import Path

import torch

from coatflux.flux.lora import read_lora
from test_train_loop import job_dict, run_job

TRAIN = {"steps": 6, "lr": 1e-3, "optimizer": "coat_fp8_adamw", "dtype": "bf16", "gradient_checkpointing": False,
         "disable_sampling": True, "lr_scheduler": "constant_with_warmup",
         "lr_scheduler_params": {"num_warmup_steps": 2}, "ema_config": {"use_ema": True, "ema_decay": 0.9}}


def _job(tiny_flux_dir: Path, root: Path, data: Path) -> dict:
    # A warmup-then-constant schedule: cosine/linear depend on train.steps, which run 1 lowers.
    job = job_dict(tiny_flux_dir, root, train=dict(TRAIN), save={"dtype": "float32", "save_every": 3})
    # caption dropout and flips exercise the data plan's randomness across the resume
    job["config"]["process"][0]["datasets"][0].update(folder_path=str(data), caption_dropout_rate=0.3, flip_x=True)
    return job


def test_resume_matches_uninterrupted_run(tmp_path: Path, tiny_flux_dir: Path, capsys) -> None:
    data = tmp_path / "shared"
    job_dict(tiny_flux_dir, data)  # writes data/ under it
    data = data / "data"
    resumed_job = _job(tiny_flux_dir, tmp_path / "a", data)
    first = run_job(tmp_path, resumed_job, {"train.steps": 3})
    assert first.steps == 3
    second = run_job(tmp_path, resumed_job)
    assert second.resumed_from == 3 and second.steps == 6
    assert "Resuming run from" in capsys.readouterr().out
    straight = run_job(tmp_path, _job(tiny_flux_dir, tmp_path / "b", data))

    a, _ = read_lora(second.lora_path)
    b, _ = read_lora(straight.lora_path)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert second.losses == straight.losses[3:]
    ckpt_a = torch.load(second.checkpoint, weights_only=True)
    ckpt_b = torch.load(straight.checkpoint, weights_only=True)
    for key in ckpt_a["weights"]:
        assert torch.equal(ckpt_a["weights"][key], ckpt_b["weights"][key]), key
