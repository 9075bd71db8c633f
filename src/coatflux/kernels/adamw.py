"""Multi-tensor FP8AdamW: one batched update for all of a group's tensors instead of one per tensor.

What: :class:`FusedFP8AdamW` is :class:`~coatflux.core.optim.FP8AdamW` with a different
``step``. A FLUX.1 LoRA has 988 trainable tensors (A and B of 494 adapters). The reference
decodes, updates and re-encodes each one separately: about 60 small kernels per tensor, 60,000
launches per step, which on a GPU costs far more than the arithmetic. Here the tensors of a
parameter group that share a step count are laid end to end in one flat buffer (each padded to
the block size), the DRE decode, the AdamW update and the DRE encode run once over that buffer,
and each tensor's new state is a view into the result: a few dozen launches per step whatever
the tensor count.

Why this is exact: every operation of the reference update is element-wise, and every DRE
statistic is computed per block of ``block_size`` elements of one tensor. Padding each tensor to
a whole number of blocks (with zeros, as the reference pads its last block) keeps every block
inside one tensor, so the same numbers meet the same operations: the FP8 codes, block metadata
and fp32 parameters come out identical to the reference's, which the tests check byte for byte.

Chosen against: a Triton kernel (faster still, one pass, but a second implementation of DRE to
keep in step with the reference, and no CPU path besides the interpreter), ``torch.compile`` of
the per-tensor update (recompiles per distinct shape and still launches per tensor), and
``torch._foreach_*`` ops (they batch launches but have no block-wise reductions for DRE).

Scope: fp32 parameters whose two moments are both FP8 with DRE (every LoRA matrix with the
default config). Anything else -- bf16 master weights with stochastic rounding, tensors below the
quantization threshold, the non-DRE block format -- goes through the reference update, unchanged.

Sharded parameters (FSDP2 ``DTensor``): the buffer is built from each rank's local shards
(``to_local()``), so a rank's step touches only its shard and the state is the reference's state
of that shard, byte for byte (see :mod:`coatflux.core.optim` for when it also equals the
unsharded run's state).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.nn.functional as F

from coatflux.core.dre import DREBlocks, dre_dequantize, dre_quantize
from coatflux.core.optim import _DRE_FIELDS, _MOMENTS, FP8AdamW, adamw_update_, local_tensor


def _flat(tensors: list[torch.Tensor], block: int) -> torch.Tensor:
    """Tensors flattened and laid end to end, each zero-padded to a multiple of ``block``."""
    parts = []
    for t in tensors:
        flat = t.reshape(-1)
        pad = (-flat.numel()) % block
        parts.append(F.pad(flat, (0, pad)) if pad else flat)
    return torch.cat(parts)


def _flat_codes(tensors: list[torch.Tensor], block: int) -> torch.Tensor:
    # Concatenate FP8 codes as bytes (cat and pad support every dtype through uint8); 0 is +0.0.
    dtype = tensors[0].dtype
    return _flat([t.view(torch.uint8) for t in tensors], block).view(dtype)


def _padded_sizes(tensors: list[torch.Tensor], block: int) -> list[int]:
    return [t.numel() + (-t.numel()) % block for t in tensors]


class FusedFP8AdamW(FP8AdamW):
    """:class:`FP8AdamW` whose step batches all eligible tensors of a group (same state, same result)."""

    def _fusable(self, p: torch.Tensor) -> bool:
        cfg = self.fp8_config
        return (p.dtype == torch.float32 and cfg.use_dynamic_range_expansion
                and all(self._quantized(p, m) for m in _MOMENTS))

    def _step_group(self, group: dict[str, Any]) -> None:
        buckets: dict[tuple[int, torch.device], list[torch.Tensor]] = defaultdict(list)
        for index, p in self._params_with_grad(group):
            state = self.state[p]
            if not self._fusable(p):
                if not state:
                    self._init_state(p, state)
                self._update(p, state, group, index)
                continue
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
            state["step"] += 1
            buckets[(int(state["step"].item()), p.device)].append(p)
        for (step, _), params in buckets.items():
            self._fused_update(params, group, step)

    def _decode_flat(self, params: list[torch.Tensor], moment: str, step: int) -> torch.Tensor:
        block = self.fp8_config.block_size
        if step == 1:  # fresh state: the reference encodes zeros, which decode to exact zeros
            locals_ = [local_tensor(p) for p in params]
            return torch.zeros(sum(_padded_sizes(locals_, block)), device=locals_[0].device)
        states = [self.state[p] for p in params]
        enc = DREBlocks(_flat_codes([s[moment] for s in states], block),
                        *(torch.cat([s[f"{moment}_{f}"] for s in states]) for f in _DRE_FIELDS))
        return dre_dequantize(enc, block)

    def _encode_flat(self, params: list[torch.Tensor], moment: str, value: torch.Tensor) -> None:
        block = self.fp8_config.block_size
        enc = dre_quantize(value, self._format(moment), block)
        locals_ = [local_tensor(p) for p in params]
        sizes = _padded_sizes(locals_, block)
        codes = enc.codes.split(sizes)
        metadata = {f: getattr(enc, f).split([n // block for n in sizes]) for f in _DRE_FIELDS}
        for i, (p, local) in enumerate(zip(params, locals_, strict=True)):
            state = self.state[p]
            state[moment] = codes[i][: local.numel()].view(local.shape)
            for f in _DRE_FIELDS:
                state[f"{moment}_{f}"] = metadata[f][i]

    def _fused_update(self, params: list[torch.Tensor], group: dict[str, Any], step: int) -> None:
        block = self.fp8_config.block_size
        locals_ = [local_tensor(p) for p in params]  # views: writing them writes the parameters
        grad = _flat([local_tensor(p.grad).float() for p in params], block)
        exp_avg = self._decode_flat(params, "exp_avg", step)
        exp_avg_sq = self._decode_flat(params, "exp_avg_sq", step)
        master = _flat(locals_, block)
        adamw_update_(master, grad, exp_avg, exp_avg_sq, step, group)
        chunks = master.split(_padded_sizes(locals_, block))
        torch._foreach_copy_(locals_, [c[: t.numel()].view(t.shape) for c, t in zip(chunks, locals_, strict=True)])

        self._encode_flat(params, "exp_avg", exp_avg)
        self._encode_flat(params, "exp_avg_sq", exp_avg_sq)
