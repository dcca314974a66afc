"""Checkpoints: the adapter plus everything needed to resume exactly, written atomically.

A checkpoint is a folder ``<run>-checkpoints/step-000010/`` holding

* ``adapter.safetensors``: the adapter at that step (lycoris key naming, full metadata), usable
  anywhere like the final file;
* ``spec.json``: the training spec, for humans and for resume checks;
* ``state/``: what ``accelerate``'s ``save_state`` writes: the network's float32 weights
  (``model.safetensors``), optimizer, LR schedule, GradScaler (fp16 on CUDA), the RNG states
  of every process, and the loop's :class:`~.progress.Progress` (``custom_checkpoint_0.pkl``:
  step, data position, loss history, noise generators; it reads back with
  ``torch.load(weights_only=True)``, which cannot run code).

The folder is filled under a temporary name (``.step-000010.tmp``, the same for every process
of a distributed run) and renamed into place, so a crash mid-write leaves the previous
checkpoints intact and never a half-written one. While it is filled it holds an ``.owner``
file naming the writing process; the staging folders of killed runs are removed when a run
starts or resumes (:func:`lycoris_core.tempfiles.clean_stale`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import LycorisError
from ..io import write_safetensors
from ..tempfiles import clear_owner, mark_owner

_STEP_DIR = re.compile(r"^step-(\d{6,})$")
STATE_DIR = "state"
PROGRESS_FILE = "custom_checkpoint_0.pkl"  # accelerate's name for the first registered object
NETWORK_FILE = "model.safetensors"  # accelerate's name for the first prepared model's weights


class CheckpointError(LycorisError, ValueError):
    """A checkpoint that is missing, incomplete or from another run."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int

    @property
    def adapter(self) -> Path:
        return self.path / "adapter.safetensors"

    @property
    def state(self) -> Path:
        """The folder accelerate's ``save_state`` wrote."""
        return self.path / STATE_DIR


def checkpoints_dir(output: str | os.PathLike[str]) -> Path:
    """Where the checkpoints of the run writing `output` live."""
    out = Path(output)
    return out.with_name(out.stem + "-checkpoints")


def checkpoint_at(folder: str | os.PathLike[str], step: int) -> Checkpoint:
    return Checkpoint(Path(folder) / f"step-{step:06d}", step)


def _staging(folder: str | os.PathLike[str], step: int) -> Path:
    return Path(folder) / f".step-{step:06d}.tmp"


def staging_state(folder: str | os.PathLike[str], step: int) -> Path:
    """Where every process writes the run state of step `step` before the rename."""
    return _staging(folder, step) / STATE_DIR


def begin_checkpoint(folder: str | os.PathLike[str], step: int) -> Path:
    """A fresh temporary folder for step `step` (main process); returns its state folder."""
    staging = _staging(folder, step)
    if staging.exists():  # left over by a crash during an earlier save of this step
        shutil.rmtree(staging)
    staging_state(folder, step).mkdir(parents=True)
    mark_owner(staging)  # which process fills it: a killed one's is cleaned (tempfiles)
    return staging_state(folder, step)


def finish_checkpoint(
    folder: str | os.PathLike[str],
    step: int,
    adapter_tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    spec: dict[str, Any],
) -> Checkpoint:
    """Add the adapter and the spec beside the state, flush everything, rename into place."""
    staging, ckpt = _staging(folder, step), checkpoint_at(folder, step)
    write_safetensors(staging / "adapter.safetensors", adapter_tensors, metadata)
    (staging / "spec.json").write_text(json.dumps(spec, indent=2, default=str), encoding="utf-8")
    clear_owner(staging)
    for file in staging.rglob("*"):
        if file.is_file():
            with open(file, "rb+") as fh:
                os.fsync(fh.fileno())
    staging.rename(ckpt.path)
    return ckpt


def abandon_checkpoint(folder: str | os.PathLike[str], step: int) -> None:
    shutil.rmtree(_staging(folder, step), ignore_errors=True)


def save_checkpoint(
    folder: str | os.PathLike[str],
    step: int,
    adapter_tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    state: Mapping[str, Any] | Callable[[Path], Any],
    spec: dict[str, Any],
) -> Checkpoint:
    """Write ``step-NNNNNN`` under `folder` atomically (one process) and return it.

    `state` writes the run state into the folder it is given (the loop passes accelerate's
    ``save_state``); a plain mapping is stored as the progress record alone."""
    ckpt = checkpoint_at(folder, step)
    if ckpt.path.exists():  # the same step written again (e.g. cancel right after a save)
        return ckpt
    state_dir = begin_checkpoint(folder, step)
    try:
        if callable(state):
            state(state_dir)
        else:
            torch.save(dict(state), state_dir / PROGRESS_FILE)
        return finish_checkpoint(folder, step, adapter_tensors, metadata, spec)
    except BaseException:
        abandon_checkpoint(folder, step)
        raise


def list_checkpoints(folder: str | os.PathLike[str]) -> list[Checkpoint]:
    """Complete checkpoints under `folder`, oldest first."""
    root = Path(folder)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        ckpt = Checkpoint(child, int(m.group(1))) if m else None
        if ckpt and (ckpt.state / PROGRESS_FILE).is_file() and ckpt.adapter.is_file():
            found.append(ckpt)
    return sorted(found, key=lambda c: c.step)


def resolve_resume(path: str | os.PathLike[str]) -> Checkpoint:
    """A checkpoint folder, a run's checkpoints folder (latest), or a run's output file."""
    p = Path(path)
    m = _STEP_DIR.match(p.name)
    if m and (p / STATE_DIR / PROGRESS_FILE).is_file():
        return Checkpoint(p, int(m.group(1)))
    for folder in (p, checkpoints_dir(p)):
        found = list_checkpoints(folder)
        if found:
            return found[-1]
    old = [f for f in (p, *p.glob("step-*"), *checkpoints_dir(p).glob("step-*")) if _legacy(f)]
    if old:
        raise CheckpointError(
            f"{old[-1]}: written by an earlier version (a single state.pt, before the state/ "
            "folder of accelerate); it cannot be resumed. Its adapter.safetensors loads as "
            "usual; start a new run (without resume) to continue training"
        )
    raise CheckpointError(
        f"{p}: no complete checkpoint found (looked for step-NNNNNN folders with "
        f"{STATE_DIR}/{PROGRESS_FILE} in {p} and {checkpoints_dir(p)}); pass a "
        "checkpoint folder, the checkpoints folder of a run, or the run's output .safetensors path"
    )


def _legacy(folder: Path) -> bool:
    return (folder / "state.pt").is_file() and not (folder / STATE_DIR).is_dir()


def _differences(saved: Any, current: Any, where: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current), key=str):
            path = f"{where}.{key}" if where else str(key)
            if key not in saved or key not in current:
                side = "only in the checkpoint" if key in saved else "not in the checkpoint"
                out.append(f"'{path}' {side}")
            else:
                out.extend(_differences(saved[key], current[key], path))
        return out
    return [] if saved == current else [f"'{where}' was {saved!r}, now {current!r}"]


def check_same_config(checkpoint: Checkpoint, config: dict[str, Any]) -> None:
    """Raise :class:`CheckpointError` naming the fields where `config` (a ``to_dict()``)
    differs from the config the checkpoint was trained with (its ``spec.json``); a
    checkpoint without a readable spec is left to the state loader's own checks."""
    try:
        saved = json.loads((checkpoint.path / "spec.json").read_text(encoding="utf-8"))["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    current = json.loads(json.dumps(config, default=str))  # as spec.json stores it
    diff = _differences(saved, current)
    if diff:
        raise CheckpointError(
            f"{checkpoint.path}: trained with another LyCORIS config ({'; '.join(diff[:5])}); "
            "resume with the config of that run, or turn resume off to start a new run"
        )


def load_state(checkpoint: Checkpoint) -> dict[str, Any]:
    """The progress record of a checkpoint (step, kind, position, losses, noise states)."""
    path = checkpoint.state / PROGRESS_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise CheckpointError(
            f"{path}: cannot be read ({exc}); resume from an earlier checkpoint"
        ) from None
