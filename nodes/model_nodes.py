"""Nodes for base models: load, apply LyCORIS at a strength, sample, save merged."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from ..lycoris_core.device import DTYPES, OFFLOAD_MODES
from ..lycoris_core.limits import MAX_SAMPLING_STEPS, MAX_STRENGTH
from ..lycoris_core.memory import Workload, estimate_memory, preflight
from ..lycoris_core.models import from_pipeline, load_model, save_merged
from ..lycoris_core.patching import MODES
from ..lycoris_core.paths import output_child
from ..lycoris_core.previews import step_preview
from ..lycoris_core.sampling import SamplingCancelled, StepInfo, sample
from ..lycoris_core.tiny import FAMILIES as TINY_FAMILIES
from ..lycoris_core.tiny import build_pipeline
from . import _host
from .handles import (
    ADAPTER,
    MODEL,
    LycorisNode,
    ModelHandle,
    base_precision_input,
    check_output_name,
)

logger = logging.getLogger(__name__)

DEMO_PREFIX = "demo: tiny-"
FILE_PREFIX = "file: "
NONE = "(none)"


def model_choices() -> list[str]:
    files = [
        FILE_PREFIX + f"{kind}/{name}"
        for kind in ("checkpoints", "diffusion_models", "unet")
        for name in _host.list_files(kind, _host.SAFETENSORS)
    ]
    return _host.list_diffusers_folders() + files + [DEMO_PREFIX + f for f in TINY_FAMILIES]


class LoadDiffusersModel(LycorisNode):
    DESCRIPTION = (
        "Load a diffusers pipeline (SD1.x/2.x, SDXL, SD3, Flux) from ComfyUI's models/diffusers "
        "folder, a single .safetensors file (with a diffusers config folder, or on its own: see "
        "Load Checkpoint (LyCORIS) for split sets), or a built-in tiny "
        "demo model (a random denoiser for trying workflows; its VAE's latents are the picture "
        "at half size, so decoded images show what the denoiser draws)."
    )
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The base model, with no LyCORIS applied yet.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": (
                    model_choices(),
                    {"tooltip": "A diffusers folder, a single file ('file: ...'), or a demo."},
                ),
                "dtype": (
                    list(DTYPES),
                    {"default": "auto", "tooltip": "auto: bf16/fp16 on GPU, fp32 on CPU."},
                ),
                "device": (
                    ["auto", "cuda", "mps", "cpu"],
                    {"default": "auto", "tooltip": "auto: cuda > mps > cpu."},
                ),
                "offload": (
                    list(OFFLOAD_MODES),
                    {
                        "default": "none",
                        "tooltip": "Move weights to the GPU only when used (less VRAM, slower).",
                    },
                ),
            },
            "optional": {
                "config_folder": (
                    [NONE, *_host.list_diffusers_folders()],
                    {
                        "default": NONE,
                        "tooltip": "For a single file (optional): a diffusers folder with its "
                        "configs; without one, the file is read on its own (offline).",
                    },
                ),
                "base_precision": base_precision_input(),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, model: str | None, config_folder: str | None = NONE) -> bool | str:
        if model is None or config_folder is None:
            return True  # a linked input: checked when the node runs
        if model not in model_choices():
            return f"model {model!r} is not in ComfyUI's model folders; refresh the node list"
        return True

    def run(
        self,
        model: str,
        dtype: str,
        device: str,
        offload: str,
        config_folder: str = NONE,
        base_precision: str = "auto",
    ) -> tuple[ModelHandle]:
        free = _host.free_host_memory()
        if free is not None:
            free()
        if model.startswith(DEMO_PREFIX):
            family = model[len(DEMO_PREFIX) :]
            with torch.inference_mode(False):  # trainable weights (ComfyUI runs nodes in it)
                pipe = build_pipeline(family)
            loaded = from_pipeline(
                pipe,
                model,
                dtype=dtype,
                device=device,
                offload=offload,
                base_precision=base_precision,
            )
            return (ModelHandle(loaded),)
        cfg = None if config_folder == NONE else _host.resolve("diffusers", config_folder)
        if model.startswith(FILE_PREFIX):
            kind, _, name = model[len(FILE_PREFIX) :].partition("/")
            path = _host.resolve(kind, name)
        else:
            path = _host.resolve("diffusers", model)
        if path is None:
            from ..lycoris_core.errors import ModelLoadError

            raise ModelLoadError(f"{model}: not found in ComfyUI's model folders; refresh the list")
        loaded = load_model(
            path,
            config_dir=cfg,
            dtype=dtype,
            device=device,
            offload=offload,
            tokenizer_dirs=_host.tokenizer_folders(),
            base_precision=base_precision,
        )
        return (ModelHandle(loaded),)


class ApplyLycoris(LycorisNode):
    DESCRIPTION = (
        "Put a LyCORIS adapter on a model at a strength. Chain several to stack them. Nothing "
        "changes until a sampler or trainer runs; the base model is restored exactly afterwards."
    )
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with this adapter added to its stack.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": (MODEL, {"tooltip": "The model (possibly already carrying adapters)."}),
                "adapter": (ADAPTER, {"tooltip": "The LyCORIS file to apply."}),
                "strength": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": -MAX_STRENGTH,
                        "max": MAX_STRENGTH,
                        "step": 0.01,
                        "tooltip": "LyCORIS' own multiplier semantics; 0 = off, negative inverts.",
                    },
                ),
                "mode": (
                    list(MODES),
                    {
                        "default": "merge",
                        "tooltip": "merge: fastest sampling; dynamic: weights untouched (the whole stack uses the last mode chosen).",
                    },
                ),
            },
            "optional": {
                "strength_clip": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": -MAX_STRENGTH,
                        "max": MAX_STRENGTH,
                        "step": 0.01,
                        "tooltip": "Strength of the file's text-encoder layers (kohya lora_te*, text_encoder*.), like ComfyUI's strength_clip. Files without such layers ignore it. A workflow saved before this input existed uses the strength.",
                    },
                ),
            },
        }

    def run(
        self,
        model: ModelHandle,
        adapter: Any,
        strength: float,
        mode: str,
        strength_clip: float | None = None,
    ) -> tuple[ModelHandle]:
        return (model.with_adapter(adapter, strength, mode, strength_clip),)


def _sample_progress(model: ModelHandle, steps: int, node: str | None) -> Callable:
    """The Sample node's ``on_step``: the progress bar (it raises the host's interrupt on
    Cancel) with a step preview when the host shows them."""
    bar = _host.Progress(steps, node)
    size = _host.preview_size()

    def on_step(info: StepInfo) -> None:
        nonlocal size
        image = None
        if size:
            try:
                latents = info.denoised if info.denoised is not None else info.latents
                image = step_preview(model.model, latents)
            except Exception as exc:  # a preview never stops the sampling
                logger.warning("step previews off for this run: %s", exc)
                size = None
        bar.update(info.step, info.total, ("JPEG", image, size) if image else None)

    return on_step


def _sample_preflight(
    model: ModelHandle, width: int, height: int, batch: int, guidance: float, node: str | None
) -> None:
    """The memory estimate of a sampling run in the status line; refused if clearly too big."""
    cfg = model.model.family.name != "flux" and guidance > 1.0  # Flux's guidance is distilled
    work = Workload(
        mode="sample", width=width, height=height, batch_size=batch, guidance_batches=1 + cfg
    )
    estimate = estimate_memory(model.model, work, free_bytes=_host.free_memory_override())
    _host.send_text(node, estimate.summary())
    preflight(estimate)


class SampleLycoris(LycorisNode):
    DESCRIPTION = (
        "Sample images with the model and its LyCORIS stack. Returns ComfyUI IMAGEs (connect to "
        "Save Image, Preview Image, upscalers). Image i of a batch uses seed + i. Cancel works "
        "between steps. With ComfyUI's --preview-method set, each step shows a preview (a "
        "latent-to-RGB map fitted to the model's VAE)."
    )
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("The sampled images, [batch, height, width, 3] in 0..1.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": (MODEL, {"tooltip": "The model and its LyCORIS stack."}),
                "prompt": (
                    "STRING",
                    {"multiline": True, "default": "", "tooltip": "What to draw."},
                ),
                "negative_prompt": (
                    "STRING",
                    {
                        "multiline": True,
                        "default": "",
                        "tooltip": "What to avoid (ignored by Flux).",
                    },
                ),
                "width": (
                    "INT",
                    {
                        "default": 1024,
                        "min": 16,
                        "max": 8192,
                        "step": 8,
                        "tooltip": "A multiple of 16 for Flux/SD3, 8 for SD1.x/SDXL.",
                    },
                ),
                "height": (
                    "INT",
                    {
                        "default": 1024,
                        "min": 16,
                        "max": 8192,
                        "step": 8,
                        "tooltip": "A multiple of 16 for Flux/SD3, 8 for SD1.x/SDXL.",
                    },
                ),
                "steps": (
                    "INT",
                    {
                        "default": 28,
                        "min": 1,
                        "max": MAX_SAMPLING_STEPS,
                        "tooltip": "Denoising steps.",
                    },
                ),
                "guidance": (
                    "FLOAT",
                    {
                        "default": 3.5,
                        "min": 0.0,
                        "max": 100.0,
                        "step": 0.1,
                        "tooltip": "Guidance scale (Flux: distilled guidance).",
                    },
                ),
                "seed": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 0xFFFFFFFFFFFFFFF,
                        "control_after_generate": True,
                        "tooltip": "Seed of the first image; image i uses seed + i.",
                    },
                ),
                "batch_size": (
                    "INT",
                    {"default": 1, "min": 1, "max": 64, "tooltip": "Images per run."},
                ),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def run(
        self,
        model: ModelHandle,
        prompt: str,
        negative_prompt: str,
        width: int,
        height: int,
        steps: int,
        guidance: float,
        seed: int,
        batch_size: int,
        unique_id: str | None = None,
    ) -> tuple[Any]:
        _sample_preflight(model, width, height, batch_size, guidance, unique_id)
        try:
            images = sample(
                model.model,
                list(model.adapters),
                mode=model.mode,
                prompt=prompt,
                negative_prompt=negative_prompt,
                width=width,
                height=height,
                steps=steps,
                guidance=guidance,
                seed=seed,
                batch_size=batch_size,
                on_step=_sample_progress(model, steps, unique_id),
                should_stop=_host.interrupted,
            )
        except SamplingCancelled:  # ComfyUI shows its interrupt as "interrupted", not an error
            _host.raise_if_interrupted()
            raise
        return (images,)


class SaveMergedModel(LycorisNode):
    DESCRIPTION = (
        "Save the model with its LyCORIS stack baked in as a diffusers folder in models/diffusers "
        "(the seed's save_pretrained step). Written to a temporary folder, then renamed."
    )
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_TOOLTIPS = ("The folder written.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": (MODEL, {"tooltip": "The model and the adapters to bake in."}),
                "folder_name": (
                    "STRING",
                    {
                        "default": "merged-lycoris",
                        "tooltip": "New folder name inside models/diffusers.",
                    },
                ),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, folder_name: str | None) -> bool | str:
        return check_output_name(folder_name, "folder_name") or True

    def run(self, model: ModelHandle, folder_name: str) -> dict[str, Any]:
        target = output_child(_host.primary_folder("diffusers"), folder_name, "folder_name")
        path = save_merged(model.model, list(model.adapters), target)
        return {"ui": {"text": [str(path)]}, "result": (str(path),)}
