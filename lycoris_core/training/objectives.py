"""Training objectives: what to encode, how to noise, what the denoiser must predict.

* DDPM families (sd15 / sdxl): noise from the scheduler config's betas, epsilon or v-prediction
  (the scheduler config's ``prediction_type``), optional min-SNR-gamma weighting
  (``diffusers.training_utils.compute_snr``).
* Flow-matching families (sd3 / flux): ``x_t = (1 - sigma) x_0 + sigma * noise``, target
  ``noise - x_0``; sigma drawn uniform or logit-normal
  (``diffusers.training_utils.compute_density_for_timestep_sampling``) and shifted the way the
  pipeline's ``FlowMatchEulerDiscreteScheduler`` config says: a fixed ``shift``, or with
  ``use_dynamic_shifting`` the scheduler's own ``time_shift`` (exponential or linear, per
  ``time_shift_type``) at the resolution-dependent ``mu``. Sampling-only schedule options
  (``shift_terminal``, Karras/exponential/beta sigmas) shape inference step lists and do not
  apply to random training draws.

What differs per family (text encoding, the denoiser call, Flux's packing) lives with the family
in ``families.py``; this module names no family. Text encoders and the VAE stay frozen; only
their outputs are used (and can be cached).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..deferred import ensure
from ..errors import LycorisError
from ..families import DenoiserCall, Family

TIMESTEP_SAMPLING = ("uniform", "logit_normal")


@dataclass(frozen=True)
class ObjectiveOptions:
    """Knobs of the objective (defaults follow the families' reference trainers)."""

    min_snr_gamma: float | None = None  # sd15/sdxl: min-SNR weighting (e.g. 5.0)
    timestep_sampling: str = "logit_normal"  # sd3/flux
    logit_mean: float = 0.0
    logit_std: float = 1.0
    flux_guidance: float = 1.0  # FLUX.1-dev guidance input while training
    max_sequence_length: int | None = None  # T5 tokens for sd3/flux (None: the pipeline's)

    def __post_init__(self) -> None:
        if self.timestep_sampling not in TIMESTEP_SAMPLING:
            raise LycorisError(
                f"timestep_sampling {self.timestep_sampling!r}: use one of "
                f"{', '.join(TIMESTEP_SAMPLING)}"
            )
        if self.min_snr_gamma is not None and not self.min_snr_gamma > 0:
            raise LycorisError(f"min_snr_gamma must be > 0 or unset, got {self.min_snr_gamma}")


class Objective:
    """Family-specific encoding and loss for one loaded pipeline."""

    def __init__(self, pipe: Any, family: Family, options: ObjectiveOptions | None = None):
        if family.predict is None or family.encode_text is None:
            raise LycorisError(f"family '{family.name}' is not supported for training")
        self.pipe = pipe
        self.family = family
        self.options = options or ObjectiveOptions()
        self.denoiser = getattr(pipe, family.denoiser)
        self.forward = self.denoiser  # what runs the denoiser (a DDP wrapper when distributed)
        vae_cfg = pipe.vae.config
        self.scaling = float(vae_cfg.scaling_factor)
        self.shift_factor = float(getattr(vae_cfg, "shift_factor", None) or 0.0)
        self.vae_scale = int(getattr(pipe, "vae_scale_factor", 8))
        self.prediction: str | None = None
        if family.flow_matching:
            from diffusers import FlowMatchEulerDiscreteScheduler

            self.noise_scheduler = FlowMatchEulerDiscreteScheduler.from_config(
                pipe.scheduler.config
            )
        else:
            from diffusers import DDPMScheduler

            self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
            self.prediction = self.noise_scheduler.config.prediction_type
            if self.prediction not in ("epsilon", "v_prediction"):
                raise LycorisError(
                    f"prediction type {self.prediction!r} of this scheduler is not supported "
                    "for training; epsilon and v_prediction are"
                )
        self.device = self.denoiser.device

    # ------------------------------------------------------------------ encoding
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, H, W] in [-1, 1] -> scaled latents [B, C, H/f, W/f] (the VAE mode)."""
        vae = self.pipe.vae
        x = pixels.to(device=vae.device, dtype=vae.dtype)
        latents = vae.encode(x).latent_dist.mode()
        return ((latents - self.shift_factor) * self.scaling).float()

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Text conditioning for each caption; every tensor has the batch as first dimension."""
        ensure(self.pipe)  # text encoders deferred at load time come in now
        encode = self.family.encode_text
        return encode(self.pipe, captions, self.device, self.options.max_sequence_length)

    # ------------------------------------------------------------------ loss
    def loss(
        self, latents: torch.Tensor, cond: dict[str, torch.Tensor], generator: torch.Generator
    ) -> torch.Tensor:
        """Mean loss of one batch (float32 scalar). Noise and timesteps come from `generator`."""
        latents = latents.to(self.device, torch.float32)
        cond = {k: v.to(self.device) for k, v in cond.items()}
        noise = torch.randn(latents.shape, generator=generator).to(self.device)
        if self.family.flow_matching:
            return self._flow_loss(latents, noise, cond, generator)
        return self._ddpm_loss(latents, noise, cond, generator)

    def _call(self) -> DenoiserCall:
        takes_guidance = getattr(self.denoiser.config, "guidance_embeds", False)
        return DenoiserCall(
            forward=self.forward,
            dtype=self.denoiser.dtype,
            device=self.device,
            vae_scale=self.vae_scale,
            guidance=self.options.flux_guidance if takes_guidance else None,
        )

    def _ddpm_loss(self, latents, noise, cond, generator) -> torch.Tensor:
        from diffusers.training_utils import compute_snr

        sched = self.noise_scheduler
        b = latents.shape[0]
        t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=generator)
        t = t.to(self.device)
        noisy = sched.add_noise(latents, noise, t)
        target = noise if self.prediction == "epsilon" else sched.get_velocity(latents, noise, t)
        pred, target = self.family.predict(self._call(), noisy, target, t, cond)
        per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
        gamma = self.options.min_snr_gamma
        if gamma is not None:  # min-SNR-gamma: weight min(SNR, gamma) / SNR (v: / (SNR + 1))
            snr = compute_snr(sched, t)
            divisor = snr + 1 if self.prediction == "v_prediction" else snr
            per_sample = per_sample * (torch.clamp(snr, max=gamma) / divisor)
        return per_sample.mean()

    def sigmas(self, b: int, generator: torch.Generator, image_seq_len: int) -> torch.Tensor:
        """`b` training sigmas: the configured density, shifted like the scheduler shifts."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        opts = self.options
        u = compute_density_for_timestep_sampling(
            opts.timestep_sampling,
            b,
            logit_mean=opts.logit_mean,
            logit_std=opts.logit_std,
            generator=generator,
        )
        sched = self.noise_scheduler
        cfg = sched.config
        if cfg.use_dynamic_shifting:
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            mu = calculate_shift(
                image_seq_len,
                cfg.base_image_seq_len,
                cfg.max_image_seq_len,
                cfg.base_shift,
                cfg.max_shift,
            )
            s = sched.time_shift(mu, 1.0, u)
        else:  # the scheduler's fixed shift (its set_timesteps formula)
            s = sched.shift * u / (1 + (sched.shift - 1) * u)
        return s.to(self.device)

    def _flow_loss(self, latents, noise, cond, generator) -> torch.Tensor:
        b, _, h, w = latents.shape
        patch = self.family.patch
        sigmas = self.sigmas(b, generator, (h // patch) * (w // patch))
        sig = sigmas.view(b, 1, 1, 1)
        noisy = (1 - sig) * latents + sig * noise
        pred, target = self.family.predict(self._call(), noisy, noise - latents, sigmas, cond)
        return F.mse_loss(pred, target)
