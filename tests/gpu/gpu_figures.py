"""Where GPU tests record their figures."""

import json
import os
from pathlib import Path

import torch


def write_figures(name: str, figures: dict) -> None:
    """Record GPU figures in $OUT (the device machine's output folder) or bench/results."""
    if not figures:
        return
    out = Path(os.environ.get("OUT") or "bench/results") / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**figures, "device": torch.cuda.get_device_name(0)}, indent=2))
