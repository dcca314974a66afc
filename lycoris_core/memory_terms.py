"""What one training step or sampling forward holds, by the measured constants.

The terms :func:`lycoris_core.memory.estimate_memory` adds up besides the weights: the
adapter (parameters, gradients, optimizer state, from the real network built on a meta
denoiser), the activations for the resolution and batch with or without gradient
checkpointing, and what the LyCORIS forward builds: the merged weights (default mode), or
over a quantised base (bypass mode) bitsandbytes' dequantised copies and the upcast weights
that fp8 storage leaves to the backward. Also the :class:`Workload` and :class:`MemoryItem`
they are stated in.

How the activation constants were measured (``bench/memory_fit.py``, results in
``bench/results/memory_fit.json``): one training step (forward, MSE loss, backward) of random
Flux transformers (hidden 256/512, 1-3 double and 1-3 single blocks, 12-24 px latent grids,
32 text tokens, batch 1-2) and SDXL-layout UNets (3 levels, 32-128 channels) with a LyCORIS
LoRA on Attention + FeedForward, under ``torch.profiler.profile(profile_memory=True)`` on the
CPU: the largest "Total Allocated" of the step, minus the adapter's gradients. Flux bytes per
``batch x tokens x hidden x element size`` were fitted per double block, per single block and
for the rest, plus bytes per wrapped weight byte, by least squares (with checkpointing a block
keeps its inputs, one unit); UNet bytes per ``batch x latent pixels x element size x
sum_i c_i (1 + t_i) / 4**i`` plus the wrapped-weight term. LoKr (the seed's config) measured
the same as LoRA rank 4, so one wrapped-weight factor serves both. ``bench/memory.py`` checks
the total against the peak RSS of training a 166.6M-parameter Flux transformer. The same formulas
estimate GPU runs (activations are per element, not per device); CUDA's own context and
allocator slack are not in them, nor, on the CPU, the heap glibc keeps after frees (a default
Linux process's RSS stayed ~1.5x above what torch held; ``MALLOC_MMAP_THRESHOLD_=131072``
removes that).

The bypass constants (``DEQUANT``, ``CAST_SAVED*``, ``SAMPLE_TRANSIENT``) come from
``bench/memory_bypass_fit.py`` (results in ``bench/results/memory_bypass_fit.json``): the peak
RSS of a training step and of a sampling forward over fp8 / int8 / nf4 bases of two random
Flux transformers (hidden 768 and 1024), with the activations above and the adapter's
gradients taken off; ``bench/memory.py`` checks them on the 166.6M-parameter transformer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .memory_counts import BaseInfo, optimizer_state_bytes, wrapped_weight_numel
from .quantization import QUANTISED

# --- measured constants (bench/memory_fit.py -> bench/results/memory_fit.json) -------------
# Flux: bytes per (batch x tokens x hidden x element size); least squares over 6 configs,
# largest error 1.9% (no checkpointing) and 14% (checkpointing)
FLUX_DOUBLE = 21.5
FLUX_SINGLE = 17.4
FLUX_REST = -4.5  # fitted intercept: the per-block terms carry the embeddings
FLUX_BLOCK_GC = 1.0  # a checkpointed block keeps its inputs only
FLUX_REST_GC = 28.0  # one block recomputed in the backward, embeddings, loss
FLUX_INFERENCE = 21.0  # median of 6 no_grad forwards (15.5 .. 40.8)
# UNet: bytes per (batch x latent pixels x element size x unet_unit(config)); 3 configs
UNET_FULL = 77.3
UNET_GC = 25.6
UNET_INFERENCE = 33.3  # median of 3 (22.8 .. 55.9)
# Per byte of wrapped base weight (at the base's element size): the LyCORIS forward (LoRA and
# LoKr alike, lycoris' default non-bypass mode) builds each wrapped layer's merged weight and
# the backward keeps it; LoKr measured no more than LoRA (-0.03 .. 0.0)
WRAPPED_FULL = {"flux": 1.07, "unet": 1.68}
WRAPPED_GC = {"flux": 0.80, "unet": 0.55}
# Bypass mode over a quantised base (bench/memory_bypass_fit.py ->
# bench/results/memory_bypass_fit.json: peak RSS of a training step of two Flux transformers,
# hidden 768/1024, minus the activations above and the adapter's gradients; mean of the two),
# per compute-dtype byte of the largest Linear (bitsandbytes' transient dequantised copies,
# int8 also its fp16 input casts; fp8's upcast, in the forward and again in the backward).
# CAST_SAVED*: diffusers' layerwise casting (the benchmark's "bf16 storage" arm) keeps the
# upcast copies for the backward: per byte of every block Linear, or of the largest block's
# with checkpointing (measured when fp8 still went through that hook)
DEQUANT = {
    ("fp8", False): 1.78,
    ("fp8", True): 0.56,
    ("int8", False): 2.07,
    ("int8", True): 1.47,
    ("nf4", False): 1.66,
    ("nf4", True): 0.53,
}
CAST_SAVED = 0.98
CAST_SAVED_GC = 0.82
# sampling (a no_grad forward): the layer being dequantised or upcast, per compute-dtype byte
# of the largest Linear (same fit)
SAMPLE_TRANSIENT = {"fp8": 0.44, "cast": 0.49, "int8": 0.67, "nf4": 0.41}


@dataclass(frozen=True)
class MemoryItem:
    """One line of an estimate. `resident`: already allocated on the device (a loaded model),
    counted in the total but not against the free memory."""

    name: str
    bytes: int
    note: str = ""
    resident: bool = False
    phase: str = "run"  # "run", or "encode": only while features are encoded


@dataclass(frozen=True)
class Workload:
    """What will run: the settings the estimate depends on."""

    mode: str = "train"  # "train" or "sample"
    width: int = 512
    height: int = 512
    batch_size: int = 1
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    text_tokens: int | None = None  # None: the family's default
    offload: str = "none"
    guidance_batches: int = 1  # sampling with classifier-free guidance runs 2
    autocast: bool = False  # training under bf16/fp16 autocast: 2-byte activations


# --------------------------------------------------------------------------- adapter


def adapter_items(
    denoiser_meta: torch.nn.Module, config: Any, optimizer: str
) -> tuple[list[MemoryItem], int]:
    """Adapter weights, gradients and optimizer state of `config` on a meta denoiser, and the
    number of base weights it wraps."""
    from .targeting import create_network

    net = create_network(denoiser_meta, config)
    try:
        shapes = [p.shape for p in net.parameters() if p.requires_grad] or [
            p.shape for p in net.parameters()
        ]
        wrapped = wrapped_weight_numel(net)
        layers = len(net.loras)
    finally:
        net.restore()
    numel = sum(s.numel() for s in shapes)
    items = [
        MemoryItem("adapter weights (fp32)", 4 * numel, f"{numel:,} parameters, {layers} layers"),
        MemoryItem("adapter gradients (fp32)", 4 * numel),
        MemoryItem(f"optimizer state ({optimizer})", optimizer_state_bytes(optimizer, shapes)),
    ]
    return items, wrapped


# --------------------------------------------------------------------------- activations


def unet_unit(config: Any) -> float:
    """sum_i c_i (1 + t_i) / 4**i over a UNet's resolution levels (t_i: transformer layers in
    a cross-attention level, 0 in a plain one)."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    channels = list(get("block_out_channels"))
    kinds = list(get("down_block_types"))
    layers = get("transformer_layers_per_block", 1)
    if isinstance(layers, int):
        layers = [layers] * len(channels)
    total = 0.0
    for i, (c, kind) in enumerate(zip(channels, kinds, strict=False)):
        t = int(layers[i]) if "CrossAttn" in kind else 0
        total += c * (1 + t) / 4**i
    return total


def _is_unet(get: Any) -> bool:
    return get("block_out_channels") is not None and get("down_block_types") is not None


def activation_bytes(family: str, config: Any, work: Workload, element: int, vae_scale: int) -> int:
    """Bytes of activations of one training step or sampling forward (see the constants)."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    batch = work.batch_size * (work.guidance_batches if work.mode == "sample" else 1)
    lat_h, lat_w = work.height // vae_scale, work.width // vae_scale
    train, gc = work.mode == "train", work.gradient_checkpointing
    if _is_unet(get):
        unit = batch * lat_h * lat_w * element * unet_unit(config)
        k = (UNET_GC if gc else UNET_FULL) if train else UNET_INFERENCE
        return int(k * unit)
    hidden = int(get("num_attention_heads")) * int(get("attention_head_dim"))
    text = work.text_tokens or (512 if family == "flux" else 333)
    tokens = (lat_h // 2) * (lat_w // 2) + text
    unit = batch * tokens * hidden * element
    if not train:
        return int(FLUX_INFERENCE * unit)
    double = int(get("num_layers", 0) or 0)
    single = int(get("num_single_layers", 0) or 0)
    if gc:
        per = FLUX_BLOCK_GC * (double + single) + FLUX_REST_GC
    else:
        per = FLUX_DOUBLE * double + FLUX_SINGLE * single + FLUX_REST
    return max(0, int(per * unit))


def merged_weight_bytes(config: Any, wrapped: int, element: int, checkpointing: bool) -> int:
    """Bytes of the merged weights the LyCORIS forward builds for `wrapped` base weights."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    kind = "unet" if _is_unet(get) else "flux"
    per = (WRAPPED_GC if checkpointing else WRAPPED_FULL)[kind]
    return int(per * wrapped * element)


def forward_items(info: BaseInfo, config: Any, wrapped: int, work: Workload) -> list[MemoryItem]:
    """What the LyCORIS forward holds besides activations: the merged weights (default mode),
    or over a quantised base (bypass mode) the dequantised / upcast copies (see the module
    docstring)."""
    gc = work.gradient_checkpointing
    kw = config.network_kwargs() if hasattr(config, "network_kwargs") else {}
    if info.precision not in (*QUANTISED, "cast") and not kw.get("bypass_mode"):
        merged = merged_weight_bytes(info.denoiser_config, wrapped, info.element, gc)
        note = f"{wrapped:,} wrapped weights"
        return [MemoryItem("adapter forward (merged weights)", merged, note, phase="step")]
    lay, el = info.layout, info.element
    if info.precision in ("fp8", "int8", "nf4"):
        size = int(DEQUANT[(info.precision, gc)] * lay.largest * el)
        note = f"bypass mode; the largest Linear, {lay.largest:,} weights, one at a time"
        return [MemoryItem("dequantised layer (transient)", size, note, phase="step")]
    if info.precision == "cast":  # diffusers' layerwise casting keeps the upcast copies
        n = lay.block_max if gc else lay.block_total
        size = int((CAST_SAVED_GC if gc else CAST_SAVED) * n * el)
        what = "the largest block's" if gc else "the blocks'"
        note = f"bypass mode; {what} Linear weights upcast, {n:,} weights"
        return [MemoryItem("upcast weights kept for the backward", size, note, phase="step")]
    return []  # bypass over a plain base: no merged weights


def sampling_items(info: BaseInfo) -> list[MemoryItem]:
    """A sampling forward over a quantised or fp8-stored base: the layer it dequantises or
    upcasts (one at a time)."""
    k = SAMPLE_TRANSIENT.get(info.precision)
    if k is None:
        return []
    size = int(k * info.layout.largest * info.element)
    note = f"the largest Linear, {info.layout.largest:,} weights, one at a time"
    return [MemoryItem("dequantised layer (transient)", size, note, phase="step")]
