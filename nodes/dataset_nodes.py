"""Nodes for training data: a folder of captioned images, or an IMAGE batch with captions."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from ..lycoris_core.errors import PathError
from ..lycoris_core.paths import existing_folder
from ..lycoris_core.training import DatasetSpec
from . import _host
from .handles import DATASET, LycorisNode

DEMO_DATASET = "demo: discs"


def _dataset_folder(folder: str) -> Path:
    """The folder of a dataset; ``demo: discs`` is a small generated one (no download)."""
    if isinstance(folder, str) and folder.strip() == DEMO_DATASET:
        from ..lycoris_core.training.synthetic import make_demo_dataset

        return make_demo_dataset(_host.temp_dir() / "lycoris-demo-dataset", count=8, size=32)
    return existing_folder(folder, "dataset folder")


def _bucket_inputs() -> dict[str, Any]:
    return {
        "resolution": (
            "INT",
            {
                "default": 1024,
                "min": 16,
                "max": 4096,
                "step": 8,
                "tooltip": "Target side; buckets keep about this many pixels.",
            },
        ),
        "center_crop": (
            "BOOLEAN",
            {"default": True, "tooltip": "Center crop (cacheable) or random crop."},
        ),
        "flip": ("BOOLEAN", {"default": False, "tooltip": "Random horizontal flips."}),
        "caption_dropout": (
            "FLOAT",
            {
                "default": 0.0,
                "min": 0.0,
                "max": 1.0,
                "step": 0.01,
                "tooltip": "Probability of training an image with an empty caption.",
            },
        ),
        "trigger_word": ("STRING", {"default": "", "tooltip": "Prepended to every caption."}),
    }


class _DatasetNode(LycorisNode):
    """What both dataset nodes return."""

    RETURN_TYPES = (DATASET,)
    RETURN_NAMES = ("dataset",)
    OUTPUT_TOOLTIPS = ("The dataset description for Train LyCORIS.",)


class DatasetFromFolder(_DatasetNode):
    DESCRIPTION = (
        "Images with same-name .txt captions in a folder (kohya 'N_name' sub-folders repeat N "
        "times). Buckets, crops and flips are set here; checked when training starts."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "folder": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "Full path of the image folder ('demo: discs' = 8 generated images, for the demo model).",
                    },
                ),
                **_bucket_inputs(),
                "default_caption": (
                    "STRING",
                    {"default": "", "tooltip": "Caption of images without a .txt."},
                ),
                "skip_bad": (
                    "BOOLEAN",
                    {
                        "default": False,
                        "tooltip": "Skip unreadable or too small images (one warning) instead of failing.",
                    },
                ),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, folder: str | None) -> bool | str:
        if folder is None or folder.strip() == DEMO_DATASET:
            return True  # None: a linked input, checked when the node runs
        try:
            existing_folder(folder, "dataset folder")
        except PathError as exc:
            return f"{exc} (or '{DEMO_DATASET}' for the built-in demo images)"
        return True

    @classmethod
    def IS_CHANGED(cls, folder: str, **kwargs: Any) -> str:
        try:
            root = _dataset_folder(folder)
        except PathError:
            return str(folder)
        stamp = [
            (str(p), p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(root.rglob("*"))
            if p.is_file()
        ]
        return hashlib.sha256(json.dumps(stamp).encode()).hexdigest()

    def run(self, folder: str, **options: Any) -> tuple[DatasetSpec]:
        return (DatasetSpec(folder=str(_dataset_folder(folder)), bucket_step=8, **options),)


class DatasetFromImages(_DatasetNode):
    DESCRIPTION = "An IMAGE batch with captions (one per line, or one line for all) as a dataset."

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The training images."}),
                "captions": (
                    "STRING",
                    {
                        "multiline": True,
                        "default": "",
                        "tooltip": "One caption per line (or a single line for all images).",
                    },
                ),
                **_bucket_inputs(),
            }
        }

    def run(self, images: torch.Tensor, captions: str, **options: Any) -> tuple[DatasetSpec]:
        lines = [line.strip() for line in captions.splitlines() if line.strip()] or [""]
        return (DatasetSpec(images=images.clone(), captions=lines, bucket_step=8, **options),)
