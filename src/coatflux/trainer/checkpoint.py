"""The run's output folder: weight files, resumable checkpoints, pruning and the overwrite guard.

Layout (ai-toolkit's for the files users handle, so its tools and habits carry over)::

    <training_folder>/<name>/
        <name>_000000250.safetensors   every save.save_every steps, newest max_step_saves_to_keep kept
        <name>.safetensors             the final LoRA (network.type: full -> transformer/, a diffusers folder)
        checkpoints/step_000000250.pt  resumable state, newest save.max_checkpoints_to_keep kept
        config.yaml                    the config as run
        samples/<step>_<i>.<format>

A checkpoint holds the optimizer, LR scheduler and EMA states, the step, the data position, the
RNG states, the count of non-finite steps and the *raw* trained tensors (LoRA B not multiplied by
alpha/rank; in the training dtype). We resume from it and not from the newest ``.safetensors`` as
ai-toolkit does, because those files have alpha folded in and are cast to ``save.dtype``:
reloading them is not bit-exact, and a resumed run would drift from an uninterrupted one. It holds
only tensors, numbers, strings, lists and dicts, so ``torch.load(..., weights_only=True)`` reads it
(no pickled code runs on resume).

Why several checkpoints and not one ``optimizer.pt``: a machine that dies while the disk is full,
or a file damaged later, must not cost the run. Every file is written to a temporary name in the
same folder, flushed to disk and ``os.replace``-d into place, so a kill at any instant leaves the
old file or the new one, never half of one; and on resume a checkpoint that cannot be used
(truncated, unreadable, written by another config) is reported by name and the next older one is
tried. Each checkpoint records a fingerprint of the settings that make its tensors and data
position meaningful (model, network, optimizer, batch size, accumulation), so a checkpoint of
another config is recognised before the model loads instead of failing later with a shape error.
"""

from __future__ import annotations

import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from coatflux.atomic import atomic_write

CHECKPOINT_VERSION = 2
CHECKPOINT_DIR = "checkpoints"
LEGACY_CHECKPOINT = "optimizer.pt"  # coatflux 0.1.0 kept one checkpoint under ai-toolkit's name


class CheckpointWarning(UserWarning):
    """A checkpoint on disk could not be used and was skipped."""


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was expected."""


@dataclass(frozen=True)
class RunPaths:
    """Where one run's files go."""

    output_dir: Path
    name: str

    @property
    def final_lora(self) -> Path:
        return self.output_dir / f"{self.name}.safetensors"

    @property
    def final_transformer(self) -> Path:
        return self.output_dir / "transformer"

    @property
    def checkpoints(self) -> Path:
        return self.output_dir / CHECKPOINT_DIR

    @property
    def samples(self) -> Path:
        return self.output_dir / "samples"

    @property
    def config(self) -> Path:
        return self.output_dir / "config.yaml"

    def step_lora(self, step: int) -> Path:
        return self.output_dir / f"{self.name}_{step:09d}.safetensors"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:09d}.pt"

    def step_loras(self) -> list[tuple[int, Path]]:
        """``(step, path)`` of the step files on disk, oldest first."""
        return _numbered(self.output_dir, rf"{re.escape(self.name)}_(\d{{9}})\.safetensors")

    def checkpoint_files(self) -> list[tuple[int, Path]]:
        """``(step, path)`` of the checkpoints on disk, oldest first (temporary files excluded)."""
        return _numbered(self.checkpoints, r"step_(\d{9})\.pt") if self.checkpoints.is_dir() else []


def _numbered(folder: Path, pattern: str) -> list[tuple[int, Path]]:
    regex = re.compile(pattern)
    found = []
    for path in folder.iterdir() if folder.is_dir() else ():
        match = regex.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def write_config(paths: RunPaths, raw: dict[str, Any]) -> None:
    def dump(tmp: str) -> None:
        Path(tmp).write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True), encoding="utf-8")
    atomic_write(paths.config, dump)


def prune_step_loras(paths: RunPaths, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest step files (by step number); returns what was deleted."""
    return _prune(paths.step_loras(), keep)


def _prune(files: list[tuple[int, Path]], keep: int) -> list[Path]:
    doomed = [path for _, path in files[:-keep]] if len(files) > keep else []
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


# ----------------------------------------------------------------------------------------------
# RNG states, in a weights_only-loadable form.


def capture_rng() -> dict[str, Any]:
    version, internal, gauss_next = random.getstate()
    return {
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python_random": [version, *internal],
        "python_gauss_next": gauss_next,
    }


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch_cpu"])
    if state["torch_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch_cuda"])
    version, *internal = state["python_random"]
    random.setstate((version, tuple(internal), state["python_gauss_next"]))


# ----------------------------------------------------------------------------------------------
# Checkpoint files.


def save_checkpoint(paths: RunPaths, state: dict[str, Any], keep: int) -> Path:
    """Write ``checkpoints/step_<step>.pt`` atomically, then delete all but the ``keep`` newest."""
    path = atomic_write(paths.checkpoint(int(state["step"])), lambda tmp: torch.save(state, tmp))
    _prune(paths.checkpoint_files(), keep)
    return path


def _read_checkpoint(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint at ``path``; ValueError saying why it cannot be resumed from."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, bad pickle, I/O error: all mean "unusable"
        raise ValueError(f"cannot be read ({type(error).__name__}: {str(error).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        found = state.get("version") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"has format {found!r}, this coatflux reads format {CHECKPOINT_VERSION}")
    differs = [key for key in sorted(set(fingerprint) | set(state.get("fingerprint", {})))
               if fingerprint.get(key) != state.get("fingerprint", {}).get(key)]
    if differs:
        key = differs[0]
        raise ValueError(f"was written by another config: {key} is {state['fingerprint'].get(key)!r} there, "
                         f"{fingerprint.get(key)!r} now")
    return state


def newest_checkpoint(paths: RunPaths, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The newest usable checkpoint; each unusable newer one is reported by name and skipped.

    Returns None when the folder has no checkpoint; raises :class:`CheckpointError` when it has
    some and none is usable, because starting over would then overwrite that run's files.
    """
    candidates = [path for _, path in reversed(paths.checkpoint_files())]
    legacy = paths.output_dir / LEGACY_CHECKPOINT
    if legacy.is_file():
        candidates.append(legacy)
    problems = []
    for path in candidates:
        try:
            return _read_checkpoint(path, fingerprint)
        except ValueError as error:
            problems.append(f"{path}: {error}")
            warnings.warn(f"checkpoint {path} {error}; trying the one before it", CheckpointWarning, stacklevel=2)
    if problems:
        raise CheckpointError("no usable checkpoint in " + str(paths.output_dir) + ":\n  " + "\n  ".join(problems)
                              + "\nMove the output folder aside, or pass --overwrite to start the run over")
    return None


def _remove_stale_temporaries(paths: RunPaths) -> None:
    """Delete what a killed run left half-written (``.<name>.*.tmp``; see :mod:`coatflux.atomic`).

    A ``.<name>.old-*`` folder is kept: it holds the previous final folder if a kill landed between
    the two renames of :func:`~coatflux.atomic.atomic_write_dir`.
    """
    if not paths.output_dir.is_dir():
        return
    for path in sorted(paths.output_dir.rglob(".*.tmp"), reverse=True):  # caches, samples, checkpoints too
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def prepare_output_dir(paths: RunPaths, total_steps: int, overwrite: bool,
                       fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """Decide between a fresh start and a resume; returns the checkpoint to resume from, if any.

    A usable checkpoint whose step is below ``total_steps`` is resumed. Otherwise, if files of an
    earlier run are present, we stop (``FileExistsError``) unless ``overwrite``, which deletes that
    run's weight files, checkpoints and samples first -- never silently.
    """
    _remove_stale_temporaries(paths)
    checkpoint = None if overwrite else newest_checkpoint(paths, fingerprint)
    if checkpoint is not None and int(checkpoint["step"]) < total_steps:
        return checkpoint
    finals = [p for p in (paths.final_lora, paths.final_transformer) if p.exists()]
    earlier = finals + [p for _, p in paths.step_loras()]
    if (earlier or checkpoint is not None) and not overwrite:
        done = f"finished at step {checkpoint['step']}" if checkpoint else "finished or from another tool"
        shown = earlier[0].name if earlier else CHECKPOINT_DIR
        raise FileExistsError(
            f"{paths.output_dir} already holds a run ({done}: {shown}); nothing to resume for "
            f"{total_steps} steps. Raise train.steps to continue it, change config.name or training_folder, "
            "or pass --overwrite to replace it")
    for path in earlier:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    for _, path in paths.checkpoint_files():
        path.unlink()
    (paths.output_dir / LEGACY_CHECKPOINT).unlink(missing_ok=True)
    if overwrite and paths.samples.is_dir():
        shutil.rmtree(paths.samples)
    return None
