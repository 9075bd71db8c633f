"""Files that appear whole or not at all: write to a temporary name, flush, rename.

Every file coatflux writes next to a user's data or run (weights, checkpoints, caches, samples,
configs) goes through here, so that a crash, a kill or a full disk at any instant leaves either
the previous file or the new one. ``os.replace`` is atomic on POSIX and Windows when source and
target are on one file system, which is why the temporary file is created in the target's folder
and not in ``/tmp``. The data is ``fsync``-ed before the rename, and the folder after it, because
a rename can reach the disk before the bytes it points to.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def _fsync_dir(folder: Path) -> None:
    # The rename itself must reach the disk for "old or new" to survive a power cut; not every
    # platform lets a directory be opened (Windows), and there the rename is all we can do.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)``, flush it to disk, then move it to ``path`` in one ``os.replace``.

    On any error (a full disk included) the temporary file is removed and ``path`` is untouched.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise OSError(error.errno, f"cannot write in {path.parent}: {error.strerror or error}") from error
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:  # a full disk, a quota, a vanished folder: say which file it was
        Path(tmp).unlink(missing_ok=True)
        raise OSError(error.errno, f"cannot write {path}: {error.strerror or error}") from error
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_dir(path: Path, write: Callable[[Path], None]) -> Path:
    """Fill a fresh temporary folder with ``write(tmp_dir)``, then swap it in for ``path``.

    A folder cannot be replaced in one rename when it exists, so the old one is first renamed
    aside and deleted only after the new one is in place: a kill in between leaves the old
    folder under ``.<name>.old-*`` and nothing half-written under ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        write(tmp)
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb+") as f:
                    os.fsync(f.fileno())
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(path.parent)
    return path
