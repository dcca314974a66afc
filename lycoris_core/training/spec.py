"""What a training run is asked for and what it gives back: the public records of ``train``.

:class:`TrainSpec` (the request, validated before anything loads), :class:`TrainStepInfo`
(what ``on_step`` receives after each optimizer step), :class:`TrainResult` (what ``train``
returns) and :class:`TrainingAborted` (a non-finite loss or gradient).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..adapters import Adapter
from ..config import LycorisConfig
from ..errors import IncompatibleModelError, LycorisError, PathError
from ..limits import check_strength
from ..models import LoadedModel
from ..paths import check_output_file
from ..precisions import QUANTISED, check_precision
from ..targeting import quantised_base_refusal
from .dataset import DatasetSpec, TrainingData
from .objectives import ObjectiveOptions

PRECISIONS = ("no", "fp16", "bf16")


class TrainingAborted(LycorisError):
    """Training stopped on a non-finite loss or gradient."""


@dataclass
class TrainSpec:
    """Everything a training run needs. `base` is a pipeline folder/file or a loaded model."""

    base: str | LoadedModel
    config: LycorisConfig
    dataset: DatasetSpec
    output: str  # the adapter file to write (.safetensors)
    steps: int = 100
    batch_size: int = 1
    lr: float = 1e-4
    optimizer: str = "adamw"
    scheduler: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    save_every: int = 0
    validation_prompts: list[str] = field(default_factory=list)
    validation_every: int = 0
    validation_lycoris_strength: float = 1.0
    validation_steps: int = 20
    validation_seed: int = 0
    seed: int = 0
    resume: str | None = None
    objective: ObjectiveOptions = field(default_factory=ObjectiveOptions)
    save_dtype: str = "fp32"
    config_dir: str | None = None  # for a single-file `base`
    # how the frozen base is stored (quantization.PRECISIONS); applied when `base` is a path,
    # checked against a loaded model; fp8/int8/nf4 train in lycoris' bypass mode
    base_precision: str = "auto"
    # `dataset` already loaded as the loop reads it (see `training_dataset`), or None
    data: TrainingData | None = field(default=None, repr=False, compare=False)

    def validate(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise LycorisError(f"training spec: {what}")

        need(
            isinstance(self.steps, int) and self.steps >= 1,
            f"steps must be >= 1, got {self.steps!r}",
        )
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}")
        need(math.isfinite(self.lr) and self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(
            self.mixed_precision in PRECISIONS,
            f"mixed_precision must be one of {', '.join(PRECISIONS)}, got {self.mixed_precision!r}",
        )
        need(
            self.save_every >= 0 and self.validation_every >= 0, "save_every/validation_every >= 0"
        )
        need(
            self.save_dtype in ("fp32", "fp16", "bf16"),
            f"save_dtype must be fp32, fp16 or bf16, got {self.save_dtype!r}",
        )
        need(
            str(self.output).endswith(".safetensors"),
            f"output must be a .safetensors path, got {self.output!r}",
        )
        check_strength(self.validation_lycoris_strength, "validation_lycoris_strength")
        check_precision(self.base_precision, "training spec: base_precision")
        precision = self.base_precision
        if isinstance(self.base, LoadedModel) and precision == "auto":
            precision = self.base.precision
        if precision in QUANTISED:
            why = quantised_base_refusal(self.config, precision)
            if why is not None:
                raise IncompatibleModelError(f"training spec: {why}")
        self.check_outputs()

    def check_outputs(self) -> None:
        """Before any work: the output file, its checkpoints and validation folders can be
        written (:class:`~lycoris_core.errors.PathError` otherwise)."""
        from .checkpoint import checkpoints_dir

        out = check_output_file(self.output, "output")
        for folder in (checkpoints_dir(out), out.with_name(out.stem + "-validation")):
            if folder.exists() and not folder.is_dir():
                raise PathError(
                    f"output {out}: {folder} is a file, but the run keeps its checkpoints and "
                    "validation images in that folder; move the file or choose another output"
                )

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "data":
                continue
            if f.name == "base":
                value = value.source if isinstance(value, LoadedModel) else str(value)
            elif f.name == "config":
                value = value.to_dict()
            elif f.name == "dataset":
                value = {  # settings, not the in-memory pixels
                    **value.settings(),
                    "folder": value.folder,
                    "captions": list(value.captions) if value.captions else None,
                    "skip_bad": value.skip_bad,
                    "cache_dir": value.cache_dir,
                }
            elif dataclasses.is_dataclass(value):
                value = dataclasses.asdict(value)
            out[f.name] = value
        return out


@dataclass(frozen=True)
class TrainStepInfo:
    """What ``on_step`` receives after each optimizer step."""

    step: int
    total: int
    loss: float
    smoothed_loss: float
    lr: float
    it_per_s: float
    eta: float  # seconds
    peak_memory: int  # bytes (CUDA peak allocated, else process max RSS)


@dataclass
class TrainResult:
    adapter_path: str | None
    steps_done: int
    total_steps: int
    completed: bool
    stopped_reason: str
    losses: list[float]
    checkpoints: list[str]
    validation: list[tuple[int, torch.Tensor]]
    seconds: float
    layers: int
    network_sha256: str = ""  # of the trained weights (equal on every rank when distributed)
    adapter: Adapter | None = None  # the file written at the end, in memory (None: cancelled)


def training_dataset(dataset: DatasetSpec, model: LoadedModel) -> DatasetSpec:
    """`dataset` as the loop reads it: the model's bucket step; flips are drawn per sample."""
    return dataclasses.replace(dataset, flip=False, bucket_step=model.size_multiple)


def check_loaded_precision(model: LoadedModel, wanted: str) -> None:
    """A loaded base must already be at the spec's `wanted` precision ("auto": any)."""
    if wanted not in ("auto", model.precision):
        raise LycorisError(
            f"training spec: base_precision is {wanted!r} but the loaded base is stored "
            f"{model.precision!r}; set the precision where the base is loaded (the Load node's "
            "base_precision, load_model(base_precision=...)) or leave it 'auto'"
        )
