"""Command line: ``python -m lycoris_core {demo, sample, inspect, make-tiny} ...``.

Errors of this library are printed as one line (type and message, which carries the fix)
and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import LycorisError


def _cmd_make_tiny(args: argparse.Namespace) -> int:
    from .tiny import make_tiny

    out = make_tiny(args.family, args.out, seed=args.seed)
    print(f"saved tiny {args.family} pipeline (seed {args.seed}) to {out}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .adapters import load_adapter
    from .report import describe, format_report

    adapter = load_adapter(args.file)
    module = None
    if args.base:
        from .models import load_denoiser

        module = load_denoiser(args.base)
    info = describe(adapter, module)
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0


def _adapter_arg(text: str) -> tuple[str, float]:
    """FILE[:STRENGTH]; the strength defaults to 1.0 (a ':' inside a path is kept)."""
    path, sep, strength = text.rpartition(":")
    if sep and path:
        try:
            return path, float(strength)
        except ValueError:
            pass
    return text, 1.0


def _save_png(images: Any, out: Path) -> None:
    from PIL import Image

    from .io import atomic_write

    grid = torch.cat(list(images), dim=1)  # [H, B*W, C]: one row
    array = (grid.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    atomic_write(out, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def _cmd_sample(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .adapters import load_adapter
    from .models import load_model
    from .sampling import sample

    model = load_model(
        args.base,
        config_dir=args.config_dir,
        dtype=args.dtype,
        device=args.device,
        offload=args.offload,
    )
    pairs = [_adapter_arg(a) for a in args.adapter]
    adapters = [(load_adapter(path), strength) for path, strength in pairs]
    bar = tqdm(desc="sampling", unit="step", disable=args.json, file=sys.stderr)

    def on_step(info: Any) -> None:
        bar.total = info.total
        bar.update(info.step - bar.n)

    start = time.perf_counter()
    try:
        images = sample(
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
    out = Path(args.out)
    _save_png(images, out)
    patch = model.active_patch
    result = {
        "out": str(out),
        "family": model.family.name,
        "images": images.shape[0],
        "width": images.shape[2],
        "height": images.shape[1],
        "seeds": [args.seed + i for i in range(images.shape[0])],
        "mode": args.mode,
        "adapters": [{"file": p, "strength": s} for p, s in pairs],
        "patched_layers": patch.num_layers if patch else 0,
        "seconds": round(time.perf_counter() - start, 3),
    }
    model.restore_base()
    print(json.dumps(result, indent=2) if args.json else f"saved {out} ({result['seconds']} s)")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    summary = run_demo(Path(args.out), seed=args.seed)
    print(summary)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lycoris_core",
        description="LyCORIS adapters for diffusers models (the core of comfyui-lycoris).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-tiny", help="save a tiny random diffusers pipeline")
    p.add_argument("--family", required=True, help="sd15, sdxl, sd3 or flux")
    p.add_argument("--out", required=True, help="empty or new output folder")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_make_tiny)

    p = sub.add_parser("inspect", help="describe a LyCORIS/LoRA .safetensors file")
    p.add_argument("file")
    p.add_argument("--base", help="diffusers pipeline folder: report matched/unmatched layers")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("sample", help="sample images with LyCORIS adapters at strengths")
    p.add_argument("--base", required=True, help="diffusers pipeline folder or .safetensors file")
    p.add_argument("--config-dir", help="local diffusers folder for a single-file --base")
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="FILE[:STRENGTH]",
        help="adapter file and strength (default 1.0); repeat to stack",
    )
    p.add_argument("--mode", choices=("merge", "dynamic"), default="merge")
    p.add_argument("--prompt", default="")
    p.add_argument("--negative", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="default: the family's")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--offload", choices=("none", "model", "sequential"), default="none")
    p.add_argument("--out", required=True, help="PNG file (a batch becomes one row)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser(
        "demo", help="tiny Flux + the seed's LoKr config: make, save, inspect, apply"
    )
    p.add_argument("--out", default="out", help="output folder (default: out)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except LycorisError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
