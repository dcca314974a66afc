"""The training loop: ``train(spec, on_step, should_stop) -> TrainResult``.

Reads top to bottom: load the model, build the LyCORIS network from the config, then for each
step draw a batch (same-bucket items, deterministic order), encode it (cached latents and text
embeddings), compute the family's loss, step the optimizer, report, checkpoint, validate. One
``accelerate.Accelerator`` (``engine.py``) does autocast, loss scaling, accumulation, clipping,
DDP and the checkpoint state, in a single process as under ``accelerate launch``.

Safety: the first non-finite loss or gradient raises :class:`TrainingAborted` (naming the step
and the last good checkpoint); ``should_stop()`` saves a resumable checkpoint and returns a
partial result; an exception from ``on_step`` (ComfyUI raises its interrupt there) also saves
first. Before anything loads, the outputs are checked (``TrainSpec.validate``) and the temp
files and checkpoint staging folders that killed runs of this output left are removed.
Whatever happens, the lycoris network is removed from the model at the end, so the base
model is left as it was. Runs outside ``torch.inference_mode`` even when called inside one.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..adapters import Adapter, adapter_from_state_dict
from ..config import LycorisConfig
from ..device import training_attention
from ..targeting import create_network
from ..tempfiles import clean_stale
from .checkpoint import (
    Checkpoint,
    CheckpointError,
    check_same_config,
    checkpoints_dir,
    resolve_resume,
)
from .engine import Engine
from .optim import build_optimizer, build_scheduler
from .progress import Progress
from .session import Session
from .spec import (
    PRECISIONS,
    TrainingAborted,
    TrainResult,
    TrainSpec,
    TrainStepInfo,
    training_dataset,
)
from .validation import validation_images

__all__ = [
    "PRECISIONS",
    "TrainResult",
    "TrainSpec",
    "TrainStepInfo",
    "TrainingAborted",
    "train",
    "training_dataset",
]

logger = logging.getLogger(__name__)

StepCallback = Callable[[TrainStepInfo], None]
StopCheck = Callable[[], bool]
ValidationCallback = Callable[[int, torch.Tensor], None]


def train(
    spec: TrainSpec,
    on_step: StepCallback | None = None,
    should_stop: StopCheck | None = None,
    on_validation: ValidationCallback | None = None,
) -> TrainResult:
    """Train a LyCORIS adapter; see the module docstring for the safety guarantees.

    ``on_validation(step, images)`` receives each set of validation images as it is made.
    """
    spec.validate()
    out = Path(spec.output)  # temp files and staging folders of killed runs (tempfiles.py)
    clean_stale(out.parent, out.name)
    clean_stale(checkpoints_dir(out))
    with torch.inference_mode(False), torch.enable_grad():
        session = Session(spec)
        start = time.perf_counter()
        torch.manual_seed(spec.seed)
        random.seed(spec.seed)
        denoiser = session.denoiser
        denoiser.requires_grad_(False)
        net = create_network(denoiser, spec.config)
        try:
            session.release_encoders()  # features cached first: encoders off the device
            loop = _Loop(session, net, start, on_step, should_stop, on_validation)
            return loop.run()
        finally:
            session.restore_encoders()
            net.restore()
            denoiser.eval()
            if spec.gradient_checkpointing and hasattr(denoiser, "disable_gradient_checkpointing"):
                denoiser.disable_gradient_checkpointing()


class _Loop:
    """One run's optimizer steps, checkpoints and reports (the state lives in `progress`)."""

    def __init__(
        self,
        session: Session,
        net: Any,
        start: float,
        on_step: StepCallback | None,
        should_stop: StopCheck | None,
        on_validation: ValidationCallback | None,
    ):
        spec = self.spec = session.spec
        self.session, self.net, self.start = session, net, start
        self.on_step, self.should_stop, self.on_validation = on_step, should_stop, on_validation
        net.requires_grad_(True)
        self.params = [p for p in net.parameters() if p.requires_grad]
        optimizer = build_optimizer(spec.optimizer, self.params, spec.lr, spec.weight_decay)
        scheduler = build_scheduler(spec.scheduler, optimizer, spec.steps, spec.warmup_steps)
        self.progress = Progress()
        self.engine = Engine(
            session.accelerator, session.denoiser, net, optimizer, scheduler, self.progress
        )
        session.objective.forward = self.engine.model
        self.noise = torch.Generator().manual_seed(spec.seed + 1_000_003 * self.engine.rank)
        self.checkpoints: list[str] = []
        self.validation: list[tuple[int, torch.Tensor]] = []
        self.last_good: Checkpoint | None = None
        self.ff_advice = _feeds_forward(spec.config)
        if spec.resume:
            self._resume(resolve_resume(spec.resume))

    def _resume(self, ckpt: Checkpoint) -> None:
        check_same_config(ckpt, self.spec.config.to_dict())  # before shapes clash in the load
        self.engine.load(ckpt)
        states, rank = self.progress.noise_states, self.engine.rank
        if states is None or rank >= len(states):
            raise CheckpointError(
                f"{ckpt.path}: written by {0 if states is None else len(states)} process(es), "
                f"resumed by {self.engine.world}; resume with as many processes as wrote it"
            )
        self.noise.set_state(states[rank].clone())  # a row of its own (no storage offset)
        self.last_good = ckpt
        logger.info("resumed from %s at step %d", ckpt.path, self.progress.step)

    def run(self) -> TrainResult:
        spec, progress, denoiser = self.spec, self.progress, self.session.denoiser
        if spec.gradient_checkpointing and hasattr(denoiser, "enable_gradient_checkpointing"):
            denoiser.enable_gradient_checkpointing()
        denoiser.train(spec.gradient_checkpointing)
        self.net.train()
        order = self.session.order(progress.epoch)
        t_first, first_step = time.perf_counter(), progress.step
        while progress.step < spec.steps:
            order, loss = self._optimizer_step(order)
            smoothed = progress.record(loss)
            elapsed = time.perf_counter() - t_first
            rate = (progress.step - first_step) / elapsed if elapsed > 0 else 0.0
            info = TrainStepInfo(
                step=progress.step,
                total=spec.steps,
                loss=loss,
                smoothed_loss=smoothed,
                lr=self.engine.scheduler.get_last_lr()[0],
                it_per_s=rate,
                eta=(spec.steps - progress.step) / rate if rate > 0 else 0.0,
                peak_memory=_peak_memory(self.session.device),
            )
            periodic = spec.save_every and progress.step % spec.save_every == 0
            if periodic and progress.step < spec.steps:
                self._snapshot("periodic")
            if spec.validation_every and progress.step % spec.validation_every == 0:
                self._validate()
            try:
                if self.on_step is not None:
                    self.on_step(info)
            except BaseException:
                self._snapshot("interrupted")
                raise
            if self.should_stop is not None and progress.step < spec.steps and self.should_stop():
                ckpt = self._snapshot("cancelled")
                return self._result(False, "cancelled", str(ckpt.adapter))
        return self._finish()

    def _optimizer_step(self, order: list[list[int]]) -> tuple[list[list[int]], float]:
        """Accumulate `grad_accum` batches, clip, step; returns the order and the mean loss."""
        spec, progress, session = self.spec, self.progress, self.session
        accelerator = self.engine.accelerator
        step_loss = 0.0
        for _ in range(spec.grad_accum):
            if progress.position >= len(order):
                progress.epoch, progress.position = progress.epoch + 1, 0
                order = session.order(progress.epoch)
            batch = order[progress.position]
            progress.position += 1
            rngs = [
                random.Random(f"{spec.seed}:{progress.epoch}:{progress.position}:{j}")
                for j in range(len(batch))
            ]
            latents, cond = session.encode_batch(batch, rngs)
            # forward and backward (where gradient checkpointing recomputes the forward)
            with accelerator.accumulate(self.engine.model), training_attention(session.device):
                with accelerator.autocast():
                    loss = session.objective.loss(latents, cond, self.noise)
                if not torch.isfinite(loss):
                    raise self._aborted("loss", loss.item())
                accelerator.backward(loss)  # divided by grad_accum, scaled for fp16 on CUDA
            step_loss += loss.item() / spec.grad_accum
        norm = accelerator.clip_grad_norm_(self.params, spec.max_grad_norm or float("inf"))
        if not torch.isfinite(norm) and accelerator.scaler is None:  # the scaler skips it
            raise self._aborted("gradient", norm.item())
        self.engine.optimizer.step()
        self.engine.scheduler.step()
        self.engine.optimizer.zero_grad(set_to_none=True)
        return order, step_loss

    def _snapshot(self, kind: str) -> Checkpoint:
        progress, engine, session = self.progress, self.engine, self.session
        progress.kind = kind
        progress.noise_states = engine.gather_state(self.noise)
        main = engine.is_main  # only the main process writes the adapter and the spec
        ckpt = engine.save(
            session.ckpt_dir,
            progress.step,
            self._adapter_tensors() if main else {},
            session.metadata(progress.step) if main else {},
            self.spec.to_dict(),
        )
        if main:
            self.checkpoints.append(str(ckpt.path))
        self.last_good = ckpt
        return ckpt

    def _validate(self) -> None:
        if not (self.engine.is_main and self.spec.validation_prompts):
            return
        step = self.progress.step
        self.validation.append((step, validation_images(self.session, self.net, step)))
        if self.on_validation is not None:
            self.on_validation(*self.validation[-1])

    def _finish(self) -> TrainResult:
        from ..io import write_safetensors

        session, step = self.session, self.progress.step
        final = self._snapshot("final")
        tensors, meta = self._adapter_tensors(), session.metadata(step)
        if self.engine.is_main:
            write_safetensors(session.output, tensors, meta)
        self.engine.barrier()
        last = self.validation[-1][0] if self.validation else None
        if self.engine.is_main and self.spec.validation_prompts and last != step:
            self.validation.append((step, validation_images(session, self.net, step)))
        logger.info("trained %d steps -> %s (checkpoint %s)", step, session.output, final.path)
        done = self._result(True, "completed", str(session.output))
        if self.engine.is_main:
            done.adapter = _as_adapter(tensors, meta, session.output)
        return done

    def _result(self, completed: bool, reason: str, path: str | None) -> TrainResult:
        return TrainResult(
            adapter_path=path,
            steps_done=self.progress.step,
            total_steps=self.spec.steps,
            completed=completed,
            stopped_reason=reason,
            losses=self.progress.losses,
            checkpoints=self.checkpoints,
            validation=self.validation,
            seconds=time.perf_counter() - self.start,
            layers=len(self.net.loras),
            network_sha256=_state_hash(self.net),
        )

    def _adapter_tensors(self) -> dict[str, torch.Tensor]:
        dtype = _SAVE_DTYPES[self.spec.save_dtype]
        return {k: v.detach().to("cpu", dtype) for k, v in self.net.state_dict().items()}

    def _aborted(self, what: str, value: float) -> TrainingAborted:
        step, last_good = self.progress.step + 1, self.last_good
        where = (
            f"the last good checkpoint is {last_good.path}"
            if last_good
            else "no checkpoint was saved yet (set save_every to keep one)"
        )
        advice = (
            " The config trains FeedForward modules: on SDXL, training the FeedForward blocks is "
            "known to go to NaN (the seed's warning); remove 'FeedForward' from "
            "apply_preset.target_module and train only the Attention blocks."
            if self.ff_advice
            else " Lower the learning rate, or use bf16 instead of fp16."
        )
        return TrainingAborted(
            f"non-finite {what} ({value}) at step {step}; training stopped; {where}.{advice}"
        )


_SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except (ImportError, OSError):  # pragma: no cover - non-POSIX
        return 0


def _state_hash(net: Any) -> str:
    h = hashlib.sha256()
    for key, tensor in sorted(net.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _feeds_forward(config: LycorisConfig) -> bool:
    preset = config.apply_preset or {}
    targets = list(preset.get("target_module", [])) + list(preset.get("module_algo_map", {}))
    names = " ".join(list(preset.get("target_name", []))).lower()
    return any("feedforward" in t.lower() or "mlp" in t.lower() for t in targets) or ("ff" in names)


def _as_adapter(tensors: dict[str, torch.Tensor], meta: dict[str, str], path: Path) -> Adapter:
    """The adapter just written to `path`, as ``load_adapter(path)`` reads it back."""
    adapter = adapter_from_state_dict(dict(tensors), dict(meta), source=str(path))
    adapter.path = str(path)
    return adapter
