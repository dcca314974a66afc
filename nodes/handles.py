"""The values that travel between our nodes, and what the node modules share. Immutable: ComfyUI caches and shares outputs.

``LYCORIS_MODEL`` is a :class:`ModelHandle`: a loaded pipeline plus the adapters stacked on it
(nothing touches the weights until a sampler or trainer runs). ``LYCORIS_ADAPTER`` is a
``lycoris_core.Adapter``, ``LYCORIS_CONFIG`` a ``LycorisConfig``, ``LYCORIS_DATASET`` a
``DatasetSpec``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..lycoris_core import Adapter
from ..lycoris_core.limits import check_strength
from ..lycoris_core.models import LoadedModel
from ..lycoris_core.paths import name_problem
from ..lycoris_core.precisions import PRECISIONS

MODEL = "LYCORIS_MODEL"
ADAPTER = "LYCORIS_ADAPTER"
CONFIG = "LYCORIS_CONFIG"
DATASET = "LYCORIS_DATASET"
CATEGORY = "LyCORIS"
OUTPUT_SUBFOLDER = "lycoris"  # our files inside ComfyUI's loras folder


def check_output_name(name: str | None, what: str = "name") -> str | None:
    """For ``VALIDATE_INPUTS``: None if `name` is a safe file/folder name, else the error
    text. ComfyUI passes None for a linked input (its value is not known yet): the node's
    ``run`` checks it again where it builds the path (``paths.output_child``)."""
    if name is None:
        return None
    return name_problem(name, what)


class LycorisNode:
    """What every node of the pack shares (V1 dialect: class attributes, no instance state)."""

    CATEGORY = CATEGORY
    FUNCTION = "run"


@dataclass(frozen=True)
class ModelHandle:
    """A base model and the adapters applied to it, each at its strength, in one mode."""

    model: LoadedModel
    # (adapter, strength, text-encoder strength or None = the strength): lycoris_core entries
    adapters: tuple[tuple[Adapter, float, float | None], ...] = ()
    mode: str = "merge"

    def with_adapter(
        self, adapter: Adapter, strength: float, mode: str, text_strength: float | None = None
    ) -> ModelHandle:
        s = check_strength(strength, f"{adapter.name}: strength")  # a linked FLOAT is unchecked
        if text_strength is not None:
            text_strength = check_strength(text_strength, f"{adapter.name}: strength_clip")
        entry = (adapter, s, text_strength)
        return replace(self, adapters=(*self.adapters, entry), mode=mode)

    def describe(self) -> str:
        stack = ", ".join(_entry_text(a, s, t) for a, s, t in self.adapters) or "no adapters"
        return f"{self.model.source} ({self.model.family.name}; {stack}; {self.mode})"


def _entry_text(adapter: Adapter, strength: float, text_strength: float | None) -> str:
    clip = "" if text_strength is None or text_strength == strength else f"/{text_strength:g}"
    return f"{adapter.name}@{strength:g}{clip}"


def base_precision_input() -> tuple[list[str], dict]:
    """The optional ``base_precision`` input of the load nodes (an older workflow without it
    loads as before: ``auto``)."""
    return (
        list(PRECISIONS),
        {
            "default": "auto",
            "tooltip": "How the base's Linear weights are stored: auto = as loaded; fp8 / int8 / "
            "nf4 = quantised (about 1/2, 1/2, 1/4 of bf16; int8/nf4 need bitsandbytes), "
            "computing in dtype. LyCORIS then trains in bypass mode and applies dynamically.",
        },
    )
