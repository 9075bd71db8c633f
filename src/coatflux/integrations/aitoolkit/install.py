"""Install and uninstall the coatflux extension folder in an ai-toolkit checkout.

What: :func:`install` writes ``PATH/extensions/coatflux/__init__.py`` (a copy of :mod:`.shim`) and a
manifest, ``.coatflux-shim.json``, listing what it wrote; :func:`uninstall` deletes exactly those
files (plus the ``__pycache__`` Python made next to them) and the folder if it is then empty.

Why a manifest rather than "delete the folder": ``extensions/`` is where users keep their own
extensions, and a folder named ``coatflux`` might be theirs (an older hand-made integration, say).
Without our manifest we refuse to touch it unless ``force=True``; with it, re-installing simply
upgrades. Why copy a file rather than symlink into site-packages: the copy works on Windows, in
Docker images and in the UI's job folders alike, and it never changes behind ai-toolkit's back when
the coatflux environment changes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from coatflux.integrations.aitoolkit import shim

EXTENSION_DIRNAME = "coatflux"
MANIFEST_NAME = ".coatflux-shim.json"
#: What marks a folder as an ai-toolkit checkout (observed at 27a03a9, see ``OBSERVED_AI_TOOLKIT``).
REQUIRED_ENTRIES = ("run.py", "toolkit", "extensions")


class AIToolkitPathError(ValueError):
    """The given path is not an ai-toolkit checkout."""


class ForeignExtensionError(FileExistsError):
    """``extensions/coatflux`` exists but was not written by :func:`install`."""


def check_ai_toolkit_root(path: Path) -> Path:
    """Return ``path`` resolved, or raise :class:`AIToolkitPathError` naming what is missing."""
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise AIToolkitPathError(f"{root}: not a directory; expected an ai-toolkit checkout")
    missing = [name for name in REQUIRED_ENTRIES if not (root / name).exists()]
    if missing:
        raise AIToolkitPathError(
            f"{root} is not an ai-toolkit checkout: missing {', '.join(missing)} "
            f"(expected {', '.join(REQUIRED_ENTRIES)} at its top level)"
        )
    return root


def _read_manifest(target: Path) -> dict | None:
    try:
        return json.loads((target / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def install(path: Path, force: bool = False) -> Path:
    """Write the shim into ``path/extensions/coatflux/`` and return that folder.

    Re-installing over our own earlier install upgrades it. A foreign folder of that name is
    replaced only with ``force=True``; otherwise :class:`ForeignExtensionError` is raised.
    """
    root = check_ai_toolkit_root(path)
    target = root / "extensions" / EXTENSION_DIRNAME
    if target.exists() and _read_manifest(target) is None and not _is_empty_dir(target):
        if not force:
            raise ForeignExtensionError(
                f"{target} exists and was not written by coatflux (no {MANIFEST_NAME}); "
                "move it away or pass --force to replace it"
            )
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    target.mkdir(parents=True, exist_ok=True)
    source = Path(shim.__file__).read_text(encoding="utf-8")
    (target / "__init__.py").write_text(source, encoding="utf-8")
    manifest = {"files": ["__init__.py", MANIFEST_NAME], "shim_version": shim.SHIM_VERSION}
    (target / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return target


def uninstall(path: Path) -> None:
    """Remove what :func:`install` wrote; leave anything else in the folder where it is."""
    root = check_ai_toolkit_root(path)
    target = root / "extensions" / EXTENSION_DIRNAME
    if not target.exists():
        return
    manifest = _read_manifest(target)
    if manifest is None:
        raise ForeignExtensionError(f"{target} was not written by coatflux (no {MANIFEST_NAME}); not removing it")
    for name in manifest.get("files", []):
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            continue  # why: a hand-edited manifest must never steer deletion outside the folder
        (target / name).unlink(missing_ok=True)
    shutil.rmtree(target / "__pycache__", ignore_errors=True)
    if not any(target.iterdir()):
        target.rmdir()
