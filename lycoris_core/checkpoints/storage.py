"""Reading a component's tensors as stored, and building modules without full-precision copies.

* fp16/bf16/fp32 tensors are read as stored and cast (per tensor) to the compute dtype.
* Plain fp8 (``float8_e4m3fn`` / ``float8_e5m2``): kept fp8 (``fp8="keep"``): the module is
  built on the meta device, a diffusers model hook (:func:`lycoris_core.quantization.
  store_fp8`) makes each Linear/Conv layer whose weight the file stores in fp8 keep its
  weight in fp8 and compute in the compute dtype (its bias in the compute dtype), and each
  tensor is assigned as read (no copy of the fp8 weights).
  ``fp8="upcast"`` casts each tensor to the compute dtype as it is read.
* ComfyUI's scaled fp8 (a ``scaled_fp8`` marker under the model prefix; per layer
  ``scale_weight``): dequantised as ``weight.float() * scale_weight`` per tensor, straight to
  the compute dtype (in slices, so no float32 copy of a whole tensor); ``scale_input`` (an
  activation scale for fp8 matmuls) is dropped.

Memory: a tensor kept as stored is safetensors' memory map of the file (no copy; its pages
count in RSS once read, and the kernel may drop them again). A tensor that is cast or
dequantised is read with a plain file read into its own buffer and converted from there:
reading it through the map would leave its file pages resident for as long as any other
tensor of the file (a bias kept as stored) holds the map, i.e. a second copy of every
converted weight in the stored dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..errors import ModelLoadError
from .detect import Part

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_SCALE_SUFFIXES = (".scale_weight", ".scale_input")


def is_scaled_fp8(part: Part) -> bool:
    """ComfyUI's marker: a ``scaled_fp8`` tensor at the root of the model prefix."""
    h = part.header
    root = part.prefix if part.layout in ("ldm_unet", "sai_mmdit", "bfl_flux") else ""
    return (
        h.has(root + "scaled_fp8")
        or h.has("scaled_fp8")
        or any(k.endswith(".scale_weight") for k in h.with_prefix(part.prefix))
    )


def read_part(part: Part, dtype: torch.dtype, keep_fp8: bool) -> dict[str, torch.Tensor]:
    """The tensors of `part` (names with the file prefix) in the dtypes to build with.

    fp8 tensors stay fp8 when `keep_fp8` (and the file is not scaled fp8), everything else is
    cast to `dtype` one tensor at a time; integer buffers and schedule tables are skipped.
    Tensors kept as stored are mapped from the file, converted ones read into new buffers.
    """
    from safetensors import SafetensorError, safe_open

    path = part.header.path
    if path.suffix.lower() == ".gguf":
        from .gguf import read_gguf_part

        return read_gguf_part(path, part.prefix, dtype)
    scaled = is_scaled_fp8(part)
    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f, path.open("rb") as raw:
            spans = _data_spans(raw)
            read = _Reader(raw, spans)
            for key in part.header.with_prefix(part.prefix):
                if key.endswith(_SCALE_SUFFIXES) or key.endswith(("scaled_fp8", "position_ids")):
                    continue
                stored = _TORCH_DTYPES.get(part.header.tensors[key].dtype)
                if stored is None:  # integer buffers, schedule tables' int64, quantised
                    continue
                scale_key = (
                    key[: -len("weight")] + "scale_weight" if key.endswith("weight") else None
                )
                if scaled and scale_key and part.header.has(scale_key):
                    scale = f.get_tensor(scale_key).float()
                    out[key] = _dequantise(read(key, stored), scale, dtype)
                elif stored == dtype or (stored in FP8 and keep_fp8 and not scaled):
                    out[key] = f.get_tensor(key)  # as stored: the file's memory map
                else:
                    out[key] = read(key, stored).to(dtype)
    except SafetensorError as exc:
        raise ModelLoadError(f"{path}: cannot read its tensors ({exc}); re-download it") from None
    return out


_TORCH_DTYPES = {  # header.py's short names of the floating dtypes
    "fp64": torch.float64,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
_DEQUANT_SLICE = 1 << 22  # elements per float32 slice while dequantising (16 MiB)


def _data_spans(raw: Any) -> dict[str, tuple[int, int, tuple[int, ...]]]:
    """name -> (absolute start, end, shape) from the safetensors header (``header.py``
    checked it, safetensors opened it: the layout is known to be sound here)."""
    import json
    import struct

    raw.seek(0)
    (n,) = struct.unpack("<Q", raw.read(8))
    entries = json.loads(raw.read(n))
    entries.pop("__metadata__", None)
    return {
        k: (8 + n + e["data_offsets"][0], 8 + n + e["data_offsets"][1], tuple(e["shape"]))
        for k, e in entries.items()
    }


class _Reader:
    """Tensors read from the open file into one scratch buffer (no memory map), reused: the
    caller converts each into a tensor of its own before the next read. One buffer, not one
    per tensor, so that the freed reads do not stay in the heap as fragments."""

    def __init__(self, raw: Any, spans: dict[str, tuple[int, int, tuple[int, ...]]]) -> None:
        self.raw, self.spans = raw, spans
        self.buf = torch.empty(0, dtype=torch.uint8)

    def __call__(self, key: str, stored: torch.dtype) -> torch.Tensor:
        start, end, shape = self.spans[key]
        n = end - start
        if n > self.buf.numel():
            self.buf = torch.empty(0, dtype=torch.uint8)  # the old one freed first
            self.buf = torch.empty(n, dtype=torch.uint8)
        view = self.buf[:n]
        self.raw.seek(start)
        if n and self.raw.readinto(memoryview(view.numpy())) != n:
            raise ModelLoadError(f"{self.raw.name}: tensor {key} is cut short; re-download it")
        return view.view(stored).reshape(shape)


def _dequantise(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(weight.float() * scale).to(dtype)``, computed in slices of the flattened tensor so
    that the float32 intermediate is at most one slice (the result is the same per element).
    A scale of more than one element (not ComfyUI's, which is a scalar) is broadcast whole."""
    if scale.numel() != 1:
        return (weight.float() * scale).to(dtype)
    out = torch.empty(weight.shape, dtype=dtype)
    src, dst = weight.reshape(-1), out.view(-1)
    scale = scale.reshape(())
    for i in range(0, src.numel(), _DEQUANT_SLICE):
        dst[i : i + _DEQUANT_SLICE] = src[i : i + _DEQUANT_SLICE].float() * scale
    return out


def fp8_dtype(tensors: Iterable[torch.Tensor]) -> torch.dtype | None:
    for t in tensors:
        if t.dtype in FP8:
            return t.dtype
    return None


def build(
    factory: Callable[[], nn.Module],
    state: dict[str, torch.Tensor],
    dtype: torch.dtype,
    what: str,
) -> nn.Module:
    """A module from `factory` (built on the meta device) with `state` assigned in place.

    Linear/Conv layers whose weights `state` holds in fp8 keep them in fp8, computing in
    `dtype` (:func:`_hook_fp8_layers`); other tensors are cast to the dtype the module expects
    for them. `state` must match the module's names exactly.
    """
    from accelerate import init_empty_weights

    with init_empty_weights():
        module = factory()
    module.to(dtype=dtype)
    storage = fp8_dtype(state.values())
    if storage is not None:
        _hook_fp8_layers(module, state, storage, dtype)
    quantised = {k for k, v in state.items() if hasattr(v, "quant_type")}
    if quantised:  # GGUF: diffusers' GGUFLinear for every Linear with a quantised weight
        from diffusers.quantizers.gguf.utils import _replace_with_gguf_linear

        _replace_with_gguf_linear(module, dtype, state)
    expected = module.state_dict(keep_vars=True)
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ModelLoadError(
            f"{what}: the file's tensors do not fit the model built from its shapes (missing "
            f"{missing[:4]}, unexpected {extra[:4]}); the file is damaged or of an unsupported "
            "variant"
        )
    cast = {
        k: v if v.dtype == expected[k].dtype or k in quantised else v.to(expected[k].dtype)
        for k, v in state.items()
    }
    for k, v in cast.items():
        if k not in quantised and tuple(v.shape) != tuple(expected[k].shape):
            raise ModelLoadError(
                f"{what}: tensor {k} has shape {tuple(v.shape)}, the model expects "
                f"{tuple(expected[k].shape)}; the file is of an unsupported variant"
            )
    plain = {k: v for k, v in cast.items() if k not in quantised}
    module.load_state_dict(plain, strict=not quantised, assign=True)
    for key in quantised:  # raw GGUF blocks: their shape is not the logical one torch checks
        owner, _, leaf = key.rpartition(".")
        module.get_submodule(owner)._parameters[leaf] = cast[key]
    _materialise_meta_buffers(module, dtype)
    return module.eval()


def _hook_fp8_layers(
    module: nn.Module, state: dict[str, torch.Tensor], storage: torch.dtype, dtype: torch.dtype
) -> None:
    """fp8 weight storage (:func:`lycoris_core.quantization.store_fp8`, a diffusers model
    hook) on exactly the Linear/Conv layers the file stores in fp8; their biases compute in
    `dtype` (an fp8 bias is upcast exactly). diffusers' own layerwise casting default also
    skips the adaLN Linears inside ``norm*`` modules, which would upcast a quarter of a Flux
    file; here the file decides."""
    from ..quantization import store_fp8

    for name, sub in module.named_modules():
        if not isinstance(sub, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            continue
        weight = state.get(f"{name}.weight" if name else "weight")
        if weight is not None and weight.dtype in FP8:
            store_fp8(sub, dtype, storage)


def _materialise_meta_buffers(module: nn.Module, dtype: Any) -> None:
    """Non-persistent buffers left on meta (none expected with init_empty_weights' default)."""
    for sub in module.modules():
        for name, buf in list(sub.named_buffers(recurse=False)):
            if buf is not None and buf.is_meta:
                raise ModelLoadError(f"buffer {name} of {type(sub).__name__} was not initialised")
