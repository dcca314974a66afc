"""The training commands: ``train`` (an adapter from images + captions) and ``demo`` (the
seed's config on a tiny Flux)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import IncompatibleModelError, LycorisError
from ..paths import check_output_file
from ..precisions import QUANTISED
from .base_args import base_files
from .estimate import estimate


def progress(desc: str, quiet: bool) -> tuple[Any, Any]:
    """A tqdm bar and an on_step callback feeding it (training: step, loss, lr)."""
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit="step", disable=quiet, file=sys.stderr)

    def on_step(info: Any) -> None:
        bar.total = info.total
        bar.set_postfix(loss=f"{info.smoothed_loss:.4f}", lr=f"{info.lr:.2e}", refresh=False)
        bar.update(info.step - bar.n)

    return bar, on_step


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import demo_base, run_demo

    out = Path(args.out)
    bar, on_step = progress("teaching the tiny base shapes", quiet=False)
    try:
        demo_base(out, seed=args.seed, steps=args.base_steps, on_step=on_step)
    finally:
        bar.close()
    bar, on_step = progress("training the demo", quiet=False)
    try:
        summary = run_demo(
            out, seed=args.seed, steps=args.steps, on_step=on_step, base_steps=args.base_steps
        )
    finally:
        bar.close()
    print(summary)
    return 0


def _dataset_spec(args: argparse.Namespace, model: Any) -> Any:
    """The training data the arguments describe (buckets in the model's size multiple)."""
    from ..training.dataset import DatasetSpec

    return DatasetSpec(
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


def _train_spec(args: argparse.Namespace, model: Any, config: Any) -> Any:
    """The whole training run the arguments describe."""
    from ..training.loop import TrainSpec
    from ..training.objectives import ObjectiveOptions

    return TrainSpec(
        base=model,
        config=config,
        dataset=_dataset_spec(args, model),
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


def _summary(result: Any) -> dict[str, Any]:
    """What ``--json`` prints about a finished (or stopped) run."""
    return {
        "adapter": result.adapter_path,
        "steps": result.steps_done,
        "completed": result.completed,
        "final_loss": result.losses[-1] if result.losses else None,
        "checkpoints": result.checkpoints,
        "seconds": round(result.seconds, 1),
        "layers": result.layers,
        "network_sha256": result.network_sha256,
    }


def cmd_train(args: argparse.Namespace) -> int:
    from ..config import LycorisConfig
    from ..memory import preflight
    from ..models import load_model
    from ..training.loop import train

    check_output_file(args.out, "--out")
    if not str(args.out).endswith(".safetensors"):  # the spec says so too, but after the load
        raise LycorisError(f"--out: output must be a .safetensors path, got {args.out!r}")
    config = LycorisConfig.from_file(args.config)  # before the model loads
    if args.base_precision in QUANTISED:
        from ..targeting import quantised_base_refusal

        why = quantised_base_refusal(config, args.base_precision)
        if why is not None:
            raise IncompatibleModelError(f"--base-precision {args.base_precision}: {why}")
    if not args.no_preflight and Path(args.base).is_dir():  # before anything loads
        print(preflight(estimate(args, "train")).summary(), file=sys.stderr)
    model = load_model(
        args.base,
        dtype=args.dtype,
        device=args.device,
        defer_text_encoders=args.cache_dir is not None,  # a cached run may never need them
        **base_files(args),
    )
    spec = _train_spec(args, model, config)
    bar, on_step = progress("training", quiet=args.json)
    try:
        result = train(spec, on_step=on_step)
    finally:
        bar.close()
    print(json.dumps(_summary(result), indent=2) if args.json else f"saved {result.adapter_path}")
    return 0
