"""Reading diffusers pipelines from disk: folders (``model_index.json``), single files with a
config folder, and one component at a time (what :func:`lycoris_core.models.load_model`
defers). Never reaches the network.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ModelLoadError
from .families import family_for_pipeline_class
from .io import PICKLE_SUFFIXES
from .quantization import QUANTISED_ENCODERS, quantise_module

DENOISER_COMPONENTS = ("transformer", "unet")
_CKPT_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")


# --------------------------------------------------------------------------- folders


def read_model_index(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``model_index.json`` of a diffusers pipeline folder."""
    root = Path(folder)
    index = root / "model_index.json"
    if not root.is_dir():
        raise ModelLoadError(
            f"{root}: not a folder; pass a diffusers pipeline folder (with model_index.json)"
        )
    if not index.is_file():
        raise ModelLoadError(
            f"{root}: no model_index.json; this is not a diffusers pipeline folder (save one "
            "with pipe.save_pretrained(folder), or point at the folder that holds "
            "model_index.json)"
        )
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{index}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or "_class_name" not in data:
        raise ModelLoadError(f"{index}: missing '_class_name'; not a diffusers model index")
    return data


def _pipeline_class(folder: Path, index: dict[str, Any]) -> type:
    import diffusers

    name = index["_class_name"]
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise ModelLoadError(
            f"{folder}: pipeline class {name!r} (model_index.json) is not provided by diffusers "
            f"{diffusers.__version__}; upgrade diffusers or use a folder saved by a known pipeline"
        )
    return cls


def denoiser_entry(folder: Path, index: dict[str, Any]) -> tuple[str, type]:
    import diffusers

    for name in DENOISER_COMPONENTS:
        entry = index.get(name)
        if isinstance(entry, list) and len(entry) == 2 and entry[1]:
            cls = getattr(diffusers, entry[1], None)
            if cls is None:
                raise ModelLoadError(
                    f"{folder}: component '{name}' has class {entry[1]!r}, which diffusers "
                    f"{diffusers.__version__} does not provide; upgrade diffusers"
                )
            return name, cls
    raise ModelLoadError(
        f"{folder}: the pipeline ({index['_class_name']}) has no 'unet' or 'transformer' "
        "component to sample with or apply adapters to"
    )


def load_denoiser(folder: str | os.PathLike[str]) -> nn.Module:
    """Load only the ``transformer`` or ``unet`` of a local diffusers pipeline folder."""
    root = Path(folder)
    index = read_model_index(root)
    name, cls = denoiser_entry(root, index)
    sub = root / name
    if not sub.is_dir():
        raise ModelLoadError(f"{sub}: missing; the pipeline folder is incomplete")
    return cls.from_pretrained(str(sub), local_files_only=True).eval()


# --------------------------------------------------------------------------- files


def _check_not_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelLoadError(
            f"{path}: pickle checkpoints ({', '.join(PICKLE_SUFFIXES)}) are refused because "
            "loading them can run arbitrary code; use a .safetensors checkpoint"
        )


def _is_full_checkpoint(path: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        return any(k.startswith(_CKPT_PREFIXES) for k in f.keys())  # noqa: SIM118


def _load_from_file(path: Path, config_dir: Path | None, dtype: torch.dtype) -> Any:
    """A single .safetensors file plus a local diffusers folder for configs and components."""
    _check_not_pickle(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: file not found")
    if path.suffix.lower() != ".safetensors":
        raise ModelLoadError(f"{path}: single-file checkpoints must be .safetensors files")
    if config_dir is None:
        raise ModelLoadError(
            f"{path}: a single-file checkpoint needs a local diffusers folder for its "
            "configuration (config_dir / --config-dir): nothing is downloaded at run time"
        )
    index = read_model_index(config_dir)
    pipe_cls = _pipeline_class(config_dir, index)
    if _is_full_checkpoint(path):
        try:
            return pipe_cls.from_single_file(
                str(path), config=str(config_dir), local_files_only=True, torch_dtype=dtype
            )
        except Exception as exc:  # diffusers raises many types on mismatched files
            raise ModelLoadError(
                f"{path}: cannot load it as a {index['_class_name']} with the configuration in "
                f"{config_dir} ({exc}); is the config folder of the same model family?"
            ) from None
    name, cls = denoiser_entry(config_dir, index)
    try:
        denoiser = cls.from_single_file(
            str(path),
            config=str(config_dir),
            subfolder=name,
            local_files_only=True,
            torch_dtype=dtype,
        )
    except Exception as exc:  # diffusers raises many types on mismatched files
        raise ModelLoadError(
            f"{path}: its weights do not fit the {cls.__name__} described in {config_dir / name} "
            f"({str(exc).splitlines()[0][:300]}); the file is probably of another model family "
            "or size than the config folder"
        ) from None
    return pipe_cls.from_pretrained(
        str(config_dir), local_files_only=True, torch_dtype=dtype, **{name: denoiser}
    )


def load_pipe(
    src: Path, cfg: Path | None, family: str | None, dt: torch.dtype, skip: Sequence[str] = ()
) -> Any:
    if src.is_dir():
        index = read_model_index(src)
        pipe_cls = _pipeline_class(src, index)
        expected = family_for_pipeline_class(index["_class_name"])
        if family is not None and expected is not None and expected.name != family:
            raise ModelLoadError(
                f"{src}: holds a {index['_class_name']} ({expected.label}), not the requested "
                f"family '{family}'"
            )
        try:
            pipe = pipe_cls.from_pretrained(
                str(src), local_files_only=True, torch_dtype=dt, **dict.fromkeys(skip)
            )
        except (OSError, ValueError) as exc:
            raise ModelLoadError(
                f"{src}: cannot load the pipeline ({str(exc).splitlines()[0][:300]}); the folder "
                "may be incomplete (each component needs its config and weights)"
            ) from None
    else:
        _check_not_pickle(src)
        if not src.exists():
            raise ModelLoadError(f"{src}: no such file or folder")
        pipe = _load_from_file(src, cfg, dt)
    return pipe


@contextmanager
def quiet_loading() -> Iterator[None]:
    """No per-component progress bars or dtype-keyword deprecation noise while loading."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    d_on, t_on = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            yield
    finally:
        if d_on:
            dlog.enable_progress_bar()
        if t_on:
            tlog.enable_progress_bar()


def text_encoder_entries(src: Path) -> dict[str, list]:
    """The text-encoder components a diffusers folder's model_index names (none for files)."""
    if not src.is_dir():
        return {}
    index = read_model_index(src)
    return {
        k: v
        for k, v in index.items()
        if k.startswith("text_encoder") and isinstance(v, list) and v[0] is not None
    }


def component_loader(
    folder: Path, name: str, entry: list, dt: torch.dtype, dev: torch.device, precision: str
) -> Callable[[], nn.Module]:
    """Loads one component of `folder` as :func:`load_model` would have."""

    def load() -> nn.Module:
        import importlib

        cls = getattr(importlib.import_module(entry[0]), entry[1])
        with quiet_loading(), torch.inference_mode(False):
            module = cls.from_pretrained(
                str(folder / name), local_files_only=True, torch_dtype=dt
            ).eval()
            module.to(dev)
            if type(module).__name__ in QUANTISED_ENCODERS:
                quantise_module(module, precision, dt)
        return module

    return load
