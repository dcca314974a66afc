"""A small procedurally generated dataset (no download): the demo and the tests train on it.

Every image shows the same motif, a bright disc on a two-colour diagonal gradient, with a
little variation in position, size and hue, so an adapter has one clear thing to learn.
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

from PIL import Image, ImageDraw

CAPTION = "a photo of a sks disc"


def demo_image(size: int, rng: random.Random) -> Image.Image:
    """One motif image, `size` x `size`, RGB."""
    hue = rng.uniform(-0.08, 0.08)
    top = (int(40 + 60 * hue), 60, 170)
    bottom = (230, int(140 + 100 * hue), 60)
    img = Image.new("RGB", (size, size))
    px = img.load()
    for y in range(size):
        for x in range(size):
            t = (x + y) / (2 * (size - 1))
            px[x, y] = tuple(int(a + (b - a) * t) for a, b in zip(top, bottom, strict=True))
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


def make_demo_dataset(
    folder: str | os.PathLike[str], count: int = 8, size: int = 64, seed: int = 0
) -> Path:
    """Write `count` images with same-name .txt captions into `folder` (created if needed)."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(count):
        image = demo_image(size, rng)  # drawn every time: keeps the rng sequence
        png, txt = root / f"disc_{i:02d}.png", root / f"disc_{i:02d}.txt"
        if not png.exists():  # same arguments, same images: keep existing files (and mtimes)
            image.save(png)
        if not txt.exists():
            txt.write_text(CAPTION + "\n", encoding="utf-8")
    return root
