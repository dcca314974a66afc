"""The file commands: ``make-tiny`` (a tiny random pipeline), ``inspect`` and ``convert``
(a LyCORIS/LoRA file)."""

from __future__ import annotations

import argparse
import json

from ..paths import check_output_folder


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from ..tiny import make_tiny

    check_output_folder(args.out, "--out")
    out = make_tiny(args.family, args.out, seed=args.seed)
    print(f"saved tiny {args.family} pipeline (seed {args.seed}) to {out}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..adapters import load_adapter
    from ..report import describe, format_report

    adapter = load_adapter(args.file)
    module = None
    if args.base:
        from ..pipeline_files import load_denoiser

        module = load_denoiser(args.base)
    info = describe(adapter, module)
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from ..adapters import load_adapter
    from ..save_layouts import save_adapter

    adapter = load_adapter(args.file)
    denoiser = None
    if args.base:
        from ..pipeline_files import load_denoiser

        denoiser = load_denoiser(args.base)
    out = save_adapter(adapter, args.out, args.layout, denoiser=denoiser)
    print(f"saved {len(adapter.layers)} layers in the {args.layout} layout to {out}")
    return 0
