"""Adapter files: read every algorithm lycoris 4.x saves, and bind layers to a model.

A file holds, per wrapped layer, tensors under ``<layer>.<suffix>`` where ``<layer>`` is a
prefix (``lycoris`` by default, or kohya's ``lora_unet``) plus the diffusers module path with
``.`` replaced by ``_``. The algorithm of each layer is recognised from its suffixes (and, for
DyLoRA, T-LoRA and GLoRA details, from the ``lycoris_config`` metadata the seed's trainer
writes). Files that lycoris' own ``create_lycoris_from_weights`` cannot reload (IA3,
unbalanced LoKr, tucker conv LoKr) load here, because nothing is rebuilt through lycoris'
module constructors. What each algorithm saves, how it is recognised and its exact math live
in :mod:`lycoris_core.algorithms` (one object per algorithm, in a registry); this module
only loops over that registry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .algorithms import REGISTRY, Algorithm, check_layer, detect, layer_label
from .config import LycorisConfig
from .errors import AdapterFormatError, ConfigError
from .io import read_safetensors

logger = logging.getLogger(__name__)

# prefixes recognised in front of the module path (the metadata's lora_prefix is tried first)
KNOWN_PREFIXES = ("lycoris", "lora_unet", "lora_transformer", "lora")


@dataclass
class LayerAdapter:
    """One layer of an adapter file: its algorithm, tensors and options."""

    name: str
    algo: str
    tensors: dict[str, torch.Tensor]
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def alpha(self) -> float | None:
        a = self.tensors.get("alpha")
        return None if a is None else float(a.float().item())

    @property
    def algorithm(self) -> Algorithm:
        return REGISTRY[self.algo]

    @property
    def label(self) -> str:
        """The algorithm name followed by its modifiers' labels (see ``algorithms.MODIFIERS``)."""
        return layer_label(self)

    def get(self, suffix: str) -> torch.Tensor | None:
        return self.tensors.get(suffix)

    def rank(self) -> int | None:
        """The low-rank dimension lycoris divides alpha by, when the algorithm has one."""
        return self.algorithm.rank(self)


@dataclass
class Adapter:
    """A parsed adapter file. Layers are keyed by their name in the file."""

    layers: dict[str, LayerAdapter]
    metadata: dict[str, str] = field(default_factory=dict)
    path: str | None = None
    config: LycorisConfig | None = None
    _fingerprint: str = field(default="", repr=False)
    _file_stat: tuple[int, int] | None = field(default=None, repr=False)
    _content_key: str = field(default="", repr=False)

    @property
    def fingerprint(self) -> str:
        """Content hash (sha256, 16 hex): of the file, or of the tensors when there is none
        (or when the file changed since it was read)."""
        if not self._fingerprint:
            if self.path and self._file_unchanged():
                self._fingerprint = file_fingerprint(self.path)
            else:
                h = hashlib.sha256()
                for name in sorted(self.layers):
                    for key, tensor in sorted(self.layers[name].tensors.items()):
                        h.update(f"{name}.{key}{tuple(tensor.shape)}{tensor.dtype}".encode())
                        h.update(
                            tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
                        )
                self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    @property
    def content_key(self) -> str:
        """What decides this adapter's effect: its fingerprint and each layer's algorithm and
        options (an adapter made in memory has no file whose hash covers its metadata)."""
        if not self._content_key:
            layers = [(n, la.algo, sorted(la.options.items())) for n, la in self.layers.items()]
            digest = hashlib.sha256(repr(sorted(layers)).encode()).hexdigest()[:16]
            self._content_key = f"{self.fingerprint}:{digest}"
        return self._content_key

    def _file_unchanged(self) -> bool:
        if self._file_stat is None:
            return True
        try:
            return _stat_of(self.path) == self._file_stat
        except OSError:
            return False

    @property
    def name(self) -> str:
        return Path(self.path).name if self.path else "<adapter>"

    @property
    def prefixes(self) -> tuple[str, ...]:
        own = (self.config.apply_preset or {}).get("lora_prefix") if self.config else None
        return tuple(dict.fromkeys([p for p in (own, *KNOWN_PREFIXES) if p]))

    def algorithms(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for layer in self.layers.values():
            key = layer.label
            out[key] = out.get(key, 0) + 1
        return out

    def num_params(self) -> int:
        return sum(
            t.numel()
            for layer in self.layers.values()
            for k, t in layer.tensors.items()
            if k != "alpha"
        )

    # ------------------------------------------------------------------ binding
    def bind(self, module: nn.Module, strict: bool = True) -> dict[str, LayerAdapter]:
        """Map the file's layers to module paths of `module`.

        Keys that match no module raise :class:`AdapterFormatError` (count and first keys),
        or with ``strict=False`` are skipped with one summarised warning.
        """
        index: dict[str, str] = {}
        clashes: set[str] = set()
        for path, _ in module.named_modules():
            if not path:
                continue
            flat = path.replace(".", "_")
            if flat in index and index[flat] != path:
                clashes.add(flat)
            index[flat] = path
        bound: dict[str, LayerAdapter] = {}
        unmatched: list[str] = []
        for name, layer in self.layers.items():
            path = None
            for prefix in self.prefixes:
                if name.startswith(prefix + "_"):
                    flat = name[len(prefix) + 1 :]
                    if flat in clashes:
                        raise AdapterFormatError(
                            f"{self.name}: layer '{name}' maps to more than one module of "
                            f"{type(module).__name__} (the '.'->'_' naming is ambiguous here)"
                        )
                    path = index.get(flat)
                    if path is not None:
                        break
            if path is None:
                unmatched.append(name)
                continue
            _check_fits(self.name, layer, module.get_submodule(path), path)
            bound[path] = layer
        if unmatched:
            msg = (
                f"{self.name}: {len(unmatched)} of {len(self.layers)} layers match no module of "
                f"this {type(module).__name__} (first: {', '.join(unmatched[:5])}). The file "
                "was probably made for another model or architecture"
            )
            if strict or not bound:
                if not bound:
                    raise AdapterFormatError(
                        msg + "; it matches 0 modules, so applying it would do nothing."
                    )
                raise AdapterFormatError(
                    msg + "; pass strict=False to apply the layers that do match."
                )
            logger.warning("%s; skipping them.", msg)
        return bound


def _check_fits(name: str, layer: LayerAdapter, target: nn.Module, path: str) -> None:
    weight = getattr(target, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise AdapterFormatError(
            f"{name}: layer '{layer.name}' targets '{path}' ({type(target).__name__}), which "
            "has no weight to adapt"
        )
    algorithm = layer.algorithm
    if not isinstance(target, algorithm.targets):
        raise AdapterFormatError(
            f"{name}: layer '{layer.name}' ({layer.algo}) cannot adapt '{path}' "
            f"({type(target).__name__})"
        )
    got = algorithm.mismatch(layer, weight)
    if got is not None:
        raise AdapterFormatError(
            f"{name}: layer '{layer.name}' ({layer.algo}, {got}) does not fit '{path}' (weight "
            f"shape {tuple(weight.shape)}); the file was made for another model or size"
        )


# --------------------------------------------------------------------------- parsing


def _metadata_config(meta: dict[str, str], source: str) -> LycorisConfig | None:
    raw = meta.get("lycoris_config")
    if not raw:
        return None
    try:
        return LycorisConfig.from_dict(json.loads(raw), source=f"{source} (lycoris_config)")
    except (ConfigError, TypeError, ValueError, RecursionError) as exc:  # hostile JSON too
        logger.warning("%s: ignoring unreadable lycoris_config metadata: %s", source, exc)
        return None


def adapter_from_state_dict(
    state_dict: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
    source: str = "<state dict>",
) -> Adapter:
    """Parse a lycoris-style state dict (as saved by ``save_weights``) into an Adapter."""
    metadata = dict(metadata or {})
    config = _metadata_config(metadata, source)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        if "." not in key:
            raise AdapterFormatError(
                f"{source}: key '{key}' is not '<layer>.<tensor>'; not a LyCORIS/LoRA file"
            )
        layer, suffix = key.split(".", 1)
        grouped.setdefault(layer, {})[suffix] = tensor
    if not grouped:
        raise AdapterFormatError(f"{source}: the file holds no tensors")
    layers: dict[str, LayerAdapter] = {}
    for name, tensors in grouped.items():
        try:
            algorithm = detect(name, tensors, config)
        except AdapterFormatError as exc:
            raise AdapterFormatError(f"{source}: {exc}") from None
        unknown = sorted(set(tensors) - set(algorithm.all_suffixes))
        missing = [s for s in algorithm.required if s not in tensors]
        if unknown or missing:
            what = f"unknown tensors {unknown}" if unknown else f"missing tensors {missing}"
            raise AdapterFormatError(f"{source}: layer '{name}' ({algorithm.name}) has {what}")
        options = {} if config is None else algorithm.options(config.keywords)
        layers[name] = LayerAdapter(name, algorithm.name, dict(tensors), options)
        check_layer(layers[name], source)  # shapes, ranks, finite values: once per file
    return Adapter(layers=layers, metadata=metadata, path=None, config=config)


def file_fingerprint(path: str | os.PathLike[str]) -> str:
    """Content hash (sha256, first 16 hex) of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _stat_of(path: str | os.PathLike[str]) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def load_adapter(path: str | os.PathLike[str]) -> Adapter:
    """Read a LyCORIS/LoRA ``.safetensors`` file (pickle formats are refused)."""
    try:
        stat = _stat_of(path)  # before reading: a file rewritten meanwhile no longer matches
    except OSError:
        stat = None  # read_safetensors says what is wrong with the path
    tensors, metadata = read_safetensors(path)
    adapter = adapter_from_state_dict(tensors, metadata, source=str(path))
    adapter.path = os.fspath(path)  # the content hash is computed when first asked for,
    adapter._file_stat = stat  # ... from the file while it is still the one that was read
    return adapter
