"""Fast paths for the COAT core, each specified by (and tested against) the plain-PyTorch reference.

:mod:`.adamw`: :class:`~coatflux.kernels.adamw.FusedFP8AdamW`, a multi-tensor FP8AdamW step
for the thousand small tensors of a FLUX LoRA. The reference stays the default everywhere; the
bench switches the fused step on for CUDA runs (``--fused-optimizer``).
"""
