"""The training loop: ``train(spec, on_step, should_stop) -> TrainResult``.

Reads top to bottom: load the model, build the LyCORIS network from the config, then for each
step draw a batch (same-bucket items, deterministic order), encode it (cached latents and text
embeddings), compute the family's loss, step the optimizer, report, checkpoint, validate.

Safety: the first non-finite loss or gradient raises :class:`TrainingAborted` (naming the step
and the last good checkpoint); ``should_stop()`` saves a resumable checkpoint and returns a
partial result; an exception from ``on_step`` (ComfyUI raises its interrupt there) also saves
first. Whatever happens, the lycoris network is removed from the model at the end, so the base
model is left as it was. Runs outside ``torch.inference_mode`` even when called inside one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..adapters import Adapter, adapter_from_state_dict
from ..config import LycorisConfig
from ..device import training_attention
from ..errors import LycorisError
from ..families import require_trainable
from ..models import LoadedModel, as_normal_tensors, load_model
from ..targeting import create_network
from .checkpoint import (
    Checkpoint,
    checkpoints_dir,
    load_state,
    resolve_resume,
    save_checkpoint,
)
from .dataset import DatasetSpec, FeatureCache, TrainingData
from .metadata import adapter_metadata, denoiser_config_hash
from .objectives import Objective, ObjectiveOptions
from .optim import build_optimizer, build_scheduler

logger = logging.getLogger(__name__)

PRECISIONS = ("no", "fp16", "bf16")
SMOOTHING = 0.9


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
        need(
            math.isfinite(self.validation_lycoris_strength),
            "validation_lycoris_strength must be a finite number",
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


# --------------------------------------------------------------------------- helpers


class _Distributed:
    """Several processes under ``accelerate launch``/``torchrun``: accelerate's DDP does the
    gradient averaging; each rank draws its own share of the batches; rank 0 writes files."""

    def __init__(self) -> None:
        from accelerate import Accelerator

        # without a GPU, accelerate only forms a multi-process (gloo) group when told cpu=True
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process

    @staticmethod
    def from_env() -> _Distributed | None:
        import os

        return _Distributed() if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None

    def wrap(self, denoiser: torch.nn.Module, net: torch.nn.Module) -> Any:
        """A DDP module whose forward is the denoiser's and whose parameters are the network's."""
        return self.accelerator.prepare(_Trainable(denoiser, net))

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()


class _Trainable(torch.nn.Module):
    """Denoiser + LyCORIS network as one module (DDP needs the trainable parameters inside
    the module whose forward it runs; lycoris keeps its modules outside the denoiser)."""

    def __init__(self, denoiser: torch.nn.Module, net: torch.nn.Module):
        super().__init__()
        self.denoiser = denoiser
        self.net = net

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.denoiser(*args, **kwargs)


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except (ImportError, OSError):  # pragma: no cover - non-POSIX
        return 0


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


def _feeds_forward(config: LycorisConfig) -> bool:
    preset = config.apply_preset or {}
    targets = list(preset.get("target_module", [])) + list(preset.get("module_algo_map", {}))
    names = " ".join(list(preset.get("target_name", []))).lower()
    return any("feedforward" in t.lower() or "mlp" in t.lower() for t in targets) or ("ff" in names)


def training_dataset(dataset: DatasetSpec, model: LoadedModel) -> DatasetSpec:
    """`dataset` as the loop reads it: the model's bucket step; flips are drawn per sample."""
    return dataclasses.replace(dataset, flip=False, bucket_step=model.size_multiple)


class _Run:
    """State of one training run (kept small: the loop in `train` reads top to bottom)."""

    def __init__(self, spec: TrainSpec):
        self.spec = spec
        self.dist = _Distributed.from_env()
        device = self.dist.accelerator.device if self.dist else "auto"
        self.model = (
            spec.base
            if isinstance(spec.base, LoadedModel)
            else load_model(spec.base, config_dir=spec.config_dir, device=device)
        )
        require_trainable(self.model.family)
        self.model.restore_base()
        as_normal_tensors(self.model.denoiser)  # weights loaded under inference_mode
        self.family = self.model.family
        self.denoiser = self.model.denoiser
        self.device = self.denoiser.device
        ds = training_dataset(spec.dataset, self.model)
        self.flip = spec.dataset.flip
        self.data = TrainingData(ds) if spec.data is None else spec.data
        if self.data.spec != ds:
            raise LycorisError(
                "training spec: 'data' was not loaded from training_dataset(dataset, model); "
                "leave it None and the loop loads 'dataset' itself"
            )
        self.objective = Objective(self.model.pipe, self.family, spec.objective)
        model_id = _hash(self.model.source + denoiser_config_hash(self.denoiser))
        cache_dir = spec.dataset.cache_dir
        self.latent_cache = FeatureCache(cache_dir, f"latents-{model_id}-{ds.resolution}")
        self.text_cache = FeatureCache(
            cache_dir,
            f"text-{model_id}-{spec.objective.max_sequence_length or 'default'}",
            max_items=256,  # T5 embeddings are large; captions repeat anyway
        )
        self.cache_latents = ds.center_crop
        self.output = Path(spec.output)
        self.ckpt_dir = checkpoints_dir(self.output)
        self.val_dir = self.output.with_name(self.output.stem + "-validation")
        self.writes = self.dist is None or self.dist.is_main

    def order(self, epoch: int) -> list[list[int]]:
        """This process's batches of an epoch (all of them in a single process)."""
        batches = self.data.epoch_order(epoch, self.spec.seed, self.spec.batch_size)
        if self.dist is None:
            return batches
        return batches[self.dist.rank :: self.dist.world] or batches[:1]

    # ------------------------------------------------------------------ batches
    def encode_batch(
        self, indices: list[int], rngs: list[random.Random]
    ) -> tuple[torch.Tensor, dict]:
        latents, conds = [], []
        for i, rng in zip(indices, rngs, strict=True):
            flip = self.flip and rng.random() < 0.5
            caption = self.data.caption(i, rng)
            key = self.data.items[i].key + ("-flip" if flip else "")

            def encode(i: int = i, rng: random.Random = rng, flip: bool = flip) -> dict:
                pixels = self.data.pixels(i, rng)
                if flip:
                    pixels = torch.flip(pixels, dims=[-1])
                return {"latents": self.objective.encode_images(pixels[None])[0]}

            if self.cache_latents:
                latents.append(self.latent_cache.get_or_compute(key, encode)["latents"])
            else:
                latents.append(encode()["latents"])
            text = self.text_cache.get_or_compute(
                _hash(caption),
                lambda caption=caption: {
                    k: v[0] for k, v in self.objective.encode_text([caption]).items()
                },
            )
            conds.append(text)
        cond = {k: torch.stack([c[k] for c in conds]) for k in conds[0]}
        return torch.stack(latents), cond


# --------------------------------------------------------------------------- the loop


def train(
    spec: TrainSpec,
    on_step: Callable[[TrainStepInfo], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_validation: Callable[[int, torch.Tensor], None] | None = None,
) -> TrainResult:
    """Train a LyCORIS adapter; see the module docstring for the safety guarantees.

    ``on_validation(step, images)`` receives each set of validation images as it is made.
    """
    spec.validate()
    with torch.inference_mode(False), torch.enable_grad():
        return _train(spec, on_step, should_stop, on_validation)


def _train(
    spec: TrainSpec,
    on_step: Callable[[TrainStepInfo], None] | None,
    should_stop: Callable[[], bool] | None,
    on_validation: Callable[[int, torch.Tensor], None] | None,
) -> TrainResult:
    run = _Run(spec)
    start = time.perf_counter()
    torch.manual_seed(spec.seed)
    random.seed(spec.seed)
    rank = run.dist.rank if run.dist else 0
    noise_gen = torch.Generator().manual_seed(spec.seed + 1_000_003 * rank)
    denoiser = run.denoiser
    denoiser.requires_grad_(False)
    net = create_network(denoiser, spec.config)
    if run.dist is not None:
        run.objective.forward = run.dist.wrap(denoiser, net)
    try:
        return _loop(spec, run, net, noise_gen, start, on_step, should_stop, on_validation)
    finally:
        net.restore()
        for lora in net.loras:  # lycoris keeps bookkeeping attributes on the wrapped layers
            lora.org_module[0].__dict__.pop("_lycoris_wrappers", None)
            lora.org_module[0].__dict__.pop("_lycoris_original_forward", None)
        denoiser.eval()
        if spec.gradient_checkpointing and hasattr(denoiser, "disable_gradient_checkpointing"):
            denoiser.disable_gradient_checkpointing()


def _loop(spec, run, net, noise_gen, start, on_step, should_stop, on_validation) -> TrainResult:
    net.requires_grad_(True)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = build_optimizer(spec.optimizer, params, spec.lr, spec.weight_decay)
    scheduler = build_scheduler(spec.scheduler, optimizer, spec.steps, spec.warmup_steps)
    step, epoch, position = 0, 0, 0
    losses: list[float] = []
    smoothed: float | None = None
    checkpoints: list[str] = []
    validation: list[tuple[int, torch.Tensor]] = []
    last_good: Checkpoint | None = None

    if spec.resume:
        ckpt = resolve_resume(spec.resume)
        state = load_state(ckpt)
        net.load_state_dict(state["network"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        noise_gen.set_state(state["noise_generator"])
        step, epoch, position = state["step"], state["epoch"], state["position"]
        losses, smoothed = list(state["losses"]), state["smoothed_loss"]
        last_good = ckpt
        logger.info("resumed from %s at step %d", ckpt.path, step)

    denoiser = run.denoiser
    if spec.gradient_checkpointing and hasattr(denoiser, "enable_gradient_checkpointing"):
        denoiser.enable_gradient_checkpointing()
    denoiser.train(spec.gradient_checkpointing)
    net.train()
    autocast = _autocast(spec.mixed_precision, run.device)
    scaler = (
        torch.amp.GradScaler("cuda")
        if (spec.mixed_precision == "fp16" and run.device.type == "cuda")
        else None
    )
    order = run.order(epoch)
    ff_advice = _feeds_forward(spec.config)

    def snapshot(kind: str) -> Checkpoint:
        nonlocal last_good
        if not run.writes:  # only rank 0 writes files
            run.dist.barrier()
            return Checkpoint(run.ckpt_dir / f"step-{step:06d}", step)
        state = {
            "network": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": _rng_state(),
            "noise_generator": noise_gen.get_state(),
            "step": step,
            "epoch": epoch,
            "position": position,
            "losses": list(losses),
            "smoothed_loss": smoothed,
            "kind": kind,
        }
        ckpt = save_checkpoint(
            run.ckpt_dir,
            step,
            _adapter_tensors(net, spec),
            _metadata(spec, run, step),
            state,
            spec.to_dict(),
        )
        checkpoints.append(str(ckpt.path))
        last_good = ckpt
        if run.dist is not None:
            run.dist.barrier()
        return ckpt

    def result(completed: bool, reason: str, path: str | None) -> TrainResult:
        return TrainResult(
            adapter_path=path,
            steps_done=step,
            total_steps=spec.steps,
            completed=completed,
            stopped_reason=reason,
            losses=losses,
            checkpoints=checkpoints,
            validation=validation,
            seconds=time.perf_counter() - start,
            layers=len(net.loras),
            network_sha256=_state_hash(net),
        )

    t_first = time.perf_counter()
    first_step = step
    while step < spec.steps:
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for _ in range(spec.grad_accum):
            if position >= len(order):
                epoch, position = epoch + 1, 0
                order = run.order(epoch)
            batch = order[position]
            position += 1
            rngs = [random.Random(f"{spec.seed}:{epoch}:{position}:{j}") for j in range(len(batch))]
            latents, cond = run.encode_batch(batch, rngs)
            # forward and backward (where gradient checkpointing recomputes the forward)
            with training_attention(run.device):
                with autocast:
                    loss = run.objective.loss(latents, cond, noise_gen)
                if not torch.isfinite(loss):
                    raise _aborted("loss", step + 1, loss.item(), last_good, ff_advice)
                scaled = loss / spec.grad_accum
                (scaler.scale(scaled) if scaler else scaled).backward()
            step_loss += loss.item() / spec.grad_accum
        if scaler:
            scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(
            params, spec.max_grad_norm if spec.max_grad_norm else float("inf")
        )
        if not torch.isfinite(norm) and scaler is None:
            raise _aborted("gradient", step + 1, norm.item(), last_good, ff_advice)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        step += 1
        losses.append(step_loss)
        smoothed = (
            step_loss if smoothed is None else SMOOTHING * smoothed + (1 - SMOOTHING) * step_loss
        )

        elapsed = time.perf_counter() - t_first
        rate = (step - first_step) / elapsed if elapsed > 0 else 0.0
        info = TrainStepInfo(
            step=step,
            total=spec.steps,
            loss=step_loss,
            smoothed_loss=smoothed,
            lr=scheduler.get_last_lr()[0],
            it_per_s=rate,
            eta=(spec.steps - step) / rate if rate > 0 else 0.0,
            peak_memory=_peak_memory(run.device),
        )
        if spec.save_every and step % spec.save_every == 0 and step < spec.steps:
            snapshot("periodic")
        if (
            run.writes
            and spec.validation_every
            and spec.validation_prompts
            and step % spec.validation_every == 0
        ):
            validation.append((step, _validate(spec, run, net, step)))
            if on_validation is not None:
                on_validation(*validation[-1])
        try:
            if on_step is not None:
                on_step(info)
        except BaseException:
            snapshot("interrupted")
            raise
        if should_stop is not None and step < spec.steps and should_stop():
            ckpt = snapshot("cancelled")
            return result(False, "cancelled", str(ckpt.adapter))

    final = snapshot("final")
    from ..io import write_safetensors

    tensors, meta = _adapter_tensors(net, spec), _metadata(spec, run, step)
    if run.writes:
        write_safetensors(run.output, tensors, meta)
    if run.dist is not None:
        run.dist.barrier()
    if run.writes and spec.validation_prompts and (not validation or validation[-1][0] != step):
        validation.append((step, _validate(spec, run, net, step)))
    logger.info("trained %d steps -> %s (checkpoint %s)", step, run.output, final.path)
    done = result(True, "completed", str(run.output))
    done.adapter = _as_adapter(tensors, meta, run.output) if run.writes else None
    return done


def _as_adapter(tensors: dict[str, torch.Tensor], meta: dict[str, str], path: Path) -> Adapter:
    """The adapter just written to `path`, as ``load_adapter(path)`` reads it back."""
    adapter = adapter_from_state_dict(dict(tensors), dict(meta), source=str(path))
    adapter.path = str(path)
    return adapter


def _state_hash(net: Any) -> str:
    h = hashlib.sha256()
    for key, tensor in sorted(net.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _autocast(precision: str, device: torch.device) -> Any:
    if precision == "no":
        return torch.autocast(device.type, enabled=False)
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def _aborted(
    what: str, step: int, value: float, last_good: Checkpoint | None, ff: bool
) -> TrainingAborted:
    where = (
        f"the last good checkpoint is {last_good.path}"
        if last_good
        else "no checkpoint was saved yet (set save_every to keep one)"
    )
    advice = (
        " The config trains FeedForward modules: on SDXL, training the FeedForward blocks is "
        "known to go to NaN (the seed's warning); remove 'FeedForward' from "
        "apply_preset.target_module and train only the Attention blocks."
        if ff
        else " Lower the learning rate, or use bf16 instead of fp16."
    )
    return TrainingAborted(
        f"non-finite {what} ({value}) at step {step}; training stopped; {where}.{advice}"
    )


_SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _adapter_tensors(net: Any, spec: TrainSpec) -> dict[str, torch.Tensor]:
    dtype = _SAVE_DTYPES[spec.save_dtype]
    return {k: v.detach().to("cpu", dtype) for k, v in net.state_dict().items()}


def _metadata(spec: TrainSpec, run: _Run, step: int) -> dict[str, str]:
    return adapter_metadata(
        spec.config,
        run.family,
        run.model.source,
        run.denoiser,
        title=run.output.stem,
        steps=step,
        resolution=spec.dataset.resolution,
        dataset_hash=run.data.fingerprint(),
        spec=spec.to_dict(),
        prediction_type=getattr(run.objective, "prediction", None),
    )


def _validate(spec: TrainSpec, run: _Run, net: Any, step: int) -> torch.Tensor:
    """Images of the validation prompts at validation_lycoris_strength; same seed each time."""
    from ..io import atomic_write
    from ..sampling import sample

    m = run.model.size_multiple
    side = max(m, spec.dataset.resolution // m * m)
    net.set_multiplier(spec.validation_lycoris_strength)
    net.eval()
    run.denoiser.eval()
    try:
        images = torch.cat(
            [
                sample(
                    run.model,
                    [],
                    prompt=prompt,
                    steps=spec.validation_steps,
                    seed=spec.validation_seed,
                    width=side,
                    height=side,
                    max_sequence_length=spec.objective.max_sequence_length,
                )
                for prompt in spec.validation_prompts
            ]
        )
    finally:
        net.set_multiplier(spec.config.multiplier)
        net.train()
        run.denoiser.train(spec.gradient_checkpointing)
    from PIL import Image

    run.val_dir.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        array = (image.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        atomic_write(
            run.val_dir / f"step-{step:06d}-{i}.png",
            lambda tmp, array=array: Image.fromarray(array).save(tmp, format="PNG"),
        )
    return images
