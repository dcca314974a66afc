"""One run's model, data and feature caches: what the loop draws its batches from.

The model is loaded (or taken as given), the dataset scanned, the family's objective built,
and latents / text embeddings cached per model. Under ``accelerate launch`` the accelerator
exists first (the model loads onto its device) and each process draws its own share of every
epoch's batches.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import torch

from ..errors import LycorisError
from ..families import require_trainable
from ..models import LoadedModel, as_normal_tensors, load_model
from .checkpoint import checkpoints_dir
from .dataset import FeatureCache, TrainingData
from .engine import launched_distributed, new_accelerator
from .metadata import adapter_metadata, denoiser_config_hash
from .objectives import Objective
from .spec import TrainSpec, training_dataset


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


class Session:
    """State of one training run (kept small: the loop in ``train`` reads top to bottom)."""

    def __init__(self, spec: TrainSpec):
        self.spec = spec
        accelerator = None
        device: Any = "auto"
        if launched_distributed():
            accelerator = new_accelerator(spec.mixed_precision, spec.grad_accum, None)
            device = accelerator.device
        self.model = (
            spec.base
            if isinstance(spec.base, LoadedModel)
            else load_model(spec.base, config_dir=spec.config_dir, device=device)
        )
        require_trainable(self.model.family)
        self.model.restore_base()
        as_normal_tensors(self.model.denoiser)  # weights loaded under inference_mode
        self.family = self.model.family
        self.denoiser = self.model.denoiser
        self.device = self.denoiser.device
        self.accelerator = accelerator or new_accelerator(
            spec.mixed_precision, spec.grad_accum, self.device
        )
        ds = training_dataset(spec.dataset, self.model)
        self.flip = spec.dataset.flip
        self.data = TrainingData(ds) if spec.data is None else spec.data
        if self.data.spec != ds:
            raise LycorisError(
                "training spec: 'data' was not loaded from training_dataset(dataset, model); "
                "leave it None and the loop loads 'dataset' itself"
            )
        self.objective = Objective(self.model.pipe, self.family, spec.objective)
        model_id = text_hash(self.model.source + denoiser_config_hash(self.denoiser))
        cache_dir = spec.dataset.cache_dir
        self.latent_cache = FeatureCache(cache_dir, f"latents-{model_id}-{ds.resolution}")
        self.text_cache = FeatureCache(
            cache_dir,
            f"text-{model_id}-{spec.objective.max_sequence_length or 'default'}",
            max_items=256,  # T5 embeddings are large; captions repeat anyway
        )
        self.cache_latents = ds.center_crop
        self.output = Path(spec.output)
        self.ckpt_dir = checkpoints_dir(self.output)
        self.val_dir = self.output.with_name(self.output.stem + "-validation")

    def order(self, epoch: int) -> list[list[int]]:
        """This process's batches of an epoch (all of them in a single process)."""
        batches = self.data.epoch_order(epoch, self.spec.seed, self.spec.batch_size)
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        if world == 1:
            return batches
        return batches[rank::world] or batches[:1]

    def encode_batch(
        self, indices: list[int], rngs: list[random.Random]
    ) -> tuple[torch.Tensor, dict]:
        latents, conds = [], []
        for i, rng in zip(indices, rngs, strict=True):
            flip = self.flip and rng.random() < 0.5
            caption = self.data.caption(i, rng)
            key = self.data.items[i].key + ("-flip" if flip else "")

            def encode(i: int = i, rng: random.Random = rng, flip: bool = flip) -> dict:
                pixels = self.data.pixels(i, rng)
                if flip:
                    pixels = torch.flip(pixels, dims=[-1])
                return {"latents": self.objective.encode_images(pixels[None])[0]}

            if self.cache_latents:
                latents.append(self.latent_cache.get_or_compute(key, encode)["latents"])
            else:
                latents.append(encode()["latents"])
            text = self.text_cache.get_or_compute(
                text_hash(caption),
                lambda caption=caption: {
                    k: v[0] for k, v in self.objective.encode_text([caption]).items()
                },
            )
            conds.append(text)
        cond = {k: torch.stack([c[k] for c in conds]) for k in conds[0]}
        return torch.stack(latents), cond

    def metadata(self, step: int) -> dict[str, str]:
        spec = self.spec
        return adapter_metadata(
            spec.config,
            self.family,
            self.model.source,
            self.denoiser,
            title=self.output.stem,
            steps=step,
            resolution=spec.dataset.resolution,
            dataset_hash=self.data.fingerprint(),
            spec=spec.to_dict(),
            prediction_type=self.objective.prediction,
        )
