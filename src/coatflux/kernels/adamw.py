"""Multi-tensor FP8AdamW: one batched update for all of a group's tensors instead of one per tensor.

What: :class:`FusedFP8AdamW` is :class:`~coatflux.core.optim.FP8AdamW` with a different
``step``. A FLUX.1 LoRA has 988 trainable tensors (A and B of 494 adapters). The reference
decodes, updates and re-encodes each one separately: about 60 small kernels per tensor, 60,000
launches per step, which on a GPU costs far more than the arithmetic. Here the tensors of a
parameter group that share a step count are laid end to end in flat buffers (each padded to the
block size) that persist between steps (:class:`_FlatBucket`): each tensor's state entries are
views into them, so the DRE decode, the AdamW update and the DRE encode run once over the
buffers (:func:`bucket_update_`), and the gradients and parameters move in and out with one
``torch._foreach_copy_`` each. Which tensors go into which buffer is decided once and reused
while the same tensors have gradients (:class:`_GroupPlan`), so a step costs no per-tensor Python
beyond collecting the gradients.

On a GPU with Triton the update itself is compiled (``torch.compile``). Eagerly it is 185 operations
over the flat buffers, whose inputs and outputs hold 38.8 GB for the 85.9 M elements of a rank-16
LoRA on all of FLUX.1-dev's block linears: 8 ms at an H200's 4.8 TB/s, and the H200 run of
2026-11-27 06:10 measured 13 ms for the optimizer part of the compiled COAT step (376 ms in all).
Compiled, it is one Triton kernel (two with torch 2.11) that reads each block and writes the
parameters, codes and metadata in place: 1.4 GB by inductor's estimate
(``benchmarks/optimizer_step.py --count``). The step's numbers (learning rate, bias corrections)
go in as a tensor, copied to the GPU without a synchronization, so one compilation serves every
step.

Why the eager form is exact: every operation of the reference update is element-wise, and every
DRE statistic is computed per block of ``block_size`` elements of one tensor. Padding each tensor
to a whole number of blocks (with zeros, as the reference pads its last block) keeps every block
inside one tensor, so the same numbers meet the same operations: the FP8 codes, block metadata
and fp32 parameters come out identical to the reference's, which the tests check byte for byte.
The compiled form computes the same expressions, but the compiler may contract a multiply and an
add into one fused multiply-add: on this machine's CPU its codes and metadata were the
reference's and some parameters differed in the last bit; the tests bound both.

Chosen against: a hand-written Triton kernel (the compiled update is one or two already, from the
reference's own code, so there is no second DRE implementation to keep in step), ``torch.compile``
of the per-tensor update (recompiles per distinct shape and still launches per tensor), and
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from coatflux.core.dre import DREBlocks, dre_dequantize, dre_quantize
from coatflux.core.formats import FP8Format, get_format, uses_fast_path
from coatflux.core.optim import _DRE_FIELDS, _MOMENTS, FP8AdamW, adamw_math_, adamw_scalars, local_tensor
from coatflux.kernels import quant


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


def bucket_update_(master: torch.Tensor, grad: torch.Tensor, moments: list[torch.Tensor],
                   metadata: list[torch.Tensor], scalars: Sequence[float] | torch.Tensor,
                   formats: tuple[FP8Format, ...],
                   block: int) -> None:
    """One AdamW step over flat buffers, in place: decode both moments (DRE), update, encode.

    ``moments`` are the two flat FP8 code buffers, ``metadata`` their DRE fields (``k_code``,
    ``center_exp``, ``scale_exp`` of the first moment, then of the second). Plain PyTorch: this is
    the reference of the compiled update, and what runs where nothing is compiled.
    """
    fields = len(_DRE_FIELDS)
    per_moment = [metadata[i * fields:(i + 1) * fields] for i in range(len(moments))]
    decoded = [dre_dequantize(DREBlocks(codes, *meta), block) for codes, meta in zip(moments, per_moment, strict=True)]
    adamw_math_(master, grad, decoded[0], decoded[1], scalars)
    for codes, meta, value, fmt in zip(moments, per_moment, decoded, formats, strict=True):
        enc = dre_quantize(value, fmt, block)
        codes.copy_(enc.codes)
        for buffer, f in zip(meta, _DRE_FIELDS, strict=True):
            buffer.copy_(getattr(enc, f))


class _FlatBucket:
    """Persistent flat buffers for one set of parameters that step together.

    The moments' FP8 codes and DRE metadata live in one flat buffer per field, and each
    parameter's optimizer state holds *views* into them, so a step decodes and encodes the whole
    set with no concatenation and no per-tensor splitting; the flat fp32 gradient and master
    buffers are kept too (8 bytes per trainable element: 687 MB for a rank-16 LoRA on FLUX.1-dev's
    block linears), so copying in and out is one ``torch._foreach_copy_`` each. The state dict
    still holds one entry per parameter with the reference's keys, shapes and dtypes (views of
    shared storage, which ``torch.save`` writes once).
    """

    def __init__(self, opt: FusedFP8AdamW, params: list[torch.Tensor]) -> None:
        block = opt.fp8_config.block_size
        self.opt, self.params, self.block = opt, params, block
        locals_ = [local_tensor(p) for p in params]
        # A plain tensor is its own local tensor; a DTensor's is asked for on every step.
        self.locals = None if any(t is not p for t, p in zip(locals_, params, strict=True)) else locals_
        self.sizes = _padded_sizes(locals_, block)
        device = locals_[0].device
        total = sum(self.sizes)
        self.master = torch.zeros(total, device=device)
        self.scalars: torch.Tensor | None = None  # a compiled update's numbers, on the GPU (_on_device)
        self.grad = torch.zeros(total, device=device)
        self.master_views = self._views(self.master, locals_)
        self.grad_views = self._views(self.grad, locals_)
        states = [opt.state[p] for p in params]
        for p, state in zip(params, states, strict=True):
            if not state:
                opt._init_state(p, state)  # zeros, encoded as the reference encodes them
        self.steps = torch.stack([s["step"] for s in states]).float()
        self.flat: dict[str, torch.Tensor] = {}
        for moment in _MOMENTS:
            self.flat[moment] = _flat_codes([s[moment] for s in states], block)
            for f in _DRE_FIELDS:
                self.flat[f"{moment}_{f}"] = torch.cat([s[f"{moment}_{f}"] for s in states])
        self._point_state_at_buffers(states, locals_)

    def _views(self, flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
        chunks = flat.split(self.sizes)
        return [c[: t.numel()].view(t.shape) for c, t in zip(chunks, like, strict=True)]

    def _point_state_at_buffers(self, states: list[dict[str, Any]], locals_: list[torch.Tensor]) -> None:
        block_counts = [n // self.block for n in self.sizes]
        for i, state in enumerate(states):
            state["step"] = self.steps[i]
        for moment in _MOMENTS:
            for state, view in zip(states, self._views(self.flat[moment], locals_), strict=True):
                state[moment] = view
            for f in _DRE_FIELDS:
                for state, meta in zip(states, self.flat[f"{moment}_{f}"].split(block_counts), strict=True):
                    state[f"{moment}_{f}"] = meta
        self._first = [state["exp_avg"] for state in states]

    def current(self) -> bool:
        """Whether every parameter's state is still the views made here (not reloaded or replaced)."""
        return all(self.opt.state[p].get("exp_avg") is view for p, view in zip(self.params, self._first, strict=True))

    def step(self, group: dict[str, Any]) -> None:
        self.steps += 1
        step = int(self.steps[0].item())
        locals_ = self.locals or [local_tensor(p) for p in self.params]  # writing them writes the parameters
        grads = [p.grad for p in self.params] if self.locals else [local_tensor(p.grad) for p in self.params]
        torch._foreach_copy_(self.grad_views, grads)
        torch._foreach_copy_(self.master_views, locals_)
        moments = [self.flat[moment] for moment in _MOMENTS]
        metadata = [self.flat[f"{moment}_{f}"] for moment in _MOMENTS for f in _DRE_FIELDS]
        formats = tuple(get_format(self.opt._format(moment)) for moment in _MOMENTS)
        scalars = adamw_scalars(step, group)
        if self.opt._compile(self.master):  # the step's numbers as an input, not as constants to compile
            self.opt._update_function()(self.master, self.grad, moments, metadata, self._on_device(scalars),
                                        formats, self.block)
        else:
            bucket_update_(self.master, self.grad, moments, metadata, scalars, formats, self.block)
        torch._foreach_copy_(locals_, self.master_views)

    def _on_device(self, scalars: tuple[float, ...]) -> torch.Tensor:
        """The step's numbers in a tensor on the buffers' device, copied without waiting for the GPU.

        ``torch.tensor(..., device="cuda")`` copies from pageable memory and then synchronizes the
        stream: the host would wait for the whole backward pass before the update is even launched.
        From pinned memory the copy is queued behind the kernels that read the last step's numbers.
        """
        host = torch.tensor(scalars, dtype=torch.float32)
        if self.master.device.type != "cuda":
            return host.to(self.master.device)
        if self.scalars is None:
            self.scalars = torch.empty(len(scalars), dtype=torch.float32, device=self.master.device)
        return self.scalars.copy_(host.pin_memory(), non_blocking=True)


@dataclass
class _GroupPlan:
    """How one parameter group stepped last time: which tensors had gradients, and where each went.

    A training step gives the same tensors gradients as the step before, so the next step can
    reuse the plan after checking only that (one identity comparison per tensor). Re-deciding per
    tensor (eligible? same step count?) cost about 4 ms of host time per step for a FLUX.1 LoRA's
    988 tensors on a 2-core CPU (``benchmarks/optimizer_step.py``: 11.1 against 7.1 ms).
    """

    params: list[torch.Tensor]  # the tensors with a gradient, in the group's order
    reference: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (index in group, tensor)
    buckets: list[_FlatBucket] = field(default_factory=list)

    def fits(self, params: list[torch.Tensor]) -> bool:
        return (len(params) == len(self.params) and all(a is b for a, b in zip(params, self.params, strict=True))
                and all(bucket.current() for bucket in self.buckets))


class FusedFP8AdamW(FP8AdamW):
    """:class:`FP8AdamW` whose step batches all eligible tensors of a group (same state, same result)."""

    def __init__(self, *args: Any, compiled: bool | None = None, **kwargs: Any) -> None:
        """``compiled``: run each step's update as the code ``torch.compile`` generates from
        :func:`bucket_update_` (one or two kernels) instead of its 185 PyTorch operations; None (the
        default) compiles where coatflux's quantization kernels are compiled too: on a GPU with
        Triton (:func:`~coatflux.core.formats.uses_fast_path`). Other arguments are
        :class:`FP8AdamW`'s."""
        super().__init__(*args, **kwargs)
        if compiled is not None and not isinstance(compiled, bool):
            raise TypeError(f"FusedFP8AdamW: compiled must be true, false or null (None), got {compiled!r}")
        self.compiled = compiled
        self._compiled_update: Callable[..., None] | None = None  # made on first use (see _update_function)
        self._buckets: dict[tuple[int, ...], _FlatBucket] = {}
        self._plans: dict[int, _GroupPlan] = {}  # by id() of the parameter group

    def _update_function(self) -> Callable[..., None]:
        """:func:`bucket_update_` compiled, with the options that make inductor's divisions round as
        eager's do. Made on first use: importing the compiler costs seconds that a CPU run, which
        never compiles the update, should not pay."""
        if self._compiled_update is None:
            self._compiled_update = torch.compile(bucket_update_, fullgraph=True, options=quant._inductor_options())
        return self._compiled_update

    def _compile(self, buffer: torch.Tensor) -> bool:
        # None: where coatflux's other compiled kernels run (a GPU with Triton, unless
        # COATFLUX_REFERENCE_KERNELS asks for the reference), so a box without Triton still trains.
        return uses_fast_path(buffer.device) if self.compiled is None else self.compiled

    def _fusable(self, p: torch.Tensor) -> bool:
        cfg = self.fp8_config
        return (p.dtype == torch.float32 and cfg.use_dynamic_range_expansion
                and all(self._quantized(p, m) for m in _MOMENTS))

    def _step_group(self, group: dict[str, Any]) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        # Keyed by the group's identity: a plan that outlives its group can only be reused for the
        # very same tensors, which fits() checks.
        plan = self._plans.get(id(group))
        if plan is None or not plan.fits(params):
            plan = self._plans[id(group)] = self._plan(group, params)
        for index, p in plan.reference:
            state = self.state[p]
            if not state:
                self._init_state(p, state)
            self._update(p, state, group, index)
        for bucket in plan.buckets:
            bucket.step(group)

    def _plan(self, group: dict[str, Any], params: list[torch.Tensor]) -> _GroupPlan:
        plan = _GroupPlan(params)
        by_step: dict[tuple[float, torch.device], list[torch.Tensor]] = defaultdict(list)
        for index, p in self._params_with_grad(group):
            state = self.state[p]
            if not self._fusable(p):
                plan.reference.append((index, p))
                continue
            step = float(state["step"]) if state else 0.0
            by_step[(step, p.device)].append(p)
        # Tensors that skipped a step keep their own count, so they form a bucket of their own.
        plan.buckets = [self._bucket(ps) for ps in by_step.values()]
        return plan

    def _bucket(self, params: list[torch.Tensor]) -> _FlatBucket:
        key = tuple(id(p) for p in params)
        bucket = self._buckets.get(key)
        if bucket is None or not bucket.current():
            # A new set (first step, a tensor without gradient) or a reloaded state: gather it once,
            # and drop the buckets these tensors were in (their buffers would otherwise stay alive).
            members = set(key)
            for stale in [k for k in self._buckets if not members.isdisjoint(k)]:
                del self._buckets[stale]
            bucket = self._buckets[key] = _FlatBucket(self, params)
        return bucket

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._buckets.clear()  # the loaded tensors replace the views; buckets are rebuilt from them
        self._plans.clear()
