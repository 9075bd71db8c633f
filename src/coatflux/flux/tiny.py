"""A tiny, random-weight FLUX.1 pipeline in diffusers layout, built locally for tests and smoke runs.

What: :func:`make_tiny_flux` writes a folder that ``diffusers.FluxPipeline.from_pretrained`` loads
offline -- ``model_index.json``, ``transformer/``, ``vae/``, ``text_encoder/`` (CLIP),
``tokenizer/``, ``text_encoder_2/`` (T5 encoder), ``tokenizer_2/`` and ``scheduler/`` -- and that
generates a 64x64 image in a couple of CPU seconds. Every module is the real diffusers/transformers
class with small sizes, so key names, shapes *ratios*, packing, RoPE, modulation and the
pipeline's control flow are exercised exactly as for FLUX.1-dev (see :data:`TINY_TRANSFORMER_CONFIG`).

Why build instead of download: tests and CI cannot reach the Hugging Face hub, and a checked-in
binary fixture would rot whenever diffusers changes a config field. Building from code takes about a
second and always matches the installed libraries.

Tokenizers are made from scratch with the ``tokenizers``-backed transformers classes: CLIP gets a
byte-level BPE vocabulary of the 256 byte symbols (each also with CLIP's ``</w>`` end-of-word form)
and no merges, T5 a Unigram vocabulary of single ASCII characters. Real text therefore tokenizes
into characters: useless for meaning, exact for plumbing. We chose these over a trained
vocabulary because they need no corpus and cannot fail to cover an input. ``vocab.json`` and
``merges.txt`` are written too, so an older transformers' slow ``CLIPTokenizer`` loads the folder.

The folder is built in a temporary sibling directory and renamed into place, so a crash never leaves
a half-written pipeline that a later run would mistake for a complete one.
"""

from __future__ import annotations

import json
import os
import shutil
import string
import tempfile
from pathlib import Path
from typing import Any

import torch

TINY_TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,  # 16 latent channels x 2x2 patch, as in FLUX.1
    "num_layers": 2,  # double-stream blocks (19 in FLUX.1)
    "num_single_layers": 2,  # single-stream blocks (38 in FLUX.1)
    "attention_head_dim": 16,
    "num_attention_heads": 2,  # inner dim 32 (3072 in FLUX.1)
    "joint_attention_dim": 32,  # = T5 d_model
    "pooled_projection_dim": 32,  # = CLIP hidden size
    "guidance_embeds": True,  # FLUX.1-dev style guidance distillation input
    "axes_dims_rope": (4, 6, 6),  # sums to the head dim, like (16, 56, 56) for 128
}

# FLUX.1-dev's scheduler/scheduler_config.json values.
FLUX_DEV_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512


def make_tiny_flux(out_dir: Path, seed: int = 0, overwrite: bool = False) -> Path:
    """Write a tiny random FLUX pipeline to ``out_dir`` and return its path.

    Raises ``FileExistsError`` if ``out_dir`` exists and is not empty, unless ``overwrite``.
    The same ``seed`` gives the same weights; the global torch RNG state is left untouched.
    """
    out_dir = Path(out_dir)
    _check_target(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        _build_pipeline(seed).save_pretrained(tmp, safe_serialization=True)
        _write_slow_clip_files(tmp / "tokenizer")
        if out_dir.exists():
            shutil.rmtree(out_dir) if any(out_dir.iterdir()) else out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _check_target(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} is not empty; pass overwrite=True to replace it")


def _build_pipeline(seed: int):
    from diffusers import FluxPipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer, tokenizer_2 = _clip_tokenizer(), _t5_tokenizer()
        return FluxPipeline(
            scheduler=_scheduler(),
            vae=_vae(),
            text_encoder=_clip_text_model(len(tokenizer), tokenizer),
            tokenizer=tokenizer,
            text_encoder_2=_t5_encoder(len(tokenizer_2)),
            tokenizer_2=tokenizer_2,
            transformer=_transformer(),
        )


def _transformer():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(**TINY_TRANSFORMER_CONFIG)


def _scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER_CONFIG)


def _vae():
    from diffusers import AutoencoderKL

    # Four resolution levels give the real 8x downsampling; scale/shift are FLUX.1's values.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=16,
        sample_size=64,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _clip_vocab() -> dict[str, int]:
    from tokenizers import pre_tokenizers

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab[CLIP_BOS] = len(vocab)
    vocab[CLIP_EOS] = len(vocab)
    return vocab


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=_clip_vocab(), merges=[], model_max_length=CLIP_MAX_LENGTH)


def _write_slow_clip_files(tokenizer_dir: Path) -> None:
    (tokenizer_dir / "vocab.json").write_text(json.dumps(_clip_vocab(), ensure_ascii=False), encoding="utf-8")
    (tokenizer_dir / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")


def _t5_tokenizer():
    from transformers import T5TokenizerFast

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    for ch in string.ascii_letters + string.digits + string.punctuation:
        pieces += [(ch, -3.0), ("\u2581" + ch, -3.5)]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def _clip_text_model(vocab_size: int, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TINY_TRANSFORMER_CONFIG["pooled_projection_dim"],
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=32,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        # The pooled output is read at the first eos position, so this must be the real eos id.
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def _t5_encoder(vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=TINY_TRANSFORMER_CONFIG["joint_attention_dim"],
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",  # T5 v1.1 / FLUX's T5-XXL
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config)
