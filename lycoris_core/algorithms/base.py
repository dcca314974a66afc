"""What one LyCORIS algorithm object knows, and the defaults most of them share.

An :class:`Algorithm` is stateless: every method takes the layer (a ``LayerAdapter``: its
name, algorithm name, tensors by suffix, options) and, where needed, the target weight or
module. The registry in :mod:`lycoris_core.algorithms` holds one instance per algorithm.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from ..quantization import base_bias, base_weight
from ._common import LINEAR_AND_CONV, Contribution, layer_op


class Layer(Protocol):
    """The view of a ``LayerAdapter`` the algorithms use."""

    name: str
    algo: str
    tensors: dict[str, torch.Tensor]
    options: dict[str, Any]

    @property
    def alpha(self) -> float | None: ...


class Modifier(Protocol):
    """Something saved beside an algorithm's own tensors that changes its delta (DoRA)."""

    suffix: str
    label: str

    def present(self, tensors: Mapping[str, torch.Tensor]) -> bool: ...

    def merge(self, layer: Layer, weight: torch.Tensor, dw: torch.Tensor, strength: float) -> Any:
        """The delta of the modified layer, from the algorithm's own delta `dw` at strength 1."""
        ...


class Algorithm(ABC):
    """One LyCORIS algorithm: file format, shape rules and exact math at any strength."""

    name: ClassVar[str]
    """The name files, reports and ``LayerAdapter.algo`` use."""
    suffixes: ClassVar[tuple[str, ...]]
    """Every tensor suffix the algorithm itself saves (lycoris 4.x ``weight_list``)."""
    required: ClassVar[tuple[str, ...]] = ()
    """Suffixes a layer of this algorithm cannot do without."""
    modifiers: ClassVar[tuple[Modifier, ...]] = ()
    """Modifiers whose tensors may be saved beside the algorithm's own."""
    targets: ClassVar[tuple[type[nn.Module], ...]] = LINEAR_AND_CONV
    """Module types a layer can adapt."""
    scaled: ClassVar[bool] = False
    """Whether the forward applies an alpha/rank scale (shown by the inspect report)."""
    scalars: ClassVar[tuple[str, ...]] = ("alpha",)
    """Suffixes holding one number (any shape with one element); the others are arrays."""

    # ------------------------------------------------------------------ file format
    @property
    def all_suffixes(self) -> tuple[str, ...]:
        return self.suffixes + tuple(m.suffix for m in self.modifiers)

    @abstractmethod
    def detect(self, tensors: Mapping[str, torch.Tensor], config: Any) -> bool:
        """Whether a layer with these tensors (and the file's LycorisConfig or None) is ours."""

    def check(self, layer: Layer) -> str | None:
        """None if the layer's tensors are a valid set for this algorithm, else the problem.

        The default: scalars hold one number, other tensors are non-empty arrays, every value
        is finite. Algorithms add their own rules (required combinations, ranks and shapes
        that must agree within the layer) by overriding and calling this first.
        """
        for suffix, t in layer.tensors.items():
            if not isinstance(t, torch.Tensor):
                return f"'{suffix}' is not a tensor"
            if suffix in self.scalars:
                if t.numel() != 1:
                    return f"'{suffix}' must be one number, got shape {tuple(t.shape)}"
            elif t.dim() == 0 or t.numel() == 0:
                return f"'{suffix}' must be a non-empty array, got shape {tuple(t.shape)}"
            if not _finite(t):
                return f"'{suffix}' holds inf or NaN values"
        return None

    def options(self, keywords: Mapping[str, Any]) -> dict[str, Any]:
        """Per-layer options read from the file's ``lycoris_config`` keywords."""
        return {}

    # ------------------------------------------------------------------ rank and shape
    def rank(self, layer: Layer) -> int | None:
        """The low-rank dimension lycoris divides alpha by, when the algorithm has one."""
        return None

    def scale(self, layer: Layer) -> float:
        """The alpha/rank factor the lycoris forward applies once (1 without a rank)."""
        r = self.rank(layer)
        if r is None:
            return 1.0
        return alpha_or_rank(layer, r) / r

    @abstractmethod
    def mismatch(self, layer: Layer, weight: torch.Tensor) -> str | None:
        """None if the layer fits a weight of this shape, else a description of its shape."""

    # ------------------------------------------------------------------ math
    @abstractmethod
    def delta(
        self, layer: Layer, weight: torch.Tensor, bias: torch.Tensor | None, strength: float
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(dW, db) in float32: (W + dW, b + db) reproduces the lycoris forward."""

    def accumulate(
        self,
        acc: torch.Tensor | None,
        layer: Layer,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        strength: float,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Add the layer to the merged weight `acc` (None: still the base `weight`)."""
        dw, db = self.delta(layer, weight, bias, strength)
        if acc is None:
            return weight + dw, db
        return acc.add_(dw), db

    def bypass(self, layer: Layer, module: nn.Module, strength: float) -> Contribution | None:
        """A cheap ``(x, y0) -> dy`` for dynamic mode, or None to use :meth:`precomputed`."""
        return None

    def precomputed(self, layer: Layer, module: nn.Module, strength: float) -> Contribution:
        """Dynamic mode via the delta weight, computed once: the forward adds op(x, dW)."""
        w, b = base_weight(module), base_bias(module)
        dw, db = self.delta(layer, w, b, strength)
        dw = dw.to(w.dtype)
        db = None if db is None else db.to(w.dtype)
        op = layer_op(module)
        return lambda x, y0: op(x, dw, db)

    # ------------------------------------------------------------------ report
    def describe(self, layer: Layer) -> dict[str, Any]:
        """Algorithm-specific entries of the inspect report (after rank and alpha)."""
        return {}


def _finite(t: torch.Tensor) -> bool:
    if not (t.is_floating_point() or t.is_complex()):
        return True
    try:
        return bool(torch.isfinite(t).all())
    except (RuntimeError, TypeError):  # dtypes without isfinite (float8): check as float32
        return bool(torch.isfinite(t.float()).all())


def agree(*pairs: tuple[str, int, str, int]) -> str | None:
    """None if each ``(name_a, size_a, name_b, size_b)`` has equal sizes, else the first
    disagreement as text (for :meth:`Algorithm.check`)."""
    for name_a, a, name_b, b in pairs:
        if a != b:
            return f"{name_a} ({a}) does not match {name_b} ({b})"
    return None


def alpha_or_rank(layer: Layer, rank: int) -> float:
    """The layer's alpha; a missing or zero alpha means alpha = rank (scale 1)."""
    alpha = layer.alpha
    return float(rank) if alpha is None or alpha == 0 else alpha


def shape_or_none(got: tuple[int, ...], weight: torch.Tensor) -> str | None:
    """None if `got` is the weight's (out, flattened in), else `got` as text."""
    expected = (weight.shape[0], int(math.prod(weight.shape[1:])))
    return None if tuple(got) == expected else str(tuple(got))


class LowRank(Algorithm):
    """Algorithms whose delta is rebuilt from factors and scaled by alpha/rank.

    Their delta is linear in the strength, unless a modifier (:attr:`Algorithm.modifiers`)
    saved beside them takes the delta at strength 1 and applies the strength its own way.
    """

    scaled = True
    tucker_suffix: ClassVar[str | None] = None
    """The tucker core's suffix: its presence makes the delta more than a 2D product."""

    @abstractmethod
    def rebuild(self, layer: Layer, weight: torch.Tensor) -> torch.Tensor:
        """Delta weight at strength 1 (float32, the weight's shape, a fresh tensor)."""

    def delta(
        self, layer: Layer, weight: torch.Tensor, bias: torch.Tensor | None, strength: float
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        s = float(strength)
        dw = self.rebuild(layer, weight)  # a fresh tensor: scaling it in place is safe
        for modifier in self.modifiers:
            if modifier.present(layer.tensors):
                return modifier.merge(layer, weight, dw, s), None
        return (dw if s == 1.0 else dw.mul_(s)), None

    def plain_2d(self, layer: Layer) -> bool:
        """Linear in strength with a plain 2D product as delta (no modifier, no tucker)."""
        t = layer.tensors
        if any(m.present(t) for m in self.modifiers):
            return False
        return self.tucker_suffix is None or self.tucker_suffix not in t

    def describe(self, layer: Layer) -> dict[str, Any]:
        info: dict[str, Any] = {"scale": round(self.scale(layer), 6)}
        if self.tucker_suffix is not None and self.tucker_suffix in layer.tensors:
            info["tucker"] = True
        return info
