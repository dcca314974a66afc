"""Step previews: the latent-to-RGB map fitted to a VAE, and previews while sampling."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lycoris_core.models import load_model
from lycoris_core.previews import fit_rgb_factors, latents_to_image, step_preview
from lycoris_core.tiny import make_tiny


class LinearVAE(torch.nn.Module):
    """A VAE whose latents are a known affine map of the RGB of each 8x8 cell."""

    def __init__(self, channels: int, scaling: float, shift: float | None):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.mix = torch.nn.Parameter(torch.randn(channels, 3, generator=g))
        self.offset = torch.nn.Parameter(torch.randn(channels, generator=g))
        self.config = SimpleNamespace(scaling_factor=scaling, shift_factor=shift)

    def encode(self, pixels: torch.Tensor):
        rgb = F.avg_pool2d((pixels + 1) / 2, 8)  # 0..1 per latent cell
        mean = torch.einsum("cr,nrhw->nchw", self.mix, rgb) + self.offset[:, None, None]
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean))


@pytest.mark.parametrize(
    ("channels", "scaling", "shift"), [(4, 0.18215, None), (16, 0.3611, 0.1159)]
)
def test_fit_inverts_a_linear_vae(channels, scaling, shift):
    vae = LinearVAE(channels, scaling, shift)
    factors = fit_rgb_factors(vae)
    assert factors.shape == (channels + 1, 3)
    # a new image, as the denoiser sees its latents (shifted, scaled) -> its cell colours
    g = torch.Generator().manual_seed(7)
    pixels = F.interpolate(torch.rand(1, 3, 2, 2, generator=g) * 2 - 1, size=(32, 32))
    with torch.no_grad():
        latents = (vae.encode(pixels).latent_dist.mean - (shift or 0.0)) * scaling
    image = torch.tensor(list(latents_to_image(latents, factors).getdata())).float() / 255
    expected = F.avg_pool2d((pixels + 1) / 2, 8)[0].permute(1, 2, 0).reshape(-1, 3)
    assert (image - expected).abs().max() < 2 / 255


def test_channel_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="16-channel preview map"):
        latents_to_image(torch.zeros(1, 4, 8, 8), torch.zeros(17, 3))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("previews")
    return {f: load_model(make_tiny(f, root / f), device="cpu") for f in ("sd15", "sdxl", "flux")}


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_previews_while_sampling(models, family):
    from lycoris_core.sampling import sample

    model = models[family]
    previews, totals = [], []
    sample(
        model,
        prompt="a cat",
        steps=3,
        seed=1,
        width=64,
        height=48,
        on_step=lambda info: (
            previews.append(step_preview(model, info.latents)),
            totals.append(info.total),
        ),
    )
    assert len(previews) == totals[-1] >= 3  # PNDM (SD 1.5) runs one step more
    # one pixel per latent cell (Flux's packed latents come unpacked)
    f = model.vae_scale_factor
    assert all(p.size == (64 // f, 48 // f) and p.mode == "RGB" for p in previews)
    first, last = (torch.tensor(list(p.getdata())).float() for p in (previews[0], previews[-1]))
    assert (first - last).abs().max() > 0  # the preview follows the steps


def test_flow_denoised_reads_back_the_models_clean_estimate():
    from diffusers import FlowMatchEulerDiscreteScheduler, PNDMScheduler

    from lycoris_core.sampling import flow_denoised

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 4, 4, generator=g)
    for i, t in enumerate(sched.timesteps):
        v = torch.randn(x.shape, generator=g)  # a velocity, as the transformer predicts
        after = sched.step(v, t, x).prev_sample
        expected = x - sched.sigmas[i] * v  # the clean estimate of step i
        assert (flow_denoised(sched, i, x, after) - expected).abs().max() < 1e-5
        x = after
    pndm = PNDMScheduler()
    pndm.set_timesteps(5)
    assert flow_denoised(pndm, 0, x, x + 1) is None


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_euler_denoised_is_the_schedulers_own_clean_estimate(prediction):
    from diffusers import EulerDiscreteScheduler

    from lycoris_core.sampling import flow_denoised

    sched = EulerDiscreteScheduler(prediction_type=prediction, timestep_spacing="trailing")
    sched.set_timesteps(6)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 4, 4, generator=g) * sched.init_noise_sigma
    for i, t in enumerate(sched.timesteps):
        out = sched.step(torch.randn(x.shape, generator=g), t, x)
        estimate = flow_denoised(sched, i, x, out.prev_sample)
        assert (estimate - out.pred_original_sample).abs().max() < 1e-4 * (1 + x.abs().max())
        x = out.prev_sample


def test_step_info_carries_the_estimate_on_flow_models(models):
    from lycoris_core.sampling import sample

    args = {"prompt": "a cat", "steps": 3, "seed": 1, "width": 32, "height": 32}
    infos = []
    final = sample(models["flux"], output="latent", on_step=infos.append, **args)
    assert infos[0].denoised is None  # no previous latents to read back from
    assert all(i.denoised is not None for i in infos[1:])
    assert infos[1].denoised.shape == infos[1].latents.shape
    assert (infos[1].denoised - infos[1].latents).abs().max() > 1e-3
    assert (infos[-1].denoised.float() - final).abs().max() < 1e-4  # the last sigma is 0
    infos.clear()
    sample(models["sd15"], on_step=infos.append, **args)
    assert all(i.denoised is None for i in infos)  # PNDM: nothing to read back
    infos.clear()
    final = sample(models["sdxl"], output="latent", on_step=infos.append, **args)
    assert all(i.denoised is not None for i in infos[1:])  # Euler, SDXL's default
    assert (infos[-1].denoised.float() - final).abs().max() < 1e-4
