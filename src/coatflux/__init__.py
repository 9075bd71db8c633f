"""coatflux: COAT FP8 memory-efficient training (FP8 optimizer states, FP8 activations, FP8 GEMMs).

The package root exports the model-agnostic core under the names of the user's integration guide.
Layers, each in its own folder: ``core`` (FP8 formats, DRE, optimizer, linear, activation
compression), ``flux`` (FLUX loading, LoRA), ``trainer`` (config, data, loop, checkpoints),
``integrations`` (ai-toolkit) and ``cli``. The core never imports the layers above it.
"""

from coatflux.core.accounting import optimizer_state_bytes_per_param, saved_activation_bytes
from coatflux.core.api import COATTrainer, apply_coat, replace_linear_with_fp8
from coatflux.core.config import ActivationConfig, COATConfig, ConfigError, FP8QuantizationConfig
from coatflux.core.linear import FP8Linear
from coatflux.core.optim import FP8AdamW

__version__ = "0.1.0"

__all__ = [
    "ActivationConfig",
    "COATConfig",
    "COATTrainer",
    "ConfigError",
    "FP8AdamW",
    "FP8Linear",
    "FP8QuantizationConfig",
    "__version__",
    "apply_coat",
    "optimizer_state_bytes_per_param",
    "replace_linear_with_fp8",
    "saved_activation_bytes",
]
