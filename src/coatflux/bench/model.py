"""The benchmarked model: FLUX.1 transformer presets, random-weight construction, inputs, FLOP count.

What: :func:`build_transformer` makes diffusers' ``FluxTransformer2DModel`` from a preset's config
directly on the target device in bf16 with random weights; :func:`make_batch` makes random packed
latents, text embeddings and position ids for a resolution; :func:`count_step_flops` counts the
matmul FLOPs of one LoRA training step from the shapes the model actually runs.

Construction, and what we chose against: FLUX.1-dev has 11.9B parameters. Building it the usual
way (``FluxTransformer2DModel(**config)`` on the CPU, then ``.to("cuda", bf16)``) runs PyTorch's
kaiming init on 48 GB of fp32 CPU tensors -- minutes on the CPU and more RAM than many boxes have.
Building under ``torch.device("cuda")`` avoids the copy but still allocates fp32 (48 GB) before the
bf16 cast. Here the module tree is made on the *meta* device (no storage), cast to bf16 there,
given uninitialised device storage with ``to_empty`` and filled in place with a cheap init: weights
N(0, 0.02) (the usual DiT/GPT init, which keeps 57 residual blocks finite), biases 0, norm scales
1. Random weights are fine for timing and memory: the work a step does depends on shapes alone.

FLOPs: one forward pass of a meta-device copy (shapes only, no memory, milliseconds) runs under a
``TorchFunctionMode`` that records every ``F.linear`` (M, K, N, whether the weight is trainable)
and every ``scaled_dot_product_attention`` (B, H, Lq, Lk, D). A LoRA step then costs

* per linear: forward 2*M*N*K; backward input-gradient 2*M*N*K for *every* linear (gradients
  must flow through frozen layers to reach earlier adapters) and weight-gradient 2*M*N*K only
  for trainable (LoRA) weights;
* per attention: forward 4*B*H*Lq*Lk*D (QK^T and PV), backward twice that (dQ, dK, dV, dP);
  FlashAttention's recomputation of P in backward is not counted.

Gradient checkpointing's recomputed forward is *not* counted: the floor is the work the step
needs, and recomputation is overhead a configuration chooses to pay for memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

FLUX_DEV_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}

TINY_CONFIG: dict[str, Any] = {
    **FLUX_DEV_CONFIG,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 4,
    "joint_attention_dim": 64,
    "pooled_projection_dim": 32,
    "axes_dims_rope": (4, 6, 6),
}


@dataclass(frozen=True)
class Preset:
    """A model size plus the run shape that suits it."""

    name: str
    config: dict[str, Any]
    text_tokens: int
    resolutions: tuple[int, ...]
    lora_rank: int = 16
    max_batch_cap: int = 16
    notes: str = ""


PRESETS: dict[str, Preset] = {
    "flux-dev": Preset("flux-dev", FLUX_DEV_CONFIG, 512, (512, 1024),
                       notes="FLUX.1-dev architecture (19 double + 38 single blocks, hidden 3072), random weights"),
    "tiny": Preset("tiny", TINY_CONFIG, 8, (32, 64), max_batch_cap=4,
                   notes="2 double + 2 single blocks, hidden 64: exercises the code on a CPU, not a performance figure"),
}


def image_tokens(resolution: int) -> int:
    """Packed latent tokens of a square image: VAE /8, then 2x2 patches, so (res/16)^2."""
    if resolution % 16:
        raise ValueError(f"resolution {resolution} is not a multiple of 16")
    return (resolution // 16) ** 2


def _init_(model: nn.Module, seed: int) -> None:
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=gen)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)


def build_transformer(preset: Preset, device: torch.device | str, dtype: torch.dtype = torch.bfloat16,
                      seed: int = 0) -> nn.Module:
    """``FluxTransformer2DModel`` of ``preset`` on ``device`` in ``dtype``, random weights, no CPU init."""
    from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**preset.config)
    model = model.to(dtype=dtype).to_empty(device=torch.device(device))
    _init_(model, seed)
    return model


def make_batch(preset: Preset, resolution: int, batch: int, device: torch.device | str,
               dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random model inputs (the keyword arguments of the transformer's forward) and a target."""
    cfg = preset.config
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed) if device.type != "meta" else None
    side = resolution // 16
    n_img, n_txt = image_tokens(resolution), preset.text_tokens

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype, generator=gen)

    img_ids = torch.zeros(side, side, 3, device=device)
    img_ids[..., 1] = torch.arange(side, device=device)[:, None]
    img_ids[..., 2] = torch.arange(side, device=device)[None, :]
    return {
        "hidden_states": randn(batch, n_img, cfg["in_channels"]),
        "encoder_hidden_states": randn(batch, n_txt, cfg["joint_attention_dim"]),
        "pooled_projections": randn(batch, cfg["pooled_projection_dim"]),
        "timestep": torch.full((batch,), 0.5, device=device, dtype=dtype),
        "guidance": torch.full((batch,), 3.5, device=device, dtype=dtype),
        "img_ids": img_ids.reshape(n_img, 3),
        "txt_ids": torch.zeros(n_txt, 3, device=device),
        "target": randn(batch, n_img, cfg["in_channels"]),
    }


def loss_of(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Flow-matching-shaped loss: MSE between the prediction and a random target."""
    inputs = {k: v for k, v in batch.items() if k != "target"}
    pred = model(**inputs, return_dict=False)[0]
    return F.mse_loss(pred.float(), batch["target"].float())


def step_functions(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
                   cudagraphs: bool) -> tuple[Callable[[], None], Callable[[], None]]:
    """One training step of the bench as its two timed parts: forward + backward, then the optimizer
    step (which drops the gradients). With ``cudagraphs`` (a recipe whose compiled blocks replay as
    CUDA graphs) each step first tells inductor's graph trees that a new step begins: the graphs
    may then reuse the memory of the last step's outputs, the gradients dropped before it."""

    def forward_backward() -> None:
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        loss_of(model, batch).backward()

    def optimizer_step() -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return forward_backward, optimizer_step


@dataclass
class StepFlops:
    """Matmul FLOPs of one training step, split by where they run."""

    linear: float = 0.0
    attention: float = 0.0
    linear_calls: int = 0
    attention_calls: int = 0

    @property
    def total(self) -> float:
        return self.linear + self.attention

    def scaled(self, factor: int) -> StepFlops:
        return StepFlops(self.linear * factor, self.attention * factor, self.linear_calls, self.attention_calls)


@dataclass
class _FlopRecorder(TorchFunctionMode):
    flops: StepFlops = field(default_factory=StepFlops)

    def __post_init__(self) -> None:
        super().__init__()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            x = args[0] if args else kwargs["input"]
            w = args[1] if len(args) > 1 else kwargs["weight"]
            m, (n, k) = x.numel() // x.shape[-1], w.shape
            passes = 3 if w.requires_grad else 2  # forward + dgrad (+ wgrad for trainable weights)
            self.flops.linear += passes * 2.0 * m * n * k
            self.flops.linear_calls += 1
        elif func is F.scaled_dot_product_attention:
            q = args[0] if args else kwargs["query"]
            k = args[1] if len(args) > 1 else kwargs["key"]
            b_h = q.numel() // (q.shape[-2] * q.shape[-1])
            self.flops.attention += 3 * 4.0 * b_h * q.shape[-2] * k.shape[-2] * q.shape[-1]  # fwd + 2x bwd
            self.flops.attention_calls += 1
        return func(*args, **kwargs)


def count_step_flops(preset: Preset, resolution: int, batch: int = 1) -> StepFlops:
    """FLOPs of one LoRA training step (see the module docstring for the formula)."""
    from coatflux.flux.lora import find_lora_targets, inject_lora

    with torch.device("meta"):
        from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel

        model = FluxTransformer2DModel(**preset.config).to(torch.bfloat16)
    model.requires_grad_(False)
    inject_lora(model, preset.lora_rank, preset.lora_rank, find_lora_targets(model))
    inputs = make_batch(preset, resolution, 1, "meta")
    inputs.pop("target")
    recorder = _FlopRecorder()
    with recorder:
        model(**inputs, return_dict=False)
    return recorder.flops.scaled(batch)
