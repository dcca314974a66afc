"""Measuring whether an adapter learned: a fixed-noise loss and a latent-space distance.

The training loss is noisy (random timesteps and noise each step). :func:`fixed_loss`
evaluates the family's objective on the whole dataset with fixed noise and timesteps, so two
adapters (or strength 0 vs 1) can be compared. :func:`nearest_latent_distance` measures how
close generated images are to the training images in latent space.
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


@torch.no_grad()
def nearest_latent_distance(
    objective: Objective, generated: torch.Tensor, training_latents: Sequence[torch.Tensor]
) -> float:
    """Mean over generated images ([B, H, W, C] in 0..1) of the RMS distance of its latent to
    the nearest training latent of the same shape."""
    pixels = generated.permute(0, 3, 1, 2) * 2 - 1
    distances = []
    for image in pixels:
        lat = objective.encode_images(image[None])[0]
        same = [t for t in training_latents if t.shape == lat.shape]
        distances.append(min(((lat - t) ** 2).mean().sqrt().item() for t in same))
    return sum(distances) / len(distances)
