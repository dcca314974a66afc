"""A tiny diffusers ``AutoencoderKL`` whose latents are the picture, downsampled.

The tiny pipelines (tests, demo, the nodes' built-in models) need a VAE that costs nothing
to build and still lets a person *see* what a denoiser generates. A random VAE decodes
everything to coloured noise; this one is a real ``AutoencoderKL`` (built from a config, saved
and loaded by diffusers like any other) whose weights are set by construction:

* encoder: each latent pixel is the 2x2 average of the RGB image, written into the latent
  channels through a seeded matrix ``Q`` (``latent_channels x 3``, orthonormal columns), so the
  latents of different seeds differ but every one of them is the picture at half resolution;
* decoder: ``Q^T`` brings the latent back to RGB and a nearest-neighbour upsampling restores
  the size. ``decode(encode(x))`` is ``x`` averaged over 2x2 blocks (up to ~1e-5).

Every ResNet and attention block is made the identity by zeroing its last projection (their
residual connection carries the input). The two layers that are not linear are handled
exactly:

* ``GroupNorm`` before ``conv_out`` (one group over all channels) would normalise each image by
  its own statistics. The channels are laid out as ``+x``, ``-x`` (3 each) and 13 pairs of
  constants ``+K``, ``-K``: the group mean is exactly 0, and the variance is dominated by the
  constants (``26 K^2 / 32``), so the norm is a fixed scale (relative error
  ``sum(mean(x^2)) / (26 K^2)``, about 1e-5 for images in [-1, 1]), which its weight undoes.
* ``SiLU`` after it: ``silu(y) - silu(-y) = y`` for every ``y``, so ``conv_out`` takes the
  difference of the ``+x`` and ``-x`` channels and the activation cancels out exactly.

The encoder's log-variance is the clamp minimum (-30), so sampling the latent distribution
adds noise of std ``exp(-15)``, about 3e-7.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL

__all__ = ["picture_vae"]

_WIDTH = 32  # channels inside the VAE: 3 (+x), 3 (-x), 26 constants
_RGB = 3
_K = 100.0  # the constant channels' magnitude (see the module docstring)
_LOGVAR = -30.0  # DiagonalGaussianDistribution clamps the log-variance at -30


def _orthonormal(latent_channels: int, generator: torch.Generator | None) -> torch.Tensor:
    """A ``latent_channels x 3`` matrix with orthonormal columns, from the generator."""
    q, r = torch.linalg.qr(torch.randn(latent_channels, _RGB, generator=generator))
    return q * torch.sign(torch.diagonal(r))  # unique: positive diagonal of R


def _zero_(*modules: torch.nn.Module) -> None:
    for module in modules:
        for p in module.parameters():
            p.zero_()


def _identity_blocks(part: torch.nn.Module) -> None:
    """Make every ResNet and attention block in ``part`` the identity (residual only)."""
    for module in part.modules():
        kind = type(module).__name__
        if kind == "ResnetBlock2D":
            _zero_(module.conv2)
        elif kind == "Attention":
            _zero_(module.to_out[0])


def _center(conv: torch.nn.Conv2d, weight: torch.Tensor) -> None:
    """Set a 3x3 (or 1x1) conv to ``weight`` (out x in) at its centre tap, zero elsewhere."""
    conv.weight.zero_()
    k = conv.weight.shape[-1] // 2
    conv.weight[:, :, k, k] = weight
    if conv.bias is not None:
        conv.bias.zero_()


def _split_channels(rgb: torch.Tensor) -> torch.Tensor:
    """``_WIDTH x n`` weight putting ``+rgb`` in channels 0-2 and ``-rgb`` in 3-5."""
    w = torch.zeros(_WIDTH, rgb.shape[1])
    w[:_RGB], w[_RGB : 2 * _RGB] = rgb, -rgb
    return w


def _constants(conv: torch.nn.Conv2d) -> None:
    """The constant channels ``+K, -K, +K, ...`` as the conv's bias."""
    signs = torch.tensor([1.0, -1.0]).repeat((_WIDTH - 2 * _RGB) // 2)
    conv.bias[2 * _RGB :] = _K * signs


def _fixed_norm(norm: torch.nn.GroupNorm) -> None:
    """Undo the (nearly constant) scale of the one-group norm on the picture channels."""
    norm.weight.zero_()
    norm.bias.zero_()
    scale = ((_WIDTH - 2 * _RGB) * _K**2 / _WIDTH + norm.eps) ** 0.5
    norm.weight[: 2 * _RGB] = scale


def _difference(conv: torch.nn.Conv2d, mix: torch.Tensor) -> None:
    """``conv_out``: ``mix @ (silu(+x) - silu(-x))`` = ``mix @ x`` at the centre tap."""
    w = torch.zeros(conv.weight.shape[0], _WIDTH)
    w[: mix.shape[0], :_RGB], w[: mix.shape[0], _RGB : 2 * _RGB] = mix, -mix
    _center(conv, w)


@torch.no_grad()
def picture_vae(
    latent_channels: int,
    scaling_factor: float,
    shift_factor: float | None,
    generator: torch.Generator | None = None,
) -> AutoencoderKL:
    """The tiny picture VAE (downsampling by 2); ``shift_factor`` set = SD3/Flux layout.

    ``Q`` is drawn from ``generator`` (torch's default generator when None).
    """
    flow = shift_factor is not None  # SD3 / Flux VAEs: no quant convs
    vae = AutoencoderKL(
        in_channels=_RGB,
        out_channels=_RGB,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(_WIDTH, _WIDTH),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=1,
        sample_size=32,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=not flow,
        use_post_quant_conv=not flow,
    )
    q = _orthonormal(latent_channels, generator)
    enc, dec = vae.encoder, vae.decoder
    for part in (enc, dec):
        _zero_(part)
        for norm in part.modules():  # norms of the zeroed branches: keep them well defined
            if isinstance(norm, torch.nn.GroupNorm):
                norm.weight.fill_(1.0)
        _identity_blocks(part)
        _fixed_norm(part.conv_norm_out)

    _center(enc.conv_in, _split_channels(torch.eye(_RGB)))
    _constants(enc.conv_in)
    for block in enc.down_blocks:
        for down in block.downsamplers or ():
            # padded (0, 1, 0, 1), kernel 3, stride 2: output i reads rows 2i..2i+2
            down.conv.weight.zero_()
            down.conv.bias.zero_()
            for c in range(_WIDTH):
                down.conv.weight[c, c, :2, :2] = 0.25
    _difference(enc.conv_out, q)  # the mean; the log-variance channels follow
    enc.conv_out.bias[latent_channels:] = _LOGVAR

    _center(dec.conv_in, _split_channels(q.T))
    _constants(dec.conv_in)
    for block in dec.up_blocks:
        for up in block.upsamplers or ():
            _center(up.conv, torch.eye(_WIDTH))  # after the nearest-neighbour interpolation
    _difference(dec.conv_out, torch.eye(_RGB))

    eye = torch.eye(2 * latent_channels)
    if vae.quant_conv is not None:
        _center(vae.quant_conv, eye)
    if vae.post_quant_conv is not None:
        _center(vae.post_quant_conv, eye[:latent_channels, :latent_channels])
    return vae
