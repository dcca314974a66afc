"""Apply adapter files to a whole pipeline: the denoiser and the text encoders.

A file's text-encoder layers (``lora_te1_...``, ``text_encoder_2.``, ComfyUI's
``text_encoders.clip_l.transformer.``) go to the pipeline's ``text_encoder`` /
``text_encoder_2`` / ``text_encoder_3`` at their own strength (like ComfyUI's
``strength_clip``; by default the model strength); the other layers go to the denoiser.
Each component gets a :class:`~lycoris_core.patching.Patch` (merge or dynamic), so every
component's weights are bitwise the base ones after ``restore()``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import nn

from .adapters import Adapter
from .deferred import ensure
from .errors import LycorisError
from .families import detect_family
from .patching import Patch, _check_mode, _check_strength

TEXT_ENCODERS: tuple[str, ...] = ("text_encoder", "text_encoder_2", "text_encoder_3")
"""Pipeline attributes that hold text encoders, in the order kohya numbers them."""

Entry = tuple[Adapter, float] | tuple[Adapter, float, float | None]
"""``(adapter, strength)`` or ``(adapter, strength, text-encoder strength or None)``."""

PipelineKey = tuple[tuple[tuple[str, float, float], ...], str]


def split_entry(entry: Entry) -> tuple[Adapter, float, float]:
    """(adapter, denoiser strength, text-encoder strength), both checked numbers."""
    if not isinstance(entry, tuple) or len(entry) not in (2, 3):
        raise LycorisError(
            f"an adapter entry is (adapter, strength) or (adapter, strength, text strength), "
            f"got {entry!r}"
        )
    adapter, s = entry[0], _check_strength(entry[0], entry[1])
    text = entry[2] if len(entry) == 3 else None
    return adapter, s, s if text is None else _check_strength(adapter, text)


def pipeline_patch_key(adapters: Sequence[Entry], mode: str = "merge") -> PipelineKey:
    """What identifies a set of adapters on a pipeline: contents and both strengths, mode."""
    _check_mode(mode)
    parts = (split_entry(e) for e in adapters)
    return tuple((a.content_key, s, t) for a, s, t in parts), mode


def text_encoders(pipe: Any) -> dict[str, nn.Module]:
    """The pipeline's text encoders by attribute name."""
    found = {c: getattr(pipe, c, None) for c in TEXT_ENCODERS}
    return {c: m for c, m in found.items() if isinstance(m, nn.Module)}


class PipelinePatch:
    """A set of adapters bound to a pipeline's denoiser and text encoders, in one mode.

    Same contract as :class:`Patch`: ``apply()``, ``restore()`` (bitwise), ``key``;
    ``patches`` holds one Patch per component that the adapters change.
    """

    def __init__(
        self,
        pipe: Any,
        adapters: Sequence[Entry],
        mode: str = "merge",
        strict: bool = True,
        family: str | None = None,
    ) -> None:
        _check_mode(mode)
        fam = detect_family(pipe)
        family = family or fam.name
        self.mode = mode
        self._entries = [split_entry(e) for e in adapters]
        if any(a.has_text_layers(family) for a, _, _ in self._entries):
            ensure(pipe)  # deferred text encoders must be there to take their layers
        encoders = text_encoders(pipe)
        self.patches: dict[str, Patch] = {}
        self.patches["denoiser"] = Patch(
            getattr(pipe, fam.denoiser),
            [(a, s) for a, s, _ in self._entries],
            mode=mode,
            strict=strict,
            component="denoiser",
            family=family,
            elsewhere=tuple(encoders),
        )
        with_text = [(a, t) for a, _, t in self._entries if a.has_text_layers(family)]
        for component, module in encoders.items():
            if not with_text:
                break
            patch = Patch(
                module,
                with_text,
                mode=mode,
                strict=strict,
                component=component,
                family=family,
            )
            if patch.plan:
                self.patches[component] = patch
        self._key: PipelineKey | None = None
        self.applied = False

    @property
    def key(self) -> PipelineKey:
        if self._key is None:
            self._key = pipeline_patch_key([(a, s, t) for a, s, t in self._entries], self.mode)
        return self._key

    @property
    def text_key(self) -> tuple[tuple[str, float], ...]:
        """What changes prompt encoding: the contents and text strengths of the adapters that
        patch a text encoder (empty when none does). Caches of prompt embeddings key on it."""
        if len(self.patches) == 1:
            return ()
        return tuple((a.content_key, t) for a, _, t in self._entries if a.has_text_layers() and t)

    @property
    def plan(self) -> dict[str, list]:
        """The denoiser's plan (module path -> layers), as :attr:`Patch.plan`."""
        return self.patches["denoiser"].plan

    @property
    def num_layers(self) -> int:
        """Modules changed, all components together."""
        return sum(p.num_layers for p in self.patches.values())

    def layers_per_component(self) -> dict[str, int]:
        return {c: p.num_layers for c, p in self.patches.items()}

    def apply(self) -> None:
        if self.applied:
            raise LycorisError("this patch is already applied; restore() it first")
        self.applied = True
        try:
            for patch in self.patches.values():
                patch.apply()
        except BaseException:
            self.restore()
            raise

    def restore(self) -> None:
        for patch in self.patches.values():
            patch.restore()
        self.applied = False


@contextmanager
def patched_pipeline(
    pipe: Any,
    adapters: Sequence[Entry],
    mode: str = "merge",
    strict: bool = True,
) -> Iterator[PipelinePatch]:
    """Apply `adapters` to every component of `pipe` for the duration of the block.

    Entries are ``(adapter, strength)`` or ``(adapter, strength, text_strength)``; the text
    strength (default: the strength) applies to the text-encoder layers.
    """
    patch = PipelinePatch(pipe, adapters, mode=mode, strict=strict)
    patch.apply()
    try:
        yield patch
    finally:
        patch.restore()
