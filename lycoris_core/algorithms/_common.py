"""Tensor helpers the algorithm modules share: float32 copies, layer ops, channel moves."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterFormatError

Contribution = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(x, y0) -> dy``: the output change a layer adds in dynamic mode (``y0``: base output)."""

LINEAR_AND_CONV: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_OPS = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}


def f32(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """`t` as float32 on `device` (None stays None)."""
    return None if t is None else t.to(device=device, dtype=torch.float32)


def cast(t: torch.Tensor, like: torch.Tensor, factor: float = 1.0) -> torch.Tensor:
    """`t` times `factor` (computed in float32), in `like`'s dtype and on its device."""
    return (t.to(device=like.device, dtype=torch.float32) * factor).to(like.dtype)


def is_conv(module: nn.Module) -> bool:
    return isinstance(module, CONV)


def conv_kwargs(module: nn.Module) -> dict[str, Any]:
    return {
        "stride": module.stride,
        "padding": module.padding,
        "dilation": module.dilation,
        "groups": module.groups,
    }


def plain_conv(module: nn.Module) -> Callable[..., torch.Tensor]:
    """The functional convolution of `module`'s type, without its geometry."""
    return _CONV_OPS[type(module)]


def layer_op(module: nn.Module) -> Callable[..., torch.Tensor]:
    """``op(x, weight, bias)`` of a Linear/Conv module with the module's geometry."""
    if isinstance(module, nn.Linear):
        return F.linear
    conv = plain_conv(module)
    kw = conv_kwargs(module)
    if module.padding_mode != "zeros":
        raise AdapterFormatError(
            f"convolution with padding_mode={module.padding_mode!r} is not supported"
        )
    return lambda x, w, b=None: conv(x, w, b, **kw)


def channel_last(t: torch.Tensor, conv: bool) -> torch.Tensor:
    return t.movedim(1, -1) if conv else t


def channel_back(t: torch.Tensor, conv: bool) -> torch.Tensor:
    return t.movedim(-1, 1) if conv else t


def bias_view(bias: torch.Tensor | None, y: torch.Tensor, conv: bool) -> Any:
    """The bias broadcastable against the output `y` (0 when there is none)."""
    if bias is None:
        return 0
    if conv:
        return bias.view(1, -1, *([1] * (y.dim() - 2)))
    return bias
