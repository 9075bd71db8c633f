"""coatflux extension for ostris/ai-toolkit (written by ``coatflux ai-toolkit install``; do not edit).

This file is copied verbatim to ``<ai-toolkit>/extensions/coatflux/__init__.py``. It registers the
process types ``coat_sd_trainer`` and ``coat_diffusion_trainer``; use one as ``process[].type`` and
add a ``coat:`` block to the process. Remove it with ``coatflux ai-toolkit uninstall <ai-toolkit>``.

Why it is so defensive: ai-toolkit imports *every* extension package for *every* ``job: extension``
run without catching errors (``toolkit/extension.py:get_all_extensions``), then calls
``get_process()`` on every extension it found. So nothing here may raise. The module imports only
the standard library and ai-toolkit's own ``toolkit.extension`` at import time; ``coatflux`` is
imported inside ``get_process()``. If coatflux is absent the list below is empty (one warning); if it
is present but broken, ``get_process()`` returns a stand-in class that fails only when a job really
uses a ``coat_*`` type, with the import error in its message. Other extensions keep working.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

SHIM_VERSION = 1
_log = logging.getLogger("coatflux.aitoolkit")

try:  # ai-toolkit's own base class; absent only when this file is imported outside ai-toolkit
    from toolkit.extension import Extension as _ExtensionBase
except ImportError:  # pragma: no cover - exercised by tests through a fake tree
    _ExtensionBase = object


def _unavailable_process(uid: str, error: BaseException) -> type:
    """A process class that explains, when instantiated, why ``uid`` cannot run."""

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(
            f"process type '{uid}' needs the coatflux package, which failed to import or set up in "
            f"this Python environment: {error!r}. Install it into ai-toolkit's environment "
            "(pip install coatflux) and re-run."
        )

    return type(f"Unavailable_{uid}", (), {"__init__": __init__})


def _process_for(uid: str) -> type:
    try:
        from coatflux.integrations.aitoolkit.processes import get_process_class

        return get_process_class(uid)
    except Exception as error:  # why: ai-toolkit calls get_process() for every job; never break those
        _log.warning("coatflux: '%s' is unavailable: %r", uid, error)
        return _unavailable_process(uid, error)


class COATSDTrainerExtension(_ExtensionBase):
    """``type: coat_sd_trainer`` -- ai-toolkit's SDTrainer with COAT (CLI configs)."""

    uid = "coat_sd_trainer"
    name = "COAT FP8 SD Trainer (coatflux)"

    @classmethod
    def get_process(cls) -> type:
        return _process_for(cls.uid)


class COATDiffusionTrainerExtension(_ExtensionBase):
    """``type: coat_diffusion_trainer`` -- DiffusionTrainer with COAT (keeps web-UI progress and stop)."""

    uid = "coat_diffusion_trainer"
    name = "COAT FP8 Diffusion Trainer (coatflux)"

    @classmethod
    def get_process(cls) -> type:
        return _process_for(cls.uid)


def _extensions() -> list:
    if importlib.util.find_spec("coatflux") is None:
        _log.warning("coatflux: package not importable in this environment; coat_* process types are "
                     "not registered (pip install coatflux into ai-toolkit's environment)")
        return []
    return [COATSDTrainerExtension, COATDiffusionTrainerExtension]


AI_TOOLKIT_EXTENSIONS = _extensions()
