"""Nodes for LyCORIS configs and files: build/load a config, load/save/inspect adapters."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..lycoris_core import LycorisConfig, coverage, load_adapter
from ..lycoris_core.config import ALGOS, SEED_EXAMPLE, algo_supports
from ..lycoris_core.errors import AdapterFormatError, ConfigError
from ..lycoris_core.paths import output_child
from ..lycoris_core.report import describe, format_report
from ..lycoris_core.save_layouts import LAYOUTS, save_adapter
from . import _host
from .handles import (
    ADAPTER,
    CONFIG,
    MODEL,
    OUTPUT_SUBFOLDER,
    LycorisNode,
    ModelHandle,
    check_output_name,
)


def _json_field(text: str, name: str) -> dict:
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"LyCORIS Config node: '{name}' is not valid JSON (line {exc.lineno} column "
            f'{exc.colno}: {exc.msg}); write a JSON object like {{"factor": 4}}'
        ) from None
    except (RecursionError, ValueError) as exc:  # nested too deep, an integer too long
        raise ConfigError(
            f"LyCORIS Config node: '{name}' cannot be read ({type(exc).__name__}); write a "
            'small JSON object like {"factor": 4}'
        ) from None
    if not isinstance(value, dict):
        raise ConfigError(f"LyCORIS Config node: '{name}' must be a JSON object, got {value!r}")
    return value


_ALGO = SEED_EXAMPLE["algo"]  # the node's default: the seed's example


def config_from_widgets(
    algo: str,
    multiplier: float,
    linear_dim: int,
    linear_alpha: float,
    factor: int,
    target_modules: str,
    module_algo_map: str,
    extra: str,
) -> LycorisConfig:
    d: dict[str, Any] = {
        "algo": algo,
        "multiplier": multiplier,
        "linear_dim": linear_dim,
        "linear_alpha": linear_alpha,
    }
    if algo_supports(algo, "factor"):  # lycoris' SDK: the algorithms that read `factor`
        d["factor"] = factor
    d.update(_json_field(extra, "extra"))
    preset: dict[str, Any] = {}
    targets = [t.strip() for t in target_modules.split(",") if t.strip()]
    if targets:
        preset["target_module"] = targets
    algo_map = _json_field(module_algo_map, "module_algo_map")
    if algo_map:
        preset["module_algo_map"] = algo_map
    if preset:
        d["apply_preset"] = {**d.get("apply_preset", {}), **preset}
    return LycorisConfig.from_dict(d, source="LyCORIS Config node")


def _coverage_text(model: ModelHandle | None, config: LycorisConfig) -> str:
    head = config.to_json()
    if model is None:
        return head
    return (
        head
        + "\n\non "
        + model.model.source
        + ":\n"
        + coverage(model.model.denoiser, config).summary()
    )


class _ConfigNode(LycorisNode):
    """What both config nodes return."""

    RETURN_TYPES = (CONFIG, "STRING")
    RETURN_NAMES = ("config", "coverage")
    OUTPUT_TOOLTIPS = ("The validated config.", "The config JSON and, with a model, what it wraps.")


class LycorisConfigNode(_ConfigNode):
    DESCRIPTION = (
        "Build a LyCORIS config (the seed's lycoris_config.json format) from widgets. Connect a "
        "model to see which modules it wraps. Unknown keys or wrong types are errors with a fix."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "algo": (list(ALGOS), {"default": _ALGO, "tooltip": "The LyCORIS algorithm."}),
                "multiplier": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": -10.0,
                        "max": 10.0,
                        "step": 0.05,
                        "tooltip": "Training multiplier; keep 1.0 unless you know why.",
                    },
                ),
                "linear_dim": (
                    "INT",
                    {
                        "default": 10000,
                        "min": 1,
                        "max": 100000,
                        "tooltip": "Rank; LoKr: 10000 = full matrix (as the seed's example).",
                    },
                ),
                "linear_alpha": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0,
                        "max": 100000.0,
                        "step": 0.5,
                        "tooltip": "Alpha; the scale is alpha / rank (ignored by full-matrix LoKr).",
                    },
                ),
                "factor": (
                    "INT",
                    {
                        "default": 10,
                        "min": -1,
                        "max": 4096,
                        "tooltip": "LoKr only: Kronecker factor (-1 = most balanced).",
                    },
                ),
                "target_modules": (
                    "STRING",
                    {
                        "default": "Attention, FeedForward",
                        "tooltip": "Module class names to wrap, comma separated ('Attention' also matches FluxAttention).",
                    },
                ),
                "module_algo_map": (
                    "STRING",
                    {
                        "multiline": True,
                        "default": '{"Attention": {"factor": 10}, "FeedForward": {"factor": 4}}',
                        "tooltip": 'JSON: per-class overrides, e.g. {"FeedForward": {"factor": 4}}.',
                    },
                ),
                "extra": (
                    "STRING",
                    {
                        "multiline": True,
                        "default": "{}",
                        "tooltip": 'JSON: any other lycoris keyword, e.g. {"dora_wd": true}.',
                    },
                ),
            },
            "optional": {
                "model": (
                    MODEL,
                    {"tooltip": "Optional: report the modules this config wraps on this model."},
                )
            },
        }

    @classmethod
    def VALIDATE_INPUTS(
        cls,
        algo: str,
        multiplier: float,
        linear_dim: int,
        linear_alpha: float,
        factor: int,
        target_modules: str,
        module_algo_map: str,
        extra: str,
    ) -> bool | str:
        # Named arguments only: ComfyUI skips its own min/max/combo checks for the inputs a
        # VALIDATE_INPUTS names (all of them with **kwargs); LycorisConfig checks these fully.
        widgets = dict(locals())
        widgets.pop("cls")
        if any(v is None for v in widgets.values()):
            return True  # a linked widget: checked when the node runs
        try:
            config_from_widgets(**widgets)
        except ConfigError as exc:
            return str(exc)
        return True

    def run(self, model: ModelHandle | None = None, **widgets: Any) -> tuple[LycorisConfig, str]:
        config = config_from_widgets(**widgets)
        return config, _coverage_text(model, config)


class LoadLycorisConfig(_ConfigNode):
    DESCRIPTION = (
        "Load a lycoris_config.json (the seed's format) from ComfyUI's models/lycoris_configs "
        "folder, or from a path. Validated: errors name the file and the JSON path."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "config_file": (
                    ["(use path)", *_host.list_files(_host.CONFIG_FOLDER, _host.CONFIG_EXTENSIONS)],
                    {"tooltip": "A file in models/lycoris_configs."},
                ),
                "path": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "Or a full path to a lycoris_config.json (used when set).",
                    },
                ),
            },
            "optional": {
                "model": (MODEL, {"tooltip": "Optional: report the modules this config wraps."})
            },
        }

    @classmethod
    def IS_CHANGED(cls, config_file: str, path: str, **kwargs: Any) -> str:
        p = cls._path(config_file, path)
        return f"{p}:{p.stat().st_mtime_ns}:{p.stat().st_size}" if p and p.is_file() else str(p)

    @staticmethod
    def _path(config_file: str, path: str) -> Path | None:
        if isinstance(path, str) and path.strip():
            return Path(os.path.expanduser(path.strip()))
        return _host.resolve(_host.CONFIG_FOLDER, config_file)

    def run(self, config_file: str, path: str, model: ModelHandle | None = None) -> tuple[Any, str]:
        p = self._path(config_file, path)
        if p is None:
            raise ConfigError(
                f"{config_file}: not found in models/{_host.CONFIG_FOLDER}; put the file there or set 'path'"
            )
        config = LycorisConfig.from_file(p)
        return config, _coverage_text(model, config)


class LoadLycoris(LycorisNode):
    DESCRIPTION = (
        "Load a LyCORIS/LoRA .safetensors file from ComfyUI's loras folder (our trained files "
        "are in loras/lycoris). Every algorithm lycoris 4.x saves; pickle files are refused."
    )
    RETURN_TYPES = (ADAPTER,)
    RETURN_NAMES = ("adapter",)
    OUTPUT_TOOLTIPS = ("The adapter, ready for Apply LyCORIS.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "lycoris_name": (
                    _host.list_files("loras", _host.SAFETENSORS),
                    {"tooltip": "A file in models/loras."},
                )
            }
        }

    @classmethod
    def IS_CHANGED(cls, lycoris_name: str) -> str:
        p = _host.resolve("loras", lycoris_name)
        if p is None:
            return lycoris_name
        st = p.stat()
        return f"{lycoris_name}:{st.st_size}:{st.st_mtime_ns}"

    @classmethod
    def VALIDATE_INPUTS(cls, lycoris_name: str | None) -> bool | str:
        if lycoris_name is not None and _host.resolve("loras", lycoris_name) is None:
            return (
                f"LyCORIS file {lycoris_name!r} is not in the loras folder; refresh the node list"
            )
        return True

    def run(self, lycoris_name: str) -> tuple[Any]:
        path = _host.resolve("loras", lycoris_name)
        if path is None:  # also a linked name, which VALIDATE_INPUTS did not see
            raise AdapterFormatError(
                f"LyCORIS file {lycoris_name!r} is not in the loras folder; refresh the node list"
            )
        return (load_adapter(path),)


def _stem(file_name: Any) -> Any:
    return file_name.removesuffix(".safetensors") if isinstance(file_name, str) else file_name


class SaveLycoris(LycorisNode):
    DESCRIPTION = (
        "Save an adapter (tensors and metadata) into models/loras/lycoris/<name>.safetensors, "
        "in our layout (default) or, with the model connected, kohya/ComfyUI's (lora_unet_ + "
        "ldm/BFL/SAI names; Flux/SD3 qkv LoRAs fused exactly)."
    )
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_TOOLTIPS = ("The file written.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "adapter": (ADAPTER, {"tooltip": "The adapter to save."}),
                "file_name": (
                    "STRING",
                    {
                        "default": "my_lycoris",
                        "tooltip": "File name (without folder), .safetensors is added.",
                    },
                ),
            },
            "optional": {
                "layout": (
                    list(LAYOUTS),
                    {
                        "default": LAYOUTS[0],
                        "tooltip": "lycoris: our names (lycoris_ + diffusers paths), as trained. "
                        "kohya: lora_unet_ + the model's original names (ldm for SD1.x/SDXL, "
                        "BFL for Flux with fused qkv/linear1, SAI for SD3), as kohya and most "
                        "Civitai files; needs the model.",
                    },
                ),
                "model": (
                    MODEL,
                    {"tooltip": "The model the adapter is for (its names for layout kohya)."},
                ),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, file_name: str | None) -> bool | str:
        return check_output_name(_stem(file_name), "file_name") or True

    def run(
        self,
        adapter: Any,
        file_name: str,
        layout: str = LAYOUTS[0],
        model: ModelHandle | None = None,
    ) -> dict[str, Any]:
        folder = _host.primary_folder("loras") / OUTPUT_SUBFOLDER
        target = output_child(folder, _stem(file_name), "file_name", ".safetensors")
        denoiser = family = None
        if model is not None:
            denoiser, family = model.model.denoiser, model.model.family.name
        save_adapter(adapter, target, layout, denoiser=denoiser, family=family)
        return {"ui": {"text": [str(target)]}, "result": (str(target),)}


class InspectLycoris(LycorisNode):
    DESCRIPTION = (
        "Describe an adapter: algorithm per layer, ranks/factors, metadata, and with a model the "
        "matched and unmatched layers (the cause of 'trained but has no effect')."
    )
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
    OUTPUT_TOOLTIPS = ("The report as text.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {"adapter": (ADAPTER, {"tooltip": "The adapter to describe."})},
            "optional": {
                "model": (MODEL, {"tooltip": "Optional: check which layers match this model."})
            },
        }

    def run(self, adapter: Any, model: ModelHandle | None = None) -> dict[str, Any]:
        report = format_report(describe(adapter, model.model.pipe if model else None))
        return {"ui": {"text": [report]}, "result": (report,)}
