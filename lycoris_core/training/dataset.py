"""Training data: image folders or in-memory images, captions, aspect buckets, feature caches.

A :class:`DatasetSpec` says where the images come from and how to prepare them;
:class:`TrainingData` loads it once (checks every image, reads every caption, chooses every
bucket) and then serves deterministic epochs of same-bucket batches, pixels and captions.
:class:`FeatureCache` keeps encoded features (VAE latents, text embeddings) in memory and,
optionally, on disk.

Folder layout (kohya-style)::

    dataset/
        a.png  a.txt          # root images repeat once per epoch
        10_mychar/            # `N_name` sub-folders repeat their images N times per epoch
            b.jpg  b.txt
        notes/                # any other sub-folder is ignored (logged)

Buckets: every image is trained at a bucket ``(w, h)`` whose sides are multiples of
``bucket_step`` and whose area is at most ``resolution ** 2``; the bucket is the one whose
aspect ratio is closest to the image's (kohya/SimpleTuner area-preserving bucketing). The image
is scaled so it covers the bucket (never upscaled) and cropped to it.

Randomness (random crop, flip, caption dropout) only comes from the ``random.Random`` the caller
passes, so the engine can reproduce any sample exactly (resume).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import numbers
import random
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import LycorisError
from ..io import read_safetensors, write_safetensors

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_EXTENSION = ".txt"
KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")
# Bump when the preprocessing changes so old on-disk caches are not reused.
_PREP_VERSION = 1
_RESAMPLE = Image.Resampling.LANCZOS
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_MAX_LISTED_PROBLEMS = 10
# Decoded folder images kept from loading for training (RGB bytes, summed); beyond it an image
# is decoded again each time its pixels are drawn.
KEEP_DECODED_BYTES = 1 << 30


class DatasetError(LycorisError, ValueError):
    """A dataset spec, folder, image, caption or feature cache is invalid."""


# --------------------------------------------------------------------------- the spec


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _image_count(images: Any) -> int:
    """How many images `images` holds; DatasetError on an unsupported element."""
    if isinstance(images, (torch.Tensor, np.ndarray)):
        return _array_count(images, "images")
    total = 0
    for i, item in enumerate(images):
        if isinstance(item, Image.Image):
            total += 1
        elif isinstance(item, (torch.Tensor, np.ndarray)):
            total += _array_count(item, f"images[{i}]")
        else:
            raise DatasetError(
                f"dataset: images[{i}] is a {type(item).__name__}; each image must be a PIL "
                "image or a float tensor [H,W,C] in 0..1 (ComfyUI IMAGE layout), or pass a "
                "[B,H,W,C] batch tensor"
            )
    return total


def _array_count(array: Any, where: str) -> int:
    shape = tuple(array.shape)
    if len(shape) not in (3, 4) or shape[-1] not in (1, 3, 4) or 0 in shape:
        raise DatasetError(
            f"dataset: {where} has shape {list(shape)}; expected [H,W,C] or [B,H,W,C] with C "
            "in 1, 3 or 4 (the ComfyUI IMAGE layout, channels last)"
        )
    return shape[0] if len(shape) == 4 else 1


@dataclass(frozen=True)
class DatasetSpec:
    """Where the training images come from and how they are prepared.

    Exactly one of `folder` (a folder of images with same-name ``.txt`` captions, kohya
    ``N_name`` sub-folders allowed) and `images` (in-memory PIL images or float tensors
    ``[H,W,C]``/``[B,H,W,C]`` in 0..1) must be given. `captions` is only for `images`: one
    caption per image, or a single caption for all of them.

    `images` is neither compared nor shown in ``repr`` (tensors have no truth value and can
    be large).
    """

    folder: str | None = None
    images: Sequence[Any] | torch.Tensor | None = field(default=None, compare=False, repr=False)
    captions: Sequence[str] | None = None
    resolution: int = 512
    bucket_step: int = 64
    min_bucket_side: int | None = None
    max_aspect: float = 2.0
    center_crop: bool = True
    flip: bool = False
    caption_dropout: float = 0.0
    default_caption: str = ""
    trigger_word: str = ""
    skip_bad: bool = False
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        def fail(what: str) -> None:
            raise DatasetError(f"dataset: {what}")

        if (self.folder is None) == (self.images is None):
            fail(
                "give exactly one of 'folder' (a folder of images with .txt captions) and "
                "'images' (in-memory images)"
                + (", not both" if self.folder is not None else "; neither was given")
            )
        if self.folder is not None:
            if not isinstance(self.folder, (str, Path)) or not str(self.folder).strip():
                fail(f"'folder' must be a non-empty path string, got {self.folder!r}")
            object.__setattr__(self, "folder", str(self.folder))
            if self.captions is not None:
                fail(
                    "'captions' is only for in-memory 'images'; for a folder, put each "
                    "caption in a .txt file next to its image (same name)"
                )
        else:
            images = self.images
            if isinstance(images, (str, bytes)) or not isinstance(
                images, (Sequence, torch.Tensor, np.ndarray)
            ):
                fail(
                    f"'images' must be a list of PIL images/tensors or a [B,H,W,C] tensor, "
                    f"got {type(images).__name__}"
                )
            if isinstance(images, list):
                object.__setattr__(self, "images", tuple(images))
            count = _image_count(self.images)
            if count == 0:
                fail("'images' is empty; give at least one image")
            if self.captions is not None:
                if isinstance(self.captions, str) or not isinstance(self.captions, Sequence):
                    fail(
                        "'captions' must be a list of strings (one per image, or one for all), "
                        f"got {type(self.captions).__name__}"
                    )
                object.__setattr__(self, "captions", tuple(self.captions))
                bad = [i for i, c in enumerate(self.captions) if not isinstance(c, str)]
                if bad:
                    fail(f"'captions[{bad[0]}]' must be a string")
                if len(self.captions) not in (1, count):
                    fail(
                        f"'captions' has {len(self.captions)} entries for {count} images; give "
                        "one caption per image or a single caption for all"
                    )

        if not _is_int(self.bucket_step) or self.bucket_step < 1:
            fail(
                f"'bucket_step' must be an integer >= 1 (e.g. 64, or the model's latent size "
                f"multiple), got {self.bucket_step!r}"
            )
        if not _is_int(self.resolution) or self.resolution < self.bucket_step:
            fail(
                f"'resolution' must be an integer >= bucket_step ({self.bucket_step}), got "
                f"{self.resolution!r}; e.g. 512 for SD1.x, 1024 for SDXL/Flux"
            )
        square = self.resolution // self.bucket_step * self.bucket_step
        if self.min_bucket_side is not None and (
            not _is_int(self.min_bucket_side) or not 1 <= self.min_bucket_side <= square
        ):
            fail(
                f"'min_bucket_side' must be None or an integer in 1..{square} (the square "
                f"bucket side at resolution {self.resolution}), got {self.min_bucket_side!r}"
            )
        if (
            not _is_number(self.max_aspect)
            or not math.isfinite(self.max_aspect)
            or self.max_aspect < 1
        ):
            fail(f"'max_aspect' must be a number >= 1 (e.g. 2.0), got {self.max_aspect!r}")
        if (
            not _is_number(self.caption_dropout)
            or not math.isfinite(self.caption_dropout)
            or not 0 <= self.caption_dropout <= 1
        ):
            fail(
                "'caption_dropout' must be a probability in 0..1 (e.g. 0.05), got "
                f"{self.caption_dropout!r}"
            )
        for name in ("center_crop", "flip", "skip_bad"):
            if not isinstance(getattr(self, name), bool):
                fail(f"'{name}' must be true or false, got {getattr(self, name)!r}")
        for name in ("default_caption", "trigger_word"):
            if not isinstance(getattr(self, name), str):
                fail(f"'{name}' must be a string, got {getattr(self, name)!r}")
        object.__setattr__(self, "trigger_word", self.trigger_word.strip())
        if self.cache_dir is not None:
            if not isinstance(self.cache_dir, (str, Path)) or not str(self.cache_dir).strip():
                fail(f"'cache_dir' must be None or a folder path, got {self.cache_dir!r}")
            object.__setattr__(self, "cache_dir", str(self.cache_dir))

    def settings(self) -> dict[str, Any]:
        """The fields that shape the training samples (JSON-safe; no paths, no pixels)."""
        return {
            "resolution": self.resolution,
            "bucket_step": self.bucket_step,
            "min_bucket_side": self.min_bucket_side,
            "max_aspect": self.max_aspect,
            "center_crop": self.center_crop,
            "flip": self.flip,
            "caption_dropout": self.caption_dropout,
            "default_caption": self.default_caption,
            "trigger_word": self.trigger_word,
        }


# --------------------------------------------------------------------------- buckets


def bucket_candidates(
    resolution: int, step: int, max_aspect: float = 2.0, min_side: int | None = None
) -> list[tuple[int, int]]:
    """All buckets ``(w, h)`` for these settings, sorted.

    For every side length ``s`` (a multiple of `step`) the largest other side with
    ``w * h <= resolution ** 2`` is taken, in both orientations; buckets beyond `max_aspect`
    or with a side below `min_side` (default `step`) are dropped. The square bucket
    ``(r, r)``, ``r = resolution // step * step``, is always among them.
    """
    area = resolution * resolution
    low = max(step, min_side or step)
    found: set[tuple[int, int]] = set()
    side = step
    while side * step <= area:
        other = area // side // step * step
        for w, h in ((side, other), (other, side)):
            if min(w, h) >= low and max(w, h) <= max_aspect * min(w, h) + 1e-9:
                found.add((w, h))
        side += step
    return sorted(found)


def choose_bucket(
    width: int, height: int, candidates: Sequence[tuple[int, int]]
) -> tuple[int, int]:
    """The candidate whose aspect ratio is closest (in log space) to ``width / height``.

    Ties go to the larger area, then to the smaller width (deterministic).
    """
    target = math.log(width / height)
    return min(candidates, key=lambda b: (abs(math.log(b[0] / b[1]) - target), -b[0] * b[1], b[0]))


def crop_box(
    size: tuple[int, int], bucket: tuple[int, int], fx: float = 0.5, fy: float = 0.5
) -> tuple[float, float, float, float]:
    """The region of an image of `size` that, scaled, fills `bucket` exactly.

    The region has the bucket's aspect ratio and is as large as the image allows; `fx`/`fy`
    in 0..1 place it (0.5 = centre).
    """
    iw, ih = size
    bw, bh = bucket
    if iw * bh > ih * bw:  # wider than the bucket: full height
        rw, rh = ih * bw / bh, float(ih)
    else:
        rw, rh = float(iw), iw * bh / bw
    left, top = (iw - rw) * fx, (ih - rh) * fy
    return (left, top, left + rw, top + rh)


# --------------------------------------------------------------------------- images


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


@dataclass(frozen=True)
class DataItem:
    """One image of the dataset.

    `key` is a content hash (image bytes/pixels, caption, bucket, crop and flip settings):
    stable across runs and machines, filesystem-safe, usable as a cache key. `caption` is the
    raw caption (before the trigger word and dropout); `size` is the image's ``(w, h)``.
    """

    key: str
    bucket: tuple[int, int]
    caption: str
    repeats: int
    source: str
    size: tuple[int, int]
    path: Path | None = field(default=None, repr=False, compare=False)
    image: Image.Image | None = field(default=None, repr=False, compare=False)


@dataclass
class _Candidate:
    source: str
    caption: str
    repeats: int
    path: Path | None = None
    image: Image.Image | None = None


class _Problems:
    """Bad items: raised at once, or collected for one summarised warning (skip_bad)."""

    def __init__(self, skip: bool):
        self.skip = skip
        self.messages: list[str] = []
        self.seen = 0  # images looked at

    def report(self, message: str) -> None:
        if not self.skip:
            raise DatasetError(message)
        self.messages.append(message)

    def warn(self) -> None:
        if not self.messages:
            return
        shown = self.messages[:_MAX_LISTED_PROBLEMS]
        more = len(self.messages) - len(shown)
        logger.warning(
            "dataset: skipped %d of %d images (skip_bad=True):\n  %s%s",
            len(self.messages),
            self.seen,
            "\n  ".join(shown),
            f"\n  ... and {more} more" if more else "",
        )


def _read_caption(image_path: Path, default: str) -> str:
    caption_path = image_path.with_suffix(CAPTION_EXTENSION)
    if not caption_path.is_file():
        return default
    try:
        return caption_path.read_text(encoding="utf-8-sig").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(
            f"{caption_path}: unreadable caption file ({exc}); save it as UTF-8 text, or "
            "delete it to use default_caption"
        ) from None


def _folder_images(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _scan_folder(spec: DatasetSpec, problems: _Problems) -> list[_Candidate]:
    root = Path(spec.folder or "")
    if not root.exists():
        raise DatasetError(
            f"{root}: dataset folder not found; check the path (it must be a folder of images "
            "with same-name .txt captions)"
        )
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder; give the folder that holds the images")
    sources: list[tuple[Path, int]] = [(root, 1)]
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        match = KOHYA_FOLDER.match(sub.name)
        if match is None:
            count = len(_folder_images(sub))
            log = logger.warning if count else logger.info
            log(
                "dataset: ignoring sub-folder %s (%d images): only kohya-style 'N_name' "
                "sub-folders (e.g. 10_%s) are read",
                sub,
                count,
                sub.name,
            )
            continue
        repeats = int(match.group(1))
        if repeats == 0:
            logger.info("dataset: ignoring sub-folder %s: 0 repeats", sub)
            continue
        sources.append((sub, repeats))
    found: list[_Candidate] = []
    for folder, repeats in sources:
        for path in _folder_images(folder):
            problems.seen += 1
            try:
                caption = _read_caption(path, spec.default_caption)
            except DatasetError as exc:
                problems.report(str(exc))
                continue
            found.append(_Candidate(str(path), caption, repeats, path=path))
    if not found and not problems.messages:
        raise DatasetError(
            f"{root}: no images found; accepted extensions are "
            f"{', '.join(IMAGE_EXTENSIONS)} (any case), in the folder itself or in kohya-style "
            "'N_name' sub-folders (e.g. 10_mychar, whose images repeat 10 times per epoch)"
        )
    return found


def _memory_candidates(spec: DatasetSpec) -> list[_Candidate]:
    images = _memory_images(spec.images)
    captions = list(spec.captions) if spec.captions is not None else [spec.default_caption]
    if len(captions) == 1:
        captions = captions * len(images)
    return [
        _Candidate(f"image[{i}]", caption.strip(), 1, image=img)
        for i, (img, caption) in enumerate(zip(images, captions, strict=True))
    ]


def _item_key(content: str, caption: str, bucket: tuple[int, int], spec: DatasetSpec) -> str:
    payload = json.dumps(
        {
            "v": _PREP_VERSION,
            "content": content,
            "caption": caption,
            "bucket": list(bucket),
            "center_crop": spec.center_crop,
            "flip": spec.flip,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


def _seeded(*parts: object) -> random.Random:
    """A Random seeded from `parts` the same way in every process (no salted hash())."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


# --------------------------------------------------------------------------- the dataset


class TrainingData:
    """A loaded dataset: checked images, captions and buckets; deterministic epochs.

    Loading decodes every image once (a corrupt or truncated file fails here, not hours into
    training) and keeps the decoded folder images, up to :data:`KEEP_DECODED_BYTES` in all, for
    :meth:`pixels`; images beyond that budget are decoded again on each :meth:`pixels` call.
    In-memory images are kept as RGB copies (later changes to the caller's tensors do not leak
    in).
    """

    def __init__(self, spec: DatasetSpec):
        if not isinstance(spec, DatasetSpec):
            raise DatasetError(f"dataset: expected a DatasetSpec, got {type(spec).__name__}")
        self.spec = spec
        self.candidates = bucket_candidates(
            spec.resolution, spec.bucket_step, spec.max_aspect, spec.min_bucket_side
        )
        problems = _Problems(spec.skip_bad)
        self._kept_bytes = 0
        if spec.folder is not None:
            found = _scan_folder(spec, problems)
        else:
            found = _memory_candidates(spec)
            problems.seen = len(found)
        items: list[DataItem] = []
        for cand in found:
            item = self._make_item(cand, problems)
            if item is not None:
                items.append(item)
        problems.warn()
        if not items:
            where = spec.folder if spec.folder is not None else "images"
            raise DatasetError(
                f"{where}: no usable images: all {len(problems.messages)} were skipped (see the "
                "warning above); fix or replace them, or lower 'resolution'"
            )
        self.items: tuple[DataItem, ...] = tuple(items)
        logger.info(
            "dataset: %d images, %d samples per epoch, buckets %s",
            len(items),
            sum(i.repeats for i in items),
            ", ".join(f"{w}x{h}: {n}" for (w, h), n in self.buckets().items()),
        )

    def _make_item(self, cand: _Candidate, problems: _Problems) -> DataItem | None:
        spec = self.spec
        if cand.path is not None:
            try:
                img, content = _open_image(cand.path)
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
                problems.report(
                    f"{cand.path}: corrupt or unreadable image ({type(exc).__name__}: {exc}); "
                    "re-export or delete it, or set skip_bad to skip bad images"
                )
                return None
        elif cand.image is not None:
            img = cand.image
            content = _pixel_hash(img)
        else:  # pragma: no cover - every candidate has a path or an image
            raise LycorisError(f"{cand.source}: internal error: no path and no image")
        bucket = choose_bucket(img.width, img.height, self.candidates)
        if img.width < bucket[0] or img.height < bucket[1]:
            problems.report(
                f"{cand.source}: image is {img.width}x{img.height}, smaller than its bucket "
                f"{bucket[0]}x{bucket[1]} at resolution {spec.resolution} (images are never "
                f"upscaled); use an image of at least {bucket[0]}x{bucket[1]}, lower "
                "'resolution', or set skip_bad to skip it"
            )
            return None
        return DataItem(
            key=_item_key(content, cand.caption, bucket, spec),
            bucket=bucket,
            caption=cand.caption,
            repeats=cand.repeats,
            source=cand.source,
            size=(img.width, img.height),
            path=cand.path,
            image=img if cand.path is None or self._keep(img) else None,
        )

    def _keep(self, img: Image.Image) -> bool:
        """Whether a decoded folder image fits in the budget of kept images (then it is kept)."""
        size = img.width * img.height * len(img.getbands())
        if self._kept_bytes + size > KEEP_DECODED_BYTES:
            return False
        self._kept_bytes += size
        return True

    def __len__(self) -> int:
        return len(self.items)

    def buckets(self) -> dict[tuple[int, int], int]:
        """Number of images per bucket ``(w, h)`` (not weighted by repeats), sorted."""
        counts: dict[tuple[int, int], int] = {}
        for item in self.items:
            counts[item.bucket] = counts.get(item.bucket, 0) + 1
        return dict(sorted(counts.items()))

    def samples_per_epoch(self) -> int:
        """Items times their repeats: how many samples one epoch draws."""
        return sum(item.repeats for item in self.items)

    def epoch_order(self, epoch: int, seed: int, batch_size: int) -> list[list[int]]:
        """The batches of item indices for `epoch`; same arguments, same batches.

        Each item appears `repeats` times. Items are shuffled within their bucket, cut into
        batches of `batch_size` (a bucket's last batch may be smaller), and the batches are
        shuffled; the shuffles come from a Random seeded by ``(seed, epoch)`` only.
        """
        for name, value, low in (("epoch", epoch, 0), ("batch_size", batch_size, 1)):
            if not _is_int(value) or value < low:
                raise DatasetError(f"dataset: '{name}' must be an integer >= {low}, got {value!r}")
        if not _is_int(seed):
            raise DatasetError(f"dataset: 'seed' must be an integer, got {seed!r}")
        rng = _seeded("epoch_order", seed, epoch)
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for index, item in enumerate(self.items):
            by_bucket.setdefault(item.bucket, []).extend([index] * item.repeats)
        batches: list[list[int]] = []
        for bucket in sorted(by_bucket):
            entries = by_bucket[bucket]
            rng.shuffle(entries)
            batches += [entries[i : i + batch_size] for i in range(0, len(entries), batch_size)]
        rng.shuffle(batches)
        return batches

    def _load(self, item: DataItem) -> Image.Image:
        if item.image is not None:
            return item.image
        if item.path is None:  # pragma: no cover - every item has a path or an image
            raise LycorisError(f"{item.source}: internal error: no path and no image")
        try:
            img, _ = _open_image(item.path)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise DatasetError(
                f"{item.path}: cannot read the image any more ({type(exc).__name__}: {exc}); "
                "the file changed or was removed after the dataset was loaded"
            ) from None
        if img.size != item.size:
            raise DatasetError(
                f"{item.path}: the image is now {img.width}x{img.height} but was "
                f"{item.size[0]}x{item.size[1]} when the dataset was loaded; do not edit the "
                "dataset during training (restart to reload it)"
            )
        return img

    def pixels(self, index: int, rng: random.Random) -> torch.Tensor:
        """Item `index` as a ``[3, h, w]`` float32 tensor in [-1, 1] at its bucket ``(w, h)``.

        Random crop (``center_crop=False``) draws two numbers from `rng`, then flip
        (``flip=True``) draws one; with a centre crop and no flip `rng` is not used.
        """
        item = self.items[index]
        img = self._load(item)
        if self.spec.center_crop:
            fx = fy = 0.5
        else:
            fx, fy = rng.random(), rng.random()
        flip = self.spec.flip and rng.random() < 0.5
        bw, bh = item.bucket
        box = crop_box(img.size, item.bucket, fx, fy)
        out = img if img.size == (bw, bh) else img.resize((bw, bh), _RESAMPLE, box=box)
        array = np.array(out, dtype=np.uint8)  # [h, w, 3], a writable copy
        tensor = torch.from_numpy(array).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
        if flip:
            tensor = torch.flip(tensor, dims=[-1])
        return tensor.contiguous()

    def caption(self, index: int, rng: random.Random) -> str:
        """Item `index`'s caption for one draw: dropout, then the trigger word.

        With probability ``caption_dropout`` the whole caption (trigger word included) is
        ``""``. Otherwise the trigger word is prepended as ``"trigger, caption"`` (just
        ``"trigger"`` for an empty caption), unless the caption already starts with it.
        `rng` is drawn once when ``caption_dropout > 0``.
        """
        text = self.items[index].caption
        if self.spec.caption_dropout > 0 and rng.random() < self.spec.caption_dropout:
            return ""
        trigger = self.spec.trigger_word
        if not trigger or _starts_with(text, trigger):
            return text
        return f"{trigger}, {text}" if text else trigger

    def fingerprint(self) -> str:
        """sha256 of the sample settings and every item (key and repeats): dataset provenance.

        Independent of where the folder lives; changes when any image, caption, bucket,
        repeat count or preparation setting changes.
        """
        payload = json.dumps(
            {
                "v": _PREP_VERSION,
                "settings": self.spec.settings(),
                "items": [[item.key, item.repeats] for item in self.items],
            },
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _starts_with(text: str, trigger: str) -> bool:
    return text == trigger or (text.startswith(trigger) and not text[len(trigger)].isalnum())


# --------------------------------------------------------------------------- feature cache


def _check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _SAFE_NAME.match(value) or ".." in value:
        raise DatasetError(
            f"feature cache: {what} {value!r} is not filesystem-safe; use 1-200 characters "
            "from A-Z a-z 0-9 . _ - starting with a letter or digit (e.g. a hex hash)"
        )
    return value


class FeatureCache:
    """Encoded features (dicts of tensors) by key: in memory, and on disk if `cache_dir` is set.

    Disk files are ``cache_dir/namespace/<key>.safetensors``, written atomically; a corrupt or
    mismatching file is ignored with a warning and recomputed. Put everything the features
    depend on besides the key (model hash, resolution, ...) into `namespace`.

    Tensors are stored and returned on `device` (default CPU) so results from memory, disk
    and fresh computation always agree. `max_items` bounds the in-memory entries (least
    recently used are dropped first; they stay on disk); None keeps everything.
    """

    def __init__(
        self,
        cache_dir: str | None,
        namespace: str,
        *,
        device: str | torch.device = "cpu",
        max_items: int | None = None,
    ):
        self.namespace = _check_name(namespace, "namespace")
        self.folder = Path(cache_dir) / namespace if cache_dir is not None else None
        self.device = torch.device(device)
        if max_items is not None and (not _is_int(max_items) or max_items < 1):
            raise DatasetError(f"feature cache: max_items must be None or >= 1, got {max_items!r}")
        self.max_items = max_items
        self.hits = 0
        self.misses = 0
        self._memory: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()

    def path(self, key: str) -> Path | None:
        """The disk file of `key` (None without a cache_dir)."""
        _check_name(key, "key")
        return self.folder / f"{key}.safetensors" if self.folder is not None else None

    def get_or_compute(
        self, key: str, compute: Callable[[], dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """The features of `key`: from memory, else from disk, else ``compute()`` (then stored)."""
        path = self.path(key)
        if key in self._memory:
            self._memory.move_to_end(key)
            self.hits += 1
            return dict(self._memory[key])
        if path is not None and path.is_file():
            loaded = self._read(path, key)
            if loaded is not None:
                self.hits += 1
                return dict(self._remember(key, loaded))
        self.misses += 1
        features = compute()
        if not isinstance(features, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in features.items()
        ):
            raise DatasetError(
                f"feature cache {self.namespace}: compute() for {key!r} must return a dict of "
                f"str -> torch.Tensor, got {type(features).__name__}"
            )
        stored = self._remember(
            key, {k: v.detach().to(self.device).contiguous() for k, v in features.items()}
        )
        if path is not None:
            write_safetensors(path, stored, {"namespace": self.namespace, "key": key})
        return dict(stored)

    def _read(self, path: Path, key: str) -> dict[str, torch.Tensor] | None:
        try:
            tensors, meta = read_safetensors(path)
        except LycorisError as exc:
            logger.warning("feature cache: ignoring %s and recomputing it (%s)", path, exc)
            return None
        if meta.get("key") != key or meta.get("namespace") != self.namespace:
            logger.warning(
                "feature cache: ignoring %s and recomputing it (written for key %r in %r)",
                path,
                meta.get("key"),
                meta.get("namespace"),
            )
            return None
        return {k: v.to(self.device) for k, v in tensors.items()}

    def _remember(self, key: str, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self._memory[key] = features
        if self.max_items is not None:
            while len(self._memory) > self.max_items:
                self._memory.popitem(last=False)
        return features

    def clear_memory(self) -> None:
        """Drop the in-memory entries (disk files stay)."""
        self._memory.clear()

    def __len__(self) -> int:
        return len(self._memory)


__all__ = [
    "CAPTION_EXTENSION",
    "IMAGE_EXTENSIONS",
    "DataItem",
    "DatasetError",
    "DatasetSpec",
    "FeatureCache",
    "TrainingData",
    "bucket_candidates",
    "choose_bucket",
    "crop_box",
]
