"""The FP8 core: formats and scaling, dynamic range expansion, optimizer, linear, activation compression.

Model-agnostic and importable with torch alone; it never imports ``coatflux.flux`` or
``coatflux.trainer``. Every module here is the plain-PyTorch reference that fast kernels
(``coatflux.kernels``) are tested against.
"""
