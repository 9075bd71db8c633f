"""The run's output folder: LoRA files, the resumable checkpoint, pruning and the overwrite guard.

Layout (ai-toolkit's, so its tools and habits carry over)::

    <training_folder>/<name>/
        <name>_000000250.safetensors   every save.save_every steps, newest max_step_saves_to_keep kept
        <name>.safetensors             the final LoRA
        optimizer.pt                   everything needed to continue exactly (see below)
        config.yaml                    the config as run
        samples/<step>_<i>.<format>

``optimizer.pt`` holds the optimizer, LR scheduler and EMA states, the step, the data position
(epoch, batch index), the RNG states and the *raw* LoRA tensors (B not multiplied by alpha/rank,
in the training dtype). We resume from it and not from the newest ``.safetensors`` as ai-toolkit
does, because the files have alpha folded in and are cast to ``save.dtype``: reloading them is not
bit-exact, and a resumed run would drift from an uninterrupted one. It contains only tensors,
numbers, strings, lists and dicts, so ``torch.load(..., weights_only=True)`` reads it (no pickled
code runs on resume).

Every file is written to a temporary name in the same folder and ``os.replace``-d into place, so a
crash leaves either the old file or the new one, never half of one; ``optimizer.pt`` is written
after the step's LoRA file, so a checkpoint on disk always has its LoRA next to it.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

CHECKPOINT_NAME = "optimizer.pt"


@dataclass(frozen=True)
class RunPaths:
    """Where one run's files go."""

    output_dir: Path
    name: str

    @property
    def final_lora(self) -> Path:
        return self.output_dir / f"{self.name}.safetensors"

    @property
    def checkpoint(self) -> Path:
        return self.output_dir / CHECKPOINT_NAME

    @property
    def samples(self) -> Path:
        return self.output_dir / "samples"

    @property
    def config(self) -> Path:
        return self.output_dir / "config.yaml"

    def step_lora(self, step: int) -> Path:
        return self.output_dir / f"{self.name}_{step:09d}.safetensors"

    def step_loras(self) -> list[tuple[int, Path]]:
        """``(step, path)`` of the step files on disk, oldest first."""
        pattern = re.compile(rf"{re.escape(self.name)}_(\d{{9}})\.safetensors")
        found = []
        for path in self.output_dir.glob(f"{self.name}_*.safetensors"):
            match = pattern.fullmatch(path.name)
            if match:
                found.append((int(match.group(1)), path))
        return sorted(found)


def atomic_write(path: Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then move the result to ``path`` in one ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_config(paths: RunPaths, raw: dict[str, Any]) -> None:
    def dump(tmp: str) -> None:
        Path(tmp).write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True), encoding="utf-8")
    atomic_write(paths.config, dump)


def prune_step_loras(paths: RunPaths, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest step files (by step number); returns what was deleted."""
    files = paths.step_loras()
    doomed = [path for _, path in files[:-keep]] if len(files) > keep else []
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


# ----------------------------------------------------------------------------------------------
# RNG states, in a weights_only-loadable form.


def capture_rng(generator: torch.Generator) -> dict[str, Any]:
    version, internal, gauss_next = random.getstate()
    return {
        "generator": generator.get_state(),
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python_random": [version, *internal],
        "python_gauss_next": gauss_next,
    }


def restore_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_cpu"])
    if state["torch_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch_cuda"])
    version, *internal = state["python_random"]
    random.setstate((version, tuple(internal), state["python_gauss_next"]))


# ----------------------------------------------------------------------------------------------
# The checkpoint file.


def save_checkpoint(paths: RunPaths, state: dict[str, Any]) -> Path:
    return atomic_write(paths.checkpoint, lambda tmp: torch.save(state, tmp))


def load_checkpoint(paths: RunPaths) -> dict[str, Any] | None:
    """The checkpoint dict, or None when the folder has none."""
    if not paths.checkpoint.is_file():
        return None
    return torch.load(paths.checkpoint, map_location="cpu", weights_only=True)


def prepare_output_dir(paths: RunPaths, total_steps: int, overwrite: bool) -> dict[str, Any] | None:
    """Decide between a fresh start and a resume; returns the checkpoint to resume from, if any.

    A checkpoint whose step is below ``total_steps`` is resumed. Otherwise, if LoRA files of an
    earlier run are present, we stop (``FileExistsError``) unless ``overwrite``, which deletes that
    run's LoRAs, checkpoint and samples first -- never silently.
    """
    checkpoint = None if overwrite else load_checkpoint(paths)
    if checkpoint is not None and int(checkpoint["step"]) < total_steps:
        return checkpoint
    earlier = ([paths.final_lora] if paths.final_lora.exists() else []) + [p for _, p in paths.step_loras()]
    if earlier and not overwrite:
        done = f"finished at step {checkpoint['step']}" if checkpoint else "finished or from another tool"
        raise FileExistsError(
            f"{paths.output_dir} already holds a run ({done}: {earlier[0].name}); nothing to resume for "
            f"{total_steps} steps. Raise train.steps to continue it, change config.name or training_folder, "
            "or pass --overwrite to replace it")
    for path in [*earlier, paths.checkpoint]:
        path.unlink(missing_ok=True)
    if overwrite and paths.samples.is_dir():
        shutil.rmtree(paths.samples)
    return None
