"""FLUX key layouts: diffusers <-> BFL ("original", ComfyUI) for LoRA files and full transformers.

What: :func:`convert_lora_file` turns a diffusers/PEFT LoRA (``transformer.<path>.lora_A/B.weight``,
what we and ai-toolkit save) into the kohya ``lora_unet_*`` layout that kohya sd-scripts, ComfyUI and
Forge load (``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` / ``.lora_up.weight`` /
``.alpha``) and back. :func:`bfl_to_diffusers` / :func:`diffusers_to_bfl` do the same for a full
transformer state dict, which single-file checkpoint loading needs.

Why our own tables: diffusers converts BFL->diffusers only, and hard-codes FLUX.1's 3072 hidden
size in the fused single-block split, so it cannot handle any other size (our tiny test model
included). Here the sizes come from the tensors, one table serves both directions, and every key
must be claimed or the conversion fails naming it.

Fused modules. BFL fuses what diffusers keeps apart: ``img_attn.qkv`` = to_q|to_k|to_v,
``txt_attn.qkv`` = add_q|add_k|add_v, single-block ``linear1`` = to_q|to_k|to_v|proj_mlp (rows
concatenated). A LoRA on the fused module is built from the parts' LoRAs ``(A_i, B_i)`` as

    down = [A_1; A_2; ...]           (ranks stacked: sum r_i rows)
    up   = blockdiag(B_1, B_2, ...)  (each B_i in its own rows and its own rank columns)

so ``up @ down = [B_1 A_1; B_2 A_2; ...]``: exactly the parts' deltas, no SVD, no loss. The cost is
a fused rank of ``sum r_i`` with mostly-zero ``up``; we chose it over an SVD re-factorisation to
rank r, which would be lossy, and over copying ``down`` (which would be wrong unless the parts share
A). Loaders that patch the fused BFL weight (kohya, ComfyUI) apply ``up @ down`` as is;
diffusers detects the block-diagonal form and splits it back into the parts. A part without a
LoRA gets zero blocks of the same rank (so the split stays even); going back, all-zero parts are
dropped. ``alpha`` is written equal to the rank, with any scale already folded into ``up``.
Reading kohya files, ``alpha / rank`` is folded into B (``lora_A`` unchanged), and a fused ``up``
that is not block-diagonal is split by rows with ``down`` shared, which is also exact.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

KOHYA_PREFIX = "lora_unet_"
PEFT_PREFIX = "transformer."


@dataclass(frozen=True)
class _Map:
    """One BFL module and the diffusers module(s) it holds, in row order."""

    bfl: str
    parts: tuple[str, ...]
    swap_halves: bool = False  # final_layer adaLN: BFL (shift, scale) vs diffusers (scale, shift)


def _double_maps(i: int) -> list[_Map]:
    b, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
    return [
        _Map(b + "img_attn.qkv", (d + "attn.to_q", d + "attn.to_k", d + "attn.to_v")),
        _Map(b + "img_attn.proj", (d + "attn.to_out.0",)),
        _Map(b + "img_mlp.0", (d + "ff.net.0.proj",)),
        _Map(b + "img_mlp.2", (d + "ff.net.2",)),
        _Map(b + "img_mod.lin", (d + "norm1.linear",)),
        _Map(b + "txt_attn.qkv", (d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj")),
        _Map(b + "txt_attn.proj", (d + "attn.to_add_out",)),
        _Map(b + "txt_mlp.0", (d + "ff_context.net.0.proj",)),
        _Map(b + "txt_mlp.2", (d + "ff_context.net.2",)),
        _Map(b + "txt_mod.lin", (d + "norm1_context.linear",)),
    ]


def _single_maps(i: int) -> list[_Map]:
    b, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
    return [
        _Map(b + "linear1", (d + "attn.to_q", d + "attn.to_k", d + "attn.to_v", d + "proj_mlp")),
        _Map(b + "linear2", (d + "proj_out",)),
        _Map(b + "modulation.lin", (d + "norm.linear",)),
    ]


_GLOBAL_MAPS = [
    _Map("img_in", ("x_embedder",)),
    _Map("txt_in", ("context_embedder",)),
    _Map("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
    _Map("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
    _Map("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
    _Map("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",)),
    _Map("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",)),
    _Map("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",)),
    _Map("final_layer.linear", ("proj_out",)),
    _Map("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap_halves=True),
]

# Parameters outside linears: QK RMSNorm scales.
_NORMS_DOUBLE = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
_NORMS_SINGLE = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}


def _block_indices(keys, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.search(k))})


def _maps_for(keys, bfl_side: bool) -> list[_Map]:
    """Tables for as many blocks as the keys mention (BFL or diffusers spelling)."""
    double = r"(?:^|[._])double_blocks[._](\d+)[._]" if bfl_side else r"(?:^|\.)transformer_blocks\.(\d+)\."
    single = r"(?:^|[._])single_blocks[._](\d+)[._]" if bfl_side else r"single_transformer_blocks\.(\d+)\."
    maps = list(_GLOBAL_MAPS)
    for i in _block_indices(keys, double):
        maps += _double_maps(i)
    for i in _block_indices(keys, single):
        maps += _single_maps(i)
    return maps


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _split_rows(total: int, n_parts: int) -> list[int]:
    """Row sizes of a fused module: equal thirds for qkv; for linear1 3 x inner + 4 x inner (mlp ratio 4)."""
    if n_parts == 3 and total % 3 == 0:
        return [total // 3] * 3
    if n_parts == 4 and total % 7 == 0:
        inner = total // 7
        return [inner, inner, inner, 4 * inner]
    raise ValueError(f"cannot split a fused dimension of {total} into the {n_parts} FLUX parts")


# ----------------------------------------------------------------------------- full transformer


def diffusers_to_bfl(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers ``FluxTransformer2DModel`` state dict in BFL (original / ComfyUI) key layout."""
    src = dict(state_dict)
    out: dict[str, torch.Tensor] = {}
    for m in _maps_for(src, bfl_side=False):
        for suffix in ("weight", "bias"):
            keys = [f"{p}.{suffix}" for p in m.parts]
            if not all(k in src for k in keys):
                continue
            fused = torch.cat([src.pop(k) for k in keys], dim=0)
            out[f"{m.bfl}.{suffix}"] = _swap_halves(fused) if m.swap_halves else fused
    for i in _block_indices(list(src), r"^transformer_blocks\.(\d+)\."):
        for bfl, dif in _NORMS_DOUBLE.items():
            out[f"double_blocks.{i}.{bfl}"] = src.pop(f"transformer_blocks.{i}.{dif}")
    for i in _block_indices(list(src), r"^single_transformer_blocks\.(\d+)\."):
        for bfl, dif in _NORMS_SINGLE.items():
            out[f"single_blocks.{i}.{bfl}"] = src.pop(f"single_transformer_blocks.{i}.{dif}")
    if src:
        raise ValueError(f"diffusers key {next(iter(src))!r} has no BFL equivalent ({len(src)} left over)")
    return out


def bfl_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A BFL / ComfyUI FLUX transformer state dict (``double_blocks.*`` ...) in diffusers layout.

    A ``model.diffusion_model.`` prefix (ComfyUI full checkpoints) is stripped.
    """
    src = {k.removeprefix("model.diffusion_model."): v for k, v in state_dict.items()}
    out: dict[str, torch.Tensor] = {}
    for m in _maps_for(src, bfl_side=True):
        for suffix in ("weight", "bias"):
            fused = src.pop(f"{m.bfl}.{suffix}", None)
            if fused is None:
                continue
            if m.swap_halves:
                fused = _swap_halves(fused)
            sizes = [fused.shape[0]] if len(m.parts) == 1 else _split_rows(fused.shape[0], len(m.parts))
            for part, piece in zip(m.parts, torch.split(fused, sizes, dim=0), strict=True):
                out[f"{part}.{suffix}"] = piece
    for i in _block_indices(list(src), r"^double_blocks\.(\d+)\."):
        for bfl, dif in _NORMS_DOUBLE.items():
            out[f"transformer_blocks.{i}.{dif}"] = src.pop(f"double_blocks.{i}.{bfl}")
    for i in _block_indices(list(src), r"^single_blocks\.(\d+)\."):
        for bfl, dif in _NORMS_SINGLE.items():
            out[f"single_transformer_blocks.{i}.{dif}"] = src.pop(f"single_blocks.{i}.{bfl}")
    if src:
        raise ValueError(f"BFL key {next(iter(src))!r} is not a FLUX transformer key ({len(src)} left over)")
    return out


def is_bfl_layout(keys) -> bool:
    return any(re.match(r"^(model\.diffusion_model\.)?(double|single)_blocks\.", k) for k in keys)


# ----------------------------------------------------------------------------- LoRA


def _kohya_name(bfl: str) -> str:
    return KOHYA_PREFIX + bfl.replace(".", "_")


def _peft_pairs(sd: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{diffusers module: (A, B)}`` with any per-module ``.alpha`` folded into B."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    rx = re.compile(r"^transformer\.(.+)\.(lora_A\.weight|lora_B\.weight|alpha)$")
    for key, value in sd.items():
        m = rx.match(key)
        if not m:
            raise ValueError(f"unrecognized key {key!r}: expected transformer.<module>.lora_A/lora_B.weight")
        groups.setdefault(m.group(1), {})[m.group(2)] = value
    pairs = {}
    for module, g in groups.items():
        if "lora_A.weight" not in g or "lora_B.weight" not in g:
            raise ValueError(f"module {module!r} lacks lora_A or lora_B")
        a, b = g["lora_A.weight"], g["lora_B.weight"]
        if "alpha" in g:
            b = b * (float(g["alpha"]) / a.shape[0])
        pairs[module] = (a, b)
    return pairs


def _fuse_lora(parts: list[tuple[torch.Tensor, torch.Tensor] | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack downs, block-diagonal ups (see the module docstring); None parts become zero blocks."""
    present = [p for p in parts if p is not None]
    rank, in_dim = present[0][0].shape
    dtype = present[0][0].dtype
    out_dims = [p[1].shape[0] if p is not None else None for p in parts]
    if None in out_dims:
        known = [d for d in out_dims if d is not None]
        total = _infer_fused_rows(known, out_dims)
        out_dims = [
            d if d is not None else s for d, s in zip(out_dims, _split_rows(total, len(parts)), strict=True)
        ]
    filled = [
        p if p is not None else (torch.zeros(rank, in_dim, dtype=dtype), torch.zeros(d, rank, dtype=dtype))
        for p, d in zip(parts, out_dims, strict=True)
    ]
    down = torch.cat([a for a, _ in filled], dim=0)
    up = torch.block_diag(*[b.to(dtype) for _, b in filled])
    return down, up


def _infer_fused_rows(known: list[int], out_dims: list[int | None]) -> int:
    # Missing qkv parts are as wide as the others; for linear1 the first three parts are the inner dim.
    if len(out_dims) == 3:
        return known[0] * 3
    inner = next(d for d in out_dims[:3] if d is not None) if any(out_dims[:3]) else out_dims[3] // 4
    return inner * 7


def diffusers_lora_to_kohya(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT/diffusers FLUX LoRA -> kohya ``lora_unet_*`` (down/up/alpha, alpha = rank)."""
    pairs = _peft_pairs(sd)
    out = {}
    for m in _maps_for([PEFT_PREFIX + k + "." for k in pairs], bfl_side=False):
        parts = [pairs.pop(p, None) for p in m.parts]
        if all(p is None for p in parts):
            continue
        down, up = _fuse_lora(parts) if len(parts) > 1 else parts[0]
        if m.swap_halves:
            up = _swap_halves(up)
        name = _kohya_name(m.bfl)
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(down.shape[0]), dtype=down.dtype)
    if pairs:
        raise ValueError(
            f"unrecognized key 'transformer.{next(iter(pairs))}.lora_A.weight': no kohya FLUX equivalent"
        )
    return out


def _kohya_groups(sd: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    rx = re.compile(r"^(lora_unet_\w+)\.(lora_down\.weight|lora_up\.weight|alpha)$")
    for key, value in sd.items():
        m = rx.match(key)
        if not m:
            raise ValueError(
                f"unrecognized key {key!r}: expected lora_unet_<module>.lora_down/lora_up.weight/alpha"
            )
        groups.setdefault(m.group(1), {})[m.group(2)] = value
    return groups


def _split_lora(
    down: torch.Tensor, up: torch.Tensor, n_parts: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Inverse of :func:`_fuse_lora`; a non-block-diagonal ``up`` is split by rows with ``down`` shared."""
    rows = _split_rows(up.shape[0], n_parts)
    rank = down.shape[0]
    ups = torch.split(up, rows, dim=0)
    if rank % n_parts == 0:
        r = rank // n_parts
        blocks = [(i * r, (i + 1) * r) for i in range(n_parts)]
        off_diagonal_zero = all(
            not torch.any(u[:, :lo]) and not torch.any(u[:, hi:])
            for u, (lo, hi) in zip(ups, blocks, strict=True)
        )
        if off_diagonal_zero:
            return [(down[lo:hi], u[:, lo:hi]) for u, (lo, hi) in zip(ups, blocks, strict=True)]
    return [(down, u) for u in ups]


def kohya_lora_to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """kohya ``lora_unet_*`` FLUX LoRA -> PEFT/diffusers ``transformer.*`` (alpha folded into B)."""
    groups = _kohya_groups(sd)
    by_name = {_kohya_name(m.bfl): m for m in _maps_for(list(groups), bfl_side=True)}
    out = {}
    for name, g in groups.items():
        m = by_name.get(name)
        if m is None:
            raise ValueError(f"unrecognized key '{name}.lora_down.weight': not a FLUX transformer module")
        if "lora_down.weight" not in g or "lora_up.weight" not in g:
            raise ValueError(f"kohya module {name!r} lacks lora_down or lora_up")
        down, up = g["lora_down.weight"], g["lora_up.weight"]
        rank = down.shape[0]
        scale = float(g["alpha"]) / rank if "alpha" in g else 1.0
        up = (up.float() * scale).to(up.dtype) if scale != 1.0 else up
        if m.swap_halves:
            up = _swap_halves(up)
        parts = _split_lora(down, up, len(m.parts)) if len(m.parts) > 1 else [(down, up)]
        for part, (a, b) in zip(m.parts, parts, strict=True):
            if len(m.parts) > 1 and not torch.any(a) and not torch.any(b):
                continue  # zero filler written for a part that had no LoRA
            out[f"{PEFT_PREFIX}{part}.lora_A.weight"] = a.contiguous()
            out[f"{PEFT_PREFIX}{part}.lora_B.weight"] = b.contiguous()
    return out


def detect_lora_format(keys) -> str:
    """ "kohya" or "diffusers", from the key spelling; ValueError naming a key if neither."""
    keys = list(keys)
    if keys and all(k.startswith(KOHYA_PREFIX) for k in keys):
        return "kohya"
    if keys and all(k.startswith(PEFT_PREFIX) for k in keys):
        return "diffusers"
    odd = next(
        (k for k in keys if not k.startswith((KOHYA_PREFIX, PEFT_PREFIX))), keys[0] if keys else "<none>"
    )
    raise ValueError(
        f"unrecognized LoRA key {odd!r}: expected all 'lora_unet_*' (kohya) or 'transformer.*' (diffusers)"
    )


_CONVERTERS: dict[tuple[str, str], Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]] = {
    ("diffusers", "kohya"): diffusers_lora_to_kohya,
    ("kohya", "diffusers"): kohya_lora_to_diffusers,
}


def convert_lora_file(
    src: str | os.PathLike, dst: str | os.PathLike, to: str, *, overwrite: bool = False
) -> Path:
    """Convert a FLUX LoRA safetensors file to ``to`` in {"kohya", "diffusers"}; metadata is kept.

    A file already in the target layout is copied unchanged (keys re-checked).
    """
    from coatflux.flux.lora import read_lora, save_lora

    if to not in ("kohya", "diffusers"):
        raise ValueError(f"to must be 'kohya' or 'diffusers', got {to!r}")
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"LoRA file {src} does not exist")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; pass overwrite=True to replace it")
    tensors, metadata = read_lora(src)
    source = detect_lora_format(tensors)
    if source == to:
        other = "kohya" if to == "diffusers" else "diffusers"
        _CONVERTERS[(source, other)](tensors)  # only to check every key is a FLUX LoRA key
        converted = tensors
    else:
        converted = _CONVERTERS[(source, to)](tensors)
    return save_lora(dst, converted, metadata, overwrite=overwrite)
