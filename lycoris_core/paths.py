"""Where files go: plain names kept inside their folder, outputs checked before any work.

Names that nodes and callers build paths from (an output name, a file picked from a model
folder) are checked where the path is built, not only where a UI validated them: a name is
one path component (letters, digits, space ``. _ -``, at most 100 characters, no ``..``), or
for :func:`inside` a relative path of such components. Containment is checked on the
normalised path, before symlinks: a model folder that is itself a link (another disk) keeps
working, and links inside it are followed as ComfyUI's own loaders follow them.

An output path is checked (:func:`check_output_file`, :func:`check_output_folder`) before the
work that produces it starts: not an existing folder (or file), a parent that is a folder, and
a folder that this process may write into. Failures are :class:`~.errors.PathError` naming
the path and the fix.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

from .errors import PathError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,99}$")


def name_problem(name: object, what: str = "name") -> str | None:
    """None if `name` is a safe plain file/folder name, else the error text."""
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        return (
            f"{what} {name!r} must be a plain name (letters, digits, space . _ -, no '/' or "
            "'..', at most 100 characters); it is saved inside ComfyUI's models folder"
        )
    return None


def check_name(name: object, what: str = "name") -> str:
    """`name` if it is a safe plain name; else :class:`PathError`."""
    problem = name_problem(name, what)
    if problem is not None:
        raise PathError(problem)
    return name  # type: ignore[return-value]


def _within(root: Path, path: Path) -> bool:
    root_n, path_n = (
        os.path.normpath(os.path.abspath(root)),
        os.path.normpath(os.path.abspath(path)),
    )
    return path_n == root_n or path_n.startswith(root_n.rstrip(os.sep) + os.sep)


def output_child(root: str | os.PathLike[str], name: object, what: str, suffix: str = "") -> Path:
    """``root/<name><suffix>`` for a plain `name` (checked here, whatever validated it before)."""
    base = Path(root)
    target = base / (check_name(name, what) + suffix)
    if not _within(base, target):  # defence in depth: the name check already excludes this
        raise PathError(f"{what} {name!r} resolves outside {base}; use a plain name")
    return target


def inside(root: str | os.PathLike[str], relative: object, what: str) -> Path:
    """``root/relative`` for a relative path (sub-folders allowed) that stays inside `root`."""
    if not isinstance(relative, str) or not relative.strip() or "\x00" in relative:
        raise PathError(f"{what} {relative!r} must be a non-empty relative file name")
    parts = PurePosixPath(relative.replace("\\", "/")).parts
    if PurePosixPath(relative).is_absolute() or os.path.isabs(relative) or ".." in parts:
        raise PathError(
            f"{what} {relative!r} must be a name inside {root} (no absolute path, no '..')"
        )
    target = Path(root).joinpath(*parts)
    if not _within(Path(root), target):
        raise PathError(f"{what} {relative!r} resolves outside {root}")
    return target


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_parent(path: Path, what: str) -> None:
    anchor = _nearest_existing(path.parent)
    if not anchor.is_dir():
        raise PathError(
            f"{what} {path}: {anchor} is a file, not a folder; choose an output whose parent "
            "is a folder"
        )
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise PathError(
            f"{what} {path}: the folder {anchor} is not writable by this process; choose "
            "another folder or fix its permissions"
        )


def check_output_file(path: str | os.PathLike[str], what: str = "output") -> Path:
    """`path` as a file this process can (re)write; raises :class:`PathError` before work."""
    p = Path(path)
    if not str(path).strip():
        raise PathError(f"{what}: the path is empty; give a file path")
    if p.is_dir():
        raise PathError(f"{what} {p}: is an existing folder; give a file path (e.g. inside it)")
    if p.exists() and not p.is_file():
        raise PathError(f"{what} {p}: exists and is not a regular file; choose another path")
    _check_parent(p, what)
    return p


def check_output_folder(path: str | os.PathLike[str], what: str = "output folder") -> Path:
    """`path` as a new or empty folder this process can create; raises :class:`PathError`."""
    p = Path(path)
    if not str(path).strip():
        raise PathError(f"{what}: the path is empty; give a folder path")
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
        raise PathError(
            f"{what} {p}: already exists and is not empty; choose an empty folder (or a new "
            "path), or delete it first"
        )
    _check_parent(p, what)
    return p


def os_failure(path: str | os.PathLike[str], exc: OSError, action: str = "write") -> PathError:
    """An ``OSError`` met while writing `path`, as a typed error naming it and the fix."""
    reason = exc.strerror or type(exc).__name__
    return PathError(
        f"{path}: cannot {action} ({reason}); check that the folder exists, is writable and "
        "has free space"
    )


def existing_folder(path: object, what: str = "folder") -> Path:
    """`path` (``~`` expanded) as an existing folder; else :class:`PathError`."""
    if not isinstance(path, str) or not path.strip():
        raise PathError(f"{what} {path!r}: give the full path of an existing folder")
    p = Path(path.strip()).expanduser()
    if not p.is_dir():
        state = "is a file, not a folder" if p.exists() else "does not exist"
        raise PathError(f"{what} {str(p)!r} {state}; give the full path of a folder")
    return p
