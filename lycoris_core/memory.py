"""The memory preflight: what a training or sampling run will hold, against what is free.

:func:`estimate_memory` adds up, without allocating anything big:

* **weights** per pipeline component at their storage dtype: counted from a loaded pipeline's
  modules, or, before loading, from the ``.safetensors`` headers of a diffusers folder (the
  floating tensors at the dtype they will be loaded in);
* **adapter** parameters, their gradients and the optimizer's state, from the LyCORIS network
  built for the config on a copy of the denoiser on the ``meta`` device (so the counts are the
  real network's): AdamW keeps 2 fp32 states per parameter, AdamW 8-bit 2 bytes, Prodigy 4
  states (``exp_avg``, ``exp_avg_sq``, ``s``, ``p0``), Adafactor a factored second moment
  (rows + columns of each matrix);
* **merged weights**: lycoris' forward (its default, non-bypass mode; LoRA and LoKr alike)
  builds each wrapped layer's weight plus delta, and the backward keeps them: about one more
  copy of the wrapped base weights;
* over a **quantised base** (``base_precision`` fp8/int8/nf4, counted from the layers'
  tensors, or before loading from the folder's Linear shapes: fp8 1 byte per weight and bias,
  int8 1 byte + an fp32 scale per row, nf4 half a byte + the double-quantised block scales)
  lycoris trains in bypass mode, with no merged weights. Instead: bitsandbytes dequantises
  each layer in its forward and again in its backward, one at a time (a transient copy of
  the largest layer at the compute dtype); and fp8 storage (diffusers' layerwise casting)
  upcasts each layer's weight for its forward, and the backward keeps the upcast copy (the
  matmul saved it), so a training step holds the compute-dtype weights of every block Linear
  whose input carries a gradient (with checkpointing: of the block being recomputed);
* **activations** of a training step (or a sampling forward) for the resolution and batch,
  with or without gradient checkpointing, from measured constants;
* **encoders** (VAE, text encoders) while latents and text are encoded: training encodes first
  and then moves them off the device (``Session.release_encoders``), so the peak is the larger
  of the encoding phase and the training phase.

The per-step terms, their constants and how they were measured: :mod:`.memory_terms`.

A run is refused (:class:`MemoryPreflightError`) only when it **clearly** does not fit: what it
still needs exceeds the free memory by more than :data:`REFUSE_FACTOR` (1.5x). Below that the
estimate is a warning in the status line and the run starts: a real out-of-memory then ends as
:class:`~lycoris_core.device.OutOfMemoryError` (a ``torch.OutOfMemoryError``, so ComfyUI frees
its models) with advice. The refusal is a plain :class:`LycorisError`, not an out-of-memory
error: nothing was allocated, and a host that unloads everything on an OOM should not.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from .errors import LycorisError
from .memory_counts import (
    BaseInfo,
    base_info_from_folder,
    base_info_from_model,
    free_memory_bytes,
    meta_denoiser,
    module_weight_bytes,
    with_precision,
    wrapped_weight_numel,
)
from .memory_terms import (
    MemoryItem,
    Workload,
    activation_bytes,
    adapter_items,
    forward_items,
    sampling_items,
    unet_unit,
)
from .quantization import QUANTISED

__all__ = [
    "REFUSE_FACTOR",
    "MemoryEstimate",
    "MemoryItem",
    "MemoryPreflightError",
    "Workload",
    "estimate_memory",
    "estimate_training",
    "free_memory_bytes",
    "module_weight_bytes",
    "preflight",
    "training_workload",
    "unet_unit",
    "wrapped_weight_numel",
]

REFUSE_FACTOR = 1.5  # refuse when needed > REFUSE_FACTOR x free

ENCODER_COMPONENTS = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "image_encoder")


class MemoryPreflightError(LycorisError):
    """A run whose memory estimate clearly exceeds the free memory; refused before loading."""


@dataclass(frozen=True)
class MemoryEstimate:
    items: tuple[MemoryItem, ...]
    device: str
    free: int | None  # bytes free on the device (None: unknown)
    workload: Workload
    options: tuple[str, ...] = ()  # cheapest changes that would fit (when it does not)

    def phase_bytes(self, phase: str, resident: bool | None = None) -> int:
        """Bytes held in `phase` ("encode" or "step"); `resident` True/False: only those
        already loaded / still to allocate."""
        return sum(
            i.bytes
            for i in self.items
            if i.phase in ("run", phase) and (resident is None or i.resident == resident)
        )

    @property
    def total(self) -> int:
        """The peak: the larger of the encoding phase and the run phase."""
        return max(self.phase_bytes("encode"), self.phase_bytes("step"))

    @property
    def resident(self) -> int:
        return sum(i.bytes for i in self.items if i.resident)

    @property
    def needed(self) -> int:
        """What the run still has to allocate, at its peak."""
        return max(self.phase_bytes(p, resident=False) for p in ("encode", "step"))

    @property
    def verdict(self) -> str:
        """'fits', 'tight' (may not fit: starts with a warning), 'refuse' or 'unknown'."""
        if self.free is None:
            return "unknown"
        if self.needed <= self.free:
            return "fits"
        return "tight" if self.needed <= REFUSE_FACTOR * self.free else "refuse"

    def summary(self) -> str:
        """One status line: total, needed vs free, verdict."""
        free = "unknown" if self.free is None else gb(self.free)
        return (
            f"memory estimate {gb(self.total)} on {self.device} (needs {gb(self.needed)} more, "
            f"free {free}): {self.verdict}"
        )

    def breakdown(self) -> str:
        lines = [self.summary()]
        for item in self.items:
            tags = [t for t in (item.note, "loaded" if item.resident else "") if t]
            phase = " (while encoding)" if item.phase == "encode" else ""
            lines.append(
                f"  {item.name}{phase}: {gb(item.bytes)}"
                + (f" [{'; '.join(tags)}]" if tags else "")
            )
        if self.options:
            lines.append("  would fit: " + "; ".join(self.options))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "total": self.total,
            "needed": self.needed,
            "free": self.free,
            "verdict": self.verdict,
            "refuse_factor": REFUSE_FACTOR,
            "items": [dataclasses.asdict(i) for i in self.items],
            "workload": dataclasses.asdict(self.workload),
            "options": list(self.options),
        }


def gb(n: int) -> str:
    """A size for people: GB from 1 GB, else MB."""
    return f"{n / 2**30:.2f} GB" if abs(n) >= 2**30 else f"{n / 2**20:.1f} MB"


# --------------------------------------------------------------------------- the estimate


def estimate_memory(
    base: Any,
    work: Workload | None = None,
    lycoris_config: Any = None,
    *,
    dtype: str | torch.dtype = "auto",
    device: Any = "auto",
    base_precision: str = "auto",
    free_bytes: int | None = None,
    with_options: bool = True,
) -> MemoryEstimate:
    """The memory a training (`work.mode` "train", needs `lycoris_config`) or sampling run on
    `base` (a LoadedModel, a diffusers folder, or a :class:`BaseInfo`) will hold.

    A folder is counted as loaded with `dtype`, `device` and `base_precision` (a loaded model
    as it is). `free_bytes`: the free memory to compare with (default: measured on the device).
    """
    work = work or Workload()
    if isinstance(base, BaseInfo):
        info = base
    elif hasattr(base, "pipe"):
        info = base_info_from_model(base)
    else:
        info = base_info_from_folder(
            base, dtype=dtype, device=device, base_precision=base_precision
        )
    items = _weight_items(info, work)
    if work.mode == "train":
        if lycoris_config is None:
            raise LycorisError("estimate_memory: a training estimate needs the LyCORIS config")
        meta = info.extra.get("meta_denoiser") or meta_denoiser(
            info.denoiser_cls, info.denoiser_config
        )
        adapter, wrapped = adapter_items(meta, lycoris_config, work.optimizer)
        items += [*adapter, *forward_items(info, lycoris_config, wrapped, work)]
    else:
        items += sampling_items(info)
    element = 2 if work.autocast else info.element
    act = activation_bytes(info.family, info.denoiser_config, work, element, info.vae_scale)
    how = ("with" if work.gradient_checkpointing else "without") + " gradient checkpointing"
    what = f"{work.width}x{work.height}, batch {work.batch_size}" + (
        f", {how}" if work.mode == "train" else ""
    )
    items.append(MemoryItem(f"activations ({work.mode})", act, what, phase="step"))
    free = free_bytes if free_bytes is not None else free_memory_bytes(info.device)
    est = MemoryEstimate(tuple(items), str(info.device), free, work)
    if with_options and est.verdict in ("tight", "refuse"):
        est = dataclasses.replace(est, options=tuple(_options(info, work, lycoris_config, free)))
    return est


def _weight_items(info: BaseInfo, work: Workload) -> list[MemoryItem]:
    items = []
    for name, (size, label) in info.components.items():
        encoder = name != info.denoiser
        if info.offload == "sequential":
            continue  # a layer at a time on the device
        # training moves the encoders off the device once the features are cached; with
        # offload 'model' only the component that runs is on the device
        phase = "encode" if encoder and (work.mode == "train" or info.offload == "model") else "run"
        items.append(
            MemoryItem(f"{name} weights ({label})", size, resident=info.resident, phase=phase)
        )
    return items


def _options(info: BaseInfo, work: Workload, config: Any, free: int | None) -> list[str]:
    """The cheapest single changes (in this order) whose estimate fits `free`."""
    candidates: list[tuple[str, BaseInfo, Workload]] = []
    if work.mode == "train" and not work.gradient_checkpointing:
        candidates.append(
            (
                "gradient checkpointing on",
                info,
                dataclasses.replace(work, gradient_checkpointing=True),
            )
        )
    if info.precision not in (*QUANTISED, "cast", "gguf") and info.linears:
        for precision in ("fp8", "nf4"):
            if precision == "nf4" and (info.offload != "none" or not _has_bitsandbytes()):
                continue  # bitsandbytes layers are refused with offload
            label = f"base_precision {precision}"
            candidates.append((label, with_precision(info, precision), work))
    if work.batch_size > 1:
        candidates.append(("batch size 1", info, dataclasses.replace(work, batch_size=1)))
    for side in (1024, 768, 512, 384, 256):
        if side < max(work.width, work.height):
            w = min(work.width, side)
            h = min(work.height, side)
            candidates.append(
                (f"resolution {side}", info, dataclasses.replace(work, width=w, height=h))
            )
            break
    if info.element == 4 and info.precision not in (*QUANTISED, "cast", "gguf"):
        half = dataclasses.replace(
            info,
            components={k: (v // 2, "bf16") for k, (v, _) in info.components.items()},
            element=2,
            resident=False,
        )
        candidates.append(("dtype bf16 (half the weights and activations)", half, work))
    if info.device.type == "cuda" and info.offload == "none" and work.mode == "sample":
        candidates.append(("offload 'model'", dataclasses.replace(info, offload="model"), work))
        candidates.append(
            ("offload 'sequential'", dataclasses.replace(info, offload="sequential"), work)
        )
    out = []
    for label, i, w in candidates:
        est = estimate_memory(i, w, config, free_bytes=free, with_options=False)
        if est.verdict == "fits":
            out.append(f"{label} -> {gb(est.total)}")
    return out or [
        "none of gradient checkpointing, base_precision fp8/nf4, batch 1, a lower resolution, "
        "bf16 or offload fits alone"
    ]


def _has_bitsandbytes() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def preflight(estimate: MemoryEstimate) -> MemoryEstimate:
    """Raise :class:`MemoryPreflightError` (with the breakdown and the options) when the run
    clearly does not fit; return the estimate otherwise."""
    if estimate.verdict == "refuse":
        raise MemoryPreflightError(
            f"this run needs about {gb(estimate.needed)} more on {estimate.device} but only "
            f"{gb(estimate.free or 0)} is free (refused above {REFUSE_FACTOR}x); change the "
            f"settings, e.g. {'; '.join(estimate.options)}.\n{estimate.breakdown()}"
        )
    return estimate


def training_workload(spec: Any) -> Workload:
    """The :class:`Workload` of a :class:`~lycoris_core.training.TrainSpec`."""
    res = int(spec.dataset.resolution)
    return Workload(
        mode="train",
        width=res,
        height=res,
        batch_size=int(spec.batch_size),
        gradient_checkpointing=bool(spec.gradient_checkpointing),
        optimizer=str(spec.optimizer),
        text_tokens=spec.objective.max_sequence_length,
        autocast=spec.mixed_precision in ("bf16", "fp16"),
    )


def estimate_training(
    spec: Any, *, free_bytes: int | None = None, **base_kw: Any
) -> MemoryEstimate:
    """The estimate of a training spec (its base: loaded, or a folder loaded with `base_kw`:
    dtype, device; at the spec's ``base_precision``)."""
    base_kw.setdefault("base_precision", getattr(spec, "base_precision", "auto"))
    return estimate_memory(
        spec.base, training_workload(spec), spec.config, free_bytes=free_bytes, **base_kw
    )
