"""Draw the small clothing dataset in ``examples/clothing/`` (flat garment illustrations + captions).

What: fourteen garments (dresses, t-shirts, jackets, skirts, trousers, hoodies, ...) in several
colours and patterns, drawn with PIL polygons on a plain studio background at 512x640, 640x512
and 576x576 (so three aspect-ratio buckets appear), each with a same-stem ``.txt`` caption that
uses ``[trigger]`` the way the user's guide asks ("a red [trigger] dress with floral patterns").

Why drawn and not photographed: the repository must stay small and free of licensed images, and
a smoke-test run needs images whose content a caption describes truthfully, not realism. Images
are quantized to a 32-colour palette PNG, which keeps the folder well under 1 MB. The output is
deterministic (fixed seed), so re-running the script reproduces identical files.

Usage: ``python examples/make_example_dataset.py [--out examples/clothing]``.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw

Shape = list[tuple[float, float]]  # polygon in unit coordinates (0..1)

GARMENTS: dict[str, list[Shape]] = {
    "dress": [[(.38, .12), (.62, .12), (.6, .4), (.78, .9), (.22, .9), (.4, .4)]],
    "t-shirt": [[(.3, .15), (.42, .12), (.58, .12), (.7, .15), (.86, .3), (.76, .4), (.7, .34),
                 (.7, .85), (.3, .85), (.3, .34), (.24, .4), (.14, .3)]],
    "jacket": [[(.3, .12), (.45, .1), (.5, .2), (.55, .1), (.7, .12), (.84, .85), (.72, .86), (.7, .4),
                (.7, .88), (.3, .88), (.3, .4), (.28, .86), (.16, .85)]],
    "skirt": [[(.36, .2), (.64, .2), (.8, .8), (.2, .8)]],
    "trousers": [[(.32, .1), (.68, .1), (.72, .9), (.56, .9), (.5, .35), (.44, .9), (.28, .9)]],
    "hoodie": [[(.4, .08), (.6, .08), (.66, .16), (.86, .3), (.86, .82), (.76, .82), (.72, .4), (.72, .88),
                (.28, .88), (.28, .4), (.24, .82), (.14, .82), (.14, .3), (.34, .16)]],
    "coat": [[(.32, .08), (.68, .08), (.82, .92), (.66, .92), (.62, .4), (.62, .95), (.38, .95), (.38, .4),
              (.34, .92), (.18, .92)]],
    "tank top": [[(.36, .1), (.42, .1), (.5, .2), (.58, .1), (.64, .1), (.66, .3), (.7, .88), (.3, .88),
                  (.34, .3)]],
    "shorts": [[(.28, .3), (.72, .3), (.78, .7), (.54, .72), (.5, .5), (.46, .72), (.22, .7)]],
}
COLOURS = {"red": (196, 40, 48), "navy blue": (30, 44, 96), "mustard yellow": (214, 168, 40),
           "emerald green": (22, 128, 86), "black": (28, 28, 30), "white": (236, 236, 232),
           "pastel pink": (240, 170, 190), "denim blue": (70, 110, 160), "beige": (214, 196, 160),
           "purple": (110, 60, 150)}
# (garment, colour, pattern, size): the size mix makes portrait, landscape and square buckets.
CATALOGUE = [
    ("dress", "red", "floral patterns", (512, 640)),
    ("dress", "navy blue", "white polka dots", (576, 576)),
    ("t-shirt", "white", "a plain front", (640, 512)),
    ("t-shirt", "mustard yellow", "horizontal stripes", (576, 576)),
    ("jacket", "black", "a plain front", (512, 640)),
    ("jacket", "denim blue", "a plaid pattern", (640, 512)),
    ("skirt", "emerald green", "a plaid pattern", (576, 576)),
    ("skirt", "pastel pink", "white polka dots", (512, 640)),
    ("trousers", "beige", "a plain front", (512, 640)),
    ("trousers", "navy blue", "vertical pinstripes", (640, 512)),
    ("hoodie", "purple", "a plain front", (576, 576)),
    ("coat", "beige", "a plaid pattern", (512, 640)),
    ("tank top", "red", "horizontal stripes", (640, 512)),
    ("shorts", "denim blue", "floral patterns", (576, 576)),
]


def _contrast(colour: tuple[int, int, int]) -> tuple[int, int, int]:
    return (250, 250, 245) if sum(colour) < 450 else (40, 40, 48)


def _stripes(draw: ImageDraw.ImageDraw, size: tuple[int, int], ink: tuple[int, int, int], vertical: bool,
             rng: random.Random) -> None:
    step = 28 if vertical else 36
    for pos in range(0, max(size), step):
        box = (pos, 0, pos + 4, size[1]) if vertical else (0, pos, size[0], pos + 12)
        draw.rectangle(box, fill=ink)


def _dots(draw: ImageDraw.ImageDraw, size: tuple[int, int], ink: tuple[int, int, int], rng: random.Random) -> None:
    for y in range(10, size[1], 40):
        for x in range(10 + (y // 40 % 2) * 20, size[0], 40):
            draw.ellipse((x - 7, y - 7, x + 7, y + 7), fill=ink)


def _plaid(draw: ImageDraw.ImageDraw, size: tuple[int, int], ink: tuple[int, int, int], rng: random.Random) -> None:
    for pos in range(0, max(size), 48):
        draw.rectangle((pos, 0, pos + 10, size[1]), fill=ink)
        draw.rectangle((0, pos, size[0], pos + 10), fill=ink)


def _flowers(draw: ImageDraw.ImageDraw, size: tuple[int, int], ink: tuple[int, int, int], rng: random.Random) -> None:
    for _ in range(size[0] * size[1] // 3000):
        x, y, r = rng.randrange(size[0]), rng.randrange(size[1]), rng.randint(6, 12)
        for dx, dy in ((r, 0), (-r, 0), (0, r), (0, -r)):
            draw.ellipse((x + dx - r // 2, y + dy - r // 2, x + dx + r // 2, y + dy + r // 2), fill=ink)
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=(240, 200, 60))


PATTERNS: dict[str, Callable[..., None]] = {
    "white polka dots": _dots,
    "horizontal stripes": lambda d, s, i, r: _stripes(d, s, i, False, r),
    "vertical pinstripes": lambda d, s, i, r: _stripes(d, s, i, True, r),
    "a plaid pattern": _plaid,
    "floral patterns": _flowers,
}


def draw_garment(garment: str, colour: tuple[int, int, int], pattern: str, size: tuple[int, int],
                 rng: random.Random) -> Image.Image:
    """A garment filled with ``colour`` and ``pattern``, centred on a light studio background."""
    width, height = size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    fabric = Image.new("RGB", size, colour)
    if pattern in PATTERNS:
        ink = (250, 250, 245) if pattern == "white polka dots" else _contrast(colour)
        PATTERNS[pattern](ImageDraw.Draw(fabric), size, ink, rng)
    mask = Image.new("L", size, 0)
    for shape in GARMENTS[garment]:
        ImageDraw.Draw(mask).polygon([(left + x * side, top + y * side) for x, y in shape], fill=255)
    image = Image.new("RGB", size, (226, 222, 214))
    shadow = mask.transform(size, Image.Transform.AFFINE, (1, 0, -6, 0, 1, -8))
    image.paste((190, 186, 178), mask=shadow)
    image.paste(fabric, mask=mask)
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "clothing")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for index, (garment, colour, pattern, size) in enumerate(CATALOGUE, start=1):
        stem = f"{garment.replace(' ', '_').replace('-', '')}_{index:03d}"
        image = draw_garment(garment, COLOURS[colour], pattern, size, rng)
        image.quantize(colors=32, dither=Image.Dither.NONE).save(args.out / f"{stem}.png", optimize=True)
        with_pattern = "" if pattern == "a plain front" else f" with {pattern}"
        caption = f"a {colour} [trigger] {garment}{with_pattern}, flat lay studio photo, plain background"
        (args.out / f"{stem}.txt").write_text(caption + "\n", encoding="utf-8")
    print(f"wrote {len(CATALOGUE)} images and captions to {args.out}")


if __name__ == "__main__":
    main()
