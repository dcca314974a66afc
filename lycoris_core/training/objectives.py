"""Training objectives per family: what to encode, how to noise, what the denoiser must predict.

* sd15 / sdxl: DDPM noise, epsilon or v-prediction (from the scheduler config), optional
  min-SNR-gamma weighting; SDXL adds its pooled text embedding and size/crop time ids.
* sd3 / flux: rectified flow matching: ``x_t = (1 - sigma) x_0 + sigma * noise``, target
  ``noise - x_0``; sigma sampled uniform or logit-normal and shifted like the model's
  scheduler (SD3: fixed shift; Flux: resolution-dependent shift). Flux latents are packed 2x2
  into tokens with position ids, and FLUX.1-dev takes a guidance input.

Text encoders and the VAE stay frozen; only their outputs are used (and can be cached).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import LycorisError
from ..families import Family

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
        self.pipe = pipe
        self.family = family
        self.options = options or ObjectiveOptions()
        self.denoiser = getattr(pipe, family.denoiser)
        self.forward = self.denoiser  # what runs the denoiser (a DDP wrapper when distributed)
        vae_cfg = pipe.vae.config
        self.scaling = float(vae_cfg.scaling_factor)
        self.shift_factor = float(getattr(vae_cfg, "shift_factor", None) or 0.0)
        self.vae_scale = int(getattr(pipe, "vae_scale_factor", 8))
        if family.name in ("sd15", "sdxl"):
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
        if self.family.name in ("sd3", "flux"):
            latents = (latents - self.shift_factor) * self.scaling
        else:
            latents = latents * self.scaling
        return latents.float()

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Text conditioning for each caption; every tensor has the batch as first dimension."""
        pipe, name, dev = self.pipe, self.family.name, self.device
        msl = self.options.max_sequence_length
        if name == "sd15":
            embeds = pipe.encode_prompt(captions, dev, 1, False)[0]
            return {"prompt_embeds": embeds.float()}
        if name == "sdxl":
            embeds, _, pooled, _ = pipe.encode_prompt(
                prompt=captions,
                device=dev,
                num_images_per_prompt=1,
                do_classifier_free_guidance=False,
            )
            return {"prompt_embeds": embeds.float(), "pooled": pooled.float()}
        if name == "sd3":
            kw = {} if msl is None else {"max_sequence_length": msl}
            embeds, _, pooled, _ = pipe.encode_prompt(
                prompt=captions,
                prompt_2=None,
                prompt_3=None,
                device=dev,
                num_images_per_prompt=1,
                do_classifier_free_guidance=False,
                **kw,
            )
            return {"prompt_embeds": embeds.float(), "pooled": pooled.float()}
        if name == "flux":
            kw = {} if msl is None else {"max_sequence_length": msl}
            embeds, pooled, _ = pipe.encode_prompt(
                prompt=captions, prompt_2=None, device=dev, num_images_per_prompt=1, **kw
            )
            return {"prompt_embeds": embeds.float(), "pooled": pooled.float()}
        raise LycorisError(f"family '{name}' is not supported for training")

    # ------------------------------------------------------------------ loss
    def loss(
        self, latents: torch.Tensor, cond: dict[str, torch.Tensor], generator: torch.Generator
    ) -> torch.Tensor:
        """Mean loss of one batch (float32 scalar). Noise and timesteps come from `generator`."""
        dtype = self.denoiser.dtype
        latents = latents.to(self.device, torch.float32)
        cond = {k: v.to(self.device) for k, v in cond.items()}
        noise = torch.randn(latents.shape, generator=generator).to(self.device)
        if self.family.name in ("sd15", "sdxl"):
            return self._ddpm_loss(latents, noise, cond, generator, dtype)
        return self._flow_loss(latents, noise, cond, generator, dtype)

    def _ddpm_loss(self, latents, noise, cond, generator, dtype) -> torch.Tensor:
        sched = self.noise_scheduler
        b = latents.shape[0]
        t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=generator)
        t = t.to(self.device)
        noisy = sched.add_noise(latents, noise, t)
        target = noise if self.prediction == "epsilon" else sched.get_velocity(latents, noise, t)
        kwargs: dict[str, Any] = {"encoder_hidden_states": cond["prompt_embeds"].to(dtype)}
        if self.family.name == "sdxl":
            h, w = latents.shape[-2] * self.vae_scale, latents.shape[-1] * self.vae_scale
            time_ids = torch.tensor([[h, w, 0, 0, h, w]], device=self.device).repeat(b, 1)
            kwargs["added_cond_kwargs"] = {
                "text_embeds": cond["pooled"].to(dtype),
                "time_ids": time_ids.to(dtype),
            }
        pred = self.forward(noisy.to(dtype), t, return_dict=False, **kwargs)[0].float()
        per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
        gamma = self.options.min_snr_gamma
        if gamma is not None:
            alphas = sched.alphas_cumprod.to(self.device)[t]
            snr = alphas / (1 - alphas)
            weight = torch.clamp(snr, max=gamma) / snr
            if self.prediction == "v_prediction":
                weight = torch.clamp(snr, max=gamma) / (snr + 1)
            per_sample = per_sample * weight
        return per_sample.mean()

    def _sigmas(self, b: int, generator: torch.Generator, image_seq_len: int) -> torch.Tensor:
        opts = self.options
        if opts.timestep_sampling == "uniform":
            s = torch.rand(b, generator=generator)
        else:
            s = torch.sigmoid(
                opts.logit_mean + opts.logit_std * torch.randn(b, generator=generator)
            )
        cfg = self.pipe.scheduler.config
        if getattr(cfg, "use_dynamic_shifting", False):
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            mu = calculate_shift(
                image_seq_len,
                cfg.get("base_image_seq_len", 256),
                cfg.get("max_image_seq_len", 4096),
                cfg.get("base_shift", 0.5),
                cfg.get("max_shift", 1.15),
            )
            s = math.exp(mu) / (math.exp(mu) + (1 / s - 1))
        else:
            shift = float(cfg.get("shift", 1.0))
            s = shift * s / (1 + (shift - 1) * s)
        return s.to(self.device)

    def _flow_loss(self, latents, noise, cond, generator, dtype) -> torch.Tensor:
        b, c, h, w = latents.shape
        sigmas = self._sigmas(b, generator, (h // 2) * (w // 2))
        sig = sigmas.view(b, 1, 1, 1)
        noisy = (1 - sig) * latents + sig * noise
        target = noise - latents
        embeds, pooled = cond["prompt_embeds"].to(dtype), cond["pooled"].to(dtype)
        if self.family.name == "sd3":
            pred = self.forward(
                hidden_states=noisy.to(dtype),
                timestep=sigmas * 1000,
                encoder_hidden_states=embeds,
                pooled_projections=pooled,
                return_dict=False,
            )[0].float()
            return F.mse_loss(pred, target)
        from diffusers import FluxPipeline

        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, self.device, dtype)
        txt_ids = torch.zeros(embeds.shape[1], 3, device=self.device, dtype=dtype)
        guidance = None
        if getattr(self.denoiser.config, "guidance_embeds", False):
            guidance = torch.full((b,), self.options.flux_guidance, device=self.device)
        pred = self.forward(
            hidden_states=packed.to(dtype),
            timestep=sigmas,
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=embeds,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0].float()
        return F.mse_loss(pred, FluxPipeline._pack_latents(target, b, c, h, w))
