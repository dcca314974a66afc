"""Adapter files: read every algorithm lycoris 4.x saves, and bind layers to a model.

A file holds, per layer, tensors under ``<layer name><suffix>``; the suffix is found from the
right (the longest known one: every algorithm's, DoRA's, ``diff_b`` and the LoRA spellings of
PEFT/diffusers/ai-toolkit, normalised to lycoris' names by :mod:`lycoris_core.layouts.keys`),
so layer names may contain dots. A layer name is a prefix plus a module name in any layout
(``lycoris_``/kohya with ``.`` -> ``_``, dotted diffusers/PEFT, ldm/BFL/SAI names); binding it
to a model is :mod:`lycoris_core.binding`'s job. The algorithm of each layer is recognised from
its suffixes (and, for DyLoRA, T-LoRA and GLoRA details, from the ``lycoris_config`` metadata
the seed's trainer writes). Files that lycoris' own ``create_lycoris_from_weights`` cannot
reload (IA3, unbalanced LoKr, tucker conv LoKr) load here, because nothing is rebuilt through
lycoris' module constructors. What each algorithm saves, how it is recognised and its exact
math live in :mod:`lycoris_core.algorithms` (one object per algorithm, in a registry); this
module only loops over that registry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .algorithms import REGISTRY, Algorithm, detect, layer_label
from .config import LycorisConfig
from .errors import AdapterFormatError, ConfigError
from .io import read_safetensors
from .layouts.keys import BIAS_DIFF, normalise_layer, split_key, suffix_table
from .layouts.names import FLAT_PREFIXES

if TYPE_CHECKING:
    from .binding import Binding

logger = logging.getLogger(__name__)

# prefixes recognised in front of a '.'->'_' module path (the metadata's lora_prefix first)
KNOWN_PREFIXES = FLAT_PREFIXES


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
    def bind(
        self,
        module: nn.Module,
        strict: bool | None = True,
        *,
        component: str = "denoiser",
        family: str | None = None,
        elsewhere: Collection[str] = (),
    ) -> Binding:
        """Bind the file's layers of `component` to `module` (:func:`binding.bind_component`).

        The result maps module path -> the layer adapting it (a fused layer under each of its
        modules); ``.targets`` gives per file layer its targets with row slices, ``.layout``
        the layout detected. Unmatched layers raise :class:`AdapterFormatError` (counts,
        layout, fix), or with ``strict=False`` are skipped with one summarised warning;
        ``strict=None`` only reports (``Binding.problem``).
        """
        from .binding import bind_component

        return bind_component(
            self, module, component=component, family=family, strict=strict, elsewhere=elsewhere
        )

    def has_text_layers(self, family: str | None = None) -> bool:
        """Whether some layer names a text encoder (``lora_te*_``, ``text_encoder*.``, ...)."""
        from .layouts.names import text_component

        return any(text_component(name, family) is not None for name in self.layers)


# --------------------------------------------------------------------------- parsing


def _metadata_config(meta: dict[str, str], source: str) -> LycorisConfig | None:
    raw = meta.get("lycoris_config")
    if not raw:
        return None
    try:
        return LycorisConfig.from_dict(json.loads(raw), source=f"{source} (lycoris_config)")
    except (json.JSONDecodeError, ConfigError, TypeError) as exc:
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
    table = suffix_table()
    for key, tensor in state_dict.items():
        parts = split_key(key, table)
        if parts is None:
            raise AdapterFormatError(
                f"{source}: key '{key}' is not '<layer>.<tensor>'; not a LyCORIS/LoRA file"
            )
        layer, suffix, _ = parts
        tensors = grouped.setdefault(layer, {})
        if suffix in tensors:
            raise AdapterFormatError(
                f"{source}: layer '{layer}' has its '{suffix}' tensor twice (the second as "
                f"'{key}'); the file mixes two spellings of the same tensor"
            )
        tensors[suffix] = tensor
    if not grouped:
        raise AdapterFormatError(f"{source}: the file holds no tensors")
    layers: dict[str, LayerAdapter] = {}
    for name, tensors in grouped.items():
        tensors = normalise_layer(tensors)
        try:
            algorithm = detect(name, tensors, config)
        except AdapterFormatError as exc:
            raise AdapterFormatError(f"{source}: {exc}") from None
        unknown = sorted(set(tensors) - set(algorithm.all_suffixes) - {BIAS_DIFF})
        missing = [s for s in algorithm.required if s not in tensors]
        if unknown or missing:
            what = f"unknown tensors {unknown}" if unknown else f"missing tensors {missing}"
            raise AdapterFormatError(f"{source}: layer '{name}' ({algorithm.name}) has {what}")
        options = {} if config is None else algorithm.options(config.keywords)
        layers[name] = LayerAdapter(name, algorithm.name, dict(tensors), options)
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
