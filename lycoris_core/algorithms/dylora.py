"""DyLoRA: LoCon's tensors, recognised by the file's ``lycoris_config`` (``algo: dylora``).

At full rank lycoris' forward uses every block with the scale alpha / number of blocks.
Without metadata (no block size) the file is LoCon everywhere else, and here too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import AdapterFormatError
from .base import Layer
from .locon import UP, LoCon


class DyLoRA(LoCon):
    name = "dylora"

    def detect(self, tensors: Mapping[str, torch.Tensor], config: Any) -> bool:
        return UP in tensors and config is not None and config.algo == self.name

    def options(self, keywords: Mapping[str, Any]) -> dict[str, Any]:
        return {"block_size": int(keywords.get("block_size", 4))}

    def scale(self, layer: Layer) -> float:
        r = self.rank(layer)
        alpha = layer.alpha
        block = int(layer.options.get("block_size", 0) or 0)
        if block <= 0:  # no metadata: the file reloads as LoCon everywhere else
            return (alpha or r) / r
        if r % block:
            raise AdapterFormatError(
                f"layer '{layer.name}': DyLoRA rank {r} is not a multiple of block_size {block}"
            )
        return (alpha or r) / (r // block)


DYLORA = DyLoRA()
