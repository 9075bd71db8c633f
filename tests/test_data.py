"""Tests of captions, buckets, folder scanning, epoch planning and the content-keyed caches."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from coatflux.trainer.buckets import bucket_size, load_image, plan_crop
from coatflux.trainer.cache import LatentCache, TextEmbeddingCache, cache_root
from coatflux.trainer.captions import inject_trigger, process_caption, shuffle_tokens
from coatflux.trainer.config import DatasetConfig
from coatflux.trainer.data import DatasetError, DataWarning, TrainingData, scan_folder


def _image(path: Path, size: tuple[int, int], colour: tuple[int, int, int] = (200, 30, 30),
           caption: str | None = "a [trigger] dress") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    _image(folder / "a.png", (128, 160))
    _image(folder / "b.jpg", (160, 128), (20, 200, 20), "a green [trigger] shirt, cotton, short sleeves")
    _image(folder / "sub" / "c.PNG", (128, 128), (20, 20, 200), "a blue skirt")
    _image(folder / "d.webp", (128, 160), (90, 90, 90))
    return folder


def _config(folder: Path, **kwargs: object) -> DatasetConfig:
    return DatasetConfig(folder_path=folder, **{"resolution": (128,), **kwargs})


# ---------------------------------------------------------------------------------------------- captions


def test_trigger_replaced_or_prepended() -> None:
    assert inject_trigger("a [trigger] dress", "sks") == "a sks dress"
    assert inject_trigger("a red dress", "sks") == "sks a red dress"
    assert inject_trigger("", "sks") == "sks"
    assert inject_trigger("a [trigger] dress", None) == "a dress"
    assert inject_trigger("a red dress", "sks", add_if_absent=False) == "a red dress"


def test_shuffle_keeps_first_tokens_and_is_seeded() -> None:
    text = "sks a dress, red, floral, silk, long, studio"
    outputs = {shuffle_tokens(text, 1, random.Random(seed)) for seed in range(20)}
    assert len(outputs) > 1
    assert all(o.startswith("sks a dress, ") and sorted(o.split(", ")) == sorted(text.split(", ")) for o in outputs)
    assert shuffle_tokens(text, 1, random.Random(3)) == shuffle_tokens(text, 1, random.Random(3))


def test_caption_dropout_leaves_the_trigger() -> None:
    rng = random.Random(0)
    captions = [process_caption("a [trigger] dress", trigger="sks", rng=rng, dropout_rate=0.5) for _ in range(200)]
    assert set(captions) == {"sks", "a sks dress"}
    assert 60 < captions.count("sks") < 140


# ---------------------------------------------------------------------------------------------- buckets


def test_bucket_never_upscales_keeps_aspect_and_snaps_to_32() -> None:
    assert bucket_size(1024, 1024, 512) == (512, 512)
    assert bucket_size(300, 200, 1024) == (288, 192)  # smaller than res^2: no upscale
    width, height = bucket_size(3000, 2000, 1024)
    assert width % 32 == 0 and height % 32 == 0 and width * height <= 1024 * 1024
    assert abs(width / height - 1.5) < 0.05
    assert bucket_size(300, 200, 512, buckets=False) == (192, 192)


def test_crop_covers_bucket_centred_or_random() -> None:
    crop = plan_crop(300, 200, (288, 192))
    assert crop.scaled[0] >= 288 and crop.scaled[1] >= 192
    assert crop.left == (crop.scaled[0] - 288) // 2 and crop.top == (crop.scaled[1] - 192) // 2
    offsets = {plan_crop(400, 100, (96, 96), random.Random(s)).left for s in range(10)}
    assert len(offsets) > 1 and all(0 <= x <= 384 - 96 for x in offsets)


def test_load_image_range_shape_and_flip(tmp_path: Path) -> None:
    image = Image.new("RGB", (128, 96), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 64, 96))  # left half white
    image.save(tmp_path / "half.png")
    crop = plan_crop(128, 96, (128, 96))
    plain = load_image(tmp_path / "half.png", crop)
    flipped = load_image(tmp_path / "half.png", crop, flip_x=True)
    assert plain.shape == (3, 96, 128) and plain.dtype == torch.float32
    assert plain.max() == 1.0 and plain.min() == -1.0
    assert plain[:, :, 0].mean() == 1.0 and flipped[:, :, 0].mean() == -1.0
    assert torch.equal(flipped, plain.flip(-1))


# ---------------------------------------------------------------------------------------------- scanning


def test_scan_finds_images_recursively_and_skips_private_folders(dataset: Path) -> None:
    _image(dataset / "_latent_cache" / "x.png", (128, 128))
    _image(dataset / ".hidden" / "y.png", (128, 128))
    (dataset / "notes.txt").write_text("not a caption")
    records, report = scan_folder(_config(dataset))
    assert [r.path.name for r in records] == ["a.png", "b.jpg", "d.webp", "c.PNG"]  # sorted by path
    assert report.images_found == 4 and report.images_used == 4
    assert {r.path.name: r.caption for r in records}["c.PNG"] == "a blue skirt"


def test_bad_files_are_skipped_with_warnings_and_counted(dataset: Path) -> None:
    (dataset / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    _image(dataset / "latin1.png", (128, 128), caption=None)
    (dataset / "latin1.txt").write_bytes("robe rouge \xe9t\xe9".encode("latin-1"))
    _image(dataset / "tiny.png", (40, 300), caption="tiny")
    _image(dataset / "nocap.png", (128, 128), caption=None)
    with pytest.warns(DataWarning) as record:
        records, report = scan_folder(_config(dataset))
    messages = " ".join(str(w.message) for w in record)
    assert "broken.png" in messages and "latin1.txt" in messages and "tiny.png" in messages
    assert "nocap.png" in messages
    assert (report.undecodable, report.bad_caption, report.too_small, report.missing_caption) == (1, 1, 1, 1)
    assert report.images_found == 8 and report.images_used == 5 == len(records)
    assert {r.path.name: r.caption for r in records}["nocap.png"] == ""
    with pytest.raises(DatasetError, match=r"broken\.png"):
        scan_folder(_config(dataset), strict=True)


def test_default_caption_fills_missing_and_empty(tmp_path: Path) -> None:
    _image(tmp_path / "d" / "a.png", (128, 128), caption=None)
    _image(tmp_path / "d" / "b.png", (128, 128), caption="  \n")
    records, report = scan_folder(_config(tmp_path / "d", default_caption="a garment"))
    assert [r.caption for r in records] == ["a garment", "a garment"] and report.missing_caption == 0


def test_missing_or_empty_dataset_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        scan_folder(_config(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    with pytest.raises(DatasetError, match="no usable image"):
        scan_folder(_config(tmp_path / "empty"))


def test_scan_never_writes_into_the_dataset(dataset: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in dataset.rglob("*")}
    data = TrainingData([_config(dataset, flip_x=True)], batch_size=2)
    for batch in data.epoch_batches(0, seed=1):
        data.load_pixels(batch)
    assert {p: p.stat().st_mtime_ns for p in dataset.rglob("*")} == before


# ---------------------------------------------------------------------------------------------- epochs


def test_epochs_are_reproducible_and_differ_between_epochs(dataset: Path) -> None:
    config = _config(dataset, trigger_word="sks", shuffle_tokens=True, caption_dropout_rate=0.3, flip_x=True,
                     resolution=(128, 96), num_repeats=2)
    data = TrainingData([config], batch_size=3)
    first = data.epoch_batches(5, seed=7)
    assert first == TrainingData([config], batch_size=3).epoch_batches(5, seed=7)  # a resumed run
    assert first != data.epoch_batches(6, seed=7) and first != data.epoch_batches(5, seed=8)
    assert len(first) == data.batches_per_epoch()
    items = [item for batch in first for item in batch]
    assert {i.resolution for i in items} == {128, 96}
    assert all(i.caption.startswith("sks") or "sks" in i.caption for i in items)


def test_batches_share_a_bucket_and_short_ones_are_padded(dataset: Path) -> None:
    data = TrainingData([_config(dataset, num_repeats=3)], batch_size=4)
    batches = data.epoch_batches(0, seed=0)
    assert all(len(b) == 4 and len({i.bucket for i in b}) == 1 for b in batches)
    # 12 draws: portrait (128x160) x6, landscape x3, square x3 -> 2 + 1 + 1 batches
    assert len(batches) == 4 == data.batches_per_epoch()
    pixels = data.load_pixels(batches[0])
    width, height = batches[0][0].bucket
    assert pixels.shape == (4, 3, height, width)


# ---------------------------------------------------------------------------------------------- caches


class CountingEncoder:
    def __init__(self) -> None:
        self.calls = 0
        self.items = 0

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.items += pixels.shape[0]
        return torch.nn.functional.avg_pool2d(pixels, 8)  # a stand-in "VAE": 8x smaller


@pytest.mark.parametrize("to_disk", [False, True])
def test_latent_cache_encodes_each_item_once(tmp_path: Path, dataset: Path, to_disk: bool) -> None:
    data = TrainingData([_config(dataset)], batch_size=2)
    cache = LatentCache(cache_root(tmp_path / "out") / "latents", "fake-vae", to_disk, [dataset])
    encoder = CountingEncoder()
    batches = data.epoch_batches(0, seed=0)
    first = [cache.latents(b, encoder, data.load_pixels) for b in batches]
    encoded = encoder.items
    assert encoded == 4  # padded duplicates are encoded once
    again = [cache.latents(b, encoder, data.load_pixels) for b in batches]
    assert encoder.items == encoded and all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert first[0].shape[0] == 2
    files = list((tmp_path / "out").rglob("*.safetensors"))
    assert len(files) == (4 if to_disk else 0)
    assert not list(dataset.rglob("*.safetensors"))


def test_latent_cache_misses_when_image_or_transform_changes(tmp_path: Path, dataset: Path) -> None:
    config = _config(dataset)
    cache = LatentCache(tmp_path / "cache", "fake-vae", to_disk=True)
    encoder = CountingEncoder()
    batch = TrainingData([config], 1).epoch_batches(0, 0)[0]
    cache.latents(batch, encoder, TrainingData.load_pixels)
    item = batch[0]
    cache.latents([replace(item, flip_x=True)], encoder, TrainingData.load_pixels)
    assert encoder.calls == 2
    reopened = LatentCache(tmp_path / "cache", "fake-vae", to_disk=True)  # survives a restart
    reopened.latents(batch, encoder, TrainingData.load_pixels)
    assert encoder.calls == 2
    LatentCache(tmp_path / "cache", "other-vae", to_disk=True).latents(batch, encoder, TrainingData.load_pixels)
    assert encoder.calls == 3
    _image(item.record.path, (item.record.width, item.record.height), (1, 2, 3))  # edit the image in place
    edited = TrainingData([config], 1).epoch_batches(0, 0)[0]
    reopened.latents(edited, encoder, TrainingData.load_pixels)
    assert encoder.calls == 4


def test_latent_cache_misses_after_the_decoder_changes(tmp_path: Path, dataset: Path, monkeypatch) -> None:
    """A latent cached by an older pixel decoder (16-bit grayscale clipped, revision 1) is encoded again."""
    from coatflux.trainer import data as data_module

    batch = TrainingData([_config(dataset)], 1).epoch_batches(0, 0)[0]
    encoder = CountingEncoder()
    monkeypatch.setattr(data_module, "PIXEL_DECODER_REVISION", 1)
    LatentCache(tmp_path / "cache", "fake-vae", to_disk=True).latents(batch, encoder, TrainingData.load_pixels)
    monkeypatch.undo()
    LatentCache(tmp_path / "cache", "fake-vae", to_disk=True).latents(batch, encoder, TrainingData.load_pixels)
    assert encoder.calls == 2


def test_corrupt_cache_entry_is_re_encoded(tmp_path: Path, dataset: Path) -> None:
    cache = LatentCache(tmp_path / "cache", "fake-vae", to_disk=True)
    encoder = CountingEncoder()
    batch = TrainingData([_config(dataset)], 1).epoch_batches(0, 0)[0]
    cache.latents(batch, encoder, TrainingData.load_pixels)
    (tmp_path / "cache" / f"{cache.key(batch[0])}.safetensors").write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="unreadable cache entry"):
        cache.latents(batch, encoder, TrainingData.load_pixels)
    assert encoder.calls == 2 and not list((tmp_path / "cache").glob("*.tmp"))


def test_cache_refuses_dataset_folder(dataset: Path) -> None:
    with pytest.raises(ValueError, match="inside dataset folder"):
        LatentCache(dataset / "_cache", "fake-vae", to_disk=True, dataset_folders=[dataset])


def test_text_embedding_cache_keyed_by_caption(tmp_path: Path) -> None:
    calls: list[list[str]] = []

    def encode(captions: list[str]) -> dict[str, torch.Tensor]:
        calls.append(captions)
        lengths = torch.tensor([float(len(c)) for c in captions])
        return {"prompt_embeds": lengths[:, None, None].expand(-1, 4, 8).clone(),
                "pooled_prompt_embeds": lengths[:, None].expand(-1, 6).clone()}

    cache = TextEmbeddingCache(tmp_path / "te", "fake-t5+clip", to_disk=True)
    out = cache.embeddings(["sks a dress", "sks", "sks a dress"], encode)
    assert calls == [["sks a dress", "sks"]]
    assert out["prompt_embeds"].shape == (3, 4, 8) and out["pooled_prompt_embeds"][1, 0] == 3.0
    cache.embeddings(["sks", "sks a dress"], encode)
    assert len(calls) == 1
    cache.embeddings(["sks a red dress"], encode)
    assert calls[-1] == ["sks a red dress"]
