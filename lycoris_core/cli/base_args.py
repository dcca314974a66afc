"""The base-model arguments of ``sample`` and ``train`` (``--base`` and what a single-file
base needs) and the :func:`~lycoris_core.models.load_model` keywords they become.

A new base option goes in two places here: its ``add_argument`` and its :func:`base_files`
keyword.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..precisions import PRECISIONS


def add_base_args(p: argparse.ArgumentParser) -> None:
    """``--base`` and its companions, in the order ``--help`` lists them."""
    p.add_argument(
        "--base",
        required=True,
        help="diffusers pipeline folder, or a .safetensors checkpoint / diffusion model file",
    )
    _add_single_file_args(p)
    _add_weight_args(p)


def _add_single_file_args(p: argparse.ArgumentParser) -> None:
    """What a single-file ``--base`` is completed with: configs, encoders, VAE, tokenizers."""
    p.add_argument("--config-dir", help="local diffusers folder for a single-file --base")
    p.add_argument(
        "--text-encoder",
        action="append",
        default=[],
        metavar="FILE",
        help="text encoder file (clip_l, clip_g, t5xxl) for a diffusion-model --base; repeat",
    )
    p.add_argument("--vae", help="VAE file for a diffusion-model --base (e.g. ae.safetensors)")
    p.add_argument(
        "--tokenizers",
        action="append",
        default=[],
        metavar="DIR",
        help="folder with tokenizers for single files (a diffusers folder of the model, or "
        "ComfyUI's comfy/ folder); repeat. Then the local Hugging Face cache is tried",
    )
    p.add_argument(
        "--allow-download",
        action="store_true",
        help="fetch a tokenizer found in neither --tokenizers nor the HF cache from the hub "
        "(tokenizer files only); without it nothing is downloaded",
    )


def _add_weight_args(p: argparse.ArgumentParser) -> None:
    """How the base's weights are read and which variant they are."""
    p.add_argument("--fp8", choices=("keep", "upcast"), default="keep", help="fp8 weights")
    p.add_argument(
        "--base-precision",
        choices=PRECISIONS,
        default="auto",
        help="how the base's Linear weights are stored: as loaded (auto), a dtype, or fp8 / "
        "int8 / nf4 (quantised, computing in --dtype; int8/nf4 need bitsandbytes; LyCORIS "
        "then trains in bypass mode and files apply dynamically)",
    )
    p.add_argument("--variant", help="override the detected variant (e.g. sd2, sd3.5-large)")
    p.add_argument("--prediction-type", choices=("v_prediction", "epsilon"), help="SD2.x only")


def base_files(args: argparse.Namespace) -> dict[str, Any]:
    """load_model's keywords for --base and its single-file companions."""
    return {
        "config_dir": args.config_dir,
        "text_encoders": args.text_encoder,
        "vae": args.vae,
        "tokenizer_dirs": args.tokenizers,
        "allow_download": args.allow_download,
        "fp8": args.fp8,
        "variant": args.variant,
        "prediction_type": args.prediction_type,
        "base_precision": args.base_precision,
    }
