"""Counting bytes and parameters without allocating: what :mod:`lycoris_core.memory` adds up.

Free memory on a device; weight bytes of a loaded module, or of a diffusers folder from its
``.safetensors`` headers; a denoiser on the meta device (for the LyCORIS network's real
parameter count); the base weights a network wraps; an optimizer's state bytes; and
:class:`BaseInfo`, what the estimate needs of a base model, loaded or still a folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}


# --------------------------------------------------------------------------- free memory


def free_memory_bytes(device: torch.device) -> int | None:
    """Free bytes on `device`: CUDA's ``mem_get_info``, the CPU's MemAvailable; else None."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


# --------------------------------------------------------------------------- weights


def module_weight_bytes(module: torch.nn.Module) -> tuple[int, str]:
    """Bytes of a module's parameters and buffers, and its dtypes ('bf16', 'fp32+bf16')."""
    total, dtypes = 0, set()
    tensors = list(module.parameters())
    for sub in module.modules():  # persistent buffers: what a saved file holds
        skip = sub._non_persistent_buffers_set
        tensors += [b for n, b in sub.named_buffers(recurse=False) if n not in skip]
    for t in tensors:
        total += t.numel() * t.element_size()
        dtypes.add(
            str(t.dtype).removeprefix("torch.").replace("float", "fp").replace("bfp16", "bf16")
        )
    return total, "+".join(sorted(dtypes))


def folder_weight_bytes(folder: Path, dtype: torch.dtype) -> dict[str, int]:
    """Per component: bytes of its ``.safetensors`` tensors once loaded as `dtype` (floating
    tensors; others at their stored size), read from the file headers only."""
    out: dict[str, int] = {}
    size = torch.tensor([], dtype=dtype).element_size()
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        total = 0
        for file in sub.glob("*.safetensors"):
            for numel, stored in _header_tensors(file):
                floating = stored.startswith(("F", "BF"))
                total += numel * (size if floating else _DTYPE_BYTES.get(stored, 1))
        if total:
            out[sub.name] = total
    return out


def _header_tensors(path: Path) -> list[tuple[int, str]]:
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    out = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        numel = 1
        for d in info["shape"]:
            numel *= int(d)
        out.append((numel, info["dtype"]))
    return out


def meta_denoiser(cls: type, config: dict[str, Any]) -> torch.nn.Module:
    """A denoiser of `cls` built from `config` on the meta device (no memory)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return cls.from_config(config)


def wrapped_weight_numel(net: Any) -> int:
    """Elements of the base weights a LyCORIS network wraps."""
    total = 0
    for lora in net.loras:
        shape = getattr(lora, "shape", None)
        if shape is None:
            shape = lora.org_module[0].weight.shape
        n = 1
        for d in shape:
            n *= int(d)
        total += n
    return total


def optimizer_state_bytes(optimizer: str, shapes: list[torch.Size]) -> int:
    """Bytes of the optimizer's state for fp32 parameters of `shapes` (from each algorithm's
    definition: torch AdamW, bitsandbytes AdamW8bit, prodigyopt Prodigy, transformers
    Adafactor with beta1=None)."""
    numel = sum(s.numel() for s in shapes)
    key = optimizer.lower()
    if key == "adamw":
        return 8 * numel
    if key == "adamw8bit":
        return 2 * numel
    if key == "prodigy":
        return 16 * numel
    if key == "adafactor":
        return 4 * sum(s[0] + s[1:].numel() if len(s) >= 2 else s.numel() for s in shapes)
    return 8 * numel


@dataclass
class BaseInfo:
    """What the estimate needs of a base model: component bytes, the denoiser's class and
    config (for a meta copy), family, VAE scale factor, device."""

    components: dict[str, tuple[int, str]]  # name -> (bytes, dtype label)
    denoiser: str  # component name of the denoiser
    denoiser_cls: type
    denoiser_config: dict[str, Any]
    family: str
    vae_scale: int
    device: torch.device
    element: int  # compute element size in bytes (the denoiser's dtype)
    resident: bool = False  # already loaded
    offload: str = "none"
    extra: dict[str, Any] = field(default_factory=dict)


def base_info_from_model(model: Any) -> BaseInfo:
    """A loaded model (:class:`~lycoris_core.models.LoadedModel`): its modules' real bytes."""
    pipe = model.pipe
    comps = {}
    for name, comp in getattr(pipe, "components", {}).items():
        if isinstance(comp, torch.nn.Module):
            comps[name] = module_weight_bytes(comp)
    den = model.denoiser
    return BaseInfo(
        components=comps,
        denoiser=model.family.denoiser,
        denoiser_cls=type(den),
        denoiser_config=dict(den.config),
        family=model.family.name,
        vae_scale=model.vae_scale_factor,
        device=model.device,
        element=next(den.parameters()).element_size(),
        resident=True,
        offload=model.offload,
    )


def base_info_from_folder(
    folder: str | os.PathLike[str], dtype: str | torch.dtype = "auto", device: Any = "auto"
) -> BaseInfo:
    """A diffusers folder before loading: weights from the safetensors headers (as `dtype`),
    the denoiser's class and config from its config.json."""
    from .device import resolve_device, resolve_dtype
    from .families import family_for_pipeline_class
    from .pipeline_files import denoiser_entry, read_model_index

    root = Path(folder)
    index = read_model_index(root)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    name, cls = denoiser_entry(root, index)
    config = cls.load_config(str(root / name))
    label = str(dt).removeprefix("torch.").replace("float", "fp").replace("bfp16", "bf16")
    family = family_for_pipeline_class(index["_class_name"])
    vae_cfg = root / "vae" / "config.json"
    scale = 8
    if vae_cfg.is_file():
        blocks = json.loads(vae_cfg.read_text(encoding="utf-8")).get("block_out_channels", [0] * 4)
        scale = 2 ** (len(blocks) - 1)
    return BaseInfo(
        components={k: (v, label) for k, v in folder_weight_bytes(root, dt).items()},
        denoiser=name,
        denoiser_cls=cls,
        denoiser_config=dict(config),
        family=family.name if family is not None else "unknown",
        vae_scale=scale,
        device=dev,
        element=torch.tensor([], dtype=dt).element_size(),
    )
