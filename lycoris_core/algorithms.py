"""Exact per-layer math of every LyCORIS algorithm, at any strength.

The reference for "layer L at strength s" is lycoris' own module forward with
``multiplier = s`` (the rebuild forward lycoris uses by default). For each algorithm this
module gives:

* :func:`delta` -- the weight (and bias) change that reproduces that forward when merged,
  computed in float32 with the alpha/rank scale applied once (lycoris' ``merge_to`` applies
  it twice for LoHa and low-rank LoKr);
* :func:`dynamic_contribution` -- a function ``(x, y0) -> dy`` that adds the same change to a
  layer's output without touching its weight (``y0`` is the base layer's output).

Strength semantics (documented in the README): linear in ``s`` for LoRA/LoCon, LoHa, LoKr,
DyLoRA, GLoRA, full, IA3, T-LoRA and norms; for DoRA variants ``s`` interpolates the
magnitude rescale while the direction is fully applied; diag-OFT interpolates each rotation
block towards the identity (``I + s(R - I)``) and BOFT each butterfly stage, with the OFT
``rescale`` always applied. Strength 0 is never computed: callers skip the adapter.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import AdapterFormatError

Contribution = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_LOW_RANK = ("locon", "dylora", "loha", "lokr", "glora", "tlora")


# --------------------------------------------------------------------------- helpers


def _f32(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device=device, dtype=torch.float32)


def conv_kwargs(module: nn.Module) -> dict[str, Any]:
    return {
        "stride": module.stride,
        "padding": module.padding,
        "dilation": module.dilation,
        "groups": module.groups,
    }


def layer_op(module: nn.Module) -> Callable[..., torch.Tensor]:
    """``op(x, weight, bias)`` of a Linear/Conv module with the module's geometry."""
    if isinstance(module, nn.Linear):
        return F.linear
    conv = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}[type(module)]
    kw = conv_kwargs(module)
    if module.padding_mode != "zeros":
        raise AdapterFormatError(
            f"convolution with padding_mode={module.padding_mode!r} is not supported"
        )
    return lambda x, w, b=None: conv(x, w, b, **kw)


def scale_of(layer: Any) -> float:
    """The alpha/rank factor the lycoris forward applies once."""
    r = layer.rank()
    if r is None:  # LoKr with two full matrices: lycoris forces scale 1
        return 1.0
    alpha = layer.alpha
    if layer.algo == "dylora":
        block = int(layer.options.get("block_size", 0) or 0)
        if block <= 0:  # no metadata: the file reloads as LoCon everywhere else
            return (alpha or r) / r
        if r % block:
            raise AdapterFormatError(
                f"layer '{layer.name}': DyLoRA rank {r} is not a multiple of block_size {block}"
            )
        # lycoris' DyLoRA forward at full rank: all blocks, alpha / number of blocks
        return (alpha or r) / (r // block)
    if alpha is None or alpha == 0:
        alpha = float(r)
    if layer.algo == "glora" and layer.options.get("rs_lora"):
        return alpha / math.sqrt(r)
    return alpha / r


def _channel_last(t: torch.Tensor, is_conv: bool) -> torch.Tensor:
    return t.movedim(1, -1) if is_conv else t


def _channel_back(t: torch.Tensor, is_conv: bool) -> torch.Tensor:
    return t.movedim(-1, 1) if is_conv else t


def _bias_view(bias: torch.Tensor | None, y: torch.Tensor, is_conv: bool) -> Any:
    if bias is None:
        return 0
    if is_conv:
        return bias.view(1, -1, *([1] * (y.dim() - 2)))
    return bias


# --------------------------------------------------------------------------- shapes


def shape_mismatch(layer: Any, weight: torch.Tensor) -> str | None:
    """None if the layer fits a weight of this shape, else a description of its shape."""
    t = layer.tensors
    out, flat_in = weight.shape[0], int(math.prod(weight.shape[1:]))
    algo = layer.algo
    if algo in ("locon", "dylora"):
        down, mid = t["lora_down.weight"], t.get("lora_mid.weight")
        k = (mid if mid is not None else down).shape[2:]
        got = (t["lora_up.weight"].shape[0], down.shape[1] * int(math.prod(k)))
    elif algo == "loha":
        if "hada_t1" in t:
            k = t["hada_t1"].shape[2:]
            got = (t["hada_w1_a"].shape[1], t["hada_w1_b"].shape[1] * int(math.prod(k)))
        else:
            got = (t["hada_w1_a"].shape[0], t["hada_w1_b"].shape[1])
    elif algo == "lokr":
        w1 = t.get("lokr_w1")
        a, b = w1.shape if w1 is not None else (t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1])
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
            c, d = w2.shape[0], int(math.prod(w2.shape[1:]))
        elif "lokr_t2" in t:
            c = t["lokr_w2_a"].shape[1]
            d = t["lokr_w2_b"].shape[1] * int(math.prod(t["lokr_t2"].shape[2:]))
        else:
            c, d = t["lokr_w2_a"].shape[0], t["lokr_w2_b"].shape[1]
        got = (a * c, b * d)
    elif algo == "full":
        got = (t["diff"].shape[0], int(math.prod(t["diff"].shape[1:])))
    elif algo in ("diag-oft", "boft"):
        blocks = t["oft_blocks"]
        got = (blocks.shape[-3] * blocks.shape[-1], flat_in)
    elif algo == "ia3":
        n = t["weight"].numel()
        on_input = bool(int(t["on_input"].item()))
        if on_input:
            return None if n == weight.shape[1] else f"{n} input channels"
        got = (n, flat_in)
    elif algo == "glora":
        got = (t["b1.weight"].shape[0], t["a2.weight"].shape[1] * int(math.prod(weight.shape[2:])))
    elif algo == "tlora":
        if weight.dim() > 2 and math.prod(weight.shape[2:]) != 1:
            return "T-LoRA on a convolution with a kernel larger than 1 (not supported)"
        got = (t["p_layer.weight"].shape[0], t["q_layer.weight"].shape[1])
    elif algo == "norm":
        got = (t["w_norm"].shape[0], flat_in)
    else:  # pragma: no cover - parsing only produces the algorithms above
        return f"unknown algorithm {algo}"
    return None if tuple(got) == (out, flat_in) else str(tuple(got))


# --------------------------------------------------------------------------- rebuilds


def _rebuild(layer: Any, weight: torch.Tensor) -> torch.Tensor:
    """Delta weight at strength 1 (float32, weight's shape) of a low-rank-family layer."""
    from lycoris.functional import locon, loha, lokr, tucker_weight_from_conv

    dev = weight.device
    t = {k: _f32(v, dev) for k, v in layer.tensors.items()}
    scale = scale_of(layer)
    algo = layer.algo
    if algo in ("locon", "dylora"):
        dw = locon.diff_weight(
            t["lora_down.weight"], t["lora_up.weight"], t.get("lora_mid.weight"), gamma=scale
        )
    elif algo == "loha":
        dw = loha.diff_weight(
            t["hada_w1_b"],
            t["hada_w1_a"],
            t["hada_w2_b"],
            t["hada_w2_a"],
            t.get("hada_t1"),
            t.get("hada_t2"),
            gamma=scale,
        )
    elif algo == "lokr":
        dw = lokr.kron_weight(
            t.get("lokr_w1"),
            t.get("lokr_w1_a"),
            t.get("lokr_w1_b"),
            t.get("lokr_w2"),
            t.get("lokr_w2_a"),
            t.get("lokr_w2_b"),
            t.get("lokr_t2"),
            scale=scale,
        )
    elif algo == "glora":
        w = weight.float()
        b1, b2, bm = t["b1.weight"], t["b2.weight"], t.get("bm.weight")
        if bm is not None:
            wb = tucker_weight_from_conv(b1, b2, bm)
        else:
            wb = (b1.view(b1.size(0), -1) @ b2.view(b2.size(0), -1)).view(w.shape)
        a1 = t["a1.weight"].view(t["a1.weight"].size(0), -1)
        a2 = t["a2.weight"].view(t["a2.weight"].size(0), -1)
        if w.dim() > 2:
            wa = torch.einsum("o i ..., i j -> o j ...", w, a1)
            wa = torch.einsum("o i ..., i j -> o j ...", wa, a2)
        else:
            wa = (w @ a1) @ a2
        dw = (wb + wa) * scale
    elif algo == "tlora":
        q0, p0, lam0 = tlora_base(layer, weight)
        q = t["q_layer.weight"].reshape(t["q_layer.weight"].shape[0], -1)
        p = t["p_layer.weight"].reshape(t["p_layer.weight"].shape[0], -1)
        lam = t["lambda_layer"].reshape(1, -1)
        dw = (p @ (lam.T * q) - p0 @ (lam0.T * q0)) * scale
    else:  # pragma: no cover
        raise AdapterFormatError(f"layer '{layer.name}': no rebuild for {algo}")
    return dw.reshape(weight.shape)


def tlora_base(layer: Any, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """T-LoRA's frozen base factors: lycoris rebuilds them from the SVD of the base weight."""
    if not layer.options.get("use_data_init", True):
        raise AdapterFormatError(
            f"layer '{layer.name}': T-LoRA trained with use_data_init=false subtracts a random "
            "matrix that the file does not store; it cannot be applied exactly"
        )
    r = layer.tensors["q_layer.weight"].shape[0]
    w = weight.float().reshape(weight.shape[0], -1)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    sig = layer.options.get("sig_type", "principal")
    if sig == "principal":
        sl = slice(0, r)
    elif sig == "last":
        sl = slice(-r, None)
    else:
        start = (s.shape[0] - r) // 2
        sl = slice(start, start + r)
    q0, p0, lam0 = vh[sl], u[:, sl], s[sl]
    if q0.shape[0] < r:
        pad = r - q0.shape[0]
        q0 = F.pad(q0, (0, 0, 0, pad))
        p0 = F.pad(p0, (0, pad))
        lam0 = F.pad(lam0, (0, pad), value=1e-6)
    return q0, p0, lam0.reshape(1, -1)


def _oft_matrix(layer: Any, strength: float, device: torch.device) -> torch.Tensor:
    """Per-block diag-OFT operator ``I + s(R - I)`` (float32, [blocks, b, b])."""
    from lycoris.functional.diag_oft import get_r

    blocks = _f32(layer.tensors["oft_blocks"], device)
    n = blocks.shape[1]
    eye = torch.eye(n, device=device)
    r = get_r(blocks, eye, _oft_constraint(layer))
    return r * strength + (1 - strength) * eye


def _oft_constraint(layer: Any) -> float:
    blocks = layer.tensors["oft_blocks"]
    out_dim = blocks.shape[-3] * blocks.shape[-1]
    return float(layer.alpha or 0.0) * out_dim


def _dora_wd_on_out(layer: Any, weight: torch.Tensor) -> bool:
    ds = layer.tensors["dora_scale"]
    return not (ds.dim() >= 2 and ds.shape[0] == 1 and weight.shape[0] != 1)


# --------------------------------------------------------------------------- merge deltas


@torch.no_grad()
def delta(
    layer: Any, weight: torch.Tensor, bias: torch.Tensor | None, strength: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dW, db) in float32: (W + dW, b + db) reproduces the lycoris forward at `strength`."""
    from lycoris.functional import weight_decompose

    s = float(strength)
    dev = weight.device
    t = layer.tensors
    algo = layer.algo
    if algo in _LOW_RANK:
        dw = _rebuild(layer, weight)  # a fresh tensor: scaling it in place is safe
        if not layer.has_dora:
            return (dw if s == 1.0 else dw.mul_(s)), None
        w = weight.float()
        merged = weight_decompose(w + dw, _f32(t["dora_scale"], dev), s, _dora_wd_on_out(layer, w))
        return merged - w, None
    if algo in ("full", "norm"):
        dw = _f32(t["diff" if algo == "full" else "w_norm"], dev) * s
        db_t = t.get("diff_b" if algo == "full" else "b_norm")
        db = None if bias is None or db_t is None else _f32(db_t, dev) * s
        return dw.reshape(weight.shape), db
    if algo == "ia3":
        w = weight.float()
        vec = _f32(t["weight"], dev).reshape(-1) * s
        if bool(int(t["on_input"].item())):
            return w * vec.view(1, -1, *([1] * (w.dim() - 2))), None
        return w * vec.view(-1, *([1] * (w.dim() - 1))), None
    if algo == "diag-oft":
        w = weight.float()
        m = _oft_matrix(layer, s, dev)
        k, n = m.shape[0], m.shape[1]
        rotated = torch.einsum("k n m, k n ... -> k m ...", m, w.view(k, n, *w.shape[1:]))
        rotated = rotated.reshape(w.shape)
        if "rescale" in t:
            rotated = _f32(t["rescale"], dev) * rotated
        return rotated - w, None
    if algo == "boft":
        from lycoris.functional import boft

        rescale = _f32(t.get("rescale"), dev)
        dw = boft.diff_weight(
            weight.float(),
            _f32(t["oft_blocks"], dev),
            rescale,
            constraint=_oft_constraint(layer),
            scale=s,
        )
        return dw, None
    raise AdapterFormatError(
        f"layer '{layer.name}': unsupported algorithm {algo}"
    )  # pragma: no cover


# --------------------------------------------------------------------------- merging


def _plain_2d(layer: Any, weight: torch.Tensor) -> bool:
    """Linear-in-strength layer whose delta is a plain 2D product (no DoRA, no tucker)."""
    t = layer.tensors
    return not layer.has_dora and not any(k in t for k in ("lora_mid.weight", "hada_t1", "lokr_t2"))


@torch.no_grad()
def accumulate(
    acc: torch.Tensor | None,
    layer: Any,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    strength: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Add `layer` at `strength` to a merged weight; returns (merged, bias delta or None).

    `acc` is the float32 merged weight so far, or None while it is still the (float32) base
    `weight`, which is never modified: a new buffer is made on first use. Deltas that depend
    on the weight (DoRA, OFT, GLoRA, IA3, T-LoRA) are computed from the base `weight`, so
    stacked adapters each contribute relative to the base. LoRA, LoHa, LoKr and full are
    added without materialising a separate delta where possible.
    """
    s = float(strength)
    t = layer.tensors
    algo = layer.algo
    dev = weight.device
    shape = weight.shape
    out_dim = shape[0]

    if algo in ("locon", "dylora") and _plain_2d(layer, weight):
        up = _f32(t["lora_up.weight"], dev).reshape(out_dim, -1)
        down = _f32(t["lora_down.weight"], dev).reshape(up.shape[1], -1)
        alpha = scale_of(layer) * s
        if acc is None:
            return torch.addmm(weight.reshape(out_dim, -1), up, down, alpha=alpha).view(shape), None
        acc.view(out_dim, -1).addmm_(up, down, alpha=alpha)
        return acc, None
    if algo == "loha" and _plain_2d(layer, weight):
        w1 = _f32(t["hada_w1_a"], dev) @ _f32(t["hada_w1_b"], dev)
        w2 = _f32(t["hada_w2_a"], dev) @ _f32(t["hada_w2_b"], dev)
        value = scale_of(layer) * s
        if acc is None:
            merged = torch.addcmul(weight.reshape(out_dim, -1), w1, w2, value=value)
            return merged.view(shape), None
        acc.view(out_dim, -1).addcmul_(w1, w2, value=value)
        return acc, None
    if algo == "lokr" and _plain_2d(layer, weight) and t.get("lokr_w2", weight).dim() == 2:
        w1 = t.get("lokr_w1")
        w1 = (
            _f32(w1, dev)
            if w1 is not None
            else _f32(t["lokr_w1_a"], dev) @ _f32(t["lokr_w1_b"], dev)
        )
        w2 = t.get("lokr_w2")
        w2 = (
            _f32(w2, dev)
            if w2 is not None
            else _f32(t["lokr_w2_a"], dev) @ _f32(t["lokr_w2_b"], dev)
        )
        (a, b), (c, d) = w1.shape, w2.shape
        if a * c == out_dim and b * d * out_dim == weight.numel():
            # kron(w1, w2) as a broadcast product over the (a, c, b, d) view: one pass
            w1v, w2v = w1.view(a, 1, b, 1), w2.view(1, c, 1, d)
            value = scale_of(layer) * s
            if acc is None:
                merged = torch.addcmul(weight.reshape(a, c, b, d), w1v, w2v, value=value)
                return merged.view(shape), None
            acc.view(a, c, b, d).addcmul_(w1v, w2v, value=value)
            return acc, None
    if algo == "full":
        diff = _f32(t["diff"], dev).reshape(shape)
        db = None if bias is None or "diff_b" not in t else _f32(t["diff_b"], dev) * s
        if acc is None:
            return torch.add(weight, diff, alpha=s), db
        return acc.add_(diff, alpha=s), db
    dw, db = delta(layer, weight, bias, s)
    if acc is None:
        return weight + dw, db
    return acc.add_(dw), db


# --------------------------------------------------------------------------- dynamic mode


def _fallback(layer: Any, module: nn.Module, strength: float) -> Contribution:
    """Precompute the delta weight once; the forward adds op(x, dW) (memory: one weight)."""
    w, b = module.weight, getattr(module, "bias", None)
    dw, db = delta(layer, w, b, strength)
    dw = dw.to(w.dtype)
    db = None if db is None else db.to(w.dtype)
    if layer.algo == "norm":
        if isinstance(module, nn.LayerNorm):
            shape, eps = module.normalized_shape, module.eps
            return lambda x, y0: F.layer_norm(x, shape, dw, db, eps)
        groups, eps = module.num_groups, module.eps
        return lambda x, y0: F.group_norm(x, groups, dw, db, eps)
    op = layer_op(module)
    return lambda x, y0: op(x, dw, db)


@torch.no_grad()
def dynamic_contribution(layer: Any, module: nn.Module, strength: float) -> Contribution:
    """A function ``(x, y0) -> dy`` adding `layer` at `strength` to `module`'s output.

    LoRA/LoCon/DyLoRA, LoKr (Linear), T-LoRA (Linear), full, IA3 (output side), diag-OFT
    and BOFT run as cheap bypass computations; the others (LoHa, GLoRA, DoRA variants,
    conv LoKr, grouped convs) precompute their delta weight once.
    """
    s = float(strength)
    w = module.weight
    dtype, dev = w.dtype, w.device
    t = layer.tensors
    algo = layer.algo
    is_conv = isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    grouped = is_conv and module.groups != 1
    bias = getattr(module, "bias", None)

    def cast(x: torch.Tensor, factor: float = 1.0) -> torch.Tensor:
        return (x.to(device=dev, dtype=torch.float32) * factor).to(dtype)

    if layer.has_dora or grouped:
        return _fallback(layer, module, s)
    if algo in ("locon", "dylora"):
        down = cast(t["lora_down.weight"])
        up = cast(t["lora_up.weight"], scale_of(layer) * s)
        up = up.reshape(up.shape[0], up.shape[1], *([1] * (w.dim() - 2)))  # DyLoRA saves 2D
        mid = t.get("lora_mid.weight")
        if not is_conv:
            return lambda x, y0: F.linear(F.linear(x, down), up)
        conv = layer_op(module)
        plain = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}[type(module)]
        if mid is None:
            return lambda x, y0: plain(conv(x, down), up)
        mid = cast(mid)
        return lambda x, y0: plain(conv(plain(x, down), mid), up)
    if algo == "lokr" and not is_conv:
        scale = scale_of(layer) * s
        if "lokr_w1" in t:
            w1 = cast(t["lokr_w1"], scale)
        else:
            w1 = cast(t["lokr_w1_a"].float() @ t["lokr_w1_b"].float(), scale)
        if "lokr_w2" in t:
            w2 = cast(t["lokr_w2"])
            n_in = w1.shape[1]

            def kron_full(x: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
                h = x.reshape(*x.shape[:-1], n_in, -1) @ w2.T
                return (w1 @ h).reshape(*x.shape[:-1], -1)

            return kron_full
        w2a, w2b = cast(t["lokr_w2_a"]), cast(t["lokr_w2_b"])
        n_in = w1.shape[1]

        def kron_low(x: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
            h = (x.reshape(*x.shape[:-1], n_in, -1) @ w2b.T) @ w2a.T
            return (w1 @ h).reshape(*x.shape[:-1], -1)

        return kron_low
    if algo == "tlora" and not is_conv:
        q0, p0, lam0 = tlora_base(layer, w)
        k = scale_of(layer) * s
        q, p = cast(t["q_layer.weight"]), cast(t["p_layer.weight"], k)
        lam = cast(t["lambda_layer"].reshape(-1))
        q0, p0, lam0 = cast(q0), cast(p0, k), cast(lam0.reshape(-1))
        return lambda x, y0: (
            F.linear(F.linear(x, q) * lam, p) - F.linear(F.linear(x, q0) * lam0, p0)
        )
    if algo == "full":
        dw = cast(t["diff"], s).reshape(w.shape)
        db = None if bias is None or "diff_b" not in t else cast(t["diff_b"], s)
        op = layer_op(module)
        return lambda x, y0: op(x, dw, db)
    if algo == "ia3" and not bool(int(t["on_input"].item())):
        vec = cast(t["weight"].reshape(-1), s)
        view = (-1, *([1] * (w.dim() - 2))) if is_conv else (-1,)

        def ia3(x: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
            return (y0 - _bias_view(bias, y0, is_conv)) * vec.view(view)

        return ia3
    if algo == "diag-oft":
        m = _oft_matrix(layer, s, dev).to(dtype)
        k, n = m.shape[0], m.shape[1]
        rescale = None if "rescale" not in t else cast(t["rescale"].reshape(-1))

        def oft(x: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
            z = _channel_last(y0 - _bias_view(bias, y0, is_conv), is_conv)
            zr = torch.einsum("k n m, ... k n -> ... k m", m, z.reshape(*z.shape[:-1], k, n))
            zr = zr.reshape(z.shape)
            if rescale is not None:
                zr = zr * rescale
            return _channel_back(zr - z, is_conv)

        return oft
    if algo == "boft":
        from lycoris.functional import boft

        blocks = _f32(t["oft_blocks"], dev)
        rescale = _f32(t.get("rescale"), dev)
        constraint = _oft_constraint(layer)

        def butterfly(x: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
            z = (y0 - _bias_view(bias, y0, is_conv)).float()
            d = boft.bypass_forward_diff(
                z, blocks, rescale, constraint=constraint, need_transpose=is_conv, scale=s
            )
            return d.to(y0.dtype)

        return butterfly
    return _fallback(layer, module, s)
