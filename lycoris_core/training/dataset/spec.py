"""The dataset spec: where the training images come from and how they are prepared.

:class:`DatasetSpec` checks every field when it is built; :class:`DatasetError` is the error of
the whole dataset package (spec, folder, image, caption, feature cache).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from PIL import Image

from ...errors import LycorisError


class DatasetError(LycorisError, ValueError):
    """A dataset spec, folder, image, caption or feature cache is invalid."""


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _fail(what: str) -> NoReturn:
    raise DatasetError(f"dataset: {what}")


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
        if (self.folder is None) == (self.images is None):
            _fail(
                "give exactly one of 'folder' (a folder of images with .txt captions) and "
                "'images' (in-memory images)"
                + (", not both" if self.folder is not None else "; neither was given")
            )
        if self.folder is not None:
            self._check_folder()
        else:
            self._check_images()
        self._check_sizes()
        self._check_options()

    def _check_folder(self) -> None:
        if not isinstance(self.folder, (str, Path)) or not str(self.folder).strip():
            _fail(f"'folder' must be a non-empty path string, got {self.folder!r}")
        object.__setattr__(self, "folder", str(self.folder))
        if self.captions is not None:
            _fail(
                "'captions' is only for in-memory 'images'; for a folder, put each "
                "caption in a .txt file next to its image (same name)"
            )

    def _check_images(self) -> None:
        images = self.images
        if isinstance(images, (str, bytes)) or not isinstance(
            images, (Sequence, torch.Tensor, np.ndarray)
        ):
            _fail(
                f"'images' must be a list of PIL images/tensors or a [B,H,W,C] tensor, "
                f"got {type(images).__name__}"
            )
        if isinstance(images, list):
            object.__setattr__(self, "images", tuple(images))
        count = _image_count(self.images)
        if count == 0:
            _fail("'images' is empty; give at least one image")
        if self.captions is None:
            return
        if isinstance(self.captions, str) or not isinstance(self.captions, Sequence):
            _fail(
                "'captions' must be a list of strings (one per image, or one for all), "
                f"got {type(self.captions).__name__}"
            )
        object.__setattr__(self, "captions", tuple(self.captions))
        bad = [i for i, c in enumerate(self.captions) if not isinstance(c, str)]
        if bad:
            _fail(f"'captions[{bad[0]}]' must be a string")
        if len(self.captions) not in (1, count):
            _fail(
                f"'captions' has {len(self.captions)} entries for {count} images; give "
                "one caption per image or a single caption for all"
            )

    def _check_sizes(self) -> None:
        if not _is_int(self.bucket_step) or self.bucket_step < 1:
            _fail(
                f"'bucket_step' must be an integer >= 1 (e.g. 64, or the model's latent size "
                f"multiple), got {self.bucket_step!r}"
            )
        if not _is_int(self.resolution) or self.resolution < self.bucket_step:
            _fail(
                f"'resolution' must be an integer >= bucket_step ({self.bucket_step}), got "
                f"{self.resolution!r}; e.g. 512 for SD1.x, 1024 for SDXL/Flux"
            )
        square = self.resolution // self.bucket_step * self.bucket_step
        if self.min_bucket_side is not None and (
            not _is_int(self.min_bucket_side) or not 1 <= self.min_bucket_side <= square
        ):
            _fail(
                f"'min_bucket_side' must be None or an integer in 1..{square} (the square "
                f"bucket side at resolution {self.resolution}), got {self.min_bucket_side!r}"
            )
        if (
            not _is_number(self.max_aspect)
            or not math.isfinite(self.max_aspect)
            or self.max_aspect < 1
        ):
            _fail(f"'max_aspect' must be a number >= 1 (e.g. 2.0), got {self.max_aspect!r}")

    def _check_options(self) -> None:
        if (
            not _is_number(self.caption_dropout)
            or not math.isfinite(self.caption_dropout)
            or not 0 <= self.caption_dropout <= 1
        ):
            _fail(
                "'caption_dropout' must be a probability in 0..1 (e.g. 0.05), got "
                f"{self.caption_dropout!r}"
            )
        for name in ("center_crop", "flip", "skip_bad"):
            if not isinstance(getattr(self, name), bool):
                _fail(f"'{name}' must be true or false, got {getattr(self, name)!r}")
        for name in ("default_caption", "trigger_word"):
            if not isinstance(getattr(self, name), str):
                _fail(f"'{name}' must be a string, got {getattr(self, name)!r}")
        object.__setattr__(self, "trigger_word", self.trigger_word.strip())
        if self.cache_dir is not None:
            if not isinstance(self.cache_dir, (str, Path)) or not str(self.cache_dir).strip():
                _fail(f"'cache_dir' must be None or a folder path, got {self.cache_dir!r}")
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
