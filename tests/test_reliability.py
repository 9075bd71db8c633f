"""Nothing lost: crashes, kills, stop signals, bad checkpoints, non-finite steps, OOM, full disks.

Every interrupted run here is resumed and must end with the same weights, bit for bit, as an
uninterrupted one (CPU). "Crashes" are raised from inside the loss at a chosen micro-batch
(in-process, fast); one test kills a real process with SIGKILL and one sends SIGTERM.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import yaml

import coatflux.trainer.loop as loop
from coatflux.flux.lora import read_lora
from coatflux.trainer.checkpoint import CheckpointError, CheckpointWarning
from coatflux.trainer.faults import NonFiniteError, TrainingOutOfMemory
from test_train_loop import job_dict, run_job

TRAIN = {"steps": 5, "lr": 1e-3, "optimizer": "coat_fp8_adamw", "dtype": "bf16", "gradient_checkpointing": False,
         "gradient_accumulation": 2, "disable_sampling": True, "lr_scheduler": "constant_with_warmup",
         "lr_scheduler_params": {"num_warmup_steps": 2}, "ema_config": {"use_ema": True, "ema_decay": 0.9}}


class Crash(BaseException):
    """Stands in for the process dying: nothing of the run's Python state survives a new train()."""


def _job(tiny_flux_dir: Path, root: Path, data: Path, **train) -> dict:
    job = job_dict(tiny_flux_dir, root, train={**TRAIN, **train},
                   save={"dtype": "float32", "save_every": 1, "max_step_saves_to_keep": 2})
    job["config"]["process"][0]["datasets"][0].update(folder_path=str(data), caption_dropout_rate=0.3, flip_x=True)
    return job


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, tiny_flux_dir: Path) -> dict:
    """The dataset and the uninterrupted reference run, made once."""
    root = tmp_path_factory.mktemp("reliability")
    job_dict(tiny_flux_dir, root)  # writes root/data
    straight = run_job(root, _job(tiny_flux_dir, root / "straight", root / "data"))
    return {"data": root / "data", "lora": read_lora(straight.lora_path)[0], "losses": straight.losses}


def _training(args: tuple, kwargs: dict) -> bool:
    """A training call of flow_matching_loss passes the model to call (the memory table and the
    non-finite replay do not)."""
    return (args[6] if len(args) > 6 else kwargs.get("model")) is not None


def _crash_at(monkeypatch: pytest.MonkeyPatch, call: int, exc: BaseException) -> None:
    """Raise ``exc`` from the ``call``-th training micro-batch (1-based)."""
    original, calls = loop.flow_matching_loss, [0]

    def patched(*args, **kwargs):
        if _training(args, kwargs):
            calls[0] += 1
            if calls[0] == call:
                raise exc
        return original(*args, **kwargs)
    monkeypatch.setattr(loop, "flow_matching_loss", patched)


def _assert_same_lora(path: Path, reference: dict[str, torch.Tensor]) -> None:
    tensors, _ = read_lora(path)
    assert tensors.keys() == reference.keys()
    for key in tensors:
        assert torch.equal(tensors[key], reference[key]), key


# Micro-batch 1 is before any checkpoint; 4 ends step 2's accumulation; 6 is the second micro-batch
# of step 3 (mid-accumulation); 9 is the first of the last step.
@pytest.mark.parametrize("call", [1, 4, 6, 9])
def test_crash_anywhere_then_resume_is_bit_identical(tmp_path: Path, tiny_flux_dir: Path, shared: dict,
                                                     monkeypatch: pytest.MonkeyPatch, call: int) -> None:
    job = _job(tiny_flux_dir, tmp_path, shared["data"])
    _crash_at(monkeypatch, call, Crash())
    with pytest.raises(Crash):
        run_job(tmp_path, job)
    monkeypatch.undo()
    resumed = run_job(tmp_path, job)
    assert resumed.resumed_from == (None if call <= 2 else (call - 1) // 2)
    _assert_same_lora(resumed.lora_path, shared["lora"])


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path: Path, tiny_flux_dir: Path, shared: dict,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    job = _job(tiny_flux_dir, tmp_path, shared["data"])
    original, calls = torch.save, [0]

    def dying_save(obj, f, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:  # the third checkpoint: half of it reaches the disk, then the process dies
            Path(f).write_bytes(b"PK\x03\x04 half a zip")
            raise Crash()
        return original(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(Crash):
        run_job(tmp_path, job)
    monkeypatch.undo()
    folder = tmp_path / "output" / "run" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step_000000001.pt", "step_000000002.pt"]
    # A SIGKILL leaves its temporary file behind (here, by hand); the next start clears them.
    leftovers = [folder / ".step_000000003.pt.x1.tmp", tmp_path / "output" / "run" / ".run_000000003.safetensors.x.tmp"]
    for path in leftovers:
        path.write_bytes(b"half")
    resumed = run_job(tmp_path, job)
    assert resumed.resumed_from == 2 and not any(p.exists() for p in leftovers)
    _assert_same_lora(resumed.lora_path, shared["lora"])


def test_unreadable_or_foreign_checkpoint_is_reported_and_the_previous_one_used(
        tmp_path: Path, tiny_flux_dir: Path, shared: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    job = _job(tiny_flux_dir, tmp_path, shared["data"])
    _crash_at(monkeypatch, 9, Crash())
    with pytest.raises(Crash):
        run_job(tmp_path, job)
    monkeypatch.undo()
    folder = tmp_path / "output" / "run" / "checkpoints"
    newest = folder / "step_000000004.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated by a dying disk
    with pytest.warns(CheckpointWarning, match="step_000000004.pt cannot be read"):
        resumed = loop.train(_load(tmp_path, job))
    assert resumed.resumed_from == 3
    _assert_same_lora(resumed.lora_path, shared["lora"])
    # A checkpoint of another config (here another LoRA rank) is refused by name, before loading.
    for path in folder.iterdir():
        path.unlink()
    other = _job(tiny_flux_dir, tmp_path, shared["data"], steps=2)
    other["config"]["process"][0]["network"]["linear"] = 8
    run_job(tmp_path, other, overwrite=True)
    with pytest.raises(CheckpointError, match=r"network.linear is '8' there, '4' now"):
        run_job(tmp_path, job)


def _load(tmp_path: Path, job: dict):
    from test_train_loop import load_job

    return load_job(tmp_path, job)


def test_nonfinite_steps_are_skipped_counted_and_located(tmp_path: Path, tiny_flux_dir: Path, shared: dict,
                                                         monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    poisoned = {"on": False}
    original_build, original_loss, calls = loop.build_network, loop.flow_matching_loss, [0]

    def build(transformer, *args, **kwargs):
        network = original_build(transformer, *args, **kwargs)

        def poison(_module, _args, output):
            return output * float("nan") if poisoned["on"] else output
        transformer.transformer_blocks[0].ff.register_forward_hook(poison)
        return network

    def loss(*args, **kwargs):
        if _training(args, kwargs):
            calls[0] += 1
            poisoned["on"] = calls[0] in bad  # and stays on for the replay that locates it
        return original_loss(*args, **kwargs)
    monkeypatch.setattr(loop, "build_network", build)
    monkeypatch.setattr(loop, "flow_matching_loss", loss)

    bad = {3, 8}  # steps 2 and 4: not in a row
    result = run_job(tmp_path, _job(tiny_flux_dir, tmp_path / "a", shared["data"], max_nonfinite_steps=2))
    assert result.skipped_steps == 2 and result.steps == 5
    assert "step 2: non-finite loss" in caplog.text and "transformer_blocks.0.ff" in caplog.text
    tensors, _ = read_lora(result.lora_path)
    assert all(torch.isfinite(t).all() for t in tensors.values())

    calls[0], bad = 0, {3, 5}  # steps 2 and 3 in a row: the run stops with a checkpoint
    with pytest.raises(NonFiniteError, match="2 optimizer steps in a row") as info:
        run_job(tmp_path, _job(tiny_flux_dir, tmp_path / "b", shared["data"], max_nonfinite_steps=2))
    assert "step_000000003.pt" in str(info.value) and "img_" in str(info.value)


def test_out_of_memory_saves_and_explains(tmp_path: Path, tiny_flux_dir: Path, shared: dict,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    job = _job(tiny_flux_dir, tmp_path, shared["data"])
    job["config"]["process"][0]["save"]["save_every"] = 100
    _crash_at(monkeypatch, 5, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    with pytest.raises(TrainingOutOfMemory) as info:
        run_job(tmp_path, job)
    message = str(info.value)
    assert "Out of memory at step 3" in message and "📊 [out_of_memory]" in message
    assert "train.gradient_checkpointing: true" in message
    assert "checkpoint of step 2" in message
    monkeypatch.undo()
    resumed = run_job(tmp_path, job)
    assert resumed.resumed_from == 2
    _assert_same_lora(resumed.lora_path, shared["lora"])


def test_full_disk_names_the_file_and_keeps_earlier_outputs(tmp_path: Path, tiny_flux_dir: Path, shared: dict,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    job = _job(tiny_flux_dir, tmp_path, shared["data"])
    original, calls = safetensors.torch.save_file, [0]

    def full_disk(tensors, filename, metadata=None):
        calls[0] += 1
        if calls[0] == 3:
            Path(filename).write_bytes(b"\0" * 100)  # what fitted before the disk filled up
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(tensors, filename, metadata=metadata)
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    out = tmp_path / "output" / "run"
    with pytest.raises(OSError, match=r"cannot write .*run_000000003.safetensors: No space left on device"):
        run_job(tmp_path, job)
    assert read_lora(out / "run_000000002.safetensors")[0]  # the earlier file is whole
    assert not list(out.rglob(".*.tmp"))
    monkeypatch.undo()
    resumed = run_job(tmp_path, job)
    assert resumed.resumed_from == 2
    _assert_same_lora(resumed.lora_path, shared["lora"])


@pytest.mark.parametrize("kind", ["read-only", "under a file"])
def test_unwritable_output_folder_fails_before_loading(tmp_path: Path, tiny_flux_dir: Path, shared: dict,
                                                       monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    if kind == "read-only" and os.geteuid() == 0:
        pytest.skip("root ignores permissions")
    job = _job(tiny_flux_dir, tmp_path, shared["data"])
    blocked = tmp_path / "output"
    if kind == "read-only":
        blocked.mkdir()
        blocked.chmod(0o500)
    else:
        blocked.write_text("a file where the training folder should be")
    monkeypatch.setattr(loop, "load_flux_components", lambda *a, **k: pytest.fail("model loaded"))
    try:
        with pytest.raises(OSError, match=str(blocked)):
            run_job(tmp_path, job)
    finally:
        if kind == "read-only":
            blocked.chmod(0o700)


# ----------------------------------------------------------------------------------------------
# Real processes: SIGKILL at a random instant, SIGTERM mid-step.

DRIVER = textwrap.dedent("""
    import os, signal, sys
    import coatflux.trainer.loop as loop
    from coatflux.cli import main
    sig, at = int(sys.argv[2]), int(sys.argv[3])
    original, calls = loop.flow_matching_loss, [0]
    def patched(*args, **kwargs):
        if (args[6] if len(args) > 6 else kwargs.get("model")) is not None:  # training, not measuring
            calls[0] += 1
            if calls[0] == at:
                os.kill(os.getpid(), sig)
        return original(*args, **kwargs)
    loop.flow_matching_loss = patched
    sys.exit(main(["train", sys.argv[1]]))
""")


def _run_driver(tmp_path: Path, job: dict, sig: int, at: int) -> subprocess.CompletedProcess:
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(job), encoding="utf-8")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", DRIVER, str(config), str(int(sig)), str(at)], capture_output=True,
                          text=True, env=env, timeout=300, cwd=tmp_path)


@pytest.mark.slow
def test_sigkill_and_sigterm_in_real_processes(tmp_path: Path, tiny_flux_dir: Path, shared: dict) -> None:
    job = _job(tiny_flux_dir, tmp_path, shared["data"])
    killed = _run_driver(tmp_path, job, signal.SIGKILL, 6)  # mid-accumulation of step 3
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    stopped = _run_driver(tmp_path, job, signal.SIGTERM, 3)  # resumed at step 2: first micro-batch of step 4
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    assert "Stopped by SIGTERM at step" in stopped.stdout and "Resume with the same command" in stopped.stdout
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed = run_job(tmp_path, job)
    assert resumed.resumed_from is not None and resumed.resumed_from >= 3
    _assert_same_lora(resumed.lora_path, shared["lora"])


def test_fp8_range_counts_per_layer_in_the_debug_log(tmp_path: Path, tiny_flux_dir: Path, shared: dict,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    import logging

    caplog.set_level(logging.DEBUG, logger="coatflux.trainer.loop")
    run_job(tmp_path, _job(tiny_flux_dir, tmp_path, shared["data"], steps=2))
    lines = [r.getMessage() for r in caplog.records if "FP8 range:" in r.getMessage()]
    assert [line.split(":")[0] for line in lines] == ["step 1", "step 2"]
    # Layers are named in the line only when they lost values, which depends on the data; the
    # counts themselves are always there.
    import re

    assert re.search(r"FP8 range: [1-9]\d* values in [1-9]\d* tensors; overflow \d+, underflow \d+", lines[0])
