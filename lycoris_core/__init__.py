"""comfyui-lycoris core library: LyCORIS configs, adapters and exact patching for diffusers.

This package never imports ComfyUI. Public API (documented in the README)::

    from lycoris_core import (
        LycorisConfig, load_adapter, patched, coverage, create_network,
        LycorisError, ConfigError, AdapterFormatError, IncompatibleModelError,
    )
"""

from __future__ import annotations

from .adapters import Adapter, LayerAdapter, adapter_from_state_dict, load_adapter
from .config import LycorisConfig
from .errors import AdapterFormatError, ConfigError, IncompatibleModelError, LycorisError
from .patching import Patch, patched
from .targeting import Coverage, coverage, create_network

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
    "adapter_from_state_dict",
    "coverage",
    "create_network",
    "load_adapter",
    "patched",
]

__version__ = "0.1.0"
