"""The ``sample`` command: images from a base with adapters at strengths, as one PNG row."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ..limits import check_strength
from ..paths import check_output_file
from .base_args import base_files


def adapter_arg(text: str) -> tuple[str, float]:
    """FILE[:STRENGTH]; the strength defaults to 1.0 (a ':' inside a path is kept)."""
    path, sep, strength = text.rpartition(":")
    if sep and path:
        try:
            return path, float(strength)
        except ValueError:
            pass
    return text, 1.0


def save_png(images: Any, out: Path) -> None:
    """Images ``[B, H, W, C]`` in 0..1 side by side in one PNG row (written atomically)."""
    import torch
    from PIL import Image

    from ..io import atomic_write

    grid = torch.cat(list(images), dim=1)  # [H, B*W, C]: one row
    array = (grid.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    atomic_write(out, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def _sample_with_bar(args: argparse.Namespace, model: Any, adapters: list[Any]) -> Any:
    """``sampling.sample`` with the arguments' settings and a progress bar on stderr."""
    from tqdm import tqdm

    from ..sampling import sample

    bar = tqdm(desc="sampling", unit="step", disable=args.json, file=sys.stderr)

    def on_step(info: Any) -> None:
        bar.total = info.total
        bar.update(info.step - bar.n)

    try:
        return sample(
            model,
            adapters,
            mode=args.mode,
            prompt=args.prompt,
            negative_prompt=args.negative,
            width=args.width,
            height=args.height,
            steps=args.steps,
            guidance=args.guidance,
            seed=args.seed,
            batch_size=args.batch,
            on_step=on_step,
        )
    finally:
        bar.close()


def _result(
    args: argparse.Namespace, model: Any, out: Path, pairs: list[tuple[str, float]], images: Any
) -> dict[str, Any]:
    """What ``--json`` prints (without the seconds)."""
    patch = model.active_patch
    return {
        "out": str(out),
        "family": model.family.name,
        "base": model.description or model.family.label,
        "images": images.shape[0],
        "width": images.shape[2],
        "height": images.shape[1],
        "seeds": [args.seed + i for i in range(images.shape[0])],
        "mode": args.mode,
        "adapters": [{"file": p, "strength": s} for p, s in pairs],
        "patched_layers": patch.num_layers if patch else 0,
    }


def cmd_sample(args: argparse.Namespace) -> int:
    from ..adapters import load_adapter
    from ..models import load_model

    check_output_file(args.out, "--out")
    pairs = [adapter_arg(a) for a in args.adapter]
    for path, strength in pairs:
        check_strength(strength, f"--adapter {path}: strength")
    adapters = [(load_adapter(path), strength) for path, strength in pairs]
    model = load_model(
        args.base,
        dtype=args.dtype,
        device=args.device,
        offload=args.offload,
        **base_files(args),
    )
    start = time.perf_counter()
    images = _sample_with_bar(args, model, adapters)
    out = Path(args.out)
    save_png(images, out)
    result = _result(args, model, out, pairs, images)
    result["seconds"] = round(time.perf_counter() - start, 3)
    model.restore_base()
    print(json.dumps(result, indent=2) if args.json else f"saved {out} ({result['seconds']} s)")
    return 0
