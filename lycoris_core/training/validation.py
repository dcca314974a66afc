"""Validation images during training: the prompts at ``validation_lycoris_strength``, same seed
each time, saved as ``<run>-validation/step-NNNNNN-i.png``."""

from __future__ import annotations

from typing import Any

import torch

from .session import Session


def validation_images(session: Session, net: Any, step: int) -> torch.Tensor:
    """Images ``[N, H, W, C]`` of the validation prompts at this step, also written as PNGs."""
    from ..sampling import sampling_multiple

    spec = session.spec
    m = sampling_multiple(session.model)
    side = max(m, spec.dataset.resolution // m * m)
    net.set_multiplier(spec.validation_lycoris_strength)
    net.eval()
    session.denoiser.eval()
    try:
        with session.encoders_on_device():  # the VAE and text encoders, if they were released
            images = _images(session, side)
    finally:
        net.set_multiplier(spec.config.multiplier)
        net.train()
        session.denoiser.train(spec.gradient_checkpointing)
    _write_pngs(session, images, step)
    return images


def _images(session: Session, side: int) -> torch.Tensor:
    from ..sampling import sample

    spec = session.spec
    return torch.cat(
        [
            sample(
                session.model,
                [],
                prompt=prompt,
                steps=spec.validation_steps,
                seed=spec.validation_seed,
                width=side,
                height=side,
                max_sequence_length=spec.objective.max_sequence_length,
            )
            for prompt in spec.validation_prompts
        ]
    )


def _write_pngs(session: Session, images: torch.Tensor, step: int) -> None:
    from PIL import Image

    from ..io import atomic_write

    session.val_dir.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        array = (image.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        atomic_write(
            session.val_dir / f"step-{step:06d}-{i}.png",
            lambda tmp, array=array: Image.fromarray(array).save(tmp, format="PNG"),
        )
