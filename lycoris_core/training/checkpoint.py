"""Checkpoints: the adapter plus everything needed to resume exactly, written atomically.

A checkpoint is a folder ``<run>-checkpoints/step-000010/`` holding

* ``adapter.safetensors``: the adapter at that step (lycoris key naming, full metadata), usable
  anywhere like the final file;
* ``state.pt``: optimizer, LR schedule, RNG states, step, data position, smoothed loss, loss
  history and the network's float32 weights (read back with ``torch.load(weights_only=True)``,
  which cannot run code);
* ``spec.json``: the training spec, for humans and for resume checks.

The folder is filled under a temporary name and renamed into place, so a crash mid-write leaves
the previous checkpoints intact and never a half-written one.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import LycorisError
from ..io import atomic_folder, write_safetensors

_STEP_DIR = re.compile(r"^step-(\d{6,})$")


class CheckpointError(LycorisError, ValueError):
    """A checkpoint that is missing, incomplete or from another run."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int

    @property
    def adapter(self) -> Path:
        return self.path / "adapter.safetensors"


def checkpoints_dir(output: str | os.PathLike[str]) -> Path:
    """Where the checkpoints of the run writing `output` live."""
    out = Path(output)
    return out.with_name(out.stem + "-checkpoints")


def save_checkpoint(
    folder: str | os.PathLike[str],
    step: int,
    adapter_tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    state: dict[str, Any],
    spec: dict[str, Any],
) -> Checkpoint:
    """Write ``step-NNNNNN`` under `folder` atomically and return it."""
    target = Path(folder) / f"step-{step:06d}"
    if target.exists():  # the same step written again (e.g. cancel right after a save)
        return Checkpoint(target, step)
    with atomic_folder(target) as tmp:
        write_safetensors(tmp / "adapter.safetensors", adapter_tensors, metadata)
        torch.save(state, tmp / "state.pt")
        (tmp / "spec.json").write_text(json.dumps(spec, indent=2, default=str), encoding="utf-8")
        for name in ("state.pt", "spec.json"):
            with open(tmp / name, "rb+") as fh:
                os.fsync(fh.fileno())
    return Checkpoint(target, step)


def list_checkpoints(folder: str | os.PathLike[str]) -> list[Checkpoint]:
    """Complete checkpoints under `folder`, oldest first."""
    root = Path(folder)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and (child / "state.pt").is_file() and (child / "adapter.safetensors").is_file():
            found.append(Checkpoint(child, int(m.group(1))))
    return sorted(found, key=lambda c: c.step)


def resolve_resume(path: str | os.PathLike[str]) -> Checkpoint:
    """A checkpoint folder, a run's checkpoints folder (latest), or a run's output file."""
    p = Path(path)
    m = _STEP_DIR.match(p.name)
    if m and (p / "state.pt").is_file():
        return Checkpoint(p, int(m.group(1)))
    for folder in (p, checkpoints_dir(p)):
        found = list_checkpoints(folder)
        if found:
            return found[-1]
    raise CheckpointError(
        f"{p}: no complete checkpoint found (looked for step-NNNNNN folders with state.pt in "
        f"{p} and {checkpoints_dir(p)}); pass a checkpoint folder, the checkpoints folder of a "
        "run, or the run's output .safetensors path"
    )


def load_state(checkpoint: Checkpoint) -> dict[str, Any]:
    try:
        return torch.load(checkpoint.path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise CheckpointError(
            f"{checkpoint.path / 'state.pt'}: cannot be read ({exc}); resume from an earlier "
            "checkpoint"
        ) from None
