"""Fast paths for the COAT core, each specified by (and tested against) the plain-PyTorch reference.

* :mod:`.adamw`: :class:`~coatflux.kernels.adamw.FusedFP8AdamW`, a multi-tensor FP8AdamW step
  for the thousand small tensors of a FLUX LoRA. The reference stays the default everywhere; the
  bench switches the fused step on for CUDA runs (``--fused-optimizer``).
* :mod:`.quant`: ``torch.compile``-fused per-tensor and per-group FP8 quantize/dequantize,
  byte-identical to :func:`coatflux.core.formats.quantize_reference`.
  :func:`coatflux.core.formats.quantize` dispatches to it for CUDA tensors (set
  ``COATFLUX_REFERENCE_KERNELS=1`` to force the reference).
"""
