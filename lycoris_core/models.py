"""Load diffusers models from local folders. Never reaches the network.

This first version loads a pipeline folder's denoiser (``unet`` or ``transformer``); full
pipelines, family detection and single-file checkpoints build on it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from .errors import ModelLoadError

DENOISER_COMPONENTS = ("transformer", "unet")


def read_model_index(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``model_index.json`` of a diffusers pipeline folder."""
    root = Path(folder)
    index = root / "model_index.json"
    if not root.is_dir():
        raise ModelLoadError(
            f"{root}: not a folder; pass a diffusers pipeline folder (with model_index.json)"
        )
    if not index.is_file():
        raise ModelLoadError(
            f"{root}: no model_index.json; this is not a diffusers pipeline folder (save one "
            "with pipe.save_pretrained(folder), or point at the folder that holds "
            "model_index.json)"
        )
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{index}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or "_class_name" not in data:
        raise ModelLoadError(f"{index}: missing '_class_name'; not a diffusers model index")
    return data


def load_denoiser(folder: str | os.PathLike[str]) -> nn.Module:
    """Load the ``transformer`` or ``unet`` of a local diffusers pipeline folder."""
    import diffusers

    index = read_model_index(folder)
    for name in DENOISER_COMPONENTS:
        entry = index.get(name)
        if isinstance(entry, list) and len(entry) == 2 and entry[1]:
            cls = getattr(diffusers, entry[1], None)
            if cls is None:
                raise ModelLoadError(
                    f"{folder}: component '{name}' has class {entry[1]!r}, which this diffusers "
                    f"{diffusers.__version__} does not provide; upgrade diffusers"
                )
            sub = Path(folder) / name
            if not sub.is_dir():
                raise ModelLoadError(f"{sub}: missing; the pipeline folder is incomplete")
            return cls.from_pretrained(str(sub), local_files_only=True).eval()
    raise ModelLoadError(
        f"{folder}: the pipeline ({index['_class_name']}) has no 'unet' or 'transformer' "
        "component to apply adapters to"
    )
