"""Latents and text embeddings for training batches: from the caches, or encoded on demand.

What: :class:`BatchEncoder` answers ``latents(batch)`` and ``text_embeddings(batch)`` for the
loop, through ai-toolkit's caches (``cache_latents``, ``cache_latents_to_disk``,
``cache_text_embeddings``; see :mod:`coatflux.trainer.cache`) or straight from the VAE and text
encoders; :func:`fill_caches` encodes everything a run will use before training starts, so the
text encoders (and usually the VAE) can be freed for the training phase.

Why encode one caption per encoder call and seed latent sampling by the image's cache key: a
resumed run, a run on several processes and a run that encodes in another order must all see the
very same tensors as an uninterrupted single-process run; batched text encoding pads differently
with the batch's make-up, and a shared generator would depend on the encoding order.
"""

from __future__ import annotations

import gc
import hashlib

import torch
from tqdm.auto import tqdm

from coatflux.flux.loading import encode_images
from coatflux.trainer.cache import LatentCache, TextEmbeddingCache, cache_root
from coatflux.trainer.config import TrainJobConfig
from coatflux.trainer.data import Item, TrainingData
from coatflux.trainer.distributed import Runtime
from coatflux.trainer.sampling import T5_MAX_LENGTH, encode_prompts


def _latent_generator(key: str) -> torch.Generator:
    # Seeded by the item's content key: the same draw always gets the same latent sample,
    # whatever order items are encoded in (cache fill, resume, no cache).
    return torch.Generator().manual_seed(int(hashlib.sha256(key.encode()).hexdigest()[:15], 16))


class BatchEncoder:
    """Latents and text embeddings for batches, from the caches or the encoders."""

    def __init__(self, cfg: TrainJobConfig, components, device: torch.device, dtype: torch.dtype) -> None:
        self.components, self.device, self.dtype = components, device, dtype
        root, folders = cache_root(cfg.output_dir), [d.folder_path for d in cfg.datasets]
        vae_id = f"{cfg.model.name_or_path}|vae|{dtype}"
        self.latent = [LatentCache(root / "latents", vae_id, d.cache_latents_to_disk, folders)
                       if d.cache_latents or d.cache_latents_to_disk else None for d in cfg.datasets]
        # ai-toolkit requires all datasets or none to cache text embeddings; we cache if all do.
        cache_text = all(d.cache_text_embeddings for d in cfg.datasets)
        to_disk = all(d.cache_latents_to_disk for d in cfg.datasets)
        self.text = TextEmbeddingCache(root / "text", f"{cfg.model.name_or_path}|te|{dtype}|{T5_MAX_LENGTH}",
                                       to_disk, folders) if cache_text else None
        self.all_latents_cached = all(c is not None for c in self.latent)
        self._key_cache = LatentCache(root / "latents", vae_id, False)  # keys only, never stores
        components.vae.to(device)
        components.text_encoder.to(device)
        components.text_encoder_2.to(device)

    def fill(self, plan: list[list[Item]]) -> None:
        items = {self._key_cache.key(i): i for b in plan for i in b if self.latent[i.dataset_index] is not None}
        for item in tqdm(list(items.values()), desc="caching latents", disable=not items, leave=False):
            self.latents([item])
        if self.text is not None:
            captions = list(dict.fromkeys(i.caption for b in plan for i in b))
            for caption in tqdm(captions, desc="caching text embeddings", leave=False):
                self.text.embeddings([caption], self._encode_text)

    def _encode_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        # One caption per encoder call: padded batches of different makeup round differently,
        # and a resumed run must see the very same embeddings as an uninterrupted one.
        encoded = [encode_prompts(self.components, [c], self.device, self.dtype) for c in captions]
        return {name: torch.cat([e[name] for e in encoded]) for name in encoded[0]}

    def _encode_item(self, item: Item, key: str) -> torch.Tensor:
        pixels = TrainingData.load_pixels([item])
        return encode_images(self.components.vae, pixels, _latent_generator(key)).to("cpu", torch.float32)

    def latents(self, batch: list[Item]) -> torch.Tensor:
        out = []
        for item in batch:
            cache, key = self.latent[item.dataset_index], self._key_cache.key(item)
            if cache is None:
                out.append(self._encode_item(item, key)[0])
            else:
                # _encode_item decodes the image itself (it needs the key for its generator), so
                # the cache's pixel loader is a no-op.
                out.append(cache.latents([item], lambda _px, i=item, k=key: self._encode_item(i, k),
                                         lambda _items: None)[0])
        return torch.stack(out)

    def text_embeddings(self, batch: list[Item]) -> dict[str, torch.Tensor]:
        captions = [i.caption for i in batch]
        if self.text is not None:
            return self.text.embeddings(captions, self._encode_text)
        return self._encode_text(captions)

    @property
    def writes_files(self) -> bool:
        stores = [c.store for c in self.latent if c is not None] + ([self.text.store] if self.text else [])
        return any(store.to_disk for store in stores)

    def release_encoders(self, keep_vae: bool) -> None:
        """Free what training does not need: text encoders once captions are cached, the VAE too."""
        c = self.components
        if self.text is not None:
            c.text_encoder = c.text_encoder_2 = None
        if not keep_vae:
            c.vae = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def fill_caches(caches: BatchEncoder, plan: list[list[Item]], runtime: Runtime) -> None:
    """Encode what this process will train on; only the main process writes cache files."""
    mine = plan[runtime.rank::runtime.world_size]
    if runtime.is_main:
        # Disk caches are shared: the main process fills them for every rank, the others then read.
        caches.fill(plan if caches.writes_files else mine)
    runtime.barrier()
    if not runtime.is_main:
        caches.fill(mine)
