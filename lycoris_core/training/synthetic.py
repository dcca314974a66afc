"""Small procedurally generated datasets (no download): the demo and the tests train on them.

* the motif: every image shows the same thing, a bright disc on a two-colour diagonal gradient,
  with a little variation in position, size and hue, so an adapter has one clear thing to learn;
* shapes: random squares on random gradients (never a disc), the "general knowledge" the demo
  gives its random tiny base before an adapter teaches it the motif.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw

CAPTION = "a photo of a sks disc"
SHAPES_CAPTION = "a photo of a square"
Colour = tuple[int, int, int]


def _gradient(size: int, top: Colour, bottom: Colour, slant: float) -> Image.Image:
    """A two-colour linear gradient; `slant` 0 runs top to bottom, 1 left to right."""
    img = Image.new("RGB", (size, size))
    px = img.load()
    for y in range(size):
        for x in range(size):
            t = (slant * x + (1 - slant) * y) / (size - 1)
            px[x, y] = tuple(int(a + (b - a) * t) for a, b in zip(top, bottom, strict=True))
    return img


def demo_image(size: int, rng: random.Random) -> Image.Image:
    """One motif image, `size` x `size`, RGB."""
    hue = rng.uniform(-0.08, 0.08)
    top = (int(40 + 60 * hue), 60, 170)
    bottom = (230, int(140 + 100 * hue), 60)
    img = _gradient(size, top, bottom, 0.5)  # diagonal
    draw = ImageDraw.Draw(img)
    r = size * rng.uniform(0.18, 0.24)
    cx = size * (0.5 + rng.uniform(-0.08, 0.08))
    cy = size * (0.5 + rng.uniform(-0.08, 0.08))
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(250, 245, 235))
    inner = r * 0.45
    angle = rng.uniform(0, 2 * math.pi)
    ox, oy = cx + 0.3 * r * math.cos(angle), cy + 0.3 * r * math.sin(angle)
    draw.ellipse((ox - inner, oy - inner, ox + inner, oy + inner), fill=(200, 30, 40))
    return img


def _random_colour(rng: random.Random) -> Colour:
    return (rng.randrange(256), rng.randrange(256), rng.randrange(256))


def shapes_image(size: int, rng: random.Random) -> Image.Image:
    """One or two squares of random colours on a random two-colour gradient, RGB."""
    img = _gradient(size, _random_colour(rng), _random_colour(rng), rng.random())
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(1, 2)):
        side = size * rng.uniform(0.2, 0.5)
        x0, y0 = rng.uniform(0, size - side), rng.uniform(0, size - side)
        draw.rectangle((x0, y0, x0 + side, y0 + side), fill=_random_colour(rng))
    return img


def _write_dataset(
    folder: str | os.PathLike[str],
    count: int,
    draw: Callable[[random.Random], Image.Image],
    stem: str,
    caption: str,
    seed: int,
) -> Path:
    """Write `count` drawn images with same-name .txt captions into `folder` (created)."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    width = max(2, len(str(count - 1)))
    for i in range(count):
        image = draw(rng)  # drawn every time: keeps the rng sequence
        png, txt = root / f"{stem}_{i:0{width}d}.png", root / f"{stem}_{i:0{width}d}.txt"
        if not png.exists():  # same arguments, same images: keep existing files (and mtimes)
            image.save(png)
        if not txt.exists():
            txt.write_text(caption + "\n", encoding="utf-8")
    return root


def make_demo_dataset(
    folder: str | os.PathLike[str], count: int = 8, size: int = 64, seed: int = 0
) -> Path:
    """Write `count` motif images captioned CAPTION into `folder` (created if needed)."""
    return _write_dataset(folder, count, lambda rng: demo_image(size, rng), "disc", CAPTION, seed)


def make_shapes_dataset(
    folder: str | os.PathLike[str], count: int = 128, size: int = 32, seed: int = 0
) -> Path:
    """Write `count` shapes images captioned SHAPES_CAPTION into `folder` (created if needed)."""
    return _write_dataset(
        folder, count, lambda rng: shapes_image(size, rng), "shapes", SHAPES_CAPTION, seed
    )
