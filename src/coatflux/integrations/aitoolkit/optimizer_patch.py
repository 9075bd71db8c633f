"""Make ``train.optimizer: coat_fp8_adamw`` resolvable inside ai-toolkit -- the one monkey-patch.

What: :func:`install_optimizer_factory` replaces the name ``get_optimizer`` in the module
``jobs.process.BaseSDTrainProcess`` (which did ``from toolkit.optimizer import get_optimizer``) by a
wrapper. The wrapper builds :class:`coatflux.core.optim.FP8AdamW` for the names in
:data:`COAT_OPTIMIZER_NAMES` and hands every other name, unchanged, to ai-toolkit's original. It is
idempotent (the wrapper carries the original in ``__coatflux_original__``) and says once, on stdout
like ai-toolkit's own messages, that it patched.

Why patch the factory rather than swap the optimizer later in ``hook_before_train_loop``:
``BaseSDTrainProcess.run()`` calls ``get_optimizer`` itself, and ai-toolkit's factory raises
``ValueError`` for names it does not know, so the swap would need a fake name first. Building the
right optimizer at ai-toolkit's own call site also keeps everything after it stock: ``optimizer.pt``
is reloaded by ai-toolkit with ``torch.load(weights_only=True)`` into *our* optimizer, the learning-
rate scheduler and EMA are built on it, accelerate wraps it, and ``run()``'s local ``optimizer``
(used for the progress-bar LR and the first ``zero_grad``) is the same object. The cost is one
patched module attribute; since ai-toolkit calls ``get_process()`` of every extension for every
extension job, the patch is installed there and the name also works with stock ``sd_trainer``.

Settings: ``train.optimizer_params`` keeps ai-toolkit's meaning (``betas``, ``eps``,
``weight_decay``, ``lr`` per group via ``train.lr``); FP8 storage settings come from the key
:data:`FP8_PARAMS_KEY` -- a mapping in the ``coat.optimizer`` schema (stock processes) or an
:class:`~coatflux.core.config.FP8QuantizationConfig` placed there by the ``coat_*`` processes from
their ``coat:`` block.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

COAT_OPTIMIZER_NAMES = ("coat_fp8_adamw",)
FP8_PARAMS_KEY = "fp8"
#: Where ai-toolkit's training loop looks the factory up (observed at 27a03a9).
PATCH_TARGET = "jobs.process.BaseSDTrainProcess"
#: FP8AdamW's keyword arguments that ``train.optimizer_params`` may set.
_ADAMW_KEYS = ("betas", "eps", "weight_decay", "seed", "compiled")  # compiled: FusedFP8AdamW's own


def is_coat_optimizer(name: str | None) -> bool:
    return isinstance(name, str) and name.lower() in COAT_OPTIMIZER_NAMES


def fp8_config_from(value: Any, path: str = "train.optimizer_params.fp8") -> Any:
    """An :class:`FP8QuantizationConfig` from ``None`` (defaults), a mapping or an instance."""
    from coatflux.core.config import ConfigError, FP8QuantizationConfig

    if value is None:
        return FP8QuantizationConfig()
    if isinstance(value, FP8QuantizationConfig):
        return value
    if isinstance(value, Mapping):
        return FP8QuantizationConfig.from_dict(value, path)
    raise ConfigError(f"{path}: expected a mapping like coat.optimizer, got {type(value).__name__}")


def build_fp8_adamw(params: Any, learning_rate: float, optimizer_params: Mapping[str, Any] | None) -> Any:
    """FP8AdamW from ai-toolkit's ``get_optimizer`` arguments; unknown keys are an error, not ignored."""
    from coatflux.core.config import ConfigError, check_known_keys

    # The fused multi-tensor step: the same state bytes as the reference, one update per group.
    from coatflux.kernels.adamw import FusedFP8AdamW as FP8AdamW

    options = dict(optimizer_params or {})
    check_known_keys(options, [*_ADAMW_KEYS, FP8_PARAMS_KEY], "train.optimizer_params")
    fp8_config = fp8_config_from(options.pop(FP8_PARAMS_KEY, None))
    if "betas" in options:
        betas = options["betas"]
        if not isinstance(betas, list | tuple) or len(betas) != 2:
            raise ConfigError(f"train.optimizer_params.betas: expected two numbers, got {betas!r}")
        options["betas"] = (float(betas[0]), float(betas[1]))
    optimizer = FP8AdamW(params, lr=float(learning_rate), fp8_config=fp8_config, **options)
    print(f"[coatflux] Using FP8AdamW (COAT): moments m1={fp8_config.m1_format if fp8_config.use_fp8_m1 else 'fp32'}"
          f" m2={fp8_config.m2_format if fp8_config.use_fp8_m2 else 'fp32'}, block {fp8_config.block_size}, "
          f"DRE {'on' if fp8_config.use_dynamic_range_expansion else 'off'}", flush=True)
    return optimizer


def make_coat_get_optimizer(original: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ai-toolkit's ``get_optimizer(params, optimizer_type, learning_rate, optimizer_params)``."""

    def get_optimizer(params: Any, optimizer_type: str = "adam", learning_rate: float = 1e-6,
                      optimizer_params: Mapping[str, Any] | None = None) -> Any:
        if is_coat_optimizer(optimizer_type):
            return build_fp8_adamw(params, learning_rate, optimizer_params)
        return original(params, optimizer_type, learning_rate=learning_rate, optimizer_params=optimizer_params)

    get_optimizer.__coatflux_original__ = original  # type: ignore[attr-defined]
    get_optimizer.__doc__ = f"coatflux wrapper: {', '.join(COAT_OPTIMIZER_NAMES)} -> FP8AdamW, else ai-toolkit."
    return get_optimizer


def install_optimizer_factory(module: ModuleType | None = None) -> bool:
    """Patch ``module.get_optimizer`` (default: ai-toolkit's training loop module) once.

    Returns True when this call patched, False when the wrapper was already there.
    """
    if module is None:
        # why importlib: ``jobs.process.BaseSDTrainProcess`` as an attribute is the *class*, because
        # ``jobs/process/__init__.py`` re-exports the class under the module's name.
        module = importlib.import_module(PATCH_TARGET)
    current = module.get_optimizer
    if hasattr(current, "__coatflux_original__"):
        return False
    module.get_optimizer = make_coat_get_optimizer(current)
    print(f"[coatflux] patched {module.__name__}.get_optimizer: train.optimizer "
          f"{' / '.join(COAT_OPTIMIZER_NAMES)} now builds FP8AdamW; other names unchanged", flush=True)
    return True
