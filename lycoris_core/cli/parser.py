"""The argument parser: one small function per sub-command's arguments.

Each sub-command's ``func`` default is its ``cmd_*`` function, looked up in its module when
the parser is built (so a test can replace one). The base-model arguments shared by
``sample`` and ``train`` are in :mod:`.base_args`.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..precisions import PRECISIONS
from . import estimate, files, sample, train
from .base_args import add_base_args

Subparsers = Any  # argparse's _SubParsersAction (private)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lycoris_core",
        description="LyCORIS adapters for diffusers models (the core of comfyui-lycoris).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_make_tiny(sub)
    _add_inspect(sub)
    _add_convert(sub)
    _add_sample(sub)
    _add_train(sub)
    _add_estimate(sub)
    _add_demo(sub)
    return parser


def _add_make_tiny(sub: Subparsers) -> None:
    p = sub.add_parser("make-tiny", help="save a tiny random diffusers pipeline")
    p.add_argument("--family", required=True, help="sd15, sdxl, sd3 or flux")
    p.add_argument("--out", required=True, help="empty or new output folder")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=files.cmd_make_tiny)


def _add_inspect(sub: Subparsers) -> None:
    p = sub.add_parser("inspect", help="describe a LyCORIS/LoRA .safetensors file")
    p.add_argument("file")
    p.add_argument("--base", help="diffusers pipeline folder: report matched/unmatched layers")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=files.cmd_inspect)


def _add_convert(sub: Subparsers) -> None:
    from ..save_layouts import LAYOUTS

    p = sub.add_parser("convert", help="write a LyCORIS/LoRA file in another layout")
    p.add_argument("file")
    p.add_argument("out", help=".safetensors file to write")
    p.add_argument("--layout", choices=LAYOUTS, default=LAYOUTS[0])
    p.add_argument("--base", help="the model the file is for (needed for --layout kohya)")
    p.set_defaults(func=files.cmd_convert)


def _add_sample(sub: Subparsers) -> None:
    p = sub.add_parser("sample", help="sample images with LyCORIS adapters at strengths")
    add_base_args(p)
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
    p.set_defaults(func=sample.cmd_sample)


def _add_train(sub: Subparsers) -> None:
    p = sub.add_parser("train", help="train a LyCORIS adapter from images + captions")
    add_base_args(p)
    p.add_argument("--config", required=True, help="lycoris_config.json (the seed's format)")
    p.add_argument("--data", required=True, help="folder of images + same-name .txt captions")
    p.add_argument("--out", required=True, help="adapter file to write (.safetensors)")
    p.add_argument("--steps", type=int, required=True)
    _add_train_optimisation_args(p)
    _add_train_data_args(p)
    p.add_argument("--resume", help="checkpoint folder, checkpoints folder, or the --out path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--json", action="store_true", help="machine-readable summary")
    p.add_argument(
        "--no-preflight", action="store_true", help="skip the memory estimate before loading"
    )
    p.add_argument(
        "--free-gb", type=float, default=None, help="preflight: free memory (default: measured)"
    )
    p.set_defaults(func=train.cmd_train)


def _add_train_optimisation_args(p: argparse.ArgumentParser) -> None:
    """Optimiser, schedule, precision, checkpoints, validation and loss options of ``train``."""
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--optimizer", default="adamw", help="adamw, adamw8bit, prodigy, adafactor")
    p.add_argument("--scheduler", default="constant")
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    p.add_argument("--precision", choices=("no", "fp16", "bf16"), default="no")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--validation-prompt", action="append", default=[])
    p.add_argument("--validation-every", type=int, default=0)
    p.add_argument("--validation-lycoris-strength", type=float, default=1.0)
    p.add_argument("--min-snr-gamma", type=float, default=None)
    p.add_argument("--max-sequence-length", type=int, default=None)


def _add_train_data_args(p: argparse.ArgumentParser) -> None:
    """How ``train`` reads its images and captions."""
    p.add_argument("--random-crop", action="store_true")
    p.add_argument("--flip", action="store_true")
    p.add_argument("--caption-dropout", type=float, default=0.0)
    p.add_argument("--default-caption", default="")
    p.add_argument("--trigger", default="")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable/too small images")
    p.add_argument("--cache-dir", help="cache latents and text embeddings on disk here")


def _add_estimate(sub: Subparsers) -> None:
    p = sub.add_parser(
        "estimate", help="memory a train (or --sample) run would need, before loading anything"
    )
    p.add_argument("--base", required=True, help="diffusers pipeline folder")
    p.add_argument("--config", help="lycoris_config.json (training estimates)")
    p.add_argument("--sample", action="store_true", help="estimate sampling instead of training")
    p.add_argument("--resolution", type=int, default=512, help="training resolution")
    p.add_argument("--width", type=int, default=None, help="sampling width (default resolution)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--guidance-batches", type=int, default=1, help="2 with CFG (SD/SDXL)")
    p.add_argument("--optimizer", default="adamw", help="adamw, adamw8bit, prodigy, adafactor")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--max-sequence-length", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument(
        "--base-precision",
        choices=PRECISIONS,
        default="auto",
        help="the base's storage the run would use (fp8 / int8 / nf4: quantised)",
    )
    p.add_argument(
        "--free-gb", type=float, default=None, help="compare with this (default: free now)"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=estimate.cmd_estimate)


def _add_demo(sub: Subparsers) -> None:
    from ..demo import BASE_STEPS, DEMO_STEPS

    p = sub.add_parser(
        "demo", help="the main job: train the seed's config on a tiny Flux and show the result"
    )
    p.add_argument("--out", default="out", help="output folder (default: out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=DEMO_STEPS, help="LoKr training steps")
    p.add_argument(
        "--base-steps",
        type=int,
        default=BASE_STEPS,
        help="steps teaching the random base shapes (first run only; reused after)",
    )
    p.set_defaults(func=train.cmd_demo)
