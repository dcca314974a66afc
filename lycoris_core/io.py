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

from .errors import AdapterFormatError
from .paths import check_output_file, check_output_folder, os_failure
from .tempfiles import SUFFIX, clean_stale_once, permissions, temp_prefix

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

    A crash or an exception leaves any previous file at `path` untouched; stale temp files
    of killed writes in that folder are removed first (:func:`.tempfiles.clean_stale_once`).
    The file gets the permissions of the umask (not the temp file's 0600). An ``OSError``
    (no such folder, not writable, disk full, `path` is a folder) becomes a
    :class:`PathError` naming `path`.
    """
    target = check_output_file(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_once(target.parent)
        fd, tmp = tempfile.mkstemp(
            prefix=temp_prefix(target.name), suffix=SUFFIX, dir=target.parent
        )
        os.close(fd)
    except OSError as exc:
        raise os_failure(target, exc) from None
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, permissions("file"))
        os.replace(tmp, target)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise os_failure(target, exc) from None
        raise
    _fsync_dir(target.parent)
    return target


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable where the platform allows it."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


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

    `path` must not exist or be an empty folder (checked before anything is written). On an
    exception the temporary folder is removed and `path` is untouched; stale temporary
    entries of killed writes in its parent are removed first. The folder gets the
    permissions of the umask; an ``OSError`` becomes a :class:`PathError` naming `path`.
    """
    target = check_output_folder(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_once(target.parent)
        staging = Path(
            tempfile.mkdtemp(prefix=temp_prefix(target.name), suffix=SUFFIX, dir=target.parent)
        )
        os.chmod(staging, permissions("folder"))
    except OSError as exc:
        raise os_failure(target, exc) from None
    try:
        yield staging
        if target.exists():  # an empty folder: replace it
            target.rmdir()
        staging.rename(target)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError):
            raise os_failure(target, exc) from None
        raise
