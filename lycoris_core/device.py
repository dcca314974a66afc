"""Device and dtype policy, TF32, offload modes, memory release and out-of-memory advice.

Nothing here touches CUDA at import time; every query happens when a function is called.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

from .errors import LycorisError

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cuda", "mps", "cpu")
DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
OFFLOAD_MODES = ("none", "model", "sequential")
_DTYPE_ALIASES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "half": "fp16"}


class DeviceError(LycorisError, ValueError):
    """A device, dtype or offload choice that this machine cannot honour."""


class OutOfMemoryError(LycorisError, torch.OutOfMemoryError, MemoryError):
    """Out of memory, with concrete advice on what to change.

    Also a ``torch.OutOfMemoryError`` (``torch.cuda.OutOfMemoryError``): hosts that handle an
    OOM by type, such as ComfyUI, which unloads its models then, see it as one.
    """


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` picks cuda > mps > cpu; an explicit device must exist here."""
    if isinstance(name, torch.device):
        return name
    key = str(name).strip().lower()
    if key == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(key)
    except RuntimeError:
        raise DeviceError(
            f"device {name!r} is not a device name; use one of {', '.join(DEVICES)}"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {name!r}: CUDA is not available here; use 'auto' or 'cpu'")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {name!r}: MPS is not available here; use 'auto' or 'cpu'")
    return device


def resolve_dtype(
    name: str | torch.dtype = "auto", device: torch.device | None = None
) -> torch.dtype:
    """``auto``: bf16 where the GPU supports it, else fp16 on CUDA/MPS, fp32 on CPU."""
    if isinstance(name, torch.dtype):
        return name
    key = _DTYPE_ALIASES.get(str(name).strip().lower(), str(name).strip().lower())
    if key not in DTYPES:
        raise DeviceError(f"dtype {name!r} is not supported; use one of {', '.join(DTYPES)}")
    dtype = DTYPES[key]
    if dtype is not None:
        return dtype
    device = device or resolve_device("auto")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def enable_tf32(device: torch.device) -> bool:
    """Allow TF32 matmuls on Ampere and newer GPUs; returns whether it was enabled."""
    if device.type != "cuda":
        return False
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


def training_attention(device: torch.device) -> Any:
    """A context for training forwards on `device` that keeps attention off cuDNN.

    On an H100 (torch 2.11, CUDA 13) cuDNN's scaled-dot-product attention gave NaN gradients
    at the first step on a Flux transformer under bf16 autocast, and an illegal memory access
    with bf16 weights; flash, memory-efficient and math attention trained the same steps
    fine. Wrap the backward too: gradient checkpointing recomputes the forward there, and a
    recompute on another backend fails torch's checkpoint metadata check (seen on the H100).
    Elsewhere (CPU, MPS) this changes nothing.
    """
    if device.type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(backends)


def place_pipeline(pipe: Any, device: torch.device, offload: str = "none") -> None:
    """Move a diffusers pipeline to `device`, or enable one of diffusers' CPU offload modes."""
    if offload not in OFFLOAD_MODES:
        raise DeviceError(
            f"offload {offload!r} is not a mode; use one of {', '.join(OFFLOAD_MODES)}"
        )
    if offload == "none":
        pipe.to(device)
        return
    if device.type == "cpu":
        raise DeviceError(
            f"offload '{offload}' moves weights between the CPU and a GPU, but the device is "
            "cpu; use offload 'none'"
        )
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.enable_sequential_cpu_offload(device=device)


def free_memory(host_free: Callable[[], None] | None = None) -> None:
    """Release what we can: let the host free its own caches first, then ours."""
    if host_free is not None:
        host_free()
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if mps is not None and torch.backends.mps.is_available():
        mps.empty_cache()


def module_bytes(module: torch.nn.Module | None) -> int:
    if module is None:
        return 0
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f} GB"


@contextmanager
def oom_advice(
    what: str, model_bytes: int = 0, adapter_bytes: int = 0, hint: str = ""
) -> Iterator[None]:
    """Rewrite an out-of-memory error into :class:`OutOfMemoryError` with concrete advice."""
    try:
        yield
    except torch.OutOfMemoryError as exc:
        free_memory()
        sizes = f"model weights {_gb(model_bytes)}"
        if adapter_bytes:
            sizes += f", adapters {_gb(adapter_bytes)}"
        raise OutOfMemoryError(
            f"out of memory while {what} ({sizes}). Try, in order: a lower resolution or batch "
            "size; offload 'model' (or 'sequential', slowest, least memory); dtype bf16/fp16 "
            f"instead of fp32; dynamic mode instead of merge for large adapters.{hint} "
            f"(device said: {str(exc).splitlines()[0][:200]})"
        ) from exc
