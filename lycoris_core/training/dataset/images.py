"""Images: decoding to RGB, in-memory images, content hashes, crop/scale/flip to a bucket."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from .buckets import crop_box
from .spec import DatasetError

_RESAMPLE = Image.Resampling.LANCZOS


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB copy of `img`: EXIF orientation applied, transparency composited on white."""
    img = ImageOps.exif_transpose(img) or img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16/32-bit greyscale
        array = np.asarray(img, dtype=np.float64)
        top = float(array.max(initial=0.0))
        peak = 65535.0 if top > 255 else (1.0 if img.mode == "F" and top <= 1 else 255.0)
        img = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" or img.mode in ("LA", "La", "PA", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img.copy()


def _array_to_pil(array: torch.Tensor | np.ndarray, where: str) -> Image.Image:
    """An [H,W,C] tensor/array (float 0..1 or uint8 0..255) as an RGB PIL image."""
    t = torch.as_tensor(array).detach().to("cpu")
    if t.dtype == torch.uint8:
        data = t
    else:
        t = t.float()
        if not torch.isfinite(t).all():
            raise DatasetError(
                f"dataset: {where} contains NaN or infinite values; images must be floats in 0..1"
            )
        data = (t.clamp(0, 1) * 255).round().to(torch.uint8)
    if data.shape[-1] == 1:
        data = data.expand(-1, -1, 3)
    data = data[..., :3].contiguous().numpy()
    return Image.fromarray(data, "RGB")


def _memory_images(images: Any) -> list[Image.Image]:
    if isinstance(images, (torch.Tensor, np.ndarray)):
        images = [images]
    out: list[Image.Image] = []
    for item in images:
        if isinstance(item, Image.Image):
            out.append(_to_rgb(item))
        elif len(item.shape) == 4:
            out += [_array_to_pil(x, f"image[{len(out) + j}]") for j, x in enumerate(item)]
        else:
            out.append(_array_to_pil(item, f"image[{len(out)}]"))
    return out


def _pixel_hash(img: Image.Image) -> str:
    h = hashlib.sha256(f"{img.mode}:{img.width}x{img.height}:".encode())
    h.update(img.tobytes())
    return h.hexdigest()


def _open_image(path: Path) -> tuple[Image.Image, str]:
    """Decode `path` fully (so truncated files fail now) -> (RGB image, sha256 of the bytes)."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        rgb = _to_rgb(img)
    return rgb, hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- items


def bucket_pixels(
    img: Image.Image, bucket: tuple[int, int], fx: float, fy: float, flip: bool
) -> torch.Tensor:
    """`img` cropped at ``(fx, fy)`` and scaled to `bucket` ``(w, h)``, flipped if asked.

    A ``[3, h, w]`` float32 tensor in [-1, 1].
    """
    bw, bh = bucket
    box = crop_box(img.size, bucket, fx, fy)
    out = img if img.size == (bw, bh) else img.resize((bw, bh), _RESAMPLE, box=box)
    array = np.array(out, dtype=np.uint8)  # [h, w, 3], a writable copy
    tensor = torch.from_numpy(array).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
    if flip:
        tensor = torch.flip(tensor, dims=[-1])
    return tensor.contiguous()
