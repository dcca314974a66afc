"""The values that travel between our nodes, and what the node modules share. Immutable: ComfyUI caches and shares outputs.

``LYCORIS_MODEL`` is a :class:`ModelHandle`: a loaded pipeline plus the adapters stacked on it
(nothing touches the weights until a sampler or trainer runs). ``LYCORIS_ADAPTER`` is a
``lycoris_core.Adapter``, ``LYCORIS_CONFIG`` a ``LycorisConfig``, ``LYCORIS_DATASET`` a
``DatasetSpec``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from ..lycoris_core import Adapter
from ..lycoris_core.models import LoadedModel

MODEL = "LYCORIS_MODEL"
ADAPTER = "LYCORIS_ADAPTER"
CONFIG = "LYCORIS_CONFIG"
DATASET = "LYCORIS_DATASET"
CATEGORY = "LyCORIS"
OUTPUT_SUBFOLDER = "lycoris"  # our files inside ComfyUI's loras folder
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,99}$")


def check_output_name(name: str, what: str = "name") -> str | None:
    """None if `name` is a safe file/folder name, else the error text (no paths, no '..')."""
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        return (
            f"{what} {name!r} must be a plain name (letters, digits, space . _ -, no '/' or "
            "'..', at most 100 characters); it is saved inside ComfyUI's models folder"
        )
    return None


class LycorisNode:
    """What every node of the pack shares (V1 dialect: class attributes, no instance state)."""

    CATEGORY = CATEGORY
    FUNCTION = "run"


@dataclass(frozen=True)
class ModelHandle:
    """A base model and the adapters applied to it, each at its strength, in one mode."""

    model: LoadedModel
    adapters: tuple[tuple[Adapter, float], ...] = ()
    mode: str = "merge"

    def with_adapter(self, adapter: Adapter, strength: float, mode: str) -> ModelHandle:
        return replace(self, adapters=(*self.adapters, (adapter, float(strength))), mode=mode)

    def describe(self) -> str:
        stack = ", ".join(f"{a.name}@{s:g}" for a, s in self.adapters) or "no adapters"
        return f"{self.model.source} ({self.model.family.name}; {stack}; {self.mode})"
