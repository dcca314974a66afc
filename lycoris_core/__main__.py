"""Command line: ``python -m lycoris_core {demo, train, estimate, sample, inspect, convert,
make-tiny} ...``.

Errors of this library are printed as one line (type and message, which carries the fix)
and exit with status 2; anything else is a bug and keeps its traceback. Output paths are
checked before any model loads or any work starts.
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
from .limits import check_strength
from .paths import check_output_file, check_output_folder


def _cmd_make_tiny(args: argparse.Namespace) -> int:
    from .tiny import make_tiny

    check_output_folder(args.out, "--out")
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


def _cmd_convert(args: argparse.Namespace) -> int:
    from .adapters import load_adapter
    from .save_layouts import save_adapter

    adapter = load_adapter(args.file)
    denoiser = None
    if args.base:
        from .models import load_denoiser

        denoiser = load_denoiser(args.base)
    out = save_adapter(adapter, args.out, args.layout, denoiser=denoiser)
    print(f"saved {len(adapter.layers)} layers in the {args.layout} layout to {out}")
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


def _base_files(args: argparse.Namespace) -> dict[str, Any]:
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
    }


def _add_base_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--base",
        required=True,
        help="diffusers pipeline folder, or a .safetensors checkpoint / diffusion model file",
    )
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
    p.add_argument("--fp8", choices=("keep", "upcast"), default="keep", help="fp8 weights")
    p.add_argument("--variant", help="override the detected variant (e.g. sd2, sd3.5-large)")
    p.add_argument("--prediction-type", choices=("v_prediction", "epsilon"), help="SD2.x only")


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

    check_output_file(args.out, "--out")
    pairs = [_adapter_arg(a) for a in args.adapter]
    for path, strength in pairs:
        check_strength(strength, f"--adapter {path}: strength")
    adapters = [(load_adapter(path), strength) for path, strength in pairs]
    model = load_model(
        args.base,
        dtype=args.dtype,
        device=args.device,
        offload=args.offload,
        **_base_files(args),
    )
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
        "base": model.description or model.family.label,
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


def _progress(desc: str, quiet: bool) -> tuple[Any, Any]:
    """A tqdm bar and an on_step callback feeding it (training: step, loss, lr)."""
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit="step", disable=quiet, file=sys.stderr)

    def on_step(info: Any) -> None:
        bar.total = info.total
        bar.set_postfix(loss=f"{info.smoothed_loss:.4f}", lr=f"{info.lr:.2e}", refresh=False)
        bar.update(info.step - bar.n)

    return bar, on_step


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import demo_base, run_demo

    out = Path(args.out)
    bar, on_step = _progress("teaching the tiny base shapes", quiet=False)
    try:
        demo_base(out, seed=args.seed, steps=args.base_steps, on_step=on_step)
    finally:
        bar.close()
    bar, on_step = _progress("training the demo", quiet=False)
    try:
        summary = run_demo(
            out, seed=args.seed, steps=args.steps, on_step=on_step, base_steps=args.base_steps
        )
    finally:
        bar.close()
    print(summary)
    return 0


def _estimate(args: argparse.Namespace, mode: str) -> Any:
    """The memory estimate of the run `args` describe (train or estimate arguments), before
    anything loads (a diffusers folder: its safetensors headers and configs)."""
    from .config import LycorisConfig
    from .memory import Workload, estimate_memory

    res = getattr(args, "resolution", 512)
    work = Workload(
        mode=mode,
        width=getattr(args, "width", None) or res,
        height=getattr(args, "height", None) or res,
        batch_size=args.batch,
        gradient_checkpointing=getattr(args, "gradient_checkpointing", False),
        optimizer=getattr(args, "optimizer", "adamw"),
        text_tokens=getattr(args, "max_sequence_length", None),
        guidance_batches=getattr(args, "guidance_batches", 1),
    )
    config = LycorisConfig.from_file(args.config) if mode == "train" else None
    free = getattr(args, "free_gb", None)
    return estimate_memory(
        args.base,
        work,
        config,
        dtype=args.dtype,
        device=args.device,
        free_bytes=None if free is None else int(free * 2**30),
    )


def _cmd_estimate(args: argparse.Namespace) -> int:
    mode = "sample" if args.sample else "train"
    if mode == "train" and not args.config:
        raise LycorisError("estimate: a training estimate needs --config (or pass --sample)")
    est = _estimate(args, mode)
    print(json.dumps(est.to_dict(), indent=2) if args.json else est.breakdown())
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import LycorisConfig
    from .memory import preflight
    from .models import load_model
    from .training.dataset import DatasetSpec
    from .training.loop import TrainSpec, train
    from .training.objectives import ObjectiveOptions

    check_output_file(args.out, "--out")
    if not str(args.out).endswith(".safetensors"):  # the spec says so too, but after the load
        raise LycorisError(f"--out: output must be a .safetensors path, got {args.out!r}")
    config = LycorisConfig.from_file(args.config)  # before the model loads
    if not args.no_preflight and Path(args.base).is_dir():  # before anything loads
        print(preflight(_estimate(args, "train")).summary(), file=sys.stderr)
    model = load_model(args.base, dtype=args.dtype, device=args.device, **_base_files(args))
    dataset = DatasetSpec(
        folder=args.data,
        resolution=args.resolution,
        bucket_step=model.size_multiple,
        center_crop=not args.random_crop,
        flip=args.flip,
        caption_dropout=args.caption_dropout,
        default_caption=args.default_caption,
        trigger_word=args.trigger,
        skip_bad=args.skip_bad,
        cache_dir=args.cache_dir,
    )
    spec = TrainSpec(
        base=model,
        config=config,
        dataset=dataset,
        output=args.out,
        steps=args.steps,
        batch_size=args.batch,
        lr=args.lr,
        optimizer=args.optimizer,
        scheduler=args.scheduler,
        warmup_steps=args.warmup,
        grad_accum=args.grad_accum,
        max_grad_norm=args.max_grad_norm or None,
        mixed_precision=args.precision,
        gradient_checkpointing=args.gradient_checkpointing,
        save_every=args.save_every,
        validation_prompts=args.validation_prompt,
        validation_every=args.validation_every,
        validation_lycoris_strength=args.validation_lycoris_strength,
        seed=args.seed,
        resume=args.resume,
        objective=ObjectiveOptions(
            min_snr_gamma=args.min_snr_gamma, max_sequence_length=args.max_sequence_length
        ),
    )
    bar, on_step = _progress("training", quiet=args.json)
    try:
        result = train(spec, on_step=on_step)
    finally:
        bar.close()
    summary = {
        "adapter": result.adapter_path,
        "steps": result.steps_done,
        "completed": result.completed,
        "final_loss": result.losses[-1] if result.losses else None,
        "checkpoints": result.checkpoints,
        "seconds": round(result.seconds, 1),
        "layers": result.layers,
        "network_sha256": result.network_sha256,
    }
    print(json.dumps(summary, indent=2) if args.json else f"saved {result.adapter_path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lycoris_core",
        description="LyCORIS adapters for diffusers models (the core of comfyui-lycoris).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    from .save_layouts import LAYOUTS

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

    p = sub.add_parser("convert", help="write a LyCORIS/LoRA file in another layout")
    p.add_argument("file")
    p.add_argument("out", help=".safetensors file to write")
    p.add_argument("--layout", choices=LAYOUTS, default=LAYOUTS[0])
    p.add_argument("--base", help="the model the file is for (needed for --layout kohya)")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("sample", help="sample images with LyCORIS adapters at strengths")
    _add_base_args(p)
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

    p = sub.add_parser("train", help="train a LyCORIS adapter from images + captions")
    _add_base_args(p)
    p.add_argument("--config", required=True, help="lycoris_config.json (the seed's format)")
    p.add_argument("--data", required=True, help="folder of images + same-name .txt captions")
    p.add_argument("--out", required=True, help="adapter file to write (.safetensors)")
    p.add_argument("--steps", type=int, required=True)
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
    p.add_argument("--random-crop", action="store_true")
    p.add_argument("--flip", action="store_true")
    p.add_argument("--caption-dropout", type=float, default=0.0)
    p.add_argument("--default-caption", default="")
    p.add_argument("--trigger", default="")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable/too small images")
    p.add_argument("--cache-dir", help="cache latents and text embeddings on disk here")
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
    p.set_defaults(func=_cmd_train)

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
        "--free-gb", type=float, default=None, help="compare with this (default: free now)"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_estimate)

    from .demo import BASE_STEPS, DEMO_STEPS

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
    p.set_defaults(func=_cmd_demo)
    return parser


def one_line(text: str) -> str:
    """A multi-line message as one line (the CLI prints every error on one line)."""
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except LycorisError as exc:
        print(f"error: {type(exc).__name__}: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
