"""Load Checkpoint (LyCORIS): base models from ComfyUI's own model files, offline."""

from __future__ import annotations

import os
from typing import Any

from ..lycoris_core.checkpoints import VARIANTS
from ..lycoris_core.device import DTYPES, OFFLOAD_MODES
from ..lycoris_core.errors import ModelLoadError
from ..lycoris_core.models import load_model
from . import _host
from .handles import MODEL, LycorisNode, ModelHandle, base_precision_input

NONE = "(none)"
AUTO = "auto"
BASE_KINDS = ("checkpoints", "diffusion_models")
TEXT_KIND = "text_encoders"
VAE_KIND = "vae"


def base_choices() -> list[str]:
    kinds = BASE_KINDS if _host.IN_COMFY else (*BASE_KINDS, "unet")
    return [f"{k}/{n}" for k in kinds for n in _host.list_files(k, _host.SAFETENSORS)]


def _files(kind: str) -> list[str]:
    names = _host.list_files(kind, _host.SAFETENSORS)
    if not _host.IN_COMFY and kind == TEXT_KIND:  # ComfyUI maps clip/ into text_encoders
        names = sorted({*names, *_host.list_files("clip", _host.SAFETENSORS)})
    return [NONE, *names]


def _variants() -> list[str]:
    return [AUTO, *(v for vs in VARIANTS.values() for v in vs if v != "sdxl-refiner")]


def _resolve(kind: str, name: str) -> str:
    found = _host.resolve(kind, name)
    if found is None and kind == TEXT_KIND and not _host.IN_COMFY:
        found = _host.resolve("clip", name)
    if found is None:
        raise ModelLoadError(f"{kind}/{name}: not found in ComfyUI's model folders; refresh")
    return str(found)


class LoadCheckpointLycoris(LycorisNode):
    DESCRIPTION = (
        "Load a base model from ComfyUI's own files, offline: a checkpoint (SD1.x/2.x, SDXL, "
        "SD3/3.5 with text encoders and VAE inside) or a diffusion model (Flux, SD3) with its "
        "text encoder files and VAE, as UNETLoader / DualCLIPLoader / VAELoader take them. "
        "fp16/bf16/fp8 and ComfyUI's scaled fp8 files load as stored; family, variant and "
        "storage show under the node."
    )
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The base model, with no LyCORIS applied yet.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        te_tip = "A text encoder file (clip_l, clip_g, t5xxl); (none) = the checkpoint's own."
        return {
            "required": {
                "base": (base_choices(), {"tooltip": "A checkpoint or a diffusion model file."}),
                "dtype": (
                    list(DTYPES),
                    {"default": "auto", "tooltip": "Compute dtype; auto: bf16/fp16 on GPU."},
                ),
                "device": (
                    ["auto", "cuda", "mps", "cpu"],
                    {"default": "auto", "tooltip": "auto: cuda > mps > cpu."},
                ),
                "fp8": (
                    ["keep", "upcast"],
                    {
                        "default": "keep",
                        "tooltip": "fp8 files: keep fp8 storage (less memory) or upcast to dtype.",
                    },
                ),
            },
            "optional": {
                "text_encoder_1": (_files(TEXT_KIND), {"default": NONE, "tooltip": te_tip}),
                "text_encoder_2": (_files(TEXT_KIND), {"default": NONE, "tooltip": te_tip}),
                "text_encoder_3": (_files(TEXT_KIND), {"default": NONE, "tooltip": te_tip}),
                "vae": (
                    _files(VAE_KIND),
                    {"default": NONE, "tooltip": "A VAE file; (none) = the checkpoint's own."},
                ),
                "variant": (
                    _variants(),
                    {
                        "default": AUTO,
                        "tooltip": "auto: detected; SD2 768-v vs 512 base cannot be told: pick sd2 + prediction.",
                    },
                ),
                "prediction": (
                    [AUTO, "v_prediction", "epsilon"],
                    {
                        "default": AUTO,
                        "tooltip": "SD2.x only; auto = v_prediction (the 768 models).",
                    },
                ),
                "tokenizers": (
                    [AUTO, *_host.list_tokenizer_sets()],
                    {
                        "default": AUTO,
                        "tooltip": "auto: ComfyUI's own CLIP/T5 tokenizers; or a folder in "
                        "models/tokenizers (e.g. a model's diffusers tokenizer*/ folders).",
                    },
                ),
                "offload": (
                    list(OFFLOAD_MODES),
                    {
                        "default": "none",
                        "tooltip": "Move weights to the GPU only when used (less VRAM, slower).",
                    },
                ),
                "base_precision": base_precision_input(),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, base: str) -> bool | str:
        if base not in base_choices():
            return f"base {base!r} is not in ComfyUI's checkpoints or diffusion_models; refresh"
        return True

    @classmethod
    def IS_CHANGED(cls, base: str, **kwargs: Any) -> str:
        """A changed file (size, time) loads again; ComfyUI caches identical inputs."""
        stamps = []
        for kind, name in [
            tuple(base.split("/", 1)),
            *[(TEXT_KIND, kwargs.get(f"text_encoder_{i}", NONE)) for i in (1, 2, 3)],
            (VAE_KIND, kwargs.get("vae", NONE)),
        ]:
            path = _host.resolve(kind, name) if name != NONE else None
            if path is not None and path.is_file():
                st = os.stat(path)
                stamps.append(f"{path}:{st.st_size}:{st.st_mtime_ns}")
        return "|".join(stamps)

    def run(
        self,
        base: str,
        dtype: str,
        device: str,
        fp8: str,
        text_encoder_1: str = NONE,
        text_encoder_2: str = NONE,
        text_encoder_3: str = NONE,
        vae: str = NONE,
        variant: str = AUTO,
        prediction: str = AUTO,
        tokenizers: str = AUTO,
        offload: str = "none",
        base_precision: str = "auto",
    ) -> dict[str, Any]:
        kind, _, name = base.partition("/")
        path = _resolve(kind, name)
        encoders = [
            _resolve(TEXT_KIND, n)
            for n in (text_encoder_1, text_encoder_2, text_encoder_3)
            if n != NONE
        ]
        vae_path = _resolve(VAE_KIND, vae) if vae != NONE else None
        free = _host.free_host_memory()
        if free is not None:
            free()
        loaded = load_model(
            path,
            dtype=dtype,
            device=device,
            offload=offload,
            text_encoders=encoders,
            vae=vae_path,
            tokenizer_dirs=_host.tokenizer_folders(None if tokenizers == AUTO else tokenizers),
            fp8=fp8,
            variant=None if variant == AUTO else variant,
            prediction_type=None if prediction == AUTO else prediction,
            base_precision=base_precision,
        )
        text = f"{loaded.family.label}: {loaded.description}"
        if loaded.quantised and base_precision != "auto":
            text += f"; stored {loaded.storage}"
        return {"ui": {"text": [text]}, "result": (ModelHandle(loaded),)}
