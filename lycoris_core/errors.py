"""Typed errors of the library.

Every message says what is wrong, where (file, JSON path, module) and how to fix it.
Nodes do not catch these: ComfyUI shows the message to the user unchanged.
"""

from __future__ import annotations


class LycorisError(Exception):
    """Base class of every error this library raises on purpose."""


class ConfigError(LycorisError, ValueError):
    """A lycoris_config.json (or the dict behind it) is invalid."""


class AdapterFormatError(LycorisError, ValueError):
    """An adapter file cannot be read, or its keys do not fit the model."""


class IncompatibleModelError(LycorisError, ValueError):
    """A config or adapter targets modules that the model does not have."""


class ModelLoadError(LycorisError, ValueError):
    """A base model folder or file cannot be loaded (missing, wrong layout, unknown class)."""


class PathError(LycorisError, ValueError):
    """A name or path that would leave its folder, or an output that cannot be written."""
