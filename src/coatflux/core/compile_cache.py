"""A portable cache of compiled graphs: what ``torch.compile`` built in one process, in one file.

What: :func:`load_compile_cache` hot-loads a file written by :func:`save_compile_cache` into this
process's compiler caches before anything compiles; :func:`save_compile_cache` writes every
artifact this process compiled or took from those caches (PyTorch's "mega-cache",
``torch.compiler.save_cache_artifacts``), atomically. :func:`compile_cache_counts` says how many
graphs were found in the caches and how many were compiled.

Why: a compiled COAT model pays its compilation at the first step: 110-150 s for FLUX.1-dev's
blocks on an H100 with a cold cache (``docs/runs/h100-2026-11-26-1846.md``). Inductor keeps what
it compiled on the machine's disk (``TORCHINDUCTOR_CACHE_DIR``) and a second run there starts
warm, but a machine that starts empty -- a rented GPU, the lent machines our GPU checks run on --
pays it every time.
One file travels where a cache directory does not: it holds the graphs of one run and nothing of
other runs, and its format is PyTorch's public API rather than a directory layout private to
inductor.

What it does not save: dynamo still traces each graph and AOTAutograd still traces and
partitions it: AOTAutograd's own cache takes no graph with a custom autograd function in it, and
COAT's traced FP8 linear is one (torch 2.13: "Unsupported call_function target
autograd_function_apply"). Inductor's code generation and kernel compilation are what a hit
skips. On this CPU the tiny FLUX's first compiled COAT step took 51.7 s cold and 39.3 s with the
file (4 of 4 graphs found). A file from another torch version or another GPU finds nothing, and
everything compiles as without it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from coatflux.atomic import atomic_write

logger = logging.getLogger(__name__)


def load_compile_cache(path: str | Path) -> str:
    """Hot-load the artifacts in ``path`` (if the file exists); returns a line saying what happened.

    A file PyTorch cannot read (another version's format, a damaged copy) is named in a warning and
    ignored: the graphs then compile as they would without it.
    """
    path = Path(path)
    if not path.is_file():
        return f"compile cache {path}: no file yet, everything compiles"
    data = path.read_bytes()
    info = torch.compiler.load_cache_artifacts(data)
    if info is None:
        logger.warning("compile cache %s: PyTorch could not read it (%d bytes); compiling without it", path, len(data))
        return f"compile cache {path}: unreadable ({len(data)} bytes), not used"
    count = sum(len(keys) for keys in info.artifacts.values())
    return f"compile cache {path}: {count} artifacts loaded ({len(data) / 2**20:.1f} MiB)"


def save_compile_cache(path: str | Path) -> str:
    """Write this process's compiled artifacts to ``path`` (replacing it); returns a line saying what.

    Call it once per process, at the end: a second call writes every artifact again, but in torch
    2.13 the loader then keeps only the last call's artifacts of each kind (it makes a dict of the
    chunks each call appended), so a file saved after each of two compiled configs held the second
    one's graphs only. Nothing is written when this process compiled and found nothing: an earlier
    file stays.
    """
    path = Path(path)
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return f"compile cache {path}: nothing compiled in this run, file left as it was"
    data, info = saved
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    count = sum(len(keys) for keys in info.artifacts.values())
    return f"compile cache {path}: {count} artifacts saved ({len(data) / 2**20:.1f} MiB)"


def compile_cache_counts() -> tuple[int, int]:
    """``(graphs found in inductor's cache, graphs compiled)`` so far in this process."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]
