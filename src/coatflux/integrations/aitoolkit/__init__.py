"""COAT inside an unmodified ostris/ai-toolkit, as one of its extension folders.

What: ``coatflux ai-toolkit install PATH`` (:func:`install`) copies :mod:`.shim` to
``PATH/extensions/coatflux/__init__.py``. ai-toolkit imports every package in ``extensions/`` for
every ``job: extension`` run and collects its ``AI_TOOLKIT_EXTENSIONS``; the shim registers the
process types ``coat_sd_trainer`` and ``coat_diffusion_trainer`` (:mod:`.processes`), which
subclass ai-toolkit's own ``SDTrainer`` / ``DiffusionTrainer`` and read the process's ``coat:``
block. :mod:`.optimizer_patch` makes ``train.optimizer: coat_fp8_adamw`` resolvable.

Why an extension folder and not a fork or a launcher script: users keep pulling ai-toolkit's
``main`` (it changes daily), the web UI spawns ``run.py`` itself, and the folder is git-ignored
upstream precisely for drop-ins. The cost is that we depend on ai-toolkit's internal class and hook
names; :data:`OBSERVED_AI_TOOLKIT` records the commit they were read from, and the integration tests
(``AI_TOOLKIT_PATH``) re-check them against a real checkout.
"""

from coatflux.integrations.aitoolkit.install import (
    AIToolkitPathError,
    ForeignExtensionError,
    install,
    uninstall,
)

#: The ai-toolkit tree whose interfaces this package (and its unit-test fakes) mirror.
OBSERVED_AI_TOOLKIT = "ostris/ai-toolkit@27a03a91f23eb1b757d5ec2e80ee3e129cfcc350 (main, 2026-08-21, version 0.12.26)"

__all__ = ["OBSERVED_AI_TOOLKIT", "AIToolkitPathError", "ForeignExtensionError", "install", "uninstall"]
