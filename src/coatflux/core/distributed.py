"""Save and load :class:`~coatflux.core.optim.FP8AdamW` state when the parameters are FSDP2-sharded.

What: under FSDP2 (``torch.distributed.fsdp.fully_shard``) every parameter is a ``DTensor`` and
each rank's FP8AdamW state covers its local shard only: FP8 codes of the shard's shape plus
per-block ``k``/centre/scale bytes of the shard's blocks, all plain tensors.
:func:`sharded_optimizer_state_dict` wraps ``optimizer.state_dict()`` with what a loader must
check -- world size, rank, FP8 config, and per parameter its name, global and local shape,
offset and dtype -- and :func:`load_sharded_optimizer_state_dict` refuses, naming the first
mismatch, anything that was not written by the same rank of the same layout.
:func:`save_sharded_optimizer` / :func:`load_sharded_optimizer` put one such dict per rank in a
folder, as ``optimizer.rank{r}-of-{w}.pt`` (written to a temporary file, flushed, fsynced, then
moved into place with ``os.replace``, so a crash never leaves a truncated file under the final name), loadable with
``torch.load(..., weights_only=True)``.

Why not ``torch.distributed.checkpoint`` (DCP), which gives one folder and resharding: DCP
treats a plain tensor in a state dict as *replicated*, so it writes rank 0's copy only and on
load hands rank 0's FP8 codes to every rank -- silently (checked on CPU/gloo with torch 2.13:
rank 1 loaded rank 0's codes, no error). Wrapping the state in ``DTensor`` objects would make DCP save
every shard, but the block metadata of a shard is a slice of a global tensor only when every
shard boundary falls on a block boundary (:func:`blocks_align_with_shards`); resharding would
need that under both the old and the new world size. :meth:`FP8AdamW.load_state_dict
<coatflux.core.optim.FP8AdamW.load_state_dict>` therefore refuses a sharded state dict that does
not carry this rank's stamp, which makes the DCP path (and accelerate's ``save_state`` /
``load_state`` under FSDP2, built on it) fail loudly at load time. Alternative to resharding:
load under the original world size, gather the full parameters, and start a new run.

The functions are collective-free: each rank reads and writes its own file. Call
``torch.distributed.barrier()`` after saving before treating the checkpoint as complete.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch.optim import Optimizer

from coatflux.core.optim import local_tensor, shard_offset

FORMAT = "coatflux.fp8adamw.sharded"
VERSION = 1


class ShardedStateMismatchError(ValueError):
    """A sharded optimizer state does not fit the optimizer it is loaded into; the message says why."""


def optimizer_shard_filename(rank: int, world_size: int) -> str:
    """Name of rank ``rank``'s file in a checkpoint folder: ``optimizer.rank{r}-of-{w}.pt``."""
    return f"optimizer.rank{rank}-of-{world_size}.pt"


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _param_names(model: torch.nn.Module | None) -> dict[int, str]:
    if model is None:
        return {}
    return {id(p): name for name, p in model.named_parameters(remove_duplicate=True)}


def _describe_params(optimizer: Optimizer, model: torch.nn.Module | None) -> list[dict[str, Any]]:
    names = _param_names(model)
    described = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            local = local_tensor(p)
            described.append({
                "name": names.get(id(p)),
                "global_shape": list(p.shape),
                "local_shape": list(local.shape),
                "offset": shard_offset(p),
                "dtype": str(p.dtype),
                "placements": str(getattr(p, "placements", "")),
            })
    return described


def blocks_align_with_shards(param: torch.Tensor, block_size: int) -> bool:
    """Whether FP8AdamW's blocks of ``param``'s local shard are blocks of the unsharded tensor.

    FP8AdamW forms blocks of ``block_size`` elements over the flattened *local* shard. With
    FSDP2's ``Shard(0)`` over ``w`` ranks, rank ``r`` holds rows ``[r*c, (r+1)*c)`` with
    ``c = ceil(rows / w)``, i.e. flattened elements starting at ``r * c * row_numel``; when
    ``c * row_numel`` is a multiple of ``block_size`` every shard starts on a block boundary, the
    shards' blocks are exactly the unsharded blocks, and the sharded step is bit-identical to the
    unsharded one. Otherwise a block straddling a boundary is split in two, each half with its own
    statistics: still a valid (slightly different) encoding, not an error. Unsharded tensors and
    2-D tensors whose last dim is a multiple of ``block_size`` always align; every tensor of
    FLUX.1-dev (diffusers' ``FluxTransformer2DModel``) that gets FP8 moments aligns at 2, 4 and 8
    ranks, while at 16 ranks the 38 single-block ``norm.linear.bias`` vectors (9216) do not.
    """
    placements = getattr(param, "placements", None)
    if placements is None or not param.dim() or param.shape[0] == 0:
        return True
    mesh_size = param.device_mesh.size()
    if mesh_size == 1:
        return True
    if len(placements) != 1 or not (placements[0].is_shard() and placements[0].dim == 0):
        return False  # a shard that is not a contiguous range of the flattened tensor
    rows_per_shard = -(-param.shape[0] // mesh_size)
    if rows_per_shard >= param.shape[0]:  # one rank holds everything
        return True
    return (rows_per_shard * (param.numel() // param.shape[0])) % block_size == 0


def sharded_optimizer_state_dict(optimizer: Optimizer, model: torch.nn.Module | None = None) -> dict[str, Any]:
    """This rank's optimizer state with the metadata a loader checks (weights-only loadable).

    Layout: ``{"format", "version", "world_size", "rank", "optimizer" (class name), "fp8_config"
    (dict or None), "params": [{"name", "global_shape", "local_shape", "offset", "dtype",
    "placements"}, ...] in ``param_groups`` order, "optimizer_state": optimizer.state_dict()}``.
    ``model`` (optional) supplies parameter names, checked on load when both sides have them.
    """
    rank, world_size = _rank_and_world()
    config = getattr(optimizer, "fp8_config", None)
    return {
        "format": FORMAT,
        "version": VERSION,
        "world_size": world_size,
        "rank": rank,
        "optimizer": type(optimizer).__name__,
        "fp8_config": dataclasses.asdict(config) if config is not None else None,
        "params": _describe_params(optimizer, model),
        "optimizer_state": optimizer.state_dict(),
    }


def _check(state: dict[str, Any], optimizer: Optimizer, model: torch.nn.Module | None) -> None:
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ShardedStateMismatchError(f"not a sharded FP8AdamW optimizer state (format {FORMAT!r} expected)")
    if state.get("version") != VERSION:
        raise ShardedStateMismatchError(f"state version {state.get('version')!r}; this code reads version {VERSION}")
    rank, world_size = _rank_and_world()
    if state["world_size"] != world_size:
        raise ShardedStateMismatchError(
            f"world size mismatch: the state was saved by {state['world_size']} ranks, this run has {world_size}; "
            "per-shard FP8 state cannot be resharded, resume with the original world size"
        )
    if state["rank"] != rank:
        raise ShardedStateMismatchError(f"rank mismatch: the state is rank {state['rank']}'s, this is rank {rank}")
    config = getattr(optimizer, "fp8_config", None)
    current = dataclasses.asdict(config) if config is not None else None
    if state["fp8_config"] != current:
        raise ShardedStateMismatchError(f"fp8_config mismatch: saved {state['fp8_config']}, optimizer has {current}")
    saved, now = state["params"], _describe_params(optimizer, model)
    if len(saved) != len(now):
        raise ShardedStateMismatchError(f"parameter count mismatch: saved {len(saved)}, optimizer has {len(now)}")
    for i, (a, b) in enumerate(zip(saved, now, strict=True)):
        label = f"parameter {i}" + (f" ({b['name'] or a['name']})" if (b["name"] or a["name"]) else "")
        if a["name"] is not None and b["name"] is not None and a["name"] != b["name"]:
            raise ShardedStateMismatchError(f"{label}: name mismatch, saved {a['name']!r}, optimizer has {b['name']!r}")
        for key in ("global_shape", "local_shape", "offset", "dtype"):
            if a[key] != b[key]:
                raise ShardedStateMismatchError(f"{label}: {key} mismatch, saved {a[key]}, optimizer has {b[key]}")


def load_sharded_optimizer_state_dict(optimizer: Optimizer, state: dict[str, Any],
                                      model: torch.nn.Module | None = None) -> None:
    """Load :func:`sharded_optimizer_state_dict`'s output after checking that it fits this rank.

    Raises :class:`ShardedStateMismatchError` naming the first mismatch (world size, rank, FP8
    config, parameter count, or a parameter's name, global/local shape, offset or dtype).
    """
    _check(state, optimizer, model)
    optimizer.load_state_dict(state["optimizer_state"])


def save_sharded_optimizer(optimizer: Optimizer, directory: str | os.PathLike[str],
                           model: torch.nn.Module | None = None) -> Path:
    """Write this rank's :func:`sharded_optimizer_state_dict` atomically; returns the file's path."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    state = sharded_optimizer_state_dict(optimizer, model)
    path = folder / optimizer_shard_filename(state["rank"], state["world_size"])
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_sharded_optimizer(optimizer: Optimizer, directory: str | os.PathLike[str],
                           model: torch.nn.Module | None = None) -> None:
    """Load this rank's file from ``directory`` (see :func:`save_sharded_optimizer`)."""
    rank, world_size = _rank_and_world()
    path = Path(directory) / optimizer_shard_filename(rank, world_size)
    if not path.is_file():
        found = sorted(p.name for p in Path(directory).glob("optimizer.rank*-of-*.pt"))
        sizes = sorted({int(m.group(1)) for n in found if (m := re.search(r"-of-(\d+)\.pt$", n))})
        hint = f"; the folder holds shards for world size {sizes}" if sizes else "; the folder holds no optimizer shards"
        raise ShardedStateMismatchError(f"{path} not found (this run: rank {rank} of {world_size}){hint}")
    load_sharded_optimizer_state_dict(optimizer, torch.load(path, map_location="cpu", weights_only=True), model)


__all__ = [
    "ShardedStateMismatchError",
    "blocks_align_with_shards",
    "load_sharded_optimizer",
    "load_sharded_optimizer_state_dict",
    "optimizer_shard_filename",
    "save_sharded_optimizer",
    "sharded_optimizer_state_dict",
]
