"""The ``estimate`` command, and the memory estimate ``train`` prints before it loads."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..errors import LycorisError


def estimate(args: argparse.Namespace, mode: str) -> Any:
    """The memory estimate of the run `args` describe (train or estimate arguments), before
    anything loads (a diffusers folder: its safetensors headers and configs)."""
    from ..config import LycorisConfig
    from ..memory import Workload, estimate_memory

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
        base_precision=getattr(args, "base_precision", "auto"),
        free_bytes=None if free is None else int(free * 2**30),
    )


def cmd_estimate(args: argparse.Namespace) -> int:
    mode = "sample" if args.sample else "train"
    if mode == "train" and not args.config:
        raise LycorisError("estimate: a training estimate needs --config (or pass --sample)")
    est = estimate(args, mode)
    print(json.dumps(est.to_dict(), indent=2) if args.json else est.breakdown())
    return 0
