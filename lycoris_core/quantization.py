"""Base precision: how the frozen base weights are stored while LyCORIS trains or samples on them.

``base_precision`` (a load option, also of :class:`~lycoris_core.training.TrainSpec`):

* ``auto``: as loaded (a single file's own storage, e.g. fp8 kept fp8); ``fp32`` / ``bf16`` /
  ``fp16``: plain dtypes (the compute dtype of the model);
* ``fp8``: every Linear/Conv weight of the denoiser (and of T5) stored as
  ``float8_e4m3fn``, computed in the model's dtype through a diffusers model hook
  (``diffusers.hooks``, the registry of diffusers' layerwise casting; ours casts only the
  weight, see :func:`_fp8_weight_hook`), what ComfyUI users know as ``weight_dtype
  fp8_e4m3fn``;
* ``int8`` / ``nf4``: every Linear replaced by bitsandbytes' ``Linear8bitLt`` (LLM.int8,
  per-row absmax) or ``Linear4bit`` (4-bit NormalFloat in blocks of 64, the block scales
  quantised again: QLoRA's recipe), computing in the model's dtype.

Why bitsandbytes: it runs on the CPU (its native torch paths since 0.45) and on CUDA, is
maintained, is what diffusers' ``BitsAndBytesConfig`` uses, and lycoris recognises its layers
(it forces bypass mode on them). diffusers' own loader path needs a GPU (``No GPU found``), so
the layers are converted here, one at a time, after loading. torchao's NF4 is a tensor
subclass that lycoris does not detect, and optimum-quanto has no NF4.

A quantised layer cannot take an exact merge (dequantise, add, requantise rounds): LyCORIS
trains over it in bypass mode (``y = base(x) + adapter(x)``), and files apply to it dynamically
(:func:`effective_mode`). :func:`base_weight` dequantises a layer's weight for the few
algorithms whose change depends on the weight.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, ModelLoadError
from .precisions import QUANTISED, check_precision

logger = logging.getLogger(__name__)

PLAIN = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FP8_STORAGE = torch.float8_e4m3fn
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_CASTING_HOOK = "layerwise_casting"  # diffusers.hooks.layerwise_casting's registry name
# ours takes the same name: diffusers reads a model's compute dtype (ModelMixin.dtype) from
# the hook registered under it (its `compute_dtype`), so inputs are cast to that, not to fp8
_FP8_HOOK = _CASTING_HOOK
# Text encoders that take the base precision too (the big ones: T5-XXL is 4.7B parameters);
# CLIP stays as loaded (0.1-0.7B, and its pooled output is sensitive to rounding).
QUANTISED_ENCODERS = ("T5EncoderModel",)


def precision_dtype(base_precision: str, dtype: str | torch.dtype) -> str | torch.dtype:
    """The compute dtype: a plain `base_precision` (fp32/bf16/fp16) is the dtype itself."""
    check_precision(base_precision)
    if base_precision not in PLAIN:
        return dtype
    if dtype not in ("auto", base_precision, PLAIN[base_precision]):
        raise ConfigError(
            f"base_precision {base_precision!r} and dtype {dtype!r} disagree; give one of them "
            "(a plain base precision is the dtype)"
        )
    return base_precision


def bitsandbytes() -> Any:
    """The ``bitsandbytes`` module, or a :class:`ModelLoadError` saying how to install it."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ModelLoadError(
            "base_precision int8/nf4 needs the bitsandbytes package: pip install bitsandbytes "
            "(or choose fp8, which needs nothing more)"
        ) from None
    return bnb


def quantiser_of(precision: str) -> str:
    """What stores the weights at `precision`, with its version (for file metadata)."""
    if precision in ("int8", "nf4"):
        return f"bitsandbytes {bitsandbytes().__version__}"
    if precision == "fp8":
        import diffusers

        return f"fp8 weight hook (diffusers {diffusers.__version__} hooks)"
    return "none"


# --------------------------------------------------------------------------- what a layer is


def _casting_hook(module: nn.Module) -> Any:
    registry = getattr(module, "_diffusers_hook", None)
    return None if registry is None else registry.get_hook(_CASTING_HOOK)


class _Fp8Op(torch.autograd.Function):
    """``op(x, weight upcast to dtype, bias)`` that keeps only the fp8 weight for the backward
    and upcasts it again there (the gradient of `x` only: the base is frozen), so a training
    step does not hold an upcast copy of every layer it went through."""

    @staticmethod
    def forward(ctx: Any, x: Any, w8: Any, bias: Any, dtype: Any, op: Any, grad_x: Any) -> Any:
        ctx.save_for_backward(w8)
        ctx.grad_x, ctx.shape, ctx.x_dtype = grad_x, x.shape, x.dtype
        return op(x, w8.to(dtype), bias)

    @staticmethod
    def backward(ctx: Any, grad: Any) -> Any:
        (w8,) = ctx.saved_tensors
        gx = None
        if ctx.needs_input_grad[0]:
            gx = ctx.grad_x(ctx.shape, w8.to(grad.dtype), grad).to(ctx.x_dtype)
        return gx, None, None, None, None, None


def _fp8_op(module: nn.Module) -> tuple[Any, Any] | None:
    """(op(x, w, b), grad of x) for a Linear or a zero-padded Conv1d/2d, else None."""
    import torch.nn.functional as F

    if isinstance(module, nn.Linear):
        return F.linear, lambda shape, w, g: g @ w
    if not isinstance(module, (nn.Conv1d, nn.Conv2d)) or module.padding_mode != "zeros":
        return None
    conv, conv_input = (
        (F.conv1d, torch.nn.grad.conv1d_input)
        if isinstance(module, nn.Conv1d)
        else (F.conv2d, torch.nn.grad.conv2d_input)
    )
    geometry = (module.stride, module.padding, module.dilation, module.groups)

    def op(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return conv(x, w, b, *geometry)

    return op, lambda shape, w, g: conv_input(shape, w, g, *geometry)


def _fp8_weight_hook(dtype: torch.dtype, storage: torch.dtype) -> Any:
    """A diffusers model hook that keeps the layer's weight in fp8 and computes in `dtype`; the
    bias stays in `dtype`. The forward upcasts the weight for its op, and the backward keeps
    only the fp8 weight (:class:`_Fp8Op`).

    diffusers' layerwise casting hook casts the whole module back and forth in place: the bias
    is rounded to fp8 too (a few percent of error), the backward holds the upcast weights of
    every layer, and a convolution's saved weight turns fp8 again before its backward."""
    from diffusers.hooks import ModelHook

    class Fp8WeightHook(ModelHook):
        storage_dtype, compute_dtype = storage, dtype

        def initialize_hook(self, module: nn.Module) -> nn.Module:
            stored = module.weight.detach().to(storage)
            module._parameters["weight"] = nn.Parameter(stored, False)
            self.op = _fp8_op(module)
            return module

        def new_forward(self, module: nn.Module, x: torch.Tensor, *args: Any, **kw: Any) -> Any:
            w8, bias = module._parameters["weight"], module.bias
            if self.op is None:  # e.g. a conv with reflect padding: upcast, keep the copy
                return module._conv_forward(x, w8.to(self.compute_dtype), bias)
            op, grad_x = self.op
            if not (torch.is_grad_enabled() and x.requires_grad):
                return op(x, w8.to(self.compute_dtype), bias)
            return _Fp8Op.apply(x, w8, bias, self.compute_dtype, op, grad_x)

    return Fp8WeightHook()


def store_fp8(module: nn.Module, dtype: torch.dtype, storage: torch.dtype = FP8_STORAGE) -> None:
    """Keep `module`'s weight in the fp8 `storage` dtype, computing in `dtype`, its bias in
    `dtype` (:func:`_fp8_weight_hook`)."""
    from diffusers.hooks import HookRegistry

    registry = HookRegistry.check_if_exists_or_initialize(module)
    registry.register_hook(_fp8_weight_hook(dtype, storage), _FP8_HOOK)


def layer_precision(module: nn.Module) -> str | None:
    """ "nf4", "int8", "fp8" (fp8 storage) or "gguf" for a quantised layer, else None."""
    name = type(module).__name__
    if name in ("Linear4bit", "LinearNF4", "LinearFP4"):
        return "nf4" if getattr(module.weight, "quant_type", "nf4") == "nf4" else "fp4"
    if name == "Linear8bitLt":
        return "int8"
    if name == "GGUFLinear":
        return "gguf"
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dtype in _FP8:
        return "fp8"
    return None


def is_quantised_linear(module: nn.Module) -> bool:
    """A Linear replaced by a quantised class (bitsandbytes, GGUF): what targets ``Linear``."""
    return layer_precision(module) in ("nf4", "fp4", "int8", "gguf")


def quantised_layers(module: nn.Module) -> dict[str, str]:
    """Module path -> precision of every quantised layer under `module`."""
    out = {}
    for name, sub in module.named_modules():
        kind = layer_precision(sub)
        if kind is not None:
            out[name] = kind
    return out


def model_precision(module: nn.Module) -> str:
    """The base precision `module` carries: the quantised kind of most of its quantised
    layers, else its parameters' dtype name ("fp32", "bf16", "fp16")."""
    kinds = quantised_layers(module)
    if kinds:
        values = list(kinds.values())
        return max(set(values), key=values.count)
    dtype = next((p.dtype for p in module.parameters()), torch.float32)
    return next((k for k, v in PLAIN.items() if v == dtype), str(dtype))


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a layer computes in (its weight's dtype unless it stores another)."""
    hook = _casting_hook(module)
    if hook is not None:
        return hook.compute_dtype
    kind = layer_precision(module)
    if kind in ("nf4", "fp4"):
        state = getattr(module.weight, "quant_state", None)
        return getattr(module, "compute_dtype", None) or getattr(state, "dtype", torch.float32)
    if kind in ("int8", "gguf"):
        bias = getattr(module, "bias", None)
        return getattr(module, "compute_dtype", None) or (
            bias.dtype if bias is not None else torch.float32
        )
    return module.weight.dtype


def weight_shape(module: nn.Module) -> torch.Size:
    """The logical shape of a layer's weight (a packed 4-bit weight is stored [n, 1])."""
    kind = layer_precision(module)
    if kind in ("nf4", "fp4", "gguf"):
        return torch.Size((module.out_features, module.in_features))
    return module.weight.shape


def weight_like(module: nn.Module) -> torch.Tensor:
    """A stand-in with the weight's logical shape, compute dtype and device, for code that
    reads only those: the weight itself for a plain layer, else a 1-element expanded tensor."""
    if layer_precision(module) is None:
        return module.weight
    w = module.weight
    return torch.zeros((), dtype=compute_dtype(module), device=w.device).expand(
        weight_shape(module)
    )


def base_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight values in its compute dtype: the weight itself for a plain layer,
    a dequantised copy for a quantised one."""
    kind = layer_precision(module)
    w = module.weight
    if kind is None:
        return w
    dtype = compute_dtype(module)
    if kind == "fp8":
        return w.detach().to(dtype)
    if kind in ("nf4", "fp4"):
        bnb = bitsandbytes()
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).to(dtype)
    if kind == "int8":
        bnb = bitsandbytes()
        # the row scales move from the weight to the layer's state at its first forward
        scales = w.SCB if getattr(w, "SCB", None) is not None else module.state.SCB
        return bnb.functional.int8_vectorwise_dequant(w.data, scales).to(dtype)
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    return dequantize_gguf_tensor(w).to(dtype)


def base_bias(module: nn.Module) -> torch.Tensor | None:
    """The layer's bias in its compute dtype (a layer stored fp8 by diffusers' own layerwise
    casting keeps its bias in fp8 too; ours keeps it in the compute dtype)."""
    bias = getattr(module, "bias", None)
    if bias is None or bias.dtype not in _FP8:
        return bias
    return bias.detach().to(compute_dtype(module))


# --------------------------------------------------------------------------- converting


def quantise_module(
    module: nn.Module, precision: str, dtype: torch.dtype, skip: tuple[str, ...] = ()
) -> int:
    """Store `module`'s Linear (and, for fp8, Conv) weights at `precision`, computing in
    `dtype`, in place; returns how many layers were converted. Layers already quantised, the
    model's ``_keep_in_fp32_modules`` and names matching a `skip` pattern (regular
    expressions) are left as they are; plain precisions convert nothing. Biases stay in
    `dtype`."""
    if precision not in QUANTISED:
        return 0
    # what the model keeps in full precision (transformers' T5 keeps `wo`, and casts its input
    # to that layer's weight dtype, so a stored fp8/uint8 weight there would cast activations)
    keep = getattr(module, "_keep_in_fp32_modules", None) or ()
    skip = (*skip, *(rf"(^|\.){re.escape(k)}$" for k in keep))
    skipped = [re.compile(p) for p in skip]
    done = 0
    with torch.no_grad(), torch.inference_mode(False):
        for parent_name, parent in list(module.named_modules()):
            for name, child in list(parent.named_children()):
                path = f"{parent_name}.{name}" if parent_name else name
                if layer_precision(child) is not None or any(p.search(path) for p in skipped):
                    continue
                if precision == "fp8" and type(child) in (nn.Linear, nn.Conv1d, nn.Conv2d):
                    store_fp8(child, dtype)
                elif precision != "fp8" and type(child) is nn.Linear:
                    setattr(parent, name, _bnb_linear(child, precision, dtype))
                else:
                    continue
                done += 1
    return done


def _bnb_linear(linear: nn.Linear, precision: str, dtype: torch.dtype) -> nn.Module:
    """A bitsandbytes layer holding `linear`'s weight quantised (on its device)."""
    bnb = bitsandbytes()
    device = linear.weight.device
    bias = linear.bias is not None
    if precision == "nf4":
        q = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=bias,
            compute_dtype=dtype,
            compress_statistics=True,
            quant_type="nf4",
            device="meta",
        )
        q.weight = bnb.nn.Params4bit(
            linear.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4"
        )
    else:
        q = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
            device="meta",
        )  # fmt: skip
        # Int8Params quantises when it moves off the CPU (or onto it from there)
        q.weight = bnb.nn.Int8Params(
            linear.weight.data.cpu(), requires_grad=False, has_fp16_weights=False
        )
    if bias:
        q.bias = nn.Parameter(linear.bias.data.to(dtype), requires_grad=False)
    q = q.to(device)
    q.train(linear.training)
    return q


def quantise_pipeline(pipe: Any, denoiser: str, precision: str, dtype: torch.dtype) -> dict:
    """Store the denoiser and the T5 text encoders of `pipe` at `precision`; returns
    component -> layers converted (empty for plain precisions)."""
    if precision not in QUANTISED:
        return {}
    if precision in ("int8", "nf4"):
        bitsandbytes()  # the install hint before anything changes
    out = {}
    for name, component in getattr(pipe, "components", {}).items():
        if not isinstance(component, nn.Module):
            continue
        if name == denoiser or type(component).__name__ in QUANTISED_ENCODERS:
            out[name] = quantise_module(component, precision, dtype)
    logger.info("base precision %s: %s", precision, out)
    return out


def effective_mode(module: nn.Module, mode: str, paths: Any = None) -> str:
    """`mode`, or "dynamic" (with a one-line note) when a merge would touch quantised layers
    of `module` (`paths`: the layers it would change; default: any)."""
    if mode != "merge":
        return mode
    kinds = quantised_layers(module)
    touched = kinds if paths is None else {p: kinds[p] for p in paths if p in kinds}
    if not touched:
        return mode
    precision = sorted(set(touched.values()))
    logger.warning(
        "merge on a %s base cannot be exact (dequantise + add + requantise rounds): applying "
        "the adapters dynamically to %d quantised layers",
        "/".join(precision),
        len(touched),
    )
    return "dynamic"
