"""The FP8 core: formats and scaling, dynamic range expansion, optimizer, linear, activation compression.

Model-agnostic and importable with torch alone; it never imports ``coatflux.flux`` or
``coatflux.trainer``. Every module here is the plain-PyTorch reference that fast kernels
(``coatflux.kernels``) are tested against.
"""

from typing import Any

# Exported lazily so that importing one core module does not import them all.
_EXPORTS = {
    "FP8RangeMonitor": "coatflux.core.stats",
    "RangeCounts": "coatflux.core.stats",
    "count_range": "coatflux.core.stats",
    "format_counts": "coatflux.core.stats",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
