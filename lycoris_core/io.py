"""Files: safetensors only, metadata, atomic writes.

Pickle formats (.ckpt, .pt, .pth, .bin) can run code when loaded; they are refused with an
error that says how to convert them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .errors import AdapterFormatError, LycorisError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def _refuse_pickle(path: Path) -> None:
    raise AdapterFormatError(
        f"{path}: pickle-based files ({', '.join(PICKLE_SUFFIXES)}) are refused because "
        "loading them can run arbitrary code. Convert it once in a trusted environment, e.g. "
        "`safetensors.torch.save_file(torch.load(path, weights_only=True), 'out.safetensors')`, "
        "and load the .safetensors file."
    )


def read_safetensors(
    path: str | os.PathLike[str],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a .safetensors file (CPU tensors, stored dtypes)."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        _refuse_pickle(p)
    if not p.is_file():
        raise AdapterFormatError(
            f"{p}: file not found" + ("" if p.exists() else "; check the path and the folder")
        )
    with open(p, "rb") as fh:
        head = fh.read(9)
    # a safetensors file starts with its header length (8 bytes, little endian) and '{'; a
    # length such as 0x480 starts with b"\x80\x04" like a pickle, so the '{' decides
    if head.startswith(_PICKLE_MAGIC) and head[8:9] != b"{":
        _refuse_pickle(p)
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open API
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterFormatError(
            f"{p}: not a readable .safetensors file ({exc}); the file may be truncated or in "
            "another format"
        ) from None
    return tensors, metadata


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], Any]) -> Path:
    """Call ``write(tmp_path)`` on a temp file beside `path`, fsync it, rename it into place.

    A crash or an exception leaves any previous file at `path` untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename durable where the platform allows it
        dir_fd = os.open(target.parent, os.O_RDONLY)
    except OSError:
        return target
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
    return target


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Save tensors atomically; metadata values that are not strings are JSON-encoded."""
    from safetensors.torch import save_file

    meta = {
        str(k): (v if isinstance(v, str) else json.dumps(v, sort_keys=True))
        for k, v in (metadata or {}).items()
    }
    data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(data, tmp, metadata=meta))


@contextmanager
def atomic_folder(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it is renamed to `path`.

    `path` must not exist or be an empty folder. On an exception the temporary folder is
    removed and `path` is untouched.
    """
    target = Path(path)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise LycorisError(
            f"{target}: already exists and is not empty; choose an empty folder (or a new "
            "path), or delete it first"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        if target.exists():  # an empty folder: replace it
            target.rmdir()
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
