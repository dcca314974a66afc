"""comfyui-lycoris core library: LyCORIS configs, adapters and exact patching for diffusers.

This package never imports ComfyUI. Public API (documented in the README)::

    from lycoris_core import (
        LycorisConfig, load_adapter, patched, patched_pipeline, coverage, create_network,
        LycorisError, ConfigError, AdapterFormatError, IncompatibleModelError,
    )

The names are loaded on first use (PEP 562), so ``import lycoris_core`` and the torch-free
parts (``lycoris_core.errors``, ``lycoris_core.client``) do not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .adapters import Adapter, LayerAdapter, adapter_from_state_dict, load_adapter
    from .config import LycorisConfig
    from .errors import AdapterFormatError, ConfigError, IncompatibleModelError, LycorisError
    from .patching import Patch, patched
    from .pipeline_patch import PipelinePatch, patched_pipeline
    from .targeting import Coverage, coverage, create_network

# public name -> the submodule that defines it
_EXPORTS = {
    "Adapter": "adapters",
    "LayerAdapter": "adapters",
    "adapter_from_state_dict": "adapters",
    "load_adapter": "adapters",
    "LycorisConfig": "config",
    "AdapterFormatError": "errors",
    "ConfigError": "errors",
    "IncompatibleModelError": "errors",
    "LycorisError": "errors",
    "Patch": "patching",
    "patched": "patching",
    "PipelinePatch": "pipeline_patch",
    "patched_pipeline": "pipeline_patch",
    "Coverage": "targeting",
    "coverage": "targeting",
    "create_network": "targeting",
}

__all__ = [
    "Adapter",
    "AdapterFormatError",
    "ConfigError",
    "Coverage",
    "IncompatibleModelError",
    "LayerAdapter",
    "LycorisConfig",
    "LycorisError",
    "Patch",
    "PipelinePatch",
    "adapter_from_state_dict",
    "coverage",
    "create_network",
    "load_adapter",
    "patched",
    "patched_pipeline",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
