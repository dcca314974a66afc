"""What a name map yields: the model module (and row slice, transform) a foreign name means."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the maps themselves need no torch (families.py imports them)
    import torch

TRANSFORMS: tuple[str, ...] = ("swap_halves",)
"""Row transforms between a foreign weight and ours; each one is its own inverse."""


@dataclass(frozen=True)
class Target:
    """One module a foreign (file or checkpoint) layer name stands for, or a part of one.

    ``component`` is the pipeline part the module lives in (``"denoiser"``, or a text encoder's
    pipeline attribute such as ``"text_encoder_2"``); ``path`` is its dotted diffusers module
    path inside that component. ``rows`` is the ``(start, stop)`` row range this module
    occupies in the foreign, fused weight (``None``: the whole foreign weight), e.g. ``to_k``
    is rows ``[h, 2h)`` of BFL Flux's ``img_attn.qkv``. ``transform`` names how our weight's
    rows are ordered in the foreign one: ``"swap_halves"`` means the foreign rows are ours
    with the two halves exchanged (BFL/SAI adaLN ``shift, scale`` against diffusers'
    ``scale, shift``). So ``foreign[rows] == transform(ours)`` and, the transforms being their
    own inverses, ``ours == transform(foreign[rows])``.
    """

    component: str
    path: str
    rows: tuple[int, int] | None = None
    transform: str | None = None

    def __post_init__(self) -> None:
        if self.transform is not None and self.transform not in TRANSFORMS:
            raise ValueError(f"unknown transform {self.transform!r}; known: {TRANSFORMS}")
        if self.rows is not None and not (0 <= self.rows[0] < self.rows[1]):
            raise ValueError(f"rows must be (start, stop) with 0 <= start < stop: {self.rows}")

    @property
    def plain(self) -> bool:
        """Whether the foreign layer is exactly this module's weight (no slice, no transform)."""
        return self.rows is None and self.transform is None

    def __str__(self) -> str:
        rows = "" if self.rows is None else f"[{self.rows[0]}:{self.rows[1]}]"
        how = "" if self.transform is None else f" ({self.transform})"
        return f"{self.path}{rows}{how}"


def apply_transform(transform: str | None, t: torch.Tensor) -> torch.Tensor:
    """`t` with its rows (dim 0) reordered by `transform` (None: `t` itself).

    Every transform is its own inverse: the same call maps ours -> foreign and back.
    """
    if transform is None:
        return t
    if transform == "swap_halves":
        if t.shape[0] % 2:
            raise ValueError(f"swap_halves needs an even number of rows, got {t.shape[0]}")
        import torch

        half = t.shape[0] // 2
        return torch.cat((t[half:], t[:half]))
    raise ValueError(f"unknown transform {transform!r}; known: {TRANSFORMS}")


def single(component: str, path: str, transform: str | None = None) -> tuple[Target, ...]:
    """A one-module map entry."""
    return (Target(component, path, None, transform),)


def split_rows(component: str, paths: list[str], sizes: list[int]) -> tuple[Target, ...]:
    """A fused map entry: consecutive row blocks of the given sizes, one per path."""
    out, start = [], 0
    for path, size in zip(paths, sizes, strict=True):
        out.append(Target(component, path, (start, start + size)))
        start += size
    return tuple(out)
