"""Fast paths for the COAT core, each specified by (and tested against) the plain-PyTorch reference.

* :mod:`.adamw`: :class:`~coatflux.kernels.adamw.FusedFP8AdamW`, a multi-tensor FP8AdamW step
  for the thousand small tensors of a FLUX LoRA. The reference stays the default everywhere; the
  bench switches the fused step on for CUDA runs (``--fused-optimizer``).
* :mod:`.quant`: ``torch.compile``-fused per-tensor and per-group FP8 quantize/dequantize,
  byte-identical to :func:`coatflux.core.formats.quantize_reference`.
  :func:`coatflux.core.formats.quantize` dispatches to it for CUDA tensors (set
  ``COATFLUX_REFERENCE_KERNELS=1`` to force the reference).
* :mod:`.nonlinear`: ``torch.compile``-fused LayerNorm / RMSNorm / AdaLN modulation / GELU, each
  forward (with the FP8 group quantization of the saved input, byte-identical to the reference)
  and backward in one pass. The core modules of :mod:`coatflux.core.nonlinear` dispatch to it by
  the same rule (:func:`coatflux.core.nonlinear.uses_fused_kernels`: CUDA, per-group saving, no
  ``COATFLUX_REFERENCE_KERNELS=1``).
"""
