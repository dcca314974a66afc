"""Apply adapters to a torch module: merged or dynamic, any strength, stacked, exactly undone.

``patched(module, [(adapter, strength), ...], mode=...)`` is a context manager. On exit,
also on an exception, every weight is bitwise what it was before (merge mode keeps a backup
of only the weights it touches; dynamic mode never touches a weight and only adds forward
hooks). Adapters stack: each contributes its own change relative to the base weights, which
is what chaining lycoris modules does. Strength 0 skips an adapter entirely.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

from .adapters import Adapter, LayerAdapter
from .algorithms import accumulate, dynamic_contribution
from .errors import LycorisError
from .limits import check_strength

logger = logging.getLogger(__name__)

Mode = Literal["merge", "dynamic"]
MODES: tuple[str, ...] = ("merge", "dynamic")


def _check_strength(adapter: Adapter, strength: object) -> float:
    return check_strength(strength, f"{adapter.name}: strength")  # bound: limits.MAX_STRENGTH


PatchKey = tuple[tuple[tuple[str, float], ...], str]


def patch_key(adapters: Sequence[tuple[Adapter, float]], mode: str = "merge") -> PatchKey:
    """What identifies a set of adapters in a mode: each adapter's content and strength.

    Computed without binding (cheap after the first call: the content hashes are kept on the
    adapters), so a caller can tell that a set is already applied before building a Patch.
    Raises for an unknown mode or a strength that is not a finite number.
    """
    _check_mode(mode)
    return tuple((a.content_key, _check_strength(a, s)) for a, s in adapters), mode


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise LycorisError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")


class Patch:
    """A set of (adapter, strength) pairs bound to a module, in one mode.

    ``apply()`` changes the module, ``restore()`` undoes it exactly. ``key`` identifies the
    set (:func:`patch_key`: contents, strengths, mode) so callers can keep a patch applied
    between calls.
    """

    def __init__(
        self,
        module: nn.Module,
        adapters: Sequence[tuple[Adapter, float]],
        mode: str = "merge",
        strict: bool = True,
    ) -> None:
        _check_mode(mode)
        self.module = module
        self.mode = mode
        self.plan: dict[str, list[tuple[LayerAdapter, float]]] = {}
        self._adapters = [(adapter, _check_strength(adapter, s)) for adapter, s in adapters]
        for adapter, s in self._adapters:
            if s == 0.0:
                continue
            for path, layer in adapter.bind(module, strict=strict).items():
                self.plan.setdefault(path, []).append((layer, s))
        self._key: PatchKey | None = None
        self._backup: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self.applied = False

    @property
    def key(self) -> PatchKey:
        if self._key is None:  # hashing contents only when a caller compares sets
            self._key = patch_key(self._adapters, self.mode)
        return self._key

    @property
    def num_layers(self) -> int:
        return len(self.plan)

    # ------------------------------------------------------------------ apply/restore
    @torch.no_grad()
    def apply(self) -> None:
        if self.applied:
            raise LycorisError("this patch is already applied; restore() it first")
        self.applied = True
        try:
            if self.mode == "merge":
                self._merge()
            else:
                self._hook()
        except BaseException:
            self.restore()
            raise

    def _merge(self) -> None:
        # The merged weight is a new tensor swapped in with `param.data = ...`; the original
        # tensor is the backup, untouched, and swapped back on restore (exact and O(1)).
        # Merged tensors must be normal tensors even when called under inference_mode.
        with torch.inference_mode(False):
            for path, entries in self.plan.items():
                mod = self.module.get_submodule(path)
                weight, bias = mod.weight, getattr(mod, "bias", None)
                w0 = weight.detach()
                b0 = None if bias is None else bias.detach()
                acc = None if w0.dtype == torch.float32 else w0.float()
                db_total: torch.Tensor | None = None
                for layer, s in entries:
                    acc, db = accumulate(acc, layer, w0, b0, s)
                    if db is not None:
                        db_total = db if db_total is None else db_total + db
                assert acc is not None  # plan entries are never empty
                self._backup[path] = (weight.data, None if db_total is None else bias.data)
                weight.data = acc.to(w0.dtype)
                if db_total is not None:
                    bias.data = (b0.float() + db_total).to(b0.dtype)

    def _hook(self) -> None:
        for path, entries in self.plan.items():
            mod = self.module.get_submodule(path)
            # prepared per device: offloading hooks may run the layer on another device
            prepared = {mod.weight.device: [dynamic_contribution(a, mod, s) for a, s in entries]}

            def hook(
                m: nn.Module,
                args: tuple[torch.Tensor, ...],
                out: torch.Tensor,
                entries: list = entries,
                prepared: dict = prepared,
            ) -> torch.Tensor:
                x = args[0]
                contributions = prepared.get(x.device)
                if contributions is None:
                    with torch.no_grad():
                        contributions = [dynamic_contribution(a, m, s) for a, s in entries]
                    prepared[x.device] = contributions
                change = contributions[0](x, out)
                for contribution in contributions[1:]:
                    change = change + contribution(x, out)
                if out.requires_grad or torch.is_inference(out) != torch.is_inference(change):
                    return out + change
                return out.add_(change)  # the layer's own fresh output: no copy needed

            self._hooks.append(mod.register_forward_hook(hook))

    @torch.no_grad()
    def restore(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        for path, (weight, bias) in self._backup.items():
            mod = self.module.get_submodule(path)
            mod.weight.data = weight
            if bias is not None:
                mod.bias.data = bias
        self._backup.clear()
        self.applied = False


@contextmanager
def patched(
    module: nn.Module,
    adapters: Sequence[tuple[Adapter, float]],
    mode: str = "merge",
    strict: bool = True,
) -> Iterator[Patch]:
    """Apply `adapters` (each at its strength) to `module` for the duration of the block.

    ``mode="merge"`` adds the exact deltas into the weights (fast forward, backup of the
    touched weights); ``mode="dynamic"`` leaves weights alone and adds each adapter's output
    change in a forward hook. Keys matching no module raise ``AdapterFormatError`` unless
    ``strict=False``.
    """
    patch = Patch(module, adapters, mode=mode, strict=strict)
    patch.apply()
    try:
        yield patch
    finally:
        patch.restore()
