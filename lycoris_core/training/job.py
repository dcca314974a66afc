"""A training job as the Train node asks for one: reuse a finished run, check a resume, train,
summarise.

A finished run leaves a stamp beside its adapter, ``<name>.run.json``: the fingerprint of what
shaped it (model, config, dataset content and settings, training parameters), the size and
modification time of the adapter file it wrote, and its summary. Asking again with the same
fingerprint, while the file is still the one the run wrote, reuses the file instead of training
again. The stamp is written atomically; an unreadable or malformed stamp counts as absent.

The dataset is loaded (every image decoded and checked) once per job: its fingerprint comes
from the loaded data, which the loop then trains on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_write
from ..models import LoadedModel, load_model
from ..schema import REUSED, TrainSummary
from .checkpoint import (
    CheckpointError,
    check_same_config,
    checkpoints_dir,
    list_checkpoints,
    resolve_resume,
)
from .dataset import TrainingData
from .loop import TrainResult, TrainSpec, TrainStepInfo, train, training_dataset

logger = logging.getLogger(__name__)

STAMP_SUFFIX = ".run.json"


def effective_precision(requested: str, device: torch.device) -> str:
    """The mixed precision a run on `device` uses: autocast is off ('no') on the CPU."""
    return requested if device.type != "cpu" else "no"


def prompts_from_text(text: str) -> list[str]:
    """Validation prompts from a multi-line text: one per non-empty line."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def stamp_path(output: str | os.PathLike[str]) -> Path:
    return Path(output).with_suffix(STAMP_SUFFIX)


def _file_state(path: Path) -> dict[str, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def read_stamp(output: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The stamp of a finished run of `output`, or None (missing, unreadable or malformed)."""
    path = stamp_path(output)
    try:
        stamp = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        logger.warning("%s: unreadable run stamp (%s); the run is trained again", path, exc)
        return None
    if (
        not isinstance(stamp, dict)
        or not isinstance(stamp.get("hash"), str)
        or not isinstance(stamp.get("summary"), dict)
    ):
        logger.warning("%s: not a run stamp; the run is trained again", path)
        return None
    return stamp


def write_stamp(output: str | os.PathLike[str], fingerprint: str, summary: dict) -> Path:
    """Record that `output` now holds the finished run `fingerprint` (atomically)."""
    text = json.dumps({"hash": fingerprint, "file": _file_state(Path(output)), "summary": summary})
    return atomic_write(
        stamp_path(output), lambda tmp: Path(tmp).write_text(text, encoding="utf-8")
    )


def reusable_summary(output: str | os.PathLike[str], fingerprint: str) -> dict | None:
    """The summary of the finished run `fingerprint` of `output` (marked reused), or None."""
    out = Path(output)
    stamp = read_stamp(out)
    if stamp is None or stamp["hash"] != fingerprint or not out.is_file():
        return None
    if stamp.get("file") != _file_state(out):  # written again since (another run, a copy)
        return None
    return stamp["summary"] | {REUSED: True}


def latest_checkpoint(output: str | os.PathLike[str]) -> str | None:
    """The newest resumable checkpoint of `output`, or None."""
    saved = list_checkpoints(checkpoints_dir(Path(output)))
    return str(saved[-1].path) if saved else None


def check_resume(resume: str | os.PathLike[str], config: dict[str, Any] | None = None) -> None:
    """Before training starts: `resume` (a run's output, or a checkpoint) has a checkpoint,
    trained with `config` (a ``LycorisConfig.to_dict()``) when given."""
    try:
        ckpt = resolve_resume(resume)
    except CheckpointError:
        raise CheckpointError(
            f"resume is on but {checkpoints_dir(Path(resume))} has no checkpoint; turn resume "
            "off to start a new run"
        ) from None
    if config is not None:
        check_same_config(ckpt, config)


def summarize(result: TrainResult) -> dict[str, Any]:
    """The JSON summary of a run (the keys are :data:`lycoris_core.schema.SUMMARY_KEYS`)."""
    return TrainSummary(
        adapter_path=result.adapter_path,
        steps=result.steps_done,
        completed=result.completed,
        stopped=result.stopped_reason,
        final_loss=result.losses[-1] if result.losses else None,
        losses=result.losses,
        checkpoints=result.checkpoints,
        seconds=round(result.seconds, 1),
        layers=result.layers,
    ).to_dict()


def run_fingerprint(spec: TrainSpec, data: TrainingData, model: str) -> str:
    """Identity of a run: `model` (its description), config, dataset content and settings,
    and every training parameter."""
    params = spec.to_dict()
    for key in ("base", "config", "dataset", "output"):
        params.pop(key)
    blob = json.dumps(
        {
            "model": model,
            "config": spec.config.to_dict(),
            "data": data.fingerprint(),  # image bytes, captions, buckets, repeats
            "dataset": spec.dataset.settings(),  # flips included (the loop draws them)
            "params": params,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class TrainJob:
    """One training request, prepared: its spec (model loaded, dataset loaded once), its
    fingerprint, and the summary of the finished run it reuses (None: it trains)."""

    spec: TrainSpec
    fingerprint: str
    reused: dict[str, Any] | None

    @classmethod
    def prepare(cls, spec: TrainSpec, model_description: str | None = None) -> TrainJob:
        """Load what the run needs once, and decide between reuse, resume and a new run.

        `model_description` identifies the model in the fingerprint (default: its source).
        """
        spec.validate()  # fields and outputs, before the model and the dataset load
        model = spec.base
        if not isinstance(model, LoadedModel):
            model = load_model(model, config_dir=spec.config_dir)
        data = TrainingData(training_dataset(spec.dataset, model))
        spec = dataclasses.replace(
            spec,
            base=model,
            data=data,
            mixed_precision=effective_precision(spec.mixed_precision, model.device),
        )
        fingerprint = run_fingerprint(spec, data, model_description or model.source)
        reused = reusable_summary(spec.output, fingerprint)
        if reused is None and spec.resume:
            check_resume(spec.resume, spec.config.to_dict())
        return cls(spec, fingerprint, reused)

    def preflight(self, free_bytes: int | None = None) -> Any:
        """The run's memory estimate (:mod:`lycoris_core.memory`); raises
        :class:`~lycoris_core.memory.MemoryPreflightError` when it clearly does not fit.
        `free_bytes`: compare with this instead of the device's free memory."""
        from ..memory import estimate_training, preflight

        return preflight(estimate_training(self.spec, free_bytes=free_bytes))

    def run(
        self,
        on_step: Callable[[TrainStepInfo], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        on_validation: Callable[[int, torch.Tensor], None] | None = None,
    ) -> TrainResult:
        """Train; a completed run stamps its output so the same job reuses it next time."""
        result = train(
            self.spec, on_step=on_step, should_stop=should_stop, on_validation=on_validation
        )
        if result.completed:
            write_stamp(self.spec.output, self.fingerprint, summarize(result))
        return result
