"""Counting bytes and parameters without allocating: what :mod:`lycoris_core.memory` adds up.

Free memory on a device; weight bytes of a loaded module (with the scales of its quantised
layers), or of a diffusers folder from its ``.safetensors`` headers, at a dtype or a quantised
``base_precision`` (its Linear layers re-priced: :func:`linear_bytes`); a denoiser on the meta
device (for the LyCORIS network's real parameter count and its Linear layout); the base
weights a network wraps; an optimizer's state bytes; and :class:`BaseInfo`, what the estimate
needs of a base model, loaded or still a folder.
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
    """Bytes of a module's parameters and persistent buffers, and its dtypes ('bf16',
    'fp32+bf16'), with what quantised layers keep beside them: bitsandbytes' 4-bit block
    scales (``weight.quant_state``: absmax, nested absmax, code books, offset) and int8 row
    scales (``weight.SCB``, moved to ``layer.state.SCB`` at the first forward). A tensor
    reached twice (int8's ``state.CB`` is the weight) counts once."""
    total, dtypes, seen = 0, set(), set()
    for t in _module_tensors(module):
        key = id(t) if t.device.type == "meta" else (t.data_ptr(), t.numel(), t.dtype)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
        dtypes.add(dtype_label(t.dtype))
    return total, "+".join(sorted(dtypes))


def dtype_label(dtype: torch.dtype) -> str:
    """'fp32', 'bf16', 'fp8_e4m3fn', 'uint8', ..."""
    return str(dtype).removeprefix("torch.").replace("float", "fp").replace("bfp16", "bf16")


def _module_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    tensors = list(module.parameters())
    for sub in module.modules():  # persistent buffers: what a saved file holds
        skip = sub._non_persistent_buffers_set
        tensors += [b for n, b in sub.named_buffers(recurse=False) if n not in skip]
        weight = getattr(sub, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None:  # bitsandbytes Params4bit
            tensors += _quant_state_tensors(state)
        state_scb = getattr(getattr(sub, "state", None), "SCB", None)
        for scales in (getattr(weight, "SCB", None), state_scb):
            if isinstance(scales, torch.Tensor):
                tensors.append(scales)
    return tensors


def _quant_state_tensors(state: Any) -> list[torch.Tensor]:
    out = [getattr(state, k, None) for k in ("absmax", "code", "offset")]
    nested = getattr(state, "state2", None)
    if nested is not None:
        out += _quant_state_tensors(nested)
    return [t for t in out if isinstance(t, torch.Tensor)]


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


# --------------------------------------------------------------------------- quantised bases

# bitsandbytes' NF4 with double quantisation (``compress_statistics=True``, as
# :func:`~lycoris_core.quantization.quantise_module` makes it): 4 bits per weight, one uint8
# absmax per block of 64 weights, one fp32 absmax per 256 of those blocks, and per layer a
# 16-entry fp32 code book, a 256-entry fp32 code book for the absmax and an fp32 offset
# (bitsandbytes.functional.quantize_4bit / QuantState; checked against the layers' tensors in
# tests/unit/test_memory.py). Int8 (LLM.int8): 1 byte per weight and one fp32 scale per row.
NF4_BLOCK = 64
NF4_NESTED_BLOCK = 256
NF4_LAYER_CONSTANTS = 4 * (16 + 256 + 1)


@dataclass(frozen=True)
class LinearLayout:
    """The Linear layers of a denoiser as the bypass terms of the estimate need them (weight
    elements): the largest one, and those of the blocks whose input carries a gradient in
    training (every Linear of the blocks except the modulation ones, ``norm*``, fed by the
    timestep embedding): their sum and the largest block's."""

    largest: int = 0
    block_total: int = 0
    block_max: int = 0


def linear_layout(module: torch.nn.Module) -> LinearLayout:
    """The :class:`LinearLayout` of `module` (plain, quantised or on the meta device)."""
    from .quantization import is_quantised_linear, weight_shape

    largest, blocks = 0, {}
    for path, sub in module.named_modules():
        if not (type(sub) is torch.nn.Linear or is_quantised_linear(sub)):
            continue
        shape = weight_shape(sub)
        numel = int(shape[0]) * int(shape[1])
        largest = max(largest, numel)
        parts = path.split(".")
        if len(parts) > 2 and parts[1].isdigit() and not any("norm" in q for q in parts):
            key = ".".join(parts[:2])
            blocks[key] = blocks.get(key, 0) + numel
    return LinearLayout(largest, sum(blocks.values()), max(blocks.values(), default=0))


def quantisable_linears(
    module: torch.nn.Module, convs: bool = False
) -> tuple[tuple[int, int, bool, int], ...]:
    """(out, in, has bias, element size) of each plain Linear (with `convs`, also Conv1d/2d:
    fp8 stores them too) that base_precision fp8/int8/nf4 would store quantised
    (:func:`~lycoris_core.quantization.quantise_module`'s rule: the model's
    ``_keep_in_fp32_modules`` stay)."""
    keep = tuple(getattr(module, "_keep_in_fp32_modules", None) or ())
    kinds = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d) if convs else (torch.nn.Linear,)
    out = []
    for path, sub in module.named_modules():
        if type(sub) not in kinds or path.rsplit(".", 1)[-1] in keep:
            continue
        if sub.weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            continue  # already fp8
        bias = sub.bias is not None
        w = sub.weight
        out.append((w.shape[0], w[0].numel(), bias, w.element_size()))
    return tuple(out)


def linear_bytes(out: int, inp: int, bias: bool, precision: str, element: int) -> int:
    """Bytes of one Linear layer stored at `precision`, its bias at `element` bytes."""
    n = out * inp
    b = out if bias else 0
    if precision == "fp8":
        return n + element * b
    if precision == "int8":
        return n + 4 * out + element * b
    if precision == "nf4":
        blocks = -(-n // NF4_BLOCK)
        nested = -(-blocks // NF4_NESTED_BLOCK)
        return -(-n // 2) + blocks + 4 * nested + NF4_LAYER_CONSTANTS + element * b
    return element * (n + b)


def with_precision(info: BaseInfo, precision: str) -> BaseInfo:
    """`info` as it would be with its denoiser and T5 encoders stored at `precision`
    (fp8/int8/nf4): each quantisable Linear re-priced (:func:`linear_bytes`)."""
    import dataclasses

    comps = dict(info.components)
    for name, layers in info.linears.items():
        if name not in comps:
            continue
        size, label = comps[name]
        plain = sum(linear_bytes(o, i, b, "plain", e) for o, i, b, e in layers)
        quant = sum(linear_bytes(o, i, b, precision, e) for o, i, b, e in layers)
        comps[name] = (size - plain + quant, f"{precision} Linear, {label} rest")
    return dataclasses.replace(info, components=comps, precision=precision, resident=False)


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
    # the denoiser's base precision (quantization.model_precision: "nf4", "int8", "fp8", or a
    # dtype name); "cast": plain weights stored in another dtype by a layerwise casting hook
    precision: str = "auto"
    layout: LinearLayout = field(default_factory=LinearLayout)
    # per component: the plain Linear layers a quantised base_precision would convert
    linears: dict[str, tuple[tuple[int, int, bool, int], ...]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def base_info_from_model(model: Any) -> BaseInfo:
    """A loaded model (:class:`~lycoris_core.models.LoadedModel`): its modules' real bytes."""
    from .quantization import QUANTISED, QUANTISED_ENCODERS, model_precision

    pipe = model.pipe
    den = model.denoiser
    precision = model_precision(den)
    if precision not in QUANTISED and any(
        _has_casting_hook(m) for m in den.modules() if type(m) is torch.nn.Linear
    ):
        precision = "cast"
    comps, linears = {}, {}
    for name, comp in getattr(pipe, "components", {}).items():
        if isinstance(comp, torch.nn.Module):
            comps[name] = module_weight_bytes(comp)
            quantisable = comp is den or type(comp).__name__ in QUANTISED_ENCODERS
            if quantisable and precision not in (*QUANTISED, "cast"):
                linears[name] = quantisable_linears(comp)
    return BaseInfo(
        components=comps,
        denoiser=model.family.denoiser,
        denoiser_cls=type(den),
        denoiser_config=dict(den.config),
        family=model.family.name,
        vae_scale=model.vae_scale_factor,
        device=model.device,
        element=torch.tensor([], dtype=model.dtype).element_size(),  # the compute dtype
        resident=True,
        offload=model.offload,
        precision=precision,
        layout=linear_layout(den),
        linears=linears,
    )


def _has_casting_hook(module: torch.nn.Module) -> bool:
    registry = getattr(module, "_diffusers_hook", None)
    # diffusers.hooks.layerwise_casting registers its hook under this name
    return registry is not None and registry.get_hook("layerwise_casting") is not None


def base_info_from_folder(
    folder: str | os.PathLike[str],
    dtype: str | torch.dtype = "auto",
    device: Any = "auto",
    base_precision: str = "auto",
) -> BaseInfo:
    """A diffusers folder before loading: weights from the safetensors headers (as `dtype`,
    or stored at `base_precision`), the denoiser's class and config from its config.json
    (built on the meta device for its Linear layers)."""
    from .device import resolve_device, resolve_dtype
    from .families import family_for_pipeline_class
    from .pipeline_files import denoiser_entry, read_model_index
    from .quantization import QUANTISED, QUANTISED_ENCODERS, precision_dtype

    root = Path(folder)
    index = read_model_index(root)
    dev = resolve_device(device)
    dt = resolve_dtype(precision_dtype(base_precision, dtype), dev)
    element = torch.tensor([], dtype=dt).element_size()
    name, cls = denoiser_entry(root, index)
    config = cls.load_config(str(root / name))
    meta = meta_denoiser(cls, dict(config))
    linears = {name: _at(quantisable_linears(meta, convs=base_precision == "fp8"), element)}
    for comp, entry in index.items():
        if isinstance(entry, list) and entry[-1] in QUANTISED_ENCODERS:
            linears[comp] = _at(quantisable_linears(_meta_encoder(root / comp, entry[-1])), element)
    family = family_for_pipeline_class(index["_class_name"])
    vae_cfg = root / "vae" / "config.json"
    scale = 8
    if vae_cfg.is_file():
        blocks = json.loads(vae_cfg.read_text(encoding="utf-8")).get("block_out_channels", [0] * 4)
        scale = 2 ** (len(blocks) - 1)
    info = BaseInfo(
        components={k: (v, dtype_label(dt)) for k, v in folder_weight_bytes(root, dt).items()},
        denoiser=name,
        denoiser_cls=cls,
        denoiser_config=dict(config),
        family=family.name if family is not None else "unknown",
        vae_scale=scale,
        device=dev,
        element=element,
        precision=dtype_label(dt),
        layout=linear_layout(meta),
        linears={k: v for k, v in linears.items() if k in index},
        extra={"meta_denoiser": meta},
    )
    return with_precision(info, base_precision) if base_precision in QUANTISED else info


def _at(layers: tuple[tuple[int, int, bool, int], ...], element: int) -> tuple:
    return tuple((o, i, b, element) for o, i, b, _ in layers)


def _meta_encoder(folder: Path, class_name: str) -> torch.nn.Module:
    import transformers
    from accelerate import init_empty_weights

    cls = getattr(transformers, class_name)
    with init_empty_weights():
        return cls(cls.config_class.from_pretrained(str(folder)))
