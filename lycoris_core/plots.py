"""Small images drawn with PIL (no plotting library): loss curves and sample grids."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image, ImageDraw

from .smoothing import smooth  # the smoothing training streams as smoothed_loss

BACKGROUND = (250, 250, 250)
AXIS = (60, 60, 60)
RAW = (170, 190, 225)
SMOOTH = (25, 80, 180)


def loss_curve_image(losses: Sequence[float], width: int = 640, height: int = 360) -> Image.Image:
    """Raw (light) and smoothed (dark) loss against the step, with min/max labels."""
    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 56, width - 16, 16, height - 32
    draw.rectangle((left, top, right, bottom), outline=AXIS)
    finite = [v for v in losses if v == v and abs(v) != float("inf")]
    if not finite:
        draw.text((left + 8, top + 8), "no loss values yet", fill=AXIS)
        return img
    lo, hi = min(finite), max(finite)
    span = (hi - lo) or 1.0
    n = len(losses)

    def point(i: int, v: float) -> tuple[float, float]:
        x = left + (right - left) * (i / max(n - 1, 1))
        y = bottom - (bottom - top) * ((v - lo) / span)
        return x, y

    for series, color in ((losses, RAW), (smooth(losses), SMOOTH)):
        pts = [point(i, v) for i, v in enumerate(series) if v == v]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        elif pts:
            draw.ellipse((pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2), fill=color)
    draw.text((4, top), f"{hi:.4g}", fill=AXIS)
    draw.text((4, bottom - 10), f"{lo:.4g}", fill=AXIS)
    draw.text((left, bottom + 8), "step 1", fill=AXIS)
    draw.text((right - 60, bottom + 8), f"step {n}", fill=AXIS)
    draw.text((left + 8, top + 4), "loss (light) / smoothed (dark)", fill=AXIS)
    return img


def to_image_tensor(img: Image.Image) -> torch.Tensor:
    """A PIL image as ComfyUI's IMAGE: float [1, H, W, 3] in 0..1."""
    data = torch.frombuffer(bytearray(img.convert("RGB").tobytes()), dtype=torch.uint8)
    return data.view(1, img.height, img.width, 3).float() / 255


def grid_image(rows: Sequence[torch.Tensor], pad: int = 2) -> Image.Image:
    """Image batches ([B, H, W, C] in 0..1), one batch per row, as one PIL image."""
    h, w = rows[0].shape[1], rows[0].shape[2]
    cols = max(r.shape[0] for r in rows)
    canvas = Image.new("RGB", (cols * (w + pad) + pad, len(rows) * (h + pad) + pad), (255,) * 3)
    for r, batch in enumerate(rows):
        for c, image in enumerate(batch):
            array = (image.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
            canvas.paste(Image.fromarray(array), (pad + c * (w + pad), pad + r * (h + pad)))
    return canvas
