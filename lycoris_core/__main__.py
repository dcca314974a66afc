"""Command line: ``python -m lycoris_core {demo, make-tiny, inspect} ...``.

Errors of this library are printed as one line (type and message, which carries the fix)
and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

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
