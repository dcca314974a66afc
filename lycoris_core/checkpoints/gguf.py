"""GGUF denoisers (e.g. city96's Flux/SD3 quantisations) through diffusers' GGUF support.

The ``gguf`` package is optional: without it a typed error says how to install it. With it,
:func:`read_gguf_header` gives the same :class:`Header` as a safetensors file (logical
shapes: GGUF lists dimensions innermost first), so detection, configs and checks are shared;
:func:`read_gguf_part` reads the tensors with diffusers' ``load_gguf_checkpoint``: quantised
ones stay ``GGUFParameter`` (diffusers' ``GGUFLinear`` dequantises them per forward, see
``storage.build``), plain F32/F16 ones are cast to the compute dtype.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import ModelLoadError
from .header import Header, TensorInfo

_PLAIN = {"F32": "fp32", "F16": "fp16", "BF16": "bf16"}


def _require_gguf(path: Path) -> Any:
    try:
        import gguf
    except ImportError:
        raise ModelLoadError(
            f"{path}: GGUF files need the optional 'gguf' package: pip install gguf "
            "(in ComfyUI's Python environment), then load the file again"
        ) from None
    return gguf


def read_gguf_header(path: Path) -> Header:
    """Names, storage types and logical shapes of a GGUF file's tensors."""
    gguf = _require_gguf(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: file not found")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError/struct/IndexError on bad files
        raise ModelLoadError(f"{path}: not a readable GGUF file ({exc}); re-download it") from None
    tensors = {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        dtype = _PLAIN.get(kind, f"gguf_{kind.lower()}")
        tensors[t.name] = TensorInfo(dtype, tuple(int(s) for s in reversed(list(t.shape))))
    return Header(path=path, tensors=tensors, metadata={"format": "gguf"})


def read_gguf_part(path: Path, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors under `prefix`, quantised ones kept as diffusers' ``GGUFParameter``."""
    from diffusers.models.model_loading_utils import load_gguf_checkpoint

    _require_gguf(path)
    out = {}
    for name, t in load_gguf_checkpoint(str(path), return_tensors=True).items():
        if name.startswith(prefix):
            out[name] = t if hasattr(t, "quant_type") else t.to(dtype)
    return out


def is_quantised(t: torch.Tensor) -> bool:
    return hasattr(t, "quant_type")
