"""Load diffusers pipelines from local folders or single files. Never reaches the network.

:func:`load_model` returns a :class:`LoadedModel`: the pipeline, its family, where it came
from, and the one place that knows which adapters are currently patched into its denoiser
(:meth:`LoadedModel.use_adapters` keeps the last set applied between calls; everything that
needs the bare base weights calls :meth:`LoadedModel.restore_base` first).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .deferred import defer
from .device import enable_tf32, place_pipeline, resolve_device, resolve_dtype
from .errors import ConfigError, ModelLoadError
from .families import FAMILIES, Family, detect_family
from .io import atomic_folder
from .paths import check_output_folder
from .pipeline_files import (
    component_loader,
    load_pipe,
    quiet_loading,
    text_encoder_entries,
)
from .pipeline_patch import Entry, PipelinePatch, patched_pipeline, pipeline_patch_key, split_entry
from .precisions import QUANTISED
from .quantization import (
    bitsandbytes,
    model_precision,
    precision_dtype,
    quantise_pipeline,
    quantiser_of,
)

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- the handle


@dataclass(eq=False)
class LoadedModel:
    """A loaded pipeline, its family and its current adapter patch."""

    pipe: Any
    family: Family
    source: str
    device: torch.device
    dtype: torch.dtype
    offload: str = "none"
    storage: str = ""  # how the base weights are stored ("fp8_e4m3fn (scaled)", "bf16", ...)
    description: str = ""  # family/variant/storage of a single-file base, for node texts
    _patch: PipelinePatch | None = field(default=None, repr=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    @property
    def denoiser(self) -> nn.Module:
        return getattr(self.pipe, self.family.denoiser)

    @property
    def vae_scale_factor(self) -> int:
        return int(getattr(self.pipe, "vae_scale_factor", 8))

    @property
    def size_multiple(self) -> int:
        return self.family.size_multiple(self.vae_scale_factor)

    @property
    def default_size(self) -> int:
        vae = getattr(self.pipe, "vae", None)
        size = getattr(getattr(vae, "config", None), "sample_size", None)
        if isinstance(size, (list, tuple)):
            size = size[0]
        size = int(size or 1024)
        m = self.size_multiple
        return max(m, size // m * m)

    @property
    def precision(self) -> str:
        """The denoiser's base precision ("nf4", "int8", "fp8", or its dtype's name)."""
        return model_precision(self.denoiser)

    @property
    def quantised(self) -> bool:
        """Whether the denoiser has quantised layers (merges then run dynamically)."""
        return self.precision in (*QUANTISED, "gguf")

    @property
    def active_patch(self) -> PipelinePatch | None:
        return self._patch

    def use_adapters(self, adapters: Sequence[Entry], mode: str = "merge") -> PipelinePatch | None:
        """Make the pipeline carry exactly `adapters` (at their strengths) in `mode`.

        Entries are ``(adapter, strength)`` or ``(adapter, strength, text_strength)``: the
        denoiser layers apply at the strength, the text-encoder layers at the text strength
        (default: the strength). The last set stays applied: calling again with the same
        adapter contents (also newly loaded copies of the same file), strengths and mode does
        nothing, not even binding; a different set restores the base first. Returns the
        active patch.
        """
        with self._lock:
            wanted = [e for e in adapters if any(s != 0.0 for s in split_entry(e)[1:])]
            if not wanted:
                self.restore_base()
                return None
            if self._patch is not None and self._patch.key == pipeline_patch_key(wanted, mode):
                return self._patch  # the same contents, strengths and mode: nothing to bind
            candidate = PipelinePatch(self.pipe, wanted, mode=mode, family=self.family.name)
            self.restore_base()
            candidate.apply()
            self._patch = candidate
            return candidate

    @property
    def prompt_key(self) -> tuple[tuple[str, float], ...]:
        """What the text encoders carry now (:attr:`PipelinePatch.text_key`); a cache of prompt
        embeddings must include it in its keys. Empty for the base encoders."""
        return () if self._patch is None else self._patch.text_key

    def restore_base(self) -> None:
        """Undo the active patch, if any: the denoiser's weights are the base ones again."""
        with self._lock:
            if self._patch is not None:
                self._patch.restore()
                self._patch = None


# --------------------------------------------------------------------------- loading


@torch.inference_mode(False)
def as_normal_tensors(module: nn.Module) -> int:
    """Replace inference tensors (made under ``torch.inference_mode``, as ComfyUI runs every
    node) by normal copies, so the module can be trained; returns how many were replaced."""
    replaced = 0
    with torch.no_grad():
        for sub in module.modules():
            for _, param in list(sub.named_parameters(recurse=False)):
                if torch.is_inference(param):
                    param.data = param.data.clone()
                    replaced += 1
            for name, buf in list(sub.named_buffers(recurse=False)):
                if buf is not None and torch.is_inference(buf):
                    sub._buffers[name] = buf.clone()
                    replaced += 1
    return replaced


def _components(pipe: Any) -> list[nn.Module]:
    return [c for c in getattr(pipe, "components", {}).values() if isinstance(c, nn.Module)]


def _quantise(pipe: Any, family: Family, precision: str, dt: torch.dtype) -> str:
    """Store the base at a quantised `precision` (nothing for plain ones); the storage text."""
    if precision not in QUANTISED:
        return ""
    converted = quantise_pipeline(pipe, family.denoiser, precision, dt)
    parts = ", ".join(f"{c}: {n} layers" for c, n in converted.items())
    compute = str(dt).removeprefix("torch.")
    return f"{precision} ({quantiser_of(precision)}; {parts}), compute {compute}"


def from_pipeline(
    pipe: Any,
    source: str,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    offload: str = "none",
    base_precision: str = "auto",
) -> LoadedModel:
    """Wrap a pipeline built in memory (e.g. a tiny demo model) like :func:`load_model` does.

    `base_precision` (:data:`~lycoris_core.quantization.PRECISIONS`): fp8/int8/nf4 store the
    denoiser's (and T5's) Linear weights quantised, computing in `dtype`, in place."""
    dev = resolve_device(device)
    dt = resolve_dtype(precision_dtype(base_precision, dtype), dev)
    if offload != "none" and base_precision in ("int8", "nf4"):
        raise ConfigError(
            f"base_precision {base_precision!r} with offload {offload!r}: bitsandbytes layers "
            "do not move between devices reliably; use offload 'none' (an nf4 base needs about "
            "a quarter of the memory) or base_precision fp8"
        )
    family = detect_family(pipe)
    # ComfyUI runs nodes under inference_mode, where a cast or a move makes inference
    # tensors, which cannot train: build, cast and place outside it, with normal tensors.
    with torch.inference_mode(False):
        for component in _components(pipe):
            as_normal_tensors(component)
        if dt != pipe.dtype:
            pipe.to(dtype=dt)
        place_pipeline(pipe, dev, offload)
        storage = _quantise(pipe, family, base_precision, dt)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    enable_tf32(dev)
    return LoadedModel(
        pipe=pipe,
        family=family,
        source=source,
        device=dev,
        dtype=dt,
        offload=offload,
        storage=storage,
    )


def load_model(
    path: str | os.PathLike[str],
    *,
    config_dir: str | os.PathLike[str] | None = None,
    family: str | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    offload: str = "none",
    text_encoders: Sequence[str | os.PathLike[str]] = (),
    vae: str | os.PathLike[str] | None = None,
    tokenizer_dirs: Sequence[str | os.PathLike[str]] = (),
    fp8: str = "keep",
    variant: str | None = None,
    prediction_type: str | None = None,
    allow_download: bool = False,
    base_precision: str = "auto",
    defer_text_encoders: bool = False,
) -> LoadedModel:
    """Load a pipeline from a diffusers folder, or from single files.

    A single file with `config_dir` (a diffusers folder of the same model) loads through
    diffusers' ``from_single_file``; without it, through :mod:`lycoris_core.checkpoints`
    (a checkpoint, or a denoiser + `text_encoders` + `vae`, tokenizers from
    `tokenizer_dirs` or the local HF cache, fp8 kept or upcast, `variant` /
    `prediction_type` overrides). `family` (optional) is checked against the detected
    family. Nothing is downloaded unless `allow_download` (then only missing tokenizer
    files of a single file, from the hub): a missing file is an error naming the path.
    `base_precision`: see :func:`from_pipeline` (checked before anything loads).
    `defer_text_encoders` (a diffusers folder without offload): the text encoders load only
    when something first encodes text (:mod:`lycoris_core.deferred`), e.g. never in a training
    run whose embeddings are all in its cache_dir.
    """
    src = Path(path)
    dev = resolve_device(device)
    dtype = precision_dtype(base_precision, dtype)
    if base_precision in ("int8", "nf4"):
        bitsandbytes()  # the install hint before anything loads
    dt = resolve_dtype(dtype, dev)
    cfg = Path(config_dir) if config_dir is not None else None
    if family is not None and family not in FAMILIES:
        raise ModelLoadError(f"family {family!r} is unknown; use one of {', '.join(FAMILIES)}")
    found = None
    deferred = text_encoder_entries(src) if defer_text_encoders and offload == "none" else {}
    with quiet_loading(), torch.inference_mode(False):  # trainable weights, even in ComfyUI
        if src.is_dir() or cfg is not None:
            pipe = load_pipe(src, cfg, family, dt, skip=tuple(deferred))
        else:
            from .checkpoints import load_files

            pipe, found = load_files(
                src,
                text_encoders,
                vae,
                tokenizer_dirs=tokenizer_dirs,
                dtype=dt,
                fp8=fp8,
                variant=variant,
                prediction_type=prediction_type,
                allow_download=allow_download,
            )
    detected = detect_family(pipe)
    if family is not None and detected.name != family:
        raise ModelLoadError(
            f"{src}: is a {detected.label} model ('{detected.name}'), not '{family}'"
        )
    logger.info("loaded %s (%s) on %s as %s", src, detected.name, dev, dt)
    defer(
        pipe, {n: component_loader(src, n, e, dt, dev, base_precision) for n, e in deferred.items()}
    )
    model = from_pipeline(
        pipe, str(src), dtype=dt, device=dev, offload=offload, base_precision=base_precision
    )
    if found is not None:
        model.storage = model.storage or found.storage
        model.description = found.describe()
    return model


def save_merged(
    model: LoadedModel,
    adapters: Sequence[Entry],
    out_dir: str | os.PathLike[str],
) -> Path:
    """Save the pipeline with `adapters` baked in (``save_pretrained``), atomically; text-
    encoder layers are merged into the text encoders.

    The base model is unchanged afterwards. `out_dir` must be new or empty (checked before
    anything is merged).
    """
    check_output_folder(out_dir, "merged model folder")
    if model.quantised:
        raise ConfigError(
            f"save_merged: the base is stored {model.precision}, and a merge into it cannot be "
            "exact; load the base with base_precision bf16/fp32 (or dtype) to save a merged copy"
        )
    with model._lock:
        model.restore_base()
        merged = patched_pipeline(model.pipe, adapters, mode="merge")
        with merged, atomic_folder(out_dir) as staging:
            model.pipe.save_pretrained(staging, safe_serialization=True)
    logger.info("saved merged pipeline to %s", out_dir)
    return Path(out_dir)
