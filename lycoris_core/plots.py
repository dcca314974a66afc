"""Small images drawn with PIL (no plotting library): loss curves and sample grids."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from PIL import Image, ImageDraw

from .smoothing import smooth  # the smoothing training streams as smoothed_loss

BACKGROUND = (250, 250, 250)
AXIS = (60, 60, 60)
RAW = (170, 190, 225)
SMOOTH = (25, 80, 180)


def _nice_ticks(lo: float, hi: float, count: int = 4) -> list[float]:
    """About `count` round values (1, 2 or 5 x 10^k apart) covering lo..hi."""
    span = (hi - lo) or abs(hi) or 1.0
    raw = span / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) // step) + 1)]


def loss_curve_image(
    losses: Sequence[float],
    width: int = 640,
    height: int = 360,
    y_label: str = "training loss (MSE of the prediction)",
) -> Image.Image:
    """Raw (light) and smoothed (dark) loss against the step, with labelled, ticked axes."""
    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 64, width - 16, 28, height - 40
    draw.rectangle((left, top, right, bottom), outline=AXIS)
    finite = [v for v in losses if v == v and abs(v) != float("inf")]
    if not finite:
        draw.text((left + 8, top + 8), "no loss values yet", fill=AXIS)
        return img
    lo, hi = min(finite), max(finite)
    span = (hi - lo) or 1.0
    n = len(losses)

    def x_of(step: float) -> float:
        return left + (right - left) * ((step - 1) / max(n - 1, 1))

    def y_of(v: float) -> float:
        return bottom - (bottom - top) * ((v - lo) / span)

    for v in _nice_ticks(lo, hi):
        y = y_of(v)
        draw.line((left - 4, y, left, y), fill=AXIS)
        draw.text((4, y - 6), f"{v:.3g}", fill=AXIS)
    for step in _nice_ticks(1, n, 5):
        if step >= 1:
            x = x_of(step)
            draw.line((x, bottom, x, bottom + 4), fill=AXIS)
            draw.text((x - 8, bottom + 6), f"{step:g}", fill=AXIS)
    for series, color in ((losses, RAW), (smooth(losses), SMOOTH)):
        pts = [(x_of(i + 1), y_of(v)) for i, v in enumerate(series) if v == v]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        elif pts:
            draw.ellipse((pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2), fill=color)
    draw.text((left, 8), f"{y_label}: raw (light), smoothed (dark)", fill=AXIS)
    draw.text(((left + right) // 2 - 40, bottom + 22), "training step", fill=AXIS)
    return img


def to_image_tensor(img: Image.Image) -> torch.Tensor:
    """A PIL image as ComfyUI's IMAGE: float [1, H, W, 3] in 0..1."""
    data = torch.frombuffer(bytearray(img.convert("RGB").tobytes()), dtype=torch.uint8)
    return data.view(1, img.height, img.width, 3).float() / 255


def grid_image(
    rows: Sequence[torch.Tensor],
    pad: int = 2,
    labels: Sequence[str] | None = None,
    tile: int | None = None,
) -> Image.Image:
    """Image batches ([B, H, W, C] in 0..1), one batch per row, as one PIL image.

    `tile` scales each image (nearest neighbour) so that its longer side is `tile` pixels;
    `labels` (one per row) are written in a column on the left.
    """
    h, w = rows[0].shape[1], rows[0].shape[2]
    if tile:
        factor = tile / max(h, w)
        h, w = round(h * factor), round(w * factor)
    cols = max(r.shape[0] for r in rows)
    label_w = 8 + 7 * max((len(t) for t in labels), default=0) if labels else 0
    size = (label_w + cols * (w + pad) + pad, len(rows) * (h + pad) + pad)
    canvas = Image.new("RGB", size, (255,) * 3)
    draw = ImageDraw.Draw(canvas)
    for r, batch in enumerate(rows):
        y = pad + r * (h + pad)
        if labels:
            draw.text((4, y + h // 2 - 6), labels[r], fill=AXIS)
        for c, image in enumerate(batch):
            array = (image.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
            picture = Image.fromarray(array).resize((w, h), Image.Resampling.NEAREST)
            canvas.paste(picture, (label_w + pad + c * (w + pad), y))
    return canvas
