"""``FP8AdamW``: AdamW whose two moments live in FP8, block-wise, with Dynamic Range Expansion.

What: a ``torch.optim.Optimizer`` with the update of ``torch.optim.AdamW`` (decoupled weight
decay, bias correction, ``eps`` added to ``sqrt(v_hat)``). Each step dequantizes a parameter's
moments to fp32, updates them and the parameter in fp32, and quantizes the moments again:
with DRE (:mod:`coatflux.core.dre`) that is 2.047 bytes of state per parameter instead of 8.

Choices:

* Tensors smaller than ``fp8_config.min_quantized_numel`` (4096) keep fp32 moments: their saving
  is a few kilobytes, and biases and norm scales are the tensors most sensitive to error.
* Without DRE, each block gets one absmax scale rounded to a power of two (one ``int8``
  exponent), the same layout torchao's ``AdamWFp8`` uses but with a 1-byte scale.
* bf16 (or fp16) parameters are their own master weights: the fp32 update is rounded back with
  *stochastic* rounding, so updates smaller than half a bf16 ulp still move the weight on
  average instead of vanishing. The random bits come from a generator seeded by
  ``(seed, parameter index, step)``, so nothing extra is checkpointed and a resumed run is
  bit-identical. fp32 parameters are updated exactly as AdamW does (no extra master copy).
* The state holds only tensors and numbers (FP8 codes, ``uint8``/``int8`` metadata, an fp32
  ``step``), so ``torch.load(..., weights_only=True)`` loads it; :meth:`load_state_dict` keeps
  every state tensor's saved dtype, where ``torch.optim.Optimizer`` would cast floating-point
  state to the parameter's dtype and decode FP8 codes as if they were numbers.

* Sharded parameters (FSDP2's ``DTensor``): the update runs on the rank's local shard
  (``p.to_local()``, ``p.grad.to_local()``) and the state holds plain tensors of the shard's
  shape, never ``DTensor`` objects -- the moments' block metadata of a shard is not a slice of a global
  tensor, so there is nothing meaningful to wrap. Whether a tensor gets FP8 moments is decided
  by its *global* size, so every rank (and an unsharded run) makes the same choice. Blocks are
  formed on the flattened local shard; when every shard starts at a multiple of ``block_size``
  in the flattened global tensor (true for FSDP2's dim-0 sharding whenever ``rows_per_shard *
  row_numel`` is a multiple of ``block_size``: any 2-D weight whose last dim is a multiple of 128,
  and every FP8-stored tensor of FLUX.1-dev at 2, 4 or 8 ranks), the blocks are the unsharded run's blocks and the sharded step is
  bit-identical to it (given the same gradients). :func:`coatflux.core.distributed.blocks_align_with_shards` checks this;
  :mod:`coatflux.core.distributed` also saves and loads the sharded state.

This is the reference implementation (one tensor at a time, plain PyTorch); fused kernels are
tested against it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.optim import Optimizer

from coatflux.core.config import FP8QuantizationConfig
from coatflux.core.dre import DREBlocks, dre_dequantize, dre_quantize
from coatflux.core.formats import quantize

_MOMENTS = ("exp_avg", "exp_avg_sq")
_DRE_FIELDS = ("k_code", "center_exp", "scale_exp")


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The rank's local shard of a ``DTensor`` (a view sharing its storage); any other tensor as is.

    Why not operate on the ``DTensor`` itself: the update mixes parameters with plain state
    tensors, reinterprets bits (``view(torch.int32)``) and draws random numbers, none of which
    ``DTensor`` dispatch supports; and every operation of the update is element-wise or per block
    of the shard, so no communication is needed.
    """
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def shard_offset(t: torch.Tensor) -> int:
    """Offset of the local shard's first element in the flattened global tensor (0 if unsharded).

    Exact for ``Shard(0)`` placements on one mesh dimension, FSDP2's layout; other placements
    (replicated, or sharded along other dims, whose local shard is not a contiguous range of the
    flattened tensor) return 0, which only affects the stochastic-rounding seed.
    """
    placements = getattr(t, "placements", None)
    if placements is None or len(placements) != 1 or not t.dim():
        return 0
    placement = placements[0]
    if not (placement.is_shard() and placement.dim == 0):
        return 0
    mesh = t.device_mesh
    coordinate = mesh.get_coordinate()
    if coordinate is None:  # this rank is not in the mesh
        return 0
    rows_per_shard = -(-t.shape[0] // mesh.size())  # torch.chunk's split, as FSDP2 uses
    row_numel = t.numel() // t.shape[0] if t.shape[0] else 0
    return min(coordinate[0] * rows_per_shard, t.shape[0]) * row_numel


def _check_hyperparameters(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    if not (isinstance(lr, float | int) or torch.is_tensor(lr)) or lr < 0:
        raise ValueError(f"FP8AdamW: invalid learning rate {lr!r}; expected a number >= 0")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"FP8AdamW: invalid betas {betas!r}; expected two numbers in [0, 1)")
    if eps < 0:
        raise ValueError(f"FP8AdamW: invalid eps {eps!r}; expected a number >= 0")
    if weight_decay < 0:
        raise ValueError(f"FP8AdamW: invalid weight_decay {weight_decay!r}; expected a number >= 0")


class FP8AdamW(Optimizer):
    """AdamW with FP8 (optionally DRE-expanded) first and second moments.

    Args:
        params: parameters or parameter groups, as for any ``torch.optim`` optimizer.
        lr, betas, eps, weight_decay: as in ``torch.optim.AdamW``.
        fp8_config: formats, block size, DRE and the small-tensor threshold.
        seed: seeds the stochastic rounding of bf16/fp16 parameters.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        fp8_config: FP8QuantizationConfig | None = None,
        seed: int = 0,
    ) -> None:
        _check_hyperparameters(lr, tuple(betas), eps, weight_decay)
        self.fp8_config = fp8_config or FP8QuantizationConfig()
        if not isinstance(self.fp8_config, FP8QuantizationConfig):
            raise TypeError(f"FP8AdamW: fp8_config must be an FP8QuantizationConfig, got {type(fp8_config).__name__}")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "seed": seed}
        super().__init__(params, defaults)
        for group in self.param_groups:
            _check_hyperparameters(group["lr"], tuple(group["betas"]), group["eps"], group["weight_decay"])
            for p in group["params"]:
                if not p.is_floating_point():
                    raise TypeError(f"FP8AdamW: parameter of dtype {p.dtype} is not floating point")

    # -- state encoding -------------------------------------------------------------------------

    def _quantized(self, p: torch.Tensor, moment: str) -> bool:
        # p.numel() is the global size for a DTensor: every rank decides as an unsharded run would.
        cfg = self.fp8_config
        use = cfg.use_fp8_m1 if moment == "exp_avg" else cfg.use_fp8_m2
        return use and p.numel() >= cfg.min_quantized_numel

    def _format(self, moment: str) -> str:
        return self.fp8_config.m1_format if moment == "exp_avg" else self.fp8_config.m2_format

    def _encode(self, state: dict[str, Any], moment: str, value: torch.Tensor) -> None:
        cfg = self.fp8_config
        fmt = self._format(moment)
        if cfg.use_dynamic_range_expansion:
            enc = dre_quantize(value, fmt, cfg.block_size)
            state[moment] = enc.codes
            for name in _DRE_FIELDS:
                state[f"{moment}_{name}"] = getattr(enc, name)
        else:
            q = quantize(value, fmt, "block", cfg.block_size, pow2_scales=True)
            state[moment] = q.data
            state[f"{moment}_scale_exp"] = q.scale

    def _decode(self, state: dict[str, Any], moment: str) -> torch.Tensor:
        cfg = self.fp8_config
        codes = state[moment]
        if not codes.dtype.is_floating_point or codes.element_size() != 1:
            return codes  # full-precision moment of a small tensor
        if cfg.use_dynamic_range_expansion:
            enc = DREBlocks(codes, *(state[f"{moment}_{name}"] for name in _DRE_FIELDS))
            return dre_dequantize(enc, cfg.block_size)
        scale = torch.exp2(state[f"{moment}_scale_exp"].float()).reshape(-1)
        flat = codes.reshape(-1).float()
        pad = (-flat.numel()) % cfg.block_size
        blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, cfg.block_size) * scale[:, None]
        return blocks.reshape(-1)[: codes.numel()].reshape(codes.shape)

    def _init_state(self, p: torch.Tensor, state: dict[str, Any]) -> None:
        state["step"] = torch.zeros((), dtype=torch.float32)
        zeros = torch.zeros_like(local_tensor(p), dtype=torch.float32, memory_format=torch.preserve_format)
        for moment in _MOMENTS:
            if self._quantized(p, moment):
                self._encode(state, moment, zeros)
            else:
                state[moment] = zeros.clone()

    # -- the update -----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Perform one optimization step (``closure`` re-evaluates the loss, as in torch.optim)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    @staticmethod
    def _params_with_grad(group: dict[str, Any]) -> Iterator[tuple[int, torch.Tensor]]:
        for index, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("FP8AdamW does not support sparse gradients")
            yield index, p

    def _step_group(self, group: dict[str, Any]) -> None:
        """One tensor at a time; fused subclasses override this to batch tensors."""
        for index, p in self._params_with_grad(group):
            state = self.state[p]
            if not state:
                self._init_state(p, state)
            self._update(p, state, group, index)

    def _update(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any], index: int) -> None:
        state["step"] += 1
        step = int(state["step"].item())
        param = local_tensor(p)  # a view: updating it in place updates the (sharded) parameter
        grad = local_tensor(p.grad).float()
        exp_avg = self._decode(state, "exp_avg").float()
        exp_avg_sq = self._decode(state, "exp_avg_sq").float()

        master = param.float() if param.dtype != torch.float32 else param
        adamw_update_(master, grad, exp_avg, exp_avg_sq, step, group)
        if master is not param:
            seed = _rounding_seed(group["seed"], index, step, shard_offset(p))
            param.copy_(_stochastic_round(master, param.dtype, seed))

        for moment, value in zip(_MOMENTS, (exp_avg, exp_avg_sq), strict=True):
            if self._quantized(p, moment):
                self._encode(state, moment, value)
            else:
                state[moment] = value

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.Optimizer.state_dict``, stamped with ``rank``/``world_size`` when sharded.

        The state of a sharded (``DTensor``) parameter is this rank's shard only, held in plain
        tensors. The stamp lets :meth:`load_state_dict` refuse a shard of another rank or another
        world size instead of loading it silently.
        """
        state_dict = super().state_dict()
        stamp = _shard_stamp(self)
        if stamp is not None:
            state_dict[SHARD_STAMP] = stamp
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as ``torch.optim.Optimizer`` does, but keep each state tensor's saved dtype.

        With sharded parameters, the state dict must carry the stamp of :meth:`state_dict` for
        this same rank and world size. This is what makes ``torch.distributed.checkpoint``
        (``set_optimizer_state_dict``, and so accelerate's ``load_state`` under FSDP2) fail loudly:
        DCP treats plain tensors as replicated, saves rank 0's copy only and would hand rank 0's
        FP8 codes to every rank. Use :mod:`coatflux.core.distributed` instead.
        """
        stamp = _shard_stamp(self)
        if stamp is not None and state_dict.get(SHARD_STAMP) != stamp:
            raise ValueError(
                f"FP8AdamW.load_state_dict: this optimizer holds sharded (DTensor) parameters as rank "
                f"{stamp['rank']} of {stamp['world_size']}, but the state dict is stamped "
                f"{state_dict.get(SHARD_STAMP)!r}. Its FP8 state is per-shard and cannot be loaded from "
                "another rank, another world size or torch.distributed.checkpoint (which keeps only "
                "rank 0's copy of plain tensors); save and load it with "
                "coatflux.core.distributed.save_sharded_optimizer / load_sharded_optimizer."
            )
        saved_states = state_dict["state"]
        saved_groups = state_dict["param_groups"]
        super().load_state_dict(state_dict)
        for saved_group, group in zip(saved_groups, self.param_groups, strict=True):
            for param_id, p in zip(saved_group["params"], group["params"], strict=True):
                if param_id not in saved_states:
                    continue
                for key, value in saved_states[param_id].items():
                    if torch.is_tensor(value) and key != "step":
                        self.state[p][key] = value.to(device=p.device, copy=True)

    def state_bytes(self) -> int:
        """Bytes held by the optimizer state (codes, metadata and full-precision moments)."""
        total = 0
        for state in self.state.values():
            for key, value in state.items():
                if torch.is_tensor(value) and key != "step":
                    total += value.numel() * value.element_size()
        return total


SHARD_STAMP = "coatflux_shard"


def _shard_stamp(optimizer: Optimizer) -> dict[str, int] | None:
    """``{"rank", "world_size"}`` of the default process group if any parameter is a DTensor."""
    sharded = any(hasattr(p, "to_local") for g in optimizer.param_groups for p in g["params"])
    if not sharded:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return {"rank": 0, "world_size": 1}
    return {"rank": dist.get_rank(), "world_size": dist.get_world_size()}


def adamw_scalars(step: int, group: dict[str, Any]) -> tuple[float, ...]:
    """The numbers one AdamW step uses, computed in double precision as ``torch.optim.AdamW`` does:
    ``1 - beta1``, ``beta2``, ``1 - beta2``, ``sqrt(1 - beta2**step)``, ``eps``, the decay factor
    ``1 - lr * weight_decay`` and the step size ``-lr / (1 - beta1**step)``."""
    beta1, beta2 = group["betas"]
    lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
    return (1 - beta1, beta2, 1 - beta2, (1 - beta2**step) ** 0.5, eps, 1 - lr * wd, -lr / (1 - beta1**step))


def adamw_math_(master: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                scalars: Sequence[float] | torch.Tensor) -> None:
    """The AdamW update in place on ``master`` and both moments, given :func:`adamw_scalars`.

    ``scalars`` may be numbers or a tensor of them: a compiled update takes a tensor, so that a new
    step's values are new inputs rather than constants to compile again. Every operation therefore
    takes its number as an operand, not as a ``value=`` keyword; ``grad * (grad * v)`` and
    ``(m / d) * s`` are the products ``addcmul``'s ``v * grad * grad`` and ``addcdiv``'s
    ``s * (m / d)`` make, bit for bit (IEEE multiplication commutes).
    """
    one_minus_beta1, beta2, one_minus_beta2, bias_correction2_sqrt, eps, decay, step_size = scalars
    exp_avg.lerp_(grad, one_minus_beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad * one_minus_beta2)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    master.mul_(decay)
    master.add_(exp_avg / denom * step_size)


def adamw_update_(master: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                  step: int, group: dict[str, Any]) -> None:
    """The AdamW update in fp32, in place on ``master`` and both moments (torch.optim.AdamW's math)."""
    adamw_math_(master, grad, exp_avg, exp_avg_sq, adamw_scalars(step, group))


def _rounding_seed(seed: int, index: int, step: int, offset: int = 0) -> int:
    # A fixed odd-multiplier mix keeps seeds distinct across parameters, steps and shards (offset
    # is the shard's first element in the flattened tensor, 0 when unsharded: unchanged seeds).
    # A shard's random bits therefore differ from the unsharded run's bits for the same elements,
    # so sharded bf16 parameters match an unsharded run in distribution, not bit for bit.
    return (seed * 1_000_003 + index * 7_919 + step * 104_729 + offset * 15_485_863) % (2**63 - 1)


def _stochastic_round(x: torch.Tensor, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Round fp32 ``x`` to bf16/fp16 stochastically (unbiased), with bits from ``seed``."""
    if dtype == torch.bfloat16:
        gen = torch.Generator(device=x.device).manual_seed(seed)
        noise = torch.randint(0, 1 << 16, x.shape, generator=gen, device=x.device, dtype=torch.int32)
        bits = x.contiguous().view(torch.int32)
        # Adding 16 random low bits then truncating rounds up with probability = the
        # discarded fraction; skip non-finite values, whose bit patterns must not change.
        rounded = ((bits + noise) & ~0xFFFF).view(torch.float32)
        return torch.where(torch.isfinite(x), rounded, x).to(dtype)
    return x.to(dtype)

