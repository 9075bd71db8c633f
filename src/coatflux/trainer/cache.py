"""Latent and text-embedding caches, keyed by content, stored in the run's output tree.

What: :class:`LatentCache` remembers the VAE latent of each :class:`~coatflux.trainer.data.Item`,
:class:`TextEmbeddingCache` the text encoders' outputs for each caption. Both call the encoder
they are given only for what they have not seen, in RAM (``to_disk=False``, ai-toolkit's
``cache_latents``) or as one ``<key>.safetensors`` file per entry (``cache_latents_to_disk``).

Why content keys: ai-toolkit names cache files after the image stem and stores them beside the
images, so an edited image with the same name reuses a stale latent and the dataset folder gets
written to. Here the key is the SHA-256 of the image bytes (or the caption text) plus everything
that shapes the encoder's input and output: bucket, scaled size, crop offset, flips, resolution,
an encoder identity string chosen by the caller (e.g. the VAE's repo and dtype), the pixel
decoder's revision (:data:`~coatflux.trainer.buckets.PIXEL_DECODER_REVISION`) and
:data:`CACHE_FORMAT_VERSION`. Editing an image, caption or transform, or changing the VAE,
therefore re-encodes exactly what changed, and renaming a file costs nothing.

Flips are part of the key, so a flipped draw is encoded from flipped pixels and cached as its own
entry; we chose this over flipping latents, which is only approximately equivariant for the
FLUX VAE. Files live under :func:`cache_root` (``<output_dir>/_cache/v1``), never in a dataset
folder (the constructor refuses one), and are written to a temporary file then ``os.replace``-d,
so a crash never leaves a half-written entry under a valid name; an unreadable entry is treated as
a miss and rewritten.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from coatflux.atomic import atomic_write

if TYPE_CHECKING:
    from coatflux.trainer.data import Item

CACHE_FORMAT_VERSION = 1


def cache_root(output_dir: Path) -> Path:
    """Where a run keeps its caches: ``<output_dir>/_cache/v<version>``."""
    return Path(output_dir) / "_cache" / f"v{CACHE_FORMAT_VERSION}"


def content_key(parts: Mapping[str, Any]) -> str:
    """SHA-256 of a canonical JSON encoding of ``parts`` (with the format version added)."""
    text = json.dumps({**parts, "cache_format_version": CACHE_FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class TensorCache:
    """Named tensors per key, in RAM or as atomically written safetensors files."""

    def __init__(self, cache_dir: Path, to_disk: bool, dataset_folders: Sequence[Path] = ()) -> None:
        self.cache_dir = Path(cache_dir)
        self.to_disk = to_disk
        self._memory: dict[str, dict[str, torch.Tensor]] = {}
        if to_disk:
            resolved = self.cache_dir.resolve()
            for folder in dataset_folders:
                if resolved.is_relative_to(Path(folder).resolve()):
                    raise ValueError(f"{self.cache_dir}: cache directory is inside dataset folder {folder}; "
                                     "caches belong in the output folder")
            self.cache_dir.mkdir(parents=True, exist_ok=True)

    def _file(self, key: str) -> Path:
        return self.cache_dir / f"{key}.safetensors"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        if not self.to_disk:
            return self._memory.get(key)
        path = self._file(key)
        if not path.is_file():
            return None
        try:
            return load_file(path)
        except Exception as error:  # a truncated or foreign file: re-encode rather than stop training
            warnings.warn(f"{path}: unreadable cache entry ({error}); re-encoding", stacklevel=2)
            return None

    def put(self, key: str, tensors: Mapping[str, torch.Tensor]) -> None:
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        if not self.to_disk:
            self._memory[key] = tensors
            return
        atomic_write(self._file(key), lambda tmp: save_file(tensors, tmp))


class LatentCache:
    """VAE latents per item; ``encode(pixels (B,3,H,W) in [-1,1]) -> latents (B,C,h,w)``."""

    def __init__(self, cache_dir: Path, encoder_id: str, to_disk: bool, dataset_folders: Sequence[Path] = ()) -> None:
        self.encoder_id = encoder_id
        self.store = TensorCache(cache_dir, to_disk, dataset_folders)

    def key(self, item: Item) -> str:
        return content_key({"kind": "latent", "encoder": self.encoder_id, **item.pixel_identity()})

    def get(self, key: str) -> torch.Tensor | None:
        entry = self.store.get(key)
        return None if entry is None else entry["latent"]

    def put(self, key: str, latent: torch.Tensor) -> None:
        self.store.put(key, {"latent": latent})

    def latents(self, batch: Sequence[Item], encode: Callable[[torch.Tensor], torch.Tensor],
                load_pixels: Callable[[Sequence[Item]], torch.Tensor]) -> torch.Tensor:
        """Latents of ``batch`` stacked (B, ...); only items not cached are decoded and encoded."""
        keys = [self.key(item) for item in batch]
        found = {k: self.get(k) for k in dict.fromkeys(keys)}
        missing = [k for k, v in found.items() if v is None]
        if missing:
            first = {k: batch[keys.index(k)] for k in missing}  # padded batches repeat items: encode once
            with torch.no_grad():
                encoded = encode(load_pixels(list(first.values())))
            for k, latent in zip(missing, encoded, strict=True):
                self.put(k, latent)
                found[k] = latent.detach().to("cpu")
        return torch.stack([found[k] for k in keys])


class TextEmbeddingCache:
    """Text-encoder outputs per caption; ``encode(captions) -> {name: (B, ...)}``, for FLUX
    ``prompt_embeds`` (T5) and ``pooled_prompt_embeds`` (CLIP)."""

    def __init__(self, cache_dir: Path, encoder_id: str, to_disk: bool, dataset_folders: Sequence[Path] = ()) -> None:
        self.encoder_id = encoder_id
        self.store = TensorCache(cache_dir, to_disk, dataset_folders)

    def key(self, caption: str) -> str:
        return content_key({"kind": "text", "encoder": self.encoder_id, "caption": caption})

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        return self.store.get(key)

    def put(self, key: str, embeddings: Mapping[str, torch.Tensor]) -> None:
        self.store.put(key, embeddings)

    def embeddings(self, captions: Sequence[str],
                   encode: Callable[[list[str]], Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Embeddings of ``captions`` stacked per name; only unseen captions are encoded."""
        found = {c: self.get(self.key(c)) for c in dict.fromkeys(captions)}
        missing = [c for c, v in found.items() if v is None]
        if missing:
            with torch.no_grad():
                encoded = encode(missing)
            for i, caption in enumerate(missing):
                entry = {name: t[i].detach().to("cpu") for name, t in encoded.items()}
                self.put(self.key(caption), entry)
                found[caption] = entry
        names = found[captions[0]].keys()
        return {name: torch.stack([found[c][name] for c in captions]) for name in names}
