"""Bridges from coatflux to other trainers.

Each sub-package adapts COAT (FP8 optimizer states, FP8 frozen weights and GEMMs, compressed saved
activations) to a trainer we do not own, through that trainer's public extension points only. The
bridges import the foreign trainer lazily: ``import coatflux.integrations`` never pulls one in, so
the core stays usable where the foreign trainer is not installed.

- :mod:`coatflux.integrations.aitoolkit` -- an extension folder for ostris/ai-toolkit.
"""
