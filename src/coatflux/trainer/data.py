"""The dataset: scan an image/caption folder, then plan reproducible bucketed batches.

What: :func:`scan_folder` walks a ``datasets[]`` folder (recursively; hidden folders, folders
starting with ``_`` such as ai-toolkit's ``_latent_cache``, and hidden files are skipped), pairs
every jpg/jpeg/png/webp with its same-stem caption file, decodes each image once to prove it is
readable, and hashes its bytes (the cache key). :class:`TrainingData` turns the scanned records
of all datasets into :class:`Item` draws -- one per image, resolution and repeat, as ai-toolkit
trains every image at every listed size -- and :meth:`TrainingData.epoch_batches` groups them by
bucket into batches.

Why plan whole epochs as data: the epoch's batches are a pure function of ``(epoch, seed)``,
computed with a ``random.Random`` seeded from both, and each :class:`Item` already carries its
random choices (caption dropout and shuffle, flips, crop offset). A resumed run at
``(epoch, batch index)`` therefore sees exactly the batches the interrupted run would have, with
no sampler state to save. The alternative, a stateful shuffling ``DataLoader``, cannot be resumed
mid-epoch without replaying it.

Batches group items of equal bucket size across datasets (the tensor shape is all that must
match); a bucket's short last batch is filled by repeating its first items, as ai-toolkit does, so
every batch has ``batch_size`` items. Bad input never stops a run silently nor crashes it late:
unreadable, animated or too small images, broken links and non-UTF-8 captions are skipped with a
warning naming the file and counted in a :class:`DatasetReport` (or raise with ``strict=True``);
captions longer than the text encoders can read are cut (with a warning); the dataset folder
is only read. Symbolic links to folders are not followed (a link to a parent would loop
forever); links to files are read.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from coatflux.trainer.buckets import (
    MIN_BUCKET_SIDE,
    PIXEL_DECODER_REVISION,
    Crop,
    bucket_size,
    load_image,
    oriented_size,
    plan_crop,
)
from coatflux.trainer.captions import TRIGGER_PLACEHOLDER, process_caption
from coatflux.trainer.config import DatasetConfig

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
# FLUX reads at most 512 T5 tokens (CLIP: 77), and a SentencePiece token is rarely over 16
# characters, so text past 32 x 512 characters never reaches a model. The fast tokenizers still
# tokenize all of it before truncating: a 1 MB caption cost seconds per encode. Longer captions
# are cut here, with a warning.
MAX_CAPTION_CHARS = 32 * 512


class DatasetError(ValueError):
    """The dataset cannot be used (missing folder, no usable image, or a bad file with strict)."""


class DataWarning(UserWarning):
    """A dataset file was skipped or has no caption."""


@dataclass(frozen=True)
class ImageRecord:
    """One usable image: its caption as read (``default_caption`` applied), content hash and size."""

    path: Path
    caption: str
    sha256: str
    width: int
    height: int


@dataclass
class DatasetReport:
    """What a scan found and skipped, for the log and for tests."""

    folder: Path
    images_found: int = 0
    images_used: int = 0
    undecodable: int = 0
    bad_caption: int = 0
    too_small: int = 0
    missing_caption: int = 0
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.folder}: {self.images_used}/{self.images_found} images used "
                f"({self.undecodable} undecodable, {self.bad_caption} bad captions, {self.too_small} too small, "
                f"{self.missing_caption} without caption)")


class _Unusable(ValueError):
    """The file decodes but cannot be trained on as it is (its message says why)."""


def _walk_images(folder: Path) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(folder, followlinks=False):  # explicit: links to folders may loop
        dirs[:] = [d for d in dirs if not d.startswith((".", "_"))]  # pruning here stops the descent
        found += [Path(root) / f for f in files
                  if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(found)


def _read_caption(image: Path, caption_ext: str) -> str | None:
    """The caption text, or None when there is no caption file. Raises UnicodeDecodeError."""
    path = image.with_suffix(caption_ext)
    return path.read_bytes().decode("utf-8-sig").strip() if path.is_file() else None


def _inspect(path: Path) -> tuple[str, int, int]:
    """sha256 of the bytes and oriented size; fully decodes, so a truncated file fails here.

    PIL refuses an image over twice ``Image.MAX_IMAGE_PIXELS`` (a decompression bomb) in
    ``open``, from the header alone, before it allocates pixels.
    """
    if path.is_symlink() and not path.exists():
        raise _Unusable(f"broken symbolic link to '{os.readlink(path)}'")
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        # Which frame of an animation is the training image is a guess; let the user pick one.
        if getattr(image, "n_frames", 1) > 1:
            raise _Unusable(f"animated {image.format} with {image.n_frames} frames; save the frame to train "
                            "on as a still image")
        image.load()
        width, height = oriented_size(image)
    return hashlib.sha256(data).hexdigest(), width, height


class _Scan:
    """Collects records and problems of one folder; ``strict`` turns problems into errors."""

    def __init__(self, config: DatasetConfig, strict: bool) -> None:
        self.config, self.strict = config, strict
        self.report = DatasetReport(Path(config.folder_path))
        self.records: list[ImageRecord] = []
        self.placeholder_without_trigger = 0

    def problem(self, counter: str | None, message: str) -> None:
        if self.strict:
            raise DatasetError(message)
        if counter:
            setattr(self.report, counter, getattr(self.report, counter) + 1)
        self.report.problems.append(message)
        warnings.warn(message, DataWarning, stacklevel=4)

    def add(self, path: Path) -> None:
        config = self.config
        try:
            caption = _read_caption(path, config.caption_ext)
        except UnicodeDecodeError:
            return self.problem("bad_caption", f"{path.with_suffix(config.caption_ext)}: caption is not UTF-8 "
                                "text; image skipped")
        try:
            digest, width, height = _inspect(path)
        except _Unusable as error:
            return self.problem("undecodable", f"{path}: {error}; skipped")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            return self.problem("undecodable", f"{path}: cannot decode image ({error}); skipped")
        smallest = bucket_size(width, height, min(config.resolution), buckets=config.buckets)
        if min(smallest) < MIN_BUCKET_SIDE:
            return self.problem("too_small", f"{path}: {width}x{height} gives a {smallest[0]}x{smallest[1]} "
                                f"bucket, below {MIN_BUCKET_SIDE} px; skipped")
        if caption and len(caption) > MAX_CAPTION_CHARS:
            warnings.warn(f"{path.with_suffix(config.caption_ext)}: caption of {len(caption)} characters cut to "
                          f"{MAX_CAPTION_CHARS} (the text encoders read at most 512 tokens)", DataWarning,
                          stacklevel=3)
            caption = caption[:MAX_CAPTION_CHARS]
        if caption and TRIGGER_PLACEHOLDER in caption and not (config.trigger_word or "").strip():
            self.placeholder_without_trigger += 1
        if not caption:
            caption = config.default_caption or ""
            if not config.default_caption:
                self.report.missing_caption += 1
                warnings.warn(f"{path}: no caption (missing or empty {config.caption_ext} file and no "
                              "default_caption); it trains on the trigger word alone", DataWarning, stacklevel=3)
        self.records.append(ImageRecord(path, caption, digest, width, height))
        return None


def scan_folder(config: DatasetConfig, *, strict: bool = False) -> tuple[list[ImageRecord], DatasetReport]:
    """Find the usable images of one dataset, sorted by path; never writes into the folder."""
    folder = Path(config.folder_path)
    if folder.exists() and not folder.is_dir():
        raise DatasetError(f"{folder}: dataset folder is a file, not a folder")
    if not folder.is_dir():
        raise DatasetError(f"{folder}: dataset folder does not exist")
    scan = _Scan(config, strict)
    paths = _walk_images(folder)
    scan.report.images_found = len(paths)
    for path in paths:
        scan.add(path)
    scan.report.images_used = len(scan.records)
    if scan.placeholder_without_trigger:
        # Once per folder, not per file: it is one setting that is missing, not many bad files.
        warnings.warn(f"{folder}: {scan.placeholder_without_trigger} caption(s) use {TRIGGER_PLACEHOLDER} but no "
                      "trigger_word is set, so the placeholder is removed (a caption of only the "
                      "placeholder trains as an empty caption)", DataWarning, stacklevel=2)
    if not scan.records:
        raise DatasetError(f"{folder}: no usable image ({scan.report.summary()}); "
                           f"expected {'/'.join(IMAGE_EXTENSIONS)} files with {config.caption_ext} captions")
    return scan.records, scan.report


@dataclass(frozen=True)
class Item:
    """One draw of one image in one epoch, with every random choice already made."""

    record: ImageRecord
    dataset_index: int
    resolution: int
    crop: Crop
    flip_x: bool
    flip_y: bool
    caption: str

    @property
    def bucket(self) -> tuple[int, int]:
        return self.crop.bucket

    def pixel_identity(self) -> dict[str, Any]:
        """Everything that determines the pixels the VAE sees (the latent cache key)."""
        return {"image_sha256": self.record.sha256, "decoder": PIXEL_DECODER_REVISION,
                "resolution": self.resolution, "bucket": list(self.crop.bucket),
                "scaled": list(self.crop.scaled), "crop": [self.crop.left, self.crop.top],
                "flip_x": self.flip_x, "flip_y": self.flip_y}


class TrainingData:
    """All datasets of a job, scanned once; plans epochs of bucketed batches."""

    def __init__(self, datasets: Sequence[DatasetConfig], batch_size: int, *, strict: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.datasets = tuple(datasets)
        self.batch_size = batch_size
        scans = [scan_folder(config, strict=strict) for config in self.datasets]
        self.records = [records for records, _ in scans]
        self.reports = [report for _, report in scans]

    def _draws(self) -> list[tuple[int, int, ImageRecord]]:
        """(dataset index, resolution, record) for every draw of an epoch, in a fixed order."""
        return [(d, res, record)
                for d, config in enumerate(self.datasets)
                for record in self.records[d]
                for res in config.resolution
                for _ in range(config.num_repeats)]

    def _item(self, d: int, resolution: int, record: ImageRecord, rng: random.Random) -> Item:
        config = self.datasets[d]
        bucket = bucket_size(record.width, record.height, resolution, buckets=config.buckets)
        flip_x = config.flip_x and rng.random() < 0.5
        flip_y = config.flip_y and rng.random() < 0.5
        crop = plan_crop(record.width, record.height, bucket, rng if config.random_crop else None)
        caption = process_caption(record.caption, trigger=config.trigger_word, rng=rng,
                                  dropout_rate=config.caption_dropout_rate, shuffle=config.shuffle_tokens,
                                  keep_tokens=config.keep_tokens)
        return Item(record, d, resolution, crop, flip_x, flip_y, caption)

    def epoch_batches(self, epoch: int, seed: int) -> list[list[Item]]:
        """The batches of ``epoch``, a pure function of ``(epoch, seed)``.

        To resume at step ``s`` with ``n = len(batches)``: ``epoch, index = divmod(s, n)``.
        """
        rng = random.Random(f"coatflux-data:{seed}:{epoch}")  # str seeds hash with SHA-512: stable
        by_bucket: dict[tuple[int, int], list[Item]] = defaultdict(list)
        for d, resolution, record in self._draws():
            item = self._item(d, resolution, record, rng)
            by_bucket[item.bucket].append(item)
        batches = []
        for bucket in sorted(by_bucket):
            items = by_bucket[bucket]
            rng.shuffle(items)
            for start in range(0, len(items), self.batch_size):
                batch = items[start:start + self.batch_size]
                # Fill a short batch by cycling through the bucket's items (ai-toolkit duplicates too).
                batch += [items[i % len(items)] for i in range(self.batch_size - len(batch))]
                batches.append(batch)
        rng.shuffle(batches)
        return batches

    def batches_per_epoch(self) -> int:
        counts: dict[tuple[int, int], int] = defaultdict(int)
        for d, resolution, record in self._draws():
            counts[bucket_size(record.width, record.height, resolution, buckets=self.datasets[d].buckets)] += 1
        return sum(-(-n // self.batch_size) for n in counts.values())

    @staticmethod
    def load_pixels(batch: Sequence[Item]) -> torch.Tensor:
        """Decode a batch into a (B, 3, H, W) float32 tensor in [-1, 1]."""
        return torch.stack([load_image(i.record.path, i.crop, i.flip_x, i.flip_y) for i in batch])
