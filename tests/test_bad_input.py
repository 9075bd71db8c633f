"""Bad input, tried systematically (issue 6, item 5): the trainer is fed broken files and configs.

Case families (count them without running anything:
``pytest --collect-only -q tests/test_bad_input.py | tail -1``):

1. images (``test_image_case``, ``test_exif_rotation_*``, ``test_decompression_bomb_*``): truncated
   JPEG/PNG, zero bytes, text or random bytes under an image name, CMYK JPEG, 16-bit grayscale
   PNG, palette PNG with and without transparency, RGBA, LA, JPEG named .png, webp, animated GIF
   named .png, 1x1, EXIF orientation 6 and 8, a 20000x20000 PNG (decompression bomb);
2. captions (``test_caption_case``, ``test_huge_caption_*``): empty, whitespace only, binary,
   UTF-16, UTF-8 with BOM, missing, only ``[trigger]`` with and without a trigger word, 1 MB;
3. file names and folder shape (``test_file_name_case``, ``test_*folder*``, ``test_symlink_*``):
   spaces, Cyrillic, Chinese, leading dash, nested subfolders, macOS ``._`` files, a symlink loop,
   a broken symlink, an empty folder, a folder of only bad images, a folder path that is a file;
4. configs (``test_config_value_case``, ``test_config_file_case``, ``test_config_*``): wrong types,
   impossible and absurd values, unknown keys, missing required keys, unparsable, empty, JSON,
   list at the top level, non-UTF-8, BOM, a folder given as the config;
5. end to end on the tiny FLUX model (three short runs): a dataset mixing every usable oddity with
   bad files trains (a 1 MB caption included); a run on a dataset of only bad images stops before touching an earlier run's
   outputs; an absurd learning rate must stop with a diagnosis.

Every case ends in a clear error naming the file or the key's dotted path, or in a skip that is
warned (naming the file) and counted in the :class:`DatasetReport`; every dataset case also checks
that the folder is unchanged byte for byte (file list, contents, link targets, mtimes).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import resource
import signal
import struct
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from coatflux.trainer.config import ConfigError, ConfigWarning, DatasetConfig, load_config
from coatflux.trainer.data import (
    MAX_CAPTION_CHARS,
    DatasetError,
    DatasetReport,
    DataWarning,
    ImageRecord,
    TrainingData,
    scan_folder,
)

# ---------------------------------------------------------------------------------------------- helpers


def _fingerprint(folder: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry under ``folder`` without following links: kind, content hash or target, mtime."""
    entries: dict[str, tuple[Any, ...]] = {".": ("dir", folder.lstat().st_mtime_ns)}
    for root, dirs, files in os.walk(folder, followlinks=False):
        for name in dirs + files:
            path = Path(root) / name
            stat = path.lstat()
            key = str(path.relative_to(folder))
            if path.is_symlink():
                entries[key] = ("link", os.readlink(path), stat.st_mtime_ns)
            elif path.is_dir():
                entries[key] = ("dir", stat.st_mtime_ns)
            else:
                entries[key] = ("file", hashlib.sha256(path.read_bytes()).hexdigest(), stat.st_mtime_ns)
    return entries


@contextmanager
def _untouched(*folders: Path) -> Iterator[None]:
    """Assert that the block neither adds, removes, edits nor re-times anything in ``folders``."""
    before = [_fingerprint(f) for f in folders]
    yield
    assert [_fingerprint(f) for f in folders] == before


@contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    """Fail instead of hanging (a symlink loop followed forever would hang the whole suite)."""
    def fail(_signum: int, _frame: Any) -> None:
        raise TimeoutError(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _noise(size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Random pixels: they do not compress, so a truncated file really misses image data."""
    channels = len(Image.new(mode, (1, 1)).getbands())
    data = random.Random(seed).randbytes(size[0] * size[1] * channels)
    return Image.frombytes(mode, size, data)


def _encoded(image: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _dataset(root: Path, size: tuple[int, int] = (128, 128)) -> Path:
    """A folder with one good captioned image, so that one bad file does not leave it empty."""
    folder = root / "data"
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(folder / "good.png")
    (folder / "good.txt").write_text("a red [trigger] dress", encoding="utf-8")
    return folder


def _config(folder: Path, **kwargs: Any) -> DatasetConfig:
    return DatasetConfig(folder_path=folder, **{"resolution": (128,), "trigger_word": "sks", **kwargs})


def _scan(config: DatasetConfig) -> tuple[list[ImageRecord], DatasetReport, list[str]]:
    """scan_folder, with the warnings it gave (as text) instead of letting them through."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records, report = scan_folder(config)
    return records, report, [str(w.message) for w in caught if issubclass(w.category, DataWarning)]


def _data(config: DatasetConfig, batch_size: int = 1) -> TrainingData:
    """TrainingData over ``config``, quietly: its scan repeats the warnings ``_scan`` checked."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        return TrainingData([config], batch_size)


def _pixels(config: DatasetConfig, record: ImageRecord) -> torch.Tensor:
    """The (3, H, W) tensor the trainer would feed the VAE for ``record`` at its first resolution."""
    data = _data(config)
    (item,) = [i for batch in data.epoch_batches(0, seed=0) for i in batch if i.record == record]
    return data.load_pixels([item])[0]


COUNTERS = ("undecodable", "bad_caption", "too_small", "missing_caption")


def _counts(report: DatasetReport) -> dict[str, int]:
    return {name: getattr(report, name) for name in COUNTERS if getattr(report, name)}


# ---------------------------------------------------------------------------------------------- 1. images


def _truncated(fmt: str) -> bytes:
    data = _encoded(_noise((128, 128)), fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return data[: len(data) // 2]


def _exif_jpeg(orientation: int, size: tuple[int, int]) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    image = Image.new("RGB", size, (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 32, 32))  # a marker in the stored top-left corner
    return _encoded(image, "JPEG", quality=95, exif=exif.tobytes())


def _palette(transparent: bool) -> bytes:
    image = Image.new("P", (128, 128), 1)
    image.putpalette([0, 0, 0, 30, 40, 200] + [0] * 762)
    return _encoded(image, "PNG", **({"transparency": 0} if transparent else {}))


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (128, 128), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _sixteen_bit_gray() -> bytes:
    image = Image.fromarray(np.full((128, 128), 128 * 257, dtype=np.uint16))  # mid gray in 16 bits
    assert image.mode == "I;16"
    return _encoded(image, "PNG")


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _huge_png(side: int = 20000) -> bytes:
    """A valid 1-bit PNG of ``side`` x ``side`` pixels (400 M at 20000) in ~50 KB.

    Decoding it would allocate 400 MB as mode "1" or 1.2 GB as RGB; it is built row by row so the
    test itself never holds more than one row.
    """
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # width, height, depth 1, grayscale
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", body)
            + _png_chunk(b"IEND", b""))


def _expect_rgb(rgb: tuple[int, int, int]) -> Callable[[torch.Tensor], None]:
    def check(pixels: torch.Tensor) -> None:
        expected = torch.tensor(rgb, dtype=torch.float32).div(127.5).sub(1.0)
        assert torch.allclose(pixels.mean(dim=(1, 2)), expected, atol=0.05), (pixels.mean(dim=(1, 2)), expected)
    return check


@dataclass(frozen=True)
class ImageCase:
    """One bad or odd image: its name, its bytes, and what the scan must make of it."""

    name: str
    make: Callable[[], bytes]
    outcome: str  # "used" or the DatasetReport counter the skip goes to
    fragment: str = ""  # part of the warning (and strict error) text
    check: Callable[[torch.Tensor], None] | None = None  # on the pixels the VAE would see


IMAGE_CASES = [
    ImageCase("truncated.jpg", lambda: _truncated("JPEG"), "undecodable", "cannot decode image"),
    ImageCase("truncated.png", lambda: _truncated("PNG"), "undecodable", "cannot decode image"),
    ImageCase("zero.png", lambda: b"", "undecodable", "cannot identify image file"),
    ImageCase("text.png", lambda: b"this is not a picture\n" * 20, "undecodable", "cannot identify image file"),
    ImageCase("random.jpg", lambda: random.Random(1).randbytes(4096), "undecodable", "cannot identify image file"),
    ImageCase("cmyk.jpg", lambda: _encoded(Image.new("CMYK", (128, 128), (0, 255, 255, 0)), "JPEG"), "used",
              check=_expect_rgb((255, 0, 0))),
    # PIL's convert("RGB") clips 16-bit values at 255: mid gray came out white before the fix.
    ImageCase("gray16.png", _sixteen_bit_gray, "used", check=_expect_rgb((128, 128, 128))),
    ImageCase("palette.png", lambda: _palette(False), "used", check=_expect_rgb((30, 40, 200))),
    # Alpha and palette transparency are dropped, as ai-toolkit's convert("RGB") does.
    ImageCase("palette_transparent.png", lambda: _palette(True), "used", check=_expect_rgb((30, 40, 200))),
    ImageCase("rgba.png", lambda: _encoded(Image.new("RGBA", (128, 128), (30, 160, 40, 0)), "PNG"), "used",
              check=_expect_rgb((30, 160, 40))),
    ImageCase("la.png", lambda: _encoded(Image.new("LA", (128, 128), (90, 255)), "PNG"), "used",
              check=_expect_rgb((90, 90, 90))),
    ImageCase("really_a_jpeg.png", lambda: _encoded(Image.new("RGB", (128, 128), (10, 10, 240)), "JPEG"), "used",
              check=_expect_rgb((10, 10, 240))),
    ImageCase("photo.webp", lambda: _encoded(Image.new("RGB", (128, 96), (240, 200, 10)), "WEBP", lossless=True),
              "used", check=_expect_rgb((240, 200, 10))),
    ImageCase("animated.png", _animated_gif, "undecodable", "animated GIF with 3 frames"),
    ImageCase("one_pixel.png", lambda: _encoded(Image.new("RGB", (1, 1)), "PNG"), "too_small", "1x1"),
    ImageCase("bomb.png", _huge_png, "undecodable", "decompression bomb"),
]


@pytest.mark.parametrize("case", IMAGE_CASES, ids=[c.name for c in IMAGE_CASES])
def test_image_case(tmp_path: Path, case: ImageCase) -> None:
    folder = _dataset(tmp_path)
    (folder / case.name).write_bytes(case.make())
    (folder / case.name).with_suffix(".txt").write_text("an odd file", encoding="utf-8")
    config = _config(folder)
    with _untouched(folder):
        records, report, messages = _scan(config)
        by_name = {r.path.name: r for r in records}
        if case.outcome == "used":
            assert case.name in by_name and not _counts(report) and not messages
            pixels = _pixels(config, by_name[case.name])
            assert pixels.shape[0] == 3 and pixels.min() >= -1.0 and pixels.max() <= 1.0
            if case.check:
                case.check(pixels)
        else:
            assert list(by_name) == ["good.png"] and _counts(report) == {case.outcome: 1}
            (message,) = messages
            assert message.startswith(str(folder / case.name)) and case.fragment in message
            assert report.problems == [message] and report.images_found == 2 and report.images_used == 1
            with pytest.raises(DatasetError, match=re.escape(str(folder / case.name))):
                scan_folder(config, strict=True)


@pytest.mark.parametrize(("orientation", "marker"), [(6, "top-right"), (8, "bottom-left")])
def test_exif_rotation_sets_bucket_and_pixels(tmp_path: Path, orientation: int, marker: str) -> None:
    """Stored 192x128 with orientation 6 or 8 is a 128x192 portrait: the bucket must be portrait."""
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "phone.jpg").write_bytes(_exif_jpeg(orientation, (192, 128)))
    config = _config(folder, default_caption="a photo")
    with _untouched(folder):
        ((record,), _, _) = _scan(config)
        assert (record.width, record.height) == (128, 192)
        data = _data(config)
        (batch,) = data.epoch_batches(0, seed=0)
        assert batch[0].bucket == (96, 128)  # portrait; unrotated it would be (128, 96)
        pixels = data.load_pixels(batch)[0]
    assert pixels.shape == (3, 128, 96)
    # The white marker sits in the stored top-left; rotated for display it moves to this corner.
    corners = {"top-left": pixels[:, :8, :8], "top-right": pixels[:, :8, -8:],
               "bottom-left": pixels[:, -8:, :8], "bottom-right": pixels[:, -8:, -8:]}
    assert [name for name, patch in corners.items() if patch.mean() > 0.5] == [marker]


def test_decompression_bomb_is_refused_from_its_header(tmp_path: Path) -> None:
    folder = _dataset(tmp_path)
    (folder / "bomb.png").write_bytes(_huge_png())
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    records, report, messages = _scan(_config(folder))
    seconds = time.perf_counter() - start
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert [r.path.name for r in records] == ["good.png"] and report.undecodable == 1
    assert "bomb.png" in messages[0]
    assert seconds < 2.0 and grown_mib < 200, (seconds, grown_mib)  # decoding would take 400+ MB


# ---------------------------------------------------------------------------------------------- 2. captions


@dataclass(frozen=True)
class CaptionCase:
    """A caption file's bytes (None: no file) and what the trainer must make of it."""

    id: str
    data: bytes | None
    caption: str | None  # the caption trained on (trigger applied); None: the image is skipped
    counts: dict[str, int]
    fragment: str = ""  # part of a warning that must be given
    trigger: str | None = "sks"


CAPTION_CASES = [
    CaptionCase("empty", b"", "sks", {"missing_caption": 1}, "no caption"),
    CaptionCase("whitespace", b" \n\t \r\n", "sks", {"missing_caption": 1}, "no caption"),
    CaptionCase("missing", None, "sks", {"missing_caption": 1}, "no caption"),
    CaptionCase("binary", bytes(range(256)), None, {"bad_caption": 1}, "not UTF-8"),
    CaptionCase("utf16", "a red dress".encode("utf-16"), None, {"bad_caption": 1}, "not UTF-8"),
    CaptionCase("utf8_bom", b"\xef\xbb\xbfa red dress\n", "sks a red dress", {}),
    CaptionCase("non_ascii", "красное платье, 红色连衣裙".encode(), "sks красное платье, 红色连衣裙", {}),
    CaptionCase("only_placeholder", b"[trigger]", "sks", {}),
    CaptionCase("only_placeholder_no_trigger", b"[trigger]", "", {}, "no trigger_word is set", trigger=None),
]


@pytest.mark.parametrize("case", CAPTION_CASES, ids=[c.id for c in CAPTION_CASES])
def test_caption_case(tmp_path: Path, case: CaptionCase) -> None:
    folder = _dataset(tmp_path)
    Image.new("RGB", (128, 128), (20, 20, 200)).save(folder / "odd.png")
    if case.data is not None:
        (folder / "odd.txt").write_bytes(case.data)
    config = _config(folder, trigger_word=case.trigger)
    with _untouched(folder):
        records, report, messages = _scan(config)
        assert _counts(report) == case.counts
        if case.fragment:
            assert any(case.fragment in m for m in messages), messages
        else:
            assert not messages
        if case.caption is None:
            assert [r.path.name for r in records] == ["good.png"]
            assert any(m.startswith(str(folder / "odd.txt")) for m in messages)
            with pytest.raises(DatasetError, match=re.escape(str(folder / "odd.txt"))):
                scan_folder(config, strict=True)
            return
        items = [i for b in _data(config).epoch_batches(0, seed=0) for i in b]
        assert {i.record.path.name: i.caption for i in items}["odd.png"] == case.caption


def test_huge_caption_is_cut_with_a_warning_and_cheap(tmp_path: Path) -> None:
    """1 MB of caption: cut to what the text encoders can read (the fast tokenizers would tokenize
    all of it before truncating: seconds per encode), then shuffled and planned in well under a second.
    The end-to-end test feeds such a caption to the tokenizers.
    """
    import tracemalloc

    folder = _dataset(tmp_path)
    huge = ("red, silk, " * 100_000)[: 1 << 20]
    (folder / "good.txt").write_text(huge, encoding="utf-8")
    config = _config(folder, trigger_word="sks", shuffle_tokens=True, keep_tokens=1, caption_dropout_rate=0.1,
                     num_repeats=4)

    def plan() -> tuple[ImageRecord, list[list[Any]], list[str]]:
        ((record,), _, messages) = _scan(config)
        return record, _data(config, 2).epoch_batches(0, seed=0), messages

    start = time.perf_counter()
    record, batches, messages = plan()
    seconds = time.perf_counter() - start
    tracemalloc.start()  # a second pass: tracing slows Python code several times
    try:
        plan()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert record.caption == huge[:MAX_CAPTION_CHARS] and len(batches) == 2
    (message,) = messages
    assert message.startswith(f"{folder / 'good.txt'}: caption of {1 << 20} characters cut to {MAX_CAPTION_CHARS}")
    assert seconds < 1.0 and peak < 16 << 20, (seconds, peak)  # the 1 MB file once, then small copies


# ---------------------------------------------------------------------------------------------- 3. names, folders


FILE_NAMES = ["with space.png", "кофта 1.png", "衣服.jpg", "-leading-dash.png", "nested/deeper/sub folder img.png"]


@pytest.mark.parametrize("name", FILE_NAMES)
def test_file_name_case(tmp_path: Path, name: str) -> None:
    folder = _dataset(tmp_path)
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (128, 160), (20, 200, 20)).save(path)
    path.with_suffix(".txt").write_text(f"caption of {name}", encoding="utf-8")
    config = _config(folder)
    with _untouched(folder):
        records, report, messages = _scan(config)
        assert not messages and report.images_used == 2
        (record,) = [r for r in records if r.path == path]
        assert record.caption == f"caption of {name}"
        assert _pixels(config, record).shape == (3, 128, 96)  # 128x160 at resolution 128


def test_macos_and_hidden_junk_is_not_an_image(tmp_path: Path) -> None:
    folder = _dataset(tmp_path)
    (folder / "._good.png").write_bytes(b"\x00\x05\x16\x07" + b"\x00" * 4000)  # AppleDouble resource fork
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + b"\x00" * 100)
    (folder / "__MACOSX").mkdir()  # zip junk folder: "_" folders are skipped like _latent_cache
    (folder / "__MACOSX" / "._x.png").write_bytes(b"\x00" * 10)
    with _untouched(folder):
        records, report, messages = _scan(_config(folder))
    assert [r.path.name for r in records] == ["good.png"] and report.images_found == 1 and not messages


def test_symlink_loops_do_not_hang_the_scan(tmp_path: Path) -> None:
    folder = _dataset(tmp_path)
    (folder / "sub").mkdir()
    Image.new("RGB", (128, 128)).save(folder / "sub" / "inner.png")
    (folder / "sub" / "up").symlink_to("..", target_is_directory=True)  # sub/up/sub/up/... forever
    (folder / "self").symlink_to(".", target_is_directory=True)
    with _untouched(folder), _deadline(20):
        records, report, _ = _scan(_config(folder, default_caption="x"))
    assert [r.path.relative_to(folder).as_posix() for r in records] == ["good.png", "sub/inner.png"]
    assert report.images_found == 2  # each image once: links to folders are not followed


def test_symlink_broken_is_a_counted_skip(tmp_path: Path) -> None:
    folder = _dataset(tmp_path)
    (folder / "gone.png").symlink_to(folder / "deleted.png")
    with _untouched(folder):
        records, report, messages = _scan(_config(folder))
    assert [r.path.name for r in records] == ["good.png"] and report.undecodable == 1
    (message,) = messages
    assert message.startswith(str(folder / "gone.png")) and "broken symbolic link" in message


def test_empty_folder_is_an_error_naming_it(tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "notes.txt").write_text("captions without images", encoding="utf-8")
    with _untouched(folder), pytest.raises(DatasetError, match=rf"^{re.escape(str(folder))}: no usable image"):
        scan_folder(_config(folder))


def test_folder_of_only_bad_images_is_an_error_naming_it_with_counts(tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "zero.png").write_bytes(b"")
    (folder / "text.jpg").write_bytes(b"hello")
    (folder / "tiny.png").write_bytes(_encoded(Image.new("RGB", (1, 1)), "PNG"))
    with _untouched(folder), pytest.raises(DatasetError) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        TrainingData([_config(folder)], batch_size=1)
    message = str(info.value)
    assert message.startswith(f"{folder}: no usable image") and "0/3 images used" in message
    assert "2 undecodable" in message and "1 too small" in message


def test_folder_path_that_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "photo.png"
    path.write_bytes(_encoded(Image.new("RGB", (128, 128)), "PNG"))
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(path))}: dataset folder is a file"):
        scan_folder(_config(path))
    data = _minimal(path)
    assert _config_error(tmp_path, data).startswith(
        f"config.process[0].datasets[0].folder_path: '{path}' is a file, not a folder")


# ---------------------------------------------------------------------------------------------- 4. configs


def _minimal(folder: Path) -> dict[str, Any]:
    return {"job": "extension", "config": {"name": "run", "process": [{
        "type": "sd_trainer", "training_folder": "out", "network": {"type": "lora"},
        "datasets": [{"folder_path": str(folder)}], "model": {"name_or_path": "black-forest-labs/FLUX.1-dev"}}]}}


def _config_error(tmp_path: Path, data: Any, name: str = "job.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(ConfigError) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        load_config(path)
    return str(info.value)


P = "config.process[0]"
# (id, dotted key to set (None: delete the last part), value, path the message starts with, fragment)
CONFIG_VALUE_CASES: list[tuple[str, str, Any, str, str]] = [
    ("steps_string", "train.steps", "ten", f"{P}.train.steps", "an integer >= 1"),
    ("steps_zero", "train.steps", 0, f"{P}.train.steps", "an integer >= 1"),
    ("steps_fraction", "train.steps", 2.5, f"{P}.train.steps", "an integer >= 1"),
    ("lr_list", "train.lr", [1e-4], f"{P}.train.lr", "a number"),
    ("lr_zero", "train.lr", 0, f"{P}.train.lr", "a number > 0"),
    ("lr_nan", "train.lr", float("nan"), f"{P}.train.lr", "a number"),
    ("lr_word", "train.lr", "fast", f"{P}.train.lr", "a number"),
    ("batch_size_bool", "train.batch_size", True, f"{P}.train.batch_size", "an integer >= 1"),
    ("batch_size_negative", "train.batch_size", -1, f"{P}.train.batch_size", "an integer >= 1"),
    ("resolution_7", "datasets[0].resolution", 7, f"{P}.datasets[0].resolution", "an integer in [64, 4096]"),
    ("resolution_100000", "datasets[0].resolution", 100000, f"{P}.datasets[0].resolution", "in [64, 4096]"),
    ("resolution_list_item", "datasets[0].resolution", [512, 100000], f"{P}.datasets[0].resolution[1]",
     "in [64, 4096]"),
    ("resolution_empty", "datasets[0].resolution", [], f"{P}.datasets[0].resolution", "a size or a list"),
    ("dropout_negative", "datasets[0].caption_dropout_rate", -0.1, f"{P}.datasets[0].caption_dropout_rate",
     "in [0, 1]"),
    ("network_string", "network", "lora", f"{P}.network", "a mapping"),
    ("datasets_mapping", "datasets", {"folder_path": "x"}, f"{P}.datasets", "a non-empty list"),
    ("datasets_empty", "datasets", [], f"{P}.datasets", "a non-empty list"),
    ("unknown_train_key", "train.stpes", 10, f"{P}.train.stpes", "did you mean 'steps'"),
    ("unknown_dataset_key", "datasets[0].folder_pth", "x", f"{P}.datasets[0].folder_pth",
     "did you mean 'folder_path'"),
    ("unknown_process_key", "netwrok", {}, f"{P}.netwrok", "did you mean 'network'"),
    ("unknown_top_key", "jobb", "extension", "jobb", "did you mean 'job'"),
    ("unknown_config_key", "config.nmae", "x", "config.nmae", "did you mean 'name'"),
    ("missing_model_path", "model.name_or_path", None, f"{P}.model.name_or_path", "required key is missing"),
    ("missing_folder_path", "datasets[0].folder_path", None, f"{P}.datasets[0].folder_path",
     "required key is missing"),
    ("missing_folder", "datasets[0].folder_path", "/nonexistent/photos", f"{P}.datasets[0].folder_path",
     "does not exist"),
]


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set (or, for None, delete) ``dotted`` relative to process[0]; ``job*``/``config.*`` are absolute."""
    parts = dotted.split(".")
    node: Any = data if parts[0] in ("jobb", "config") else data["config"]["process"][0]
    for part in parts[:-1]:
        match = re.fullmatch(r"(\w+)\[(\d+)\]", part)
        node = node[match.group(1)][int(match.group(2))] if match else node.setdefault(part, {})
    if value is None:
        del node[parts[-1]]
    else:
        node[parts[-1]] = value


@pytest.mark.parametrize(("key", "value", "where", "fragment"), [c[1:] for c in CONFIG_VALUE_CASES],
                         ids=[c[0] for c in CONFIG_VALUE_CASES])
def test_config_value_case(tmp_path: Path, key: str, value: Any, where: str, fragment: str) -> None:
    data = _minimal(_dataset(tmp_path))
    _set(data, key, value)
    message = _config_error(tmp_path, data)
    assert message.startswith(f"{where}:") and fragment in message, message


CONFIG_FILE_CASES: list[tuple[str, str, bytes, str]] = [
    ("yaml_syntax", "job.yaml", b"job: extension\nconfig:\n  name: x\n  process: [\n    - a: b\n",
     r'cannot parse: .*"{file}", line 5, column 5'),
    ("yaml_tab_indent", "job.yaml", b"job: extension\nconfig:\n\tname: x\n", r'"{file}", line 3, column 1'),
    ("empty", "job.yaml", b"", "expected a mapping with job, config and meta"),
    ("only_comment", "job.yaml", b"# nothing yet\n", "expected a mapping with job, config and meta"),
    ("list_top_level", "job.yaml", b"- job: extension\n- config: {}\n", "expected a mapping"),
    ("scalar_top_level", "job.yaml", b"extension\n", "expected a mapping"),
    ("latin1", "job.yaml", "job: extension  # café\n".encode("latin-1"), r"not UTF-8 text \(byte 0xe9 at offset 21\)"),
    ("utf16", "job.yaml", "job: extension\n".encode("utf-16"), r"not UTF-8 text \(byte 0xff at offset 0\)"),
    ("json_syntax", "job.json", b'{"job": "extension",}', r"cannot parse: .*line 1 column 21"),
    ("json_list", "job.json", b"[1, 2]", "expected a mapping"),
]


@pytest.mark.parametrize(("name", "content", "pattern"), [c[1:] for c in CONFIG_FILE_CASES],
                         ids=[c[0] for c in CONFIG_FILE_CASES])
def test_config_file_case(tmp_path: Path, name: str, content: bytes, pattern: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and re.search(pattern.replace("{file}", re.escape(str(path))), message, re.S)


def test_config_path_is_a_folder_or_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(tmp_path))}: is a folder, not a config file"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="config file does not exist"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("name", ["job.yaml", "job.json"])
def test_config_json_and_bom_are_accepted(tmp_path: Path, name: str) -> None:
    """A JSON job file, and either kind saved "UTF-8 with BOM" (Windows Notepad's default)."""
    data = _minimal(_dataset(tmp_path))
    text = json.dumps(data) if name.endswith(".json") else yaml.safe_dump(data)
    (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert load_config(tmp_path / name).datasets[0].folder_path == tmp_path / "data"


def test_config_absurd_lr_is_a_warning_naming_the_key(tmp_path: Path) -> None:
    """1e9 is a possible value (so not an error) but never a sensible one: warn, naming the key."""
    data = _minimal(_dataset(tmp_path))
    _set(data, "train.lr", 1e9)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.warns(ConfigWarning, match=rf"{re.escape(P)}\.train\.lr: 1e\+09 is far above"):
        assert load_config(tmp_path / "job.yaml").train.lr == 1e9


# ---------------------------------------------------------------------------------------------- 5. end to end


def _job(tiny_flux_dir: Path, data: Path, output: Path, **train: Any) -> dict[str, Any]:
    """A 2-step job on the tiny FLUX model with every cache on disk (so cache files can be checked)."""
    return {"job": "extension", "meta": {}, "config": {"name": "run", "process": [{
        "type": "sd_trainer", "training_folder": str(output), "device": "cpu", "trigger_word": "zxq",
        "training_seed": 3, "network": {"type": "lora", "linear": 4},
        "save": {"dtype": "float32", "save_every": 1000},
        "datasets": [{"folder_path": str(data), "resolution": [64], "cache_latents_to_disk": True,
                      "cache_text_embeddings": True}],
        "train": {"batch_size": 2, "steps": 2, "lr": 1e-3, "optimizer": "adamw", "dtype": "fp32",
                  "gradient_checkpointing": False, "disable_sampling": True, **train},
        "model": {"name_or_path": str(tiny_flux_dir)}}]}}


def _train(tmp_path: Path, job: dict[str, Any]) -> tuple[Any, list[str]]:
    from coatflux.trainer.loop import train

    path = tmp_path / f"job_{len(list(tmp_path.glob('job_*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(job), encoding="utf-8")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(load_config(path))
    return result, [str(w.message) for w in caught if issubclass(w.category, DataWarning)]


def _mixed_dataset(folder: Path) -> dict[str, str]:
    """64 px images in every usable odd format and name, plus bad files; returns {file: its warning}."""
    folder.mkdir(parents=True)
    usable = {
        "plain.png": _encoded(Image.new("RGB", (64, 64), (200, 30, 30)), "PNG"),
        "кофта 1.png": _encoded(Image.new("RGBA", (64, 64), (30, 160, 40, 128)), "PNG"),
        "衣服.jpg": _encoded(Image.new("CMYK", (64, 64), (0, 0, 255, 0)), "JPEG"),
        "-dash.png": _encoded(Image.fromarray(np.full((64, 64), 30000, dtype=np.uint16)), "PNG"),
        "sub dir/p.png": _encoded(Image.new("P", (64, 64), 3), "PNG", transparency=3),
        "x.webp": _encoded(Image.new("RGB", (64, 64), (9, 9, 99)), "WEBP"),
    }
    bad = {"truncated.jpg": _truncated("JPEG"), "zero.png": b"", "anim.png": _animated_gif(),
           "tiny.png": _encoded(Image.new("RGB", (1, 1)), "PNG"), "bomb.png": _huge_png()}
    for name, content in {**usable, **bad}.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
        (folder / name).with_suffix(".txt").write_text(f"a [trigger] {Path(name).stem}", encoding="utf-8")
    (folder / "plain.txt").write_text("a [trigger] block, " + "red, " * 200_000, encoding="utf-8")  # 1 MB
    (folder / "x.txt").write_bytes(b"\xff\xfe not utf-8")  # x.webp is then skipped for its caption
    return {"truncated.jpg": "cannot decode", "zero.png": "cannot identify", "anim.png": "animated",
            "tiny.png": "1x1", "bomb.png": "decompression bomb", "x.txt": "not UTF-8", "plain.txt": "cut to"}


def test_end_to_end_mixed_bad_dataset_trains_and_stays_untouched(tmp_path: Path, tiny_flux_dir: Path) -> None:
    data, output = tmp_path / "data", tmp_path / "output"
    reasons = _mixed_dataset(data)
    with _untouched(data):
        result, messages = _train(tmp_path, _job(tiny_flux_dir, data, output))
    assert result.steps == 2 and all(np.isfinite(result.losses))
    for name, reason in reasons.items():
        assert any(m.startswith(str(data / name)) and reason in m for m in messages), (name, messages)
    run = output / "run"
    cached = {kind: list(run.glob(f"_cache/*/{kind}/*.safetensors")) for kind in ("latents", "text")}
    assert cached["latents"] and cached["text"]  # caches live in the run's output, never in the dataset
    assert not list(output.rglob("*.tmp"))


def test_end_to_end_bad_dataset_stops_before_touching_an_earlier_run(tmp_path: Path, tiny_flux_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from coatflux.trainer import loop

    good, output = tmp_path / "good", tmp_path / "output"
    _dataset(tmp_path)
    (tmp_path / "data").rename(good)
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good / "second.png")
    _train(tmp_path, _job(tiny_flux_dir, good, output, steps=1, batch_size=1))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"")
    (bad / "b.jpg").write_bytes(_truncated("JPEG"))
    monkeypatch.setattr(loop, "load_flux_components", lambda *a, **k: pytest.fail("model loaded"))
    for name in ("run", "other"):  # the same run name (a resume) and a new one in the same folder
        job = _job(tiny_flux_dir, bad, output, steps=1, batch_size=1)
        job["config"]["name"] = name
        with _untouched(output, bad), pytest.raises(DatasetError, match=rf"^{re.escape(str(bad))}: no usable"):
            _train(tmp_path, job)


def test_end_to_end_absurd_lr_stops_with_a_diagnosis(tmp_path: Path, tiny_flux_dir: Path) -> None:
    """lr 1e9 makes the loss NaN from step 2 on; the run must stop naming the cause, never write NaNs.

    (Before the non-finite guard, train() returned normally and wrote a LoRA of NaN weights.)
    """
    from coatflux.flux.lora import read_lora
    from coatflux.trainer.faults import NonFiniteError

    data, output = tmp_path / "data", tmp_path / "output"
    _dataset(tmp_path, size=(64, 64))
    Image.new("RGB", (64, 64), (1, 2, 3)).save(data / "second.png")
    job = _job(tiny_flux_dir, data, output, lr=1e9, steps=3, max_nonfinite_steps=1)
    with pytest.raises(NonFiniteError, match=r"non-finite[\s\S]*train\.lr"):
        _train(tmp_path, job)
    for path in output.rglob("*.safetensors"):  # whatever was written before stopping is finite
        if "_cache" not in path.parts:
            tensors, _ = read_lora(path)
            assert all(torch.isfinite(t).all() for t in tensors.values()), path
