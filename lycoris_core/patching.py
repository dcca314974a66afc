"""Apply adapters to a torch module: merged or dynamic, any strength, stacked, exactly undone.

``patched(module, [(adapter, strength), ...], mode=...)`` is a context manager. On exit,
also on an exception, every weight is bitwise what it was before (merge mode keeps a backup
of only the weights it touches; dynamic mode never touches a weight and only adds forward
hooks). Adapters stack: each contributes its own change relative to the base weights, which
is what chaining lycoris modules does. Strength 0 skips an adapter entirely.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

from .adapters import Adapter, LayerAdapter
from .algorithms import accumulate, dynamic_contribution
from .binding import Binding
from .errors import LycorisError
from .fused import (
    Factory,
    bias_factory,
    delta_factory,
    extra_bias,
    fused_deltas,
    row_sliceable,
    sliced,
)
from .layouts import Target
from .limits import check_strength
from .quantization import base_bias, base_weight, effective_mode, weight_like

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


class BaseWeights(Mapping[str, tuple[torch.Tensor, torch.Tensor | None]]):
    """Module path -> (weight, bias) of the base layers a patch reads, on demand: a quantised
    layer's weight is dequantised when it is read (never all of them at once)."""

    def __init__(self, module: nn.Module, paths: Collection[str]) -> None:
        self.module, self.paths = module, list(paths)

    def __getitem__(self, path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        if path not in self.paths:
            raise KeyError(path)
        mod = self.module.get_submodule(path)
        bias = base_bias(mod)
        return base_weight(mod).detach(), None if bias is None else bias.detach()

    def __iter__(self) -> Iterator[str]:
        return iter(self.paths)

    def __len__(self) -> int:
        return len(self.paths)


class Patch:
    """A set of (adapter, strength) pairs bound to a module, in one mode.

    ``apply()`` changes the module, ``restore()`` undoes it exactly. ``key`` identifies the
    set (:func:`patch_key`: contents, strengths, mode) so callers can keep a patch applied
    between calls. `component` names the pipeline part `module` is (the denoiser by
    default); layers of the components in `elsewhere` are left to their own patches.
    """

    def __init__(
        self,
        module: nn.Module,
        adapters: Sequence[tuple[Adapter, float]],
        mode: str = "merge",
        strict: bool = True,
        *,
        component: str = "denoiser",
        family: str | None = None,
        elsewhere: Collection[str] = (),
    ) -> None:
        _check_mode(mode)
        self.module = module
        self.mode = mode
        self.component = component
        # module path -> the (layer, strength) pairs touching it; `_entries` keeps the targets
        self.plan: dict[str, list[tuple[LayerAdapter, float]]] = {}
        self._entries: list[tuple[LayerAdapter, float, tuple[Target, ...]]] = []
        self.bindings: list[Binding] = []
        self._adapters = [(adapter, _check_strength(adapter, s)) for adapter, s in adapters]
        for adapter, s in self._adapters:
            if s == 0.0:
                continue
            binding = adapter.bind(
                module, strict=strict, component=component, family=family, elsewhere=elsewhere
            )
            self.bindings.append(binding)
            for name, targets in binding.targets.items():
                layer = binding.layers[name]
                self._entries.append((layer, s, targets))
                for t in targets:
                    self.plan.setdefault(t.path, []).append((layer, s))
        # the mode that runs: a merge into quantised layers cannot be exact, so it runs dynamic
        self.applied_mode = effective_mode(module, mode, self.plan)
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
        """Modules this patch changes."""
        return len(self.plan)

    # ------------------------------------------------------------------ apply/restore
    @torch.no_grad()
    def apply(self) -> None:
        if self.applied:
            raise LycorisError("this patch is already applied; restore() it first")
        self.applied = True
        try:
            if self.applied_mode == "merge":
                self._merge()
            else:
                self._hook()
        except BaseException:
            self.restore()
            raise

    def _base(self) -> BaseWeights:
        return BaseWeights(self.module, self.plan)

    def _merge(self) -> None:
        # Every delta is computed from the base weights first (a fused layer reads several
        # modules), then the merged weights are new tensors swapped in with `param.data = ...`;
        # the original tensors are the backup, untouched, swapped back on restore (exact, O(1)).
        # Merged tensors must be normal tensors even when called under inference_mode.
        with torch.inference_mode(False):
            base = self._base()
            acc: dict[str, torch.Tensor | None] = {}
            dbs: dict[str, torch.Tensor] = {}

            def add_bias(path: str, db: torch.Tensor | None) -> None:
                if db is not None and base[path][1] is not None:
                    dbs[path] = db if path not in dbs else dbs[path] + db

            for layer, s, targets in self._entries:
                if len(targets) == 1 and targets[0].plain:
                    path = targets[0].path
                    w0, b0 = base[path]
                    a = acc.get(path)
                    if a is None and w0.dtype != torch.float32:
                        a = w0.float()
                    acc[path], db = accumulate(a, layer, w0, b0, s)
                    add_bias(path, db)
                    add_bias(path, extra_bias(layer, s, w0))
                    continue
                for path, (dw, db) in fused_deltas(layer, targets, base, s).items():
                    a = acc.get(path)
                    acc[path] = base[path][0].float() + dw if a is None else a.add_(dw)
                    add_bias(path, db)
            for path, merged in acc.items():
                mod = self.module.get_submodule(path)
                w0, b0 = base[path]
                db = dbs.get(path)
                self._backup[path] = (mod.weight.data, None if db is None else mod.bias.data)
                mod.weight.data = merged.to(w0.dtype)
                if db is not None:
                    mod.bias.data = (b0.float() + db).to(b0.dtype)

    def _factories(self) -> dict[str, list[Factory]]:
        """Per module path, what builds each contribution of its dynamic forward."""
        out: dict[str, list[Factory]] = {}
        base = self._base()
        for layer, s, targets in self._entries:
            if len(targets) == 1 and targets[0].plain:
                parts = {targets[0].path: layer}
            elif row_sliceable(layer):
                parts = sliced(layer, targets, base)
            else:
                for path, (dw, db) in fused_deltas(layer, targets, base, s).items():
                    out.setdefault(path, []).append(delta_factory(dw, db))
                continue
            for path, part in parts.items():
                fs = out.setdefault(path, [])
                fs.append(lambda m, part=part, s=s: dynamic_contribution(part, m, s))
                mod = self.module.get_submodule(path)
                db = extra_bias(part, s, weight_like(mod))
                if db is not None and getattr(mod, "bias", None) is not None:
                    fs.append(bias_factory(db))
        return out

    def _hook(self) -> None:
        for path, factories in self._factories().items():
            mod = self.module.get_submodule(path)
            # prepared per device: offloading hooks may run the layer on another device
            prepared = {weight_like(mod).device: [make(mod) for make in factories]}

            def hook(
                m: nn.Module,
                args: tuple[torch.Tensor, ...],
                out: torch.Tensor,
                factories: list = factories,
                prepared: dict = prepared,
            ) -> torch.Tensor:
                x = args[0]
                contributions = prepared.get(x.device)
                if contributions is None:
                    with torch.no_grad():
                        contributions = [make(m) for make in factories]
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
