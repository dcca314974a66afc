"""Metadata written into every saved adapter.

* ``lycoris_config``: the config JSON, as the seed's trainer writes it;
* modelspec keys (``modelspec.sai_model_spec``, ``modelspec.architecture``, ...);
* kohya-style ``ss_*`` keys that LoRA tools read;
* provenance under ``comfyui_lycoris.*``: base model, hash of its denoiser config, dataset
  hash, library versions and the training spec.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
from pathlib import Path
from typing import Any

from ..config import LycorisConfig
from ..families import Family
from ..quantization import quantiser_of

ARCHITECTURES = {
    "sd15": "stable-diffusion-v1",
    "sdxl": "stable-diffusion-xl-v1-base",
    "sd3": "stable-diffusion-v3-medium",
    "flux": "flux-1-dev",
}


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def denoiser_config_hash(denoiser: Any) -> str:
    cfg = dict(getattr(denoiser, "config", {}) or {})
    text = json.dumps(
        {k: v for k, v in cfg.items() if not k.startswith("_")}, sort_keys=True, default=str
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def adapter_metadata(
    config: LycorisConfig,
    family: Family,
    base_source: str,
    denoiser: Any,
    *,
    title: str,
    steps: int,
    resolution: int,
    dataset_hash: str,
    spec: dict[str, Any],
    prediction_type: str | None = None,
    base_precision: str = "fp32",
) -> dict[str, str]:
    """String metadata for a saved adapter (safetensors metadata values are strings).

    `base_precision`: how the base was stored while it trained (``nf4``, ``fp8``, ``bf16``,
    ...); recorded with the quantiser that stored it."""
    cfg = config.to_dict()
    args = {k: v for k, v in cfg.items() if k not in ("multiplier", "linear_dim", "linear_alpha")}
    from .. import __version__

    meta = {
        "lycoris_config": json.dumps(cfg),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{ARCHITECTURES.get(family.name, family.name)}/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "ss_network_module": "lycoris.kohya",
        "ss_network_dim": str(config.linear_dim if config.linear_dim is not None else ""),
        "ss_network_alpha": str(config.linear_alpha),
        "ss_network_args": json.dumps({k: str(v) for k, v in args.items()}),
        "ss_steps": str(steps),
        "ss_base_model_version": family.name,
        "comfyui_lycoris.base_model": Path(base_source).name,
        "comfyui_lycoris.denoiser_config_sha256": denoiser_config_hash(denoiser),
        "comfyui_lycoris.dataset_sha256": dataset_hash,
        "comfyui_lycoris.versions": json.dumps(
            {
                "comfyui_lycoris": __version__,
                "lycoris_lora": _version("lycoris-lora"),
                "diffusers": _version("diffusers"),
                "torch": _version("torch"),
            }
        ),
        "comfyui_lycoris.training_spec": json.dumps(spec, default=str),
        "comfyui_lycoris.base_precision": base_precision,
        "comfyui_lycoris.quantiser": quantiser_of(base_precision),
    }
    if prediction_type:
        meta["modelspec.prediction_type"] = prediction_type
    return meta
