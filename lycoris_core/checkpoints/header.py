"""Read a .safetensors header (names, dtypes, shapes) without reading any tensor.

The safetensors format (https://github.com/huggingface/safetensors, "Format"): 8 bytes
little-endian header length N, then N bytes of JSON ``{name: {dtype, shape, data_offsets}}``
plus an optional ``__metadata__`` map, then the tensor bytes. A file shorter than the largest
``data_offsets`` end is truncated: reported here, before anything is allocated.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ModelLoadError
from ..io import PICKLE_SUFFIXES

_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit for the JSON header

# safetensors dtype names -> our short names (storage dtypes reported to the user)
DTYPE_NAMES = {
    "F64": "fp64",
    "F32": "fp32",
    "F16": "fp16",
    "BF16": "bf16",
    "F8_E4M3": "fp8_e4m3fn",
    "F8_E5M2": "fp8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # our short name, e.g. "bf16", "fp8_e4m3fn"
    shape: tuple[int, ...]


@dataclass
class Header:
    """What a file holds: tensor names with dtype and shape, and its metadata."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.tensors[key].shape

    def has(self, key: str) -> bool:
        return key in self.tensors

    def with_prefix(self, prefix: str) -> list[str]:
        return [k for k in self.tensors if k.startswith(prefix)]

    def storage_dtype(self, prefix: str = "") -> str:
        """The storage dtype under `prefix`: its fp8 (or GGUF quantisation) type when any
        weight is stored so (such files keep biases and norms in bf16), else the dtype of most
        elements."""
        counts: dict[str, int] = {}
        for key, info in self.tensors.items():
            if key.startswith(prefix) and info.dtype.startswith(("fp", "bf", "gguf_")):
                n = 1
                for s in info.shape:
                    n *= s
                counts[info.dtype] = counts.get(info.dtype, 0) + n
        fp8 = [d for d in counts if d.startswith(("fp8", "gguf_"))]
        if fp8:
            return max(fp8, key=counts.__getitem__)
        return max(counts, key=counts.__getitem__) if counts else "none"


def read_header(path: str | os.PathLike[str]) -> Header:
    """The header of a .safetensors file; typed errors for pickles, truncation, non-files."""
    p = Path(path)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelLoadError(
            f"{p}: pickle checkpoints ({', '.join(PICKLE_SUFFIXES)}) are refused because "
            "loading them can run arbitrary code; use a .safetensors file"
        )
    if p.suffix.lower() == ".gguf":
        from .gguf import read_gguf_header

        return read_gguf_header(p)
    if not p.is_file():
        raise ModelLoadError(f"{p}: file not found")
    size = p.stat().st_size
    with p.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelLoadError(f"{p}: not a .safetensors file ({size} bytes); re-download it")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or n + 8 > size:
            raise ModelLoadError(
                f"{p}: not a .safetensors file or truncated (header of {n} bytes, file of "
                f"{size}); re-download or re-save it"
            )
        raw = f.read(n)
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelLoadError(
            f"{p}: its safetensors header is not valid JSON; re-download it"
        ) from None
    meta = data.pop("__metadata__", None) or {}
    tensors: dict[str, TensorInfo] = {}
    end = 0
    for name, entry in data.items():
        try:
            dtype = DTYPE_NAMES.get(entry["dtype"], entry["dtype"].lower())
            tensors[name] = TensorInfo(dtype, tuple(int(s) for s in entry["shape"]))
            end = max(end, int(entry["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError):
            raise ModelLoadError(f"{p}: malformed header entry {name!r}; re-download it") from None
    if 8 + n + end > size:
        raise ModelLoadError(
            f"{p}: truncated ({size} bytes, its header needs {8 + n + end}); the download or "
            "copy did not finish: copy or download the file again"
        )
    return Header(path=p, tensors=tensors, metadata={str(k): str(v) for k, v in meta.items()})
