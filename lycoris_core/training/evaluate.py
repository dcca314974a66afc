"""Measuring whether an adapter learned: a fixed-noise loss, latent and pixel distances.

The training loss is noisy (random timesteps and noise each step). :func:`fixed_loss`
evaluates the family's objective on the whole dataset with fixed noise and timesteps, so two
adapters (or strength 0 vs 1) can be compared. :func:`nearest_latent_distance` measures how
close generated images are to the training images in latent space, and
:func:`nearest_image_correlation` in pixel space (on decoded images, what a person sees).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from ..adapters import Adapter
from ..models import LoadedModel
from ..patching import patched
from .dataset import TrainingData
from .objectives import Objective, ObjectiveOptions


@torch.no_grad()
def dataset_latents(objective: Objective, data: TrainingData) -> list[torch.Tensor]:
    """The (center-crop, unflipped) latents of every dataset item."""
    return [
        objective.encode_images(data.pixels(i, random.Random(i))[None])[0] for i in range(len(data))
    ]


@torch.no_grad()
def fixed_loss(
    model: LoadedModel,
    data: TrainingData,
    adapters: Sequence[tuple[Adapter, float]] = (),
    draws: int = 8,
    seed: int = 1234,
    options: ObjectiveOptions | None = None,
) -> float:
    """Mean objective over the dataset with `draws` fixed noise/timestep draws per item."""
    model.restore_base()
    objective = Objective(model.pipe, model.family, options or ObjectiveOptions())
    latents = dataset_latents(objective, data)
    conds = [objective.encode_text([data.items[i].caption]) for i in range(len(data))]
    total, n = 0.0, 0
    with patched(model.denoiser, list(adapters), mode="merge"):
        for i, (lat, cond) in enumerate(zip(latents, conds, strict=True)):
            g = torch.Generator().manual_seed(seed + i)
            for _ in range(draws):
                total += objective.loss(lat[None], cond, g).item()
                n += 1
    return total / n


def nearest_latent_distance(generated: torch.Tensor, training: torch.Tensor) -> float:
    """Mean over generated latents ([B, ...]) of the RMS distance to the nearest training
    latent (``training``: [N, ...], the same shape per item)."""
    rms = (generated[:, None] - training[None]).pow(2).flatten(2).mean(-1).sqrt()  # [B, N]
    return rms.min(dim=1).values.mean().item()


def dataset_images(data: TrainingData) -> torch.Tensor:
    """The (center-crop, unflipped) training images as an IMAGE batch [N, H, W, C] in 0..1.

    Items of another size than the first (aspect buckets) are left out.
    """
    pixels = [data.pixels(i, random.Random(i)) for i in range(len(data))]
    same = [p for p in pixels if p.shape == pixels[0].shape]
    return (torch.stack(same).permute(0, 2, 3, 1) + 1) / 2


def nearest_image_correlation(generated: torch.Tensor, training: torch.Tensor) -> float:
    """Mean over generated images of the Pearson correlation with the nearest training image.

    Both are IMAGE batches ([B, H, W, C] in 0..1) of one size. 1 means a generated image is a
    training image up to brightness and contrast; about 0 means unrelated (noise).
    """
    if generated.shape[1:] != training.shape[1:]:
        raise ValueError(
            f"nearest_image_correlation: generated images {tuple(generated.shape[1:])} and "
            f"training images {tuple(training.shape[1:])} must have the same size"
        )

    def standardised(batch: torch.Tensor) -> torch.Tensor:
        flat = batch.flatten(1).double()
        flat = flat - flat.mean(dim=1, keepdim=True)
        return flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)

    corr = standardised(generated) @ standardised(training).T  # [B, N]
    return corr.max(dim=1).values.mean().item()
