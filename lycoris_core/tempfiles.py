"""Our temporary names, and the cleanup of the ones a killed process left behind.

Every temporary file or folder this library writes beside its final path is named
``.<final name>.~<host>_<pid>_<random>.tmp`` (``<host>``: 8 hex digits of the machine name's
hash; ``<pid>``: the writing process). Checkpoint staging folders keep their fixed name
``.step-NNNNNN.tmp`` (every process of a distributed run writes into the same one) and hold an
``.owner`` file with the same ``<host>_<pid>`` while they are being filled.

The rule for "stale" (safe to delete), applied only to names of these shapes:

* written on this machine by a process that is no longer running: stale at once (a pid that
  was reused by a live process keeps the entry: nothing is deleted that might be in use);
* written on another machine (a shared folder), or by an earlier version whose names carry no
  pid, or a staging folder without its owner file: stale once nothing in it changed for
  :data:`FOREIGN_AGE` seconds (a live writer keeps changing it well within that).

The running process's own entries are never stale. Cleaning happens on the first atomic
write into a folder in each process (:func:`clean_stale_once`: later writes there skip it, so a
feature cache writing thousands of files lists its folder once), and whenever a training run
starts or resumes (its output's temp files and its checkpoints folder, every time).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)

SUFFIX = ".tmp"
OWNER_FILE = ".owner"
FOREIGN_AGE = 24 * 3600.0

_OURS = re.compile(r"^\.(?P<target>.+)\.~(?P<host>[0-9a-f]{8})_(?P<pid>\d+)_[A-Za-z0-9_]+\.tmp$")
_LEGACY_FILE = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")
_LEGACY_FOLDER = re.compile(r"^\.(?P<target>.+)\.tmp-[a-z0-9_]{8}$")
_STAGING = re.compile(r"^\.step-\d{6,}\.tmp$")


def host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def owner_tag() -> str:
    """``<host>_<pid>`` of the running process."""
    return f"{host_tag()}_{os.getpid()}"


def temp_prefix(final_name: str) -> str:
    """The prefix of a temporary name for `final_name` (``mkstemp``/``mkdtemp`` add the rest)."""
    return f".{final_name}.~{owner_tag()}_"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if sys.platform == "win32":  # no signal-0 probe: treat as alive (the age rule applies)
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def _last_change(entry: Path) -> float:
    newest = entry.lstat().st_mtime
    if entry.is_dir() and not entry.is_symlink():
        for sub in entry.rglob("*"):
            with contextlib.suppress(OSError):  # vanished meanwhile
                newest = max(newest, sub.lstat().st_mtime)
    return newest


def _stale_owner(host: str, pid: int, entry: Path) -> bool:
    if host == host_tag():
        return not _alive(pid)
    return time.time() - _last_change(entry) > FOREIGN_AGE


def is_stale(entry: Path) -> bool:
    """Whether `entry` is one of our temporary names and safe to delete (see the module)."""
    name = entry.name
    try:
        m = _OURS.match(name)
        if m:
            return _stale_owner(m["host"], int(m["pid"]), entry)
        if _STAGING.match(name) and entry.is_dir():
            try:
                host, _, pid = (
                    (entry / OWNER_FILE).read_text(encoding="utf-8").strip().partition("_")
                )
                return _stale_owner(host, int(pid), entry)
            except (OSError, ValueError):  # no owner yet, or an earlier version's folder
                return time.time() - _last_change(entry) > FOREIGN_AGE
        if _LEGACY_FILE.match(name) or _LEGACY_FOLDER.match(name):
            return time.time() - _last_change(entry) > FOREIGN_AGE
    except OSError:  # vanished meanwhile
        return False
    return False


def _target_of(name: str) -> str | None:
    for pattern in (_OURS, _LEGACY_FILE, _LEGACY_FOLDER):
        m = pattern.match(name)
        if m:
            return m["target"]
    return None


def clean_stale(folder: str | os.PathLike[str], final_name: str | None = None) -> list[Path]:
    """Delete the stale temporary entries in `folder` (only those of `final_name` if given);
    returns what was removed. Never raises for a folder that cannot be listed."""
    root = Path(folder)
    try:
        entries = list(root.iterdir())
    except OSError:
        return []
    removed = []
    for entry in entries:
        if final_name is not None and _target_of(entry.name) != final_name:
            continue
        if not is_stale(entry):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError as exc:
            logger.warning("%s: stale temporary entry not removed (%s)", entry, exc)
            continue
        removed.append(entry)
    if removed:
        logger.info("removed %d stale temporary entries in %s", len(removed), root)
    return removed


_CLEANED: set[str] = set()


def clean_stale_once(folder: str | os.PathLike[str]) -> list[Path]:
    """:func:`clean_stale` for `folder`, the first time this process writes into it."""
    key = os.path.abspath(folder)
    if key in _CLEANED:
        return []
    _CLEANED.add(key)
    return clean_stale(folder)


def mark_owner(folder: Path) -> None:
    """Record the running process as the writer of a staging `folder`."""
    (folder / OWNER_FILE).write_text(owner_tag(), encoding="utf-8")


def clear_owner(folder: Path) -> None:
    (folder / OWNER_FILE).unlink(missing_ok=True)


def permissions(kind: str) -> int:
    """The mode a new file (``kind="file"``) or folder gets from the process umask: temp files
    are created 0600/0700, which would keep other users and services from reading outputs."""
    mask = os.umask(0o022)
    os.umask(mask)
    return (0o666 if kind == "file" else 0o777) & ~mask
