"""Run a pipeline with adapters at strengths: seeds, progress, cancel, ComfyUI IMAGE output.

``sample(model, adapters=[(adapter, strength)], ...)`` returns a float tensor
``[B, H, W, C]`` in 0..1 on the CPU (ComfyUI's IMAGE). The adapters are applied through
:meth:`LoadedModel.use_adapters`, which keeps the last set patched, so sampling the same set
twice does not re-merge; a different set (or none) restores the base weights first.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from .deferred import ensure
from .device import module_bytes, oom_advice
from .errors import LycorisError
from .limits import MAX_SAMPLING_STEPS
from .models import LoadedModel
from .pipeline_patch import Entry

logger = logging.getLogger(__name__)


class SamplingCancelled(LycorisError):
    """``should_stop()`` asked to stop; raised between two steps."""


@dataclass(frozen=True)
class StepInfo:
    """What ``on_step`` receives after each denoising step."""

    step: int  # 1-based
    total: int
    elapsed: float  # seconds since the first step started
    eta: float  # seconds left, estimated
    # the current latents [B, C, h, w] (Flux's unpacked), scaled as the denoiser sees them
    latents: torch.Tensor | None = None
    # what `denoised` is read back from: the latents before this step, and the scheduler
    previous: torch.Tensor | None = field(default=None, repr=False)
    scheduler: Any = field(default=None, repr=False)

    @property
    def it_per_s(self) -> float:
        return self.step / self.elapsed if self.elapsed > 0 else 0.0

    @cached_property
    def denoised(self) -> torch.Tensor | None:
        """The model's estimate of the final latents at this step, where the scheduler allows
        reading it back (Euler schedulers: SD3, Flux, SDXL's default; from step 2 on);
        computed when asked for."""
        if self.latents is None or self.previous is None or self.scheduler is None:
            return None
        return flow_denoised(self.scheduler, self.step - 1, self.previous, self.latents)


def _check_int(name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise LycorisError(f"{name} must be an integer >= {lo}, got {value!r}")
    return value


# diffusers' StableDiffusion and StableDiffusionXL pipelines refuse sizes that are not
# multiples of 8 (their check_inputs), whatever the VAE's own scale factor is
_UNET_PIPELINE_MULTIPLE = 8


def sampling_multiple(model: LoadedModel) -> int:
    """What sampled widths and heights must be a multiple of (pixels)."""
    m = model.size_multiple
    return math.lcm(m, _UNET_PIPELINE_MULTIPLE) if model.family.denoiser == "unet" else m


def check_size(model: LoadedModel, width: int, height: int) -> None:
    m = sampling_multiple(model)
    for name, v in (("width", width), ("height", height)):
        _check_int(name, v, m)
        if v % m:
            lower, upper = v // m * m, (v // m + 1) * m
            raise LycorisError(
                f"{name} {v} is not a multiple of {m} ({model.family.label} with this VAE needs "
                f"multiples of {m}); use {max(lower, m)} or {upper}"
            )


def _check_steps(model: LoadedModel, steps: Any) -> None:
    """An integer from 1 to MAX_SAMPLING_STEPS, and below a UNet scheduler's training
    timesteps (DDPM-style schedulers cannot run that many)."""
    _check_int("steps", steps, 1)
    if steps > MAX_SAMPLING_STEPS:
        raise LycorisError(
            f"steps {steps} is more than {MAX_SAMPLING_STEPS} (limits.MAX_SAMPLING_STEPS); "
            "25 to 50 is usual"
        )
    limit = getattr(getattr(model.pipe, "scheduler", None), "config", {}).get("num_train_timesteps")
    if limit and model.family.denoiser == "unet" and steps >= limit:  # DDPM-style schedulers
        raise LycorisError(
            f"steps {steps} is too many for this scheduler ({limit} training timesteps); "
            f"use at most {limit - 1} (25 to 50 is usual)"
        )


def _check_request(
    model: LoadedModel,
    adapters: Sequence[Entry],
    prompt: Any,
    negative_prompt: Any,
    guidance: Any,
    seed: Any,
    batch_size: Any,
) -> None:
    """The checks of :func:`sample` after size, output and steps: batch, seed, prompts,
    guidance, and adapters with sequential offload."""
    _check_int("batch_size", batch_size, 1)
    _check_int("seed", seed, 0)
    if not isinstance(prompt, str) or not isinstance(negative_prompt, str):
        raise LycorisError("prompt and negative_prompt must be strings")
    if (
        isinstance(guidance, bool)
        or not isinstance(guidance, (int, float))
        or not (math.isfinite(guidance) and guidance >= 0)
    ):
        raise LycorisError(f"guidance must be a finite number >= 0, got {guidance!r}")
    if model.offload == "sequential" and adapters:
        raise LycorisError(
            "adapters with offload 'sequential' are not supported (its weights live outside the "
            "model between steps); use offload 'model' or 'none'"
        )


def _pipe_extra(model: LoadedModel, max_sequence_length: int | None, output: str) -> dict[str, Any]:
    """The pipeline keywords beyond the common ones: the T5 prompt length, latent output."""
    extra: dict[str, Any] = {}
    if max_sequence_length is not None:
        _check_int("max_sequence_length", max_sequence_length, 1)
        if "max_sequence_length" not in inspect.signature(model.pipe.__call__).parameters:
            raise LycorisError(
                f"max_sequence_length: {type(model.pipe).__name__} has no T5 prompt length "
                "to set; leave it unset"
            )
        extra["max_sequence_length"] = max_sequence_length
    if output == "latent":
        extra["output_type"] = "latent"
    return extra


def sample(
    model: LoadedModel,
    adapters: Sequence[Entry] = (),
    mode: str = "merge",
    prompt: str = "",
    negative_prompt: str = "",
    width: int | None = None,
    height: int | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    batch_size: int = 1,
    on_step: Callable[[StepInfo], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    max_sequence_length: int | None = None,
    output: str = "image",
) -> torch.Tensor:
    """Sample `batch_size` images; image i uses seed ``seed + i``. Returns [B, H, W, C] in 0..1.

    `max_sequence_length` caps the T5 prompt tokens of SD3/Flux (their default: 256/512).
    ``output="latent"`` returns the final latents instead, ``[B, C, h, w]`` (Flux unpacked),
    in the space the VAE encoder maps images to (scaled, shifted), without decoding.
    """
    fam = model.family
    width = model.default_size if width is None else width
    height = model.default_size if height is None else height
    steps = fam.steps if steps is None else steps
    guidance = fam.guidance if guidance is None else guidance
    check_size(model, width, height)
    if output not in ("image", "latent"):
        raise LycorisError(f"output must be 'image' or 'latent', got {output!r}")
    _check_steps(model, steps)
    _check_request(model, adapters, prompt, negative_prompt, guidance, seed, batch_size)

    adapter_bytes = sum(entry[0].num_params() * 4 for entry in adapters)
    with oom_advice(
        f"sampling {batch_size}x{width}x{height}",
        model_bytes=module_bytes(model.denoiser),
        adapter_bytes=adapter_bytes,
    ):
        ensure(model.pipe)  # text encoders deferred at load time come in now
        extra = _pipe_extra(model, max_sequence_length, output)
        model.use_adapters(adapters, mode=mode)
        return _run(
            model,
            prompt,
            negative_prompt,
            width,
            height,
            steps,
            float(guidance),
            seed,
            batch_size,
            on_step,
            should_stop,
            extra,
        )


EULER_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "EulerDiscreteScheduler")


def flow_denoised(
    scheduler: Any, i: int, before: torch.Tensor, after: torch.Tensor
) -> torch.Tensor | None:
    """The model's estimate of the clean latents at step `i` (0-based), read back from the
    latents before and after an Euler step, or None for other schedulers.

    Euler (flow matching in SD3/Flux, or diffusers' EulerDiscreteScheduler, SDXL's default)
    moves ``x[i+1] = x[i] + (s[i+1] - s[i]) * d`` along the predicted direction ``d``, and the
    model's clean estimate is ``x[i] - s[i] * d`` (what ComfyUI's samplers preview).
    """
    sigmas = getattr(scheduler, "sigmas", None)
    if (
        type(scheduler).__name__ not in EULER_SCHEDULERS
        or getattr(scheduler.config, "stochastic_sampling", False)
        or sigmas is None
        or i + 1 >= len(sigmas)
    ):
        return None
    s0, s1 = float(sigmas[i]), float(sigmas[i + 1])
    if s0 == s1:
        return None
    v = (after.float() - before.float()) / (s1 - s0)
    return (before.float() - s0 * v).to(after.dtype)


def _step_callback(
    model: LoadedModel,
    steps: int,
    width: int,
    height: int,
    on_step: Callable[[StepInfo], None] | None,
    should_stop: Callable[[], bool] | None,
) -> Callable[..., dict[str, Any]]:
    """The pipeline's ``callback_on_step_end``: progress to `on_step`, cancel on
    `should_stop`; its clock starts now."""
    start = time.perf_counter()
    previous: list[torch.Tensor] = []  # the latents after the previous step

    def callback(pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        done = i + 1
        # some schedulers (PNDM) run more model steps than num_inference_steps
        total = max(steps, len(getattr(pipe.scheduler, "timesteps", ())), done)
        elapsed = time.perf_counter() - start
        if on_step is not None:
            eta = elapsed / done * (total - done)
            latents = kwargs.get("latents")
            if latents is not None and model.family.packed_latents:
                latents = pipe._unpack_latents(latents, height, width, model.vae_scale_factor)
            before = previous[0] if previous else None
            previous[:] = [] if latents is None else [latents]
            on_step(StepInfo(done, total, elapsed, eta, latents, before, pipe.scheduler))
        if should_stop is not None and done < total and should_stop():
            raise SamplingCancelled(f"sampling cancelled after step {done} of {total}")
        return {}

    return callback


def _run(
    model: LoadedModel,
    prompt: str,
    negative_prompt: str,
    width: int,
    height: int,
    steps: int,
    guidance: float,
    seed: int,
    batch_size: int,
    on_step: Callable[[StepInfo], None] | None,
    should_stop: Callable[[], bool] | None,
    extra: dict[str, Any],
) -> torch.Tensor:
    fam = model.family
    gen_device = "cpu" if model.offload != "none" else model.device
    generators = [
        torch.Generator(device=gen_device).manual_seed(seed + i) for i in range(batch_size)
    ]
    callback = _step_callback(model, steps, width, height, on_step, should_stop)
    kwargs: dict[str, Any] = {
        "prompt": [prompt] * batch_size,
        "width": width,
        "height": height,
        "num_inference_steps": steps,
        "guidance_scale": guidance,
        "generator": generators,
        "output_type": "pt",
        "callback_on_step_end": callback,
        "callback_on_step_end_tensor_inputs": ["latents"],
        **extra,
    }
    if fam.negative_prompt:
        kwargs["negative_prompt"] = [negative_prompt] * batch_size
    elif negative_prompt:
        logger.warning("%s ignores negative prompts (guidance-distilled); ignoring it", fam.label)
    if should_stop is not None and should_stop():
        raise SamplingCancelled("sampling cancelled before the first step")
    with torch.inference_mode():
        images = model.pipe(**kwargs).images
    return _output(model, images, width, height, latent=kwargs["output_type"] == "latent")


def _output(model: LoadedModel, images: Any, width: int, height: int, latent: bool) -> torch.Tensor:
    """The pipeline's output on the CPU in float32: latents ``[B, C, h, w]`` (Flux's
    unpacked), or images ``[B, H, W, C]`` clamped to 0..1."""
    if latent:
        if model.family.packed_latents:
            images = model.pipe._unpack_latents(images, height, width, model.vae_scale_factor)
        return images.float().cpu()
    if isinstance(images, list):
        images = torch.stack([torch.as_tensor(im) for im in images])
    return images.float().clamp(0, 1).permute(0, 2, 3, 1).contiguous().cpu()
