"""The feature cache: encoded features (VAE latents, text embeddings) in memory and on disk."""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ...errors import LycorisError
from ...io import read_safetensors, write_safetensors
from .spec import DatasetError, _is_int

logger = logging.getLogger(__package__)  # one logger for the dataset package

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def _check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _SAFE_NAME.match(value) or ".." in value:
        raise DatasetError(
            f"feature cache: {what} {value!r} is not filesystem-safe; use 1-200 characters "
            "from A-Z a-z 0-9 . _ - starting with a letter or digit (e.g. a hex hash)"
        )
    return value


class FeatureCache:
    """Encoded features (dicts of tensors) by key: in memory, and on disk if `cache_dir` is set.

    Disk files are ``cache_dir/namespace/<key>.safetensors``, written atomically; a corrupt or
    mismatching file is ignored with a warning and recomputed. Put everything the features
    depend on besides the key (model hash, resolution, ...) into `namespace`.

    Tensors are stored and returned on `device` (default CPU) so results from memory, disk
    and fresh computation always agree. `max_items` bounds the in-memory entries (least
    recently used are dropped first; they stay on disk); None keeps everything.
    """

    def __init__(
        self,
        cache_dir: str | None,
        namespace: str,
        *,
        device: str | torch.device = "cpu",
        max_items: int | None = None,
    ):
        self.namespace = _check_name(namespace, "namespace")
        self.folder = Path(cache_dir) / namespace if cache_dir is not None else None
        self.device = torch.device(device)
        if max_items is not None and (not _is_int(max_items) or max_items < 1):
            raise DatasetError(f"feature cache: max_items must be None or >= 1, got {max_items!r}")
        self.max_items = max_items
        self.hits = 0
        self.misses = 0
        self._memory: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()

    def path(self, key: str) -> Path | None:
        """The disk file of `key` (None without a cache_dir)."""
        _check_name(key, "key")
        return self.folder / f"{key}.safetensors" if self.folder is not None else None

    def get_or_compute(
        self, key: str, compute: Callable[[], dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """The features of `key`: from memory, else from disk, else ``compute()`` (then stored)."""
        path = self.path(key)
        if key in self._memory:
            self._memory.move_to_end(key)
            self.hits += 1
            return dict(self._memory[key])
        if path is not None and path.is_file():
            loaded = self._read(path, key)
            if loaded is not None:
                self.hits += 1
                return dict(self._remember(key, loaded))
        self.misses += 1
        features = compute()
        if not isinstance(features, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in features.items()
        ):
            raise DatasetError(
                f"feature cache {self.namespace}: compute() for {key!r} must return a dict of "
                f"str -> torch.Tensor, got {type(features).__name__}"
            )
        stored = self._remember(
            key, {k: v.detach().to(self.device).contiguous() for k, v in features.items()}
        )
        if path is not None:
            write_safetensors(path, stored, {"namespace": self.namespace, "key": key})
        return dict(stored)

    def _read(self, path: Path, key: str) -> dict[str, torch.Tensor] | None:
        try:
            tensors, meta = read_safetensors(path)
        except LycorisError as exc:
            logger.warning("feature cache: ignoring %s and recomputing it (%s)", path, exc)
            return None
        if meta.get("key") != key or meta.get("namespace") != self.namespace:
            logger.warning(
                "feature cache: ignoring %s and recomputing it (written for key %r in %r)",
                path,
                meta.get("key"),
                meta.get("namespace"),
            )
            return None
        return {k: v.to(self.device) for k, v in tensors.items()}

    def _remember(self, key: str, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self._memory[key] = features
        if self.max_items is not None:
            while len(self._memory) > self.max_items:
                self._memory.popitem(last=False)
        return features

    def clear_memory(self) -> None:
        """Drop the in-memory entries (disk files stay)."""
        self._memory.clear()

    def __len__(self) -> int:
        return len(self._memory)
