"""The tiny pipelines' picture VAE: latents are the image at half size, decoding shows it."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from lycoris_core.picture_vae import picture_vae
from lycoris_core.training.synthetic import demo_image


def _image(seed: int, size: int = 32) -> torch.Tensor:
    """A demo disc image as a [1, 3, H, W] batch in -1..1 (what the VAE encodes)."""
    img = demo_image(size, random.Random(seed))
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return data.view(size, size, 3).permute(2, 0, 1)[None].float() / 127.5 - 1


def _block_average(x: torch.Tensor) -> torch.Tensor:
    """The 2x2 block average of x, computed independently of the VAE, at full size."""
    return F.avg_pool2d(x, 2).repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)


@pytest.mark.parametrize(("channels", "shift"), [(4, None), (16, 0.0)])
def test_round_trip_is_the_block_average(channels: int, shift: float | None) -> None:
    vae = picture_vae(channels, 2.5, shift, torch.Generator().manual_seed(3)).eval()
    x = torch.cat([_image(0), _image(1)])
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        decoded = vae.decode(dist.sample(torch.Generator().manual_seed(0))).sample
    assert dist.mean.shape == (2, channels, 16, 16)
    assert dist.std.max() < 1e-6  # sampling the latent adds (almost) nothing
    torch.testing.assert_close(decoded, _block_average(x), rtol=0, atol=1e-4)
    assert (decoded - x).abs().max() > 0.1  # it is the half-size picture, not the input


def test_latents_are_the_picture_through_an_orthonormal_mix() -> None:
    x = _image(2)
    vae = picture_vae(16, 2.5, 0.0, torch.Generator().manual_seed(0)).eval()
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean[0]  # [16, 16, 16]
    rgb = F.avg_pool2d(x, 2)[0]  # [3, 16, 16]
    q = torch.linalg.lstsq(rgb.flatten(1).T, mean.flatten(1).T).solution.T  # [16, 3]
    torch.testing.assert_close(q.T @ q, torch.eye(3), rtol=0, atol=1e-4)
    torch.testing.assert_close(q @ rgb.flatten(1), mean.flatten(1), rtol=0, atol=1e-4)


def test_decoding_any_latent_is_the_projection_upsampled() -> None:
    """Latents a denoiser makes (noise of any scale) decode linearly, without clipping."""
    vae = picture_vae(16, 2.5, 0.0, torch.Generator().manual_seed(5)).eval()
    z = 3 * torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        basis = torch.eye(16).view(16, 16, 1, 1).expand(16, 16, 8, 8)
        columns = vae.decode(basis).sample[:, :, 0, 0]  # RGB of each unit latent: [16, 3]
        decoded = vae.decode(z).sample
    expected = torch.einsum("lc,blhw->bchw", columns, z)
    expected = expected.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)
    assert expected.abs().max() > 3  # far outside the image range: still linear
    # the norm's scale moves by sum(x^2) / (26 K^2) relative: 1e-4 at this size
    torch.testing.assert_close(decoded, expected, rtol=1e-3, atol=1e-4)


def test_seeds_differ_and_it_saves_as_a_diffusers_model(tmp_path) -> None:
    a = picture_vae(4, 2.5, None, torch.Generator().manual_seed(0))
    b = picture_vae(4, 2.5, None, torch.Generator().manual_seed(1))
    assert not torch.equal(a.encoder.conv_out.weight, b.encoder.conv_out.weight)
    a.save_pretrained(tmp_path / "vae")
    loaded = AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    x = _image(4)
    with torch.no_grad():
        out = loaded.decode(loaded.encode(x).latent_dist.mode()).sample
    torch.testing.assert_close(out, _block_average(x), rtol=0, atol=1e-4)
