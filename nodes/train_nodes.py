"""Nodes for training: the Train node (with checkpoints, validation, live events) and a loss
plot."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..lycoris_core import load_adapter, schema
from ..lycoris_core.limits import MAX_STRENGTH
from ..lycoris_core.memory import MemoryPreflightError
from ..lycoris_core.paths import output_child
from ..lycoris_core.plots import loss_curve_image, to_image_tensor
from ..lycoris_core.training import DatasetSpec, TrainSpec, TrainStepInfo
from ..lycoris_core.training.job import TrainJob, latest_checkpoint, prompts_from_text, summarize
from ..lycoris_core.training.optim import OPTIMIZERS, SCHEDULERS
from . import _host
from .handles import (
    ADAPTER,
    CONFIG,
    DATASET,
    MODEL,
    OUTPUT_SUBFOLDER,
    LycorisNode,
    ModelHandle,
    check_output_name,
)


def _save_previews(images: torch.Tensor, stem: str) -> list[dict[str, str]]:
    """Validation images as PNGs in ComfyUI's temp folder, as /view references."""
    from PIL import Image

    folder = _host.temp_dir() / "lycoris"
    folder.mkdir(parents=True, exist_ok=True)
    refs = []
    for i, image in enumerate(images):
        name = f"{stem}-{i}.png"
        array = (image.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        Image.fromarray(array).save(folder / name)
        refs.append(dict(zip(schema.IMAGE_REF_KEYS, (name, "lycoris", "temp"), strict=True)))
    return refs


def _empty_image() -> torch.Tensor:
    return torch.zeros(1, 64, 64, 3)


def _train_spec(
    model: ModelHandle, config: Any, dataset: DatasetSpec, out: Path, params: dict[str, Any]
) -> TrainSpec:
    """The Train node's widgets as a training spec (widget names are the node's public API)."""
    return TrainSpec(
        base=model.model,
        config=config,
        dataset=dataset,
        output=str(out),
        steps=params["steps"],
        batch_size=params["batch_size"],
        lr=params["learning_rate"],
        optimizer=params["optimizer"],
        scheduler=params["scheduler"],
        mixed_precision=params["precision"],
        gradient_checkpointing=params["gradient_checkpointing"],
        save_every=params["save_every"],
        validation_prompts=prompts_from_text(params["validation_prompt"]),
        validation_every=params["validation_every"],
        validation_lycoris_strength=params["validation_lycoris_strength"],
        seed=params["seed"],
        resume=str(out) if params["resume"] else None,
    )


def _reporters(steps: int, stem: str, node: str | None) -> tuple[Callable, Callable]:
    """The Train node's ``on_step`` (events, status line, progress bar: the bar raises the
    host's interrupt on Cancel) and ``on_validation`` (thumbnails) callbacks."""
    bar = _host.Progress(steps, node)

    def on_step(info: TrainStepInfo) -> None:
        _host.send_event(schema.TRAIN_EVENT, schema.step_event(info), node)
        _host.send_text(
            node,
            f"step {info.step}/{info.total}  loss {info.smoothed_loss:.4f}  "
            f"{info.it_per_s:.2f} it/s  eta {info.eta:.0f} s",
        )
        bar.update(info.step, info.total)

    def on_validation(step: int, images: torch.Tensor) -> None:
        refs = _save_previews(images, f"{stem}-step{step:06d}")
        _host.send_event(schema.TRAIN_EVENT, schema.validation_event(step, refs), node)

    return on_step, on_validation


def _outputs(adapter: Any, path: Path, summary: dict, validation: Any) -> dict[str, Any]:
    curve = to_image_tensor(loss_curve_image(summary.get("losses") or []))
    text = json.dumps(summary)
    ui = schema.train_ui(text, str(path), summary.get("final_loss"))
    images = validation if validation is not None else _empty_image()
    return {"ui": ui, "result": (adapter, str(path), curve, images, text)}


class TrainLycoris(LycorisNode):
    DESCRIPTION = (
        "Train a LyCORIS adapter with the seed's config format. Saves into models/loras/lycoris: "
        "checkpoints every N steps, validation images at validation_lycoris_strength, a live loss "
        "chart on the node; Cancel keeps a resumable checkpoint (turn on 'resume' to continue). "
        "A finished run with the same inputs is reused instead of retrained."
    )
    OUTPUT_NODE = True
    RETURN_TYPES = (ADAPTER, "STRING", "IMAGE", "IMAGE", "STRING")
    RETURN_NAMES = ("adapter", "path", "loss_curve", "validation", "summary")
    OUTPUT_TOOLTIPS = (
        "The trained adapter (connect to Apply LyCORIS).",
        "Where it was saved.",
        "The loss curve.",
        "The last validation images (black when none).",
        "A JSON summary: steps, losses, checkpoints, timings.",
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": (
                    MODEL,
                    {"tooltip": "The base model (its LyCORIS stack is not used for training)."},
                ),
                "config": (CONFIG, {"tooltip": "The LyCORIS config."}),
                "dataset": (DATASET, {"tooltip": "Images and captions."}),
                "output_name": (
                    "STRING",
                    {"default": "my_lycoris", "tooltip": "File name in models/loras/lycoris."},
                ),
                "steps": (
                    "INT",
                    {"default": 1000, "min": 1, "max": 1000000, "tooltip": "Optimizer steps."},
                ),
                "learning_rate": (
                    "FLOAT",
                    {
                        "default": 1e-4,
                        "min": 1e-7,
                        "max": 1.0,
                        # the frontend rounds a typed FLOAT to the decimals of its step
                        "step": 1e-7,
                        "tooltip": "Peak learning rate (e.g. 1e-4 for AdamW, 1.0 for Prodigy).",
                    },
                ),
                "batch_size": (
                    "INT",
                    {
                        "default": 1,
                        "min": 1,
                        "max": 64,
                        "tooltip": "Images per step (same bucket).",
                    },
                ),
                "optimizer": (
                    list(OPTIMIZERS),
                    {
                        "default": "adamw",
                        "tooltip": "adamw8bit needs bitsandbytes, prodigy needs prodigyopt.",
                    },
                ),
                "scheduler": (
                    list(SCHEDULERS),
                    {"default": "constant", "tooltip": "Learning-rate schedule (diffusers)."},
                ),
                "precision": (
                    ["no", "bf16", "fp16"],
                    {"default": "bf16", "tooltip": "Mixed precision (autocast); 'no' on CPU."},
                ),
                "gradient_checkpointing": (
                    "BOOLEAN",
                    {"default": False, "tooltip": "Less memory, slower steps."},
                ),
                "save_every": (
                    "INT",
                    {
                        "default": 250,
                        "min": 0,
                        "max": 1000000,
                        "tooltip": "Checkpoint every N steps (0: only at the end).",
                    },
                ),
                "validation_prompt": (
                    "STRING",
                    {
                        "multiline": True,
                        "default": "",
                        "tooltip": "One prompt per line; empty: no validation.",
                    },
                ),
                "validation_every": (
                    "INT",
                    {
                        "default": 250,
                        "min": 0,
                        "max": 1000000,
                        "tooltip": "Validation images every N steps.",
                    },
                ),
                "validation_lycoris_strength": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": -MAX_STRENGTH,
                        "max": MAX_STRENGTH,
                        "step": 0.05,
                        "tooltip": "The seed's field: adapter strength for validation images.",
                    },
                ),
                "seed": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 2**31 - 1,
                        # fixed: a run is reproducible and an unchanged graph reuses its file
                        # (the frontend would add a 'randomize' control to any INT "seed")
                        "control_after_generate": False,
                        "tooltip": "Training seed (noise, timesteps, shuffling).",
                    },
                ),
                "resume": (
                    "BOOLEAN",
                    {"default": False, "tooltip": "Continue from this output's latest checkpoint."},
                ),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, output_name: str | None) -> bool | str:
        return check_output_name(output_name, "output_name") or True

    def run(
        self,
        model: ModelHandle,
        config: Any,
        dataset: DatasetSpec,
        output_name: str,
        unique_id: str | None = None,
        **params: Any,
    ) -> dict[str, Any]:
        folder = _host.primary_folder("loras") / OUTPUT_SUBFOLDER
        out = output_child(folder, output_name, "output_name", ".safetensors")
        job = TrainJob.prepare(_train_spec(model, config, dataset, out, params), model.describe())
        if job.reused is not None:
            return _outputs(load_adapter(out), out, job.reused, None)
        on_step, on_validation = _reporters(job.spec.steps, output_name, unique_id)
        free = _host.free_host_memory()
        if free is not None:
            free()
        model.model.restore_base()
        try:  # the memory preflight: its figure in the status line; refused if clearly too big
            estimate = job.preflight(_host.free_memory_override())
        except MemoryPreflightError as exc:
            _host.send_text(unique_id, str(exc).splitlines()[0])
            raise
        _host.send_text(unique_id, estimate.summary())
        try:
            result = job.run(on_step, _host.interrupted, on_validation)
        except _host.interrupt_exception():  # Cancel during a step: its checkpoint is saved
            cancelled = schema.cancelled_event(latest_checkpoint(out))
            _host.send_event(schema.TRAIN_EVENT, cancelled, unique_id)
            raise
        summary = summarize(result)
        last = result.validation[-1][1] if result.validation else None
        if not result.completed:  # Cancel noticed between steps: keep the checkpoint, report it
            cancelled = schema.cancelled_event(result.checkpoints[-1])
            _host.send_event(schema.TRAIN_EVENT, cancelled, unique_id)
            _host.raise_if_interrupted()
            path = Path(result.adapter_path)
            return _outputs(load_adapter(path), path, summary, last)
        _host.send_event(schema.TRAIN_EVENT, schema.done_event(str(out)), unique_id)
        return _outputs(result.adapter, out, summary, last)


class LossPlot(LycorisNode):
    DESCRIPTION = "Draw the loss curve of a Train LyCORIS summary as an IMAGE."
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The loss curve (raw and smoothed).",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "summary": (
                    "STRING",
                    {"forceInput": True, "tooltip": "The summary output of Train LyCORIS."},
                ),
                "width": (
                    "INT",
                    {"default": 640, "min": 128, "max": 4096, "tooltip": "Image width."},
                ),
                "height": (
                    "INT",
                    {"default": 360, "min": 96, "max": 4096, "tooltip": "Image height."},
                ),
            }
        }

    def run(self, summary: str, width: int, height: int) -> tuple[torch.Tensor]:
        try:
            losses = json.loads(summary).get("losses", [])
        except (json.JSONDecodeError, AttributeError):
            from ..lycoris_core.errors import LycorisError

            raise LycorisError(
                "LyCORIS Loss Plot: 'summary' is not the JSON summary of Train LyCORIS"
            ) from None
        return (to_image_tensor(loss_curve_image(losses, width, height)),)
