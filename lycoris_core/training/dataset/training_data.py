"""The loaded dataset: checked items with their buckets, deterministic epochs, pixels, captions.

Randomness (random crop, flip, caption dropout) only comes from the ``random.Random`` the caller
passes, so the engine can reproduce any sample exactly (resume).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from ...errors import LycorisError
from .buckets import bucket_candidates, choose_bucket
from .images import _open_image, _pixel_hash, bucket_pixels
from .sources import _Candidate, _memory_candidates, _Problems, _scan_folder
from .spec import DatasetError, DatasetSpec, _is_int

logger = logging.getLogger(__package__)  # one logger for the dataset package

# Bump when the preprocessing changes so old on-disk caches are not reused.
_PREP_VERSION = 1
# Decoded folder images kept from loading for training (RGB bytes, summed); beyond it an image
# is decoded again each time its pixels are drawn.
KEEP_DECODED_BYTES = 1 << 30


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
        return bucket_pixels(img, item.bucket, fx, fy, flip)

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
