"""One run's model, data and feature caches: what the loop draws its batches from.

The model is loaded (or taken as given), the dataset scanned, the family's objective built,
and latents / text embeddings cached per model. Under ``accelerate launch`` the accelerator
exists first (the model loads onto its device) and each process draws its own share of every
epoch's batches.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..device import free_memory
from ..errors import LycorisError
from ..families import require_trainable
from ..models import LoadedModel, as_normal_tensors, load_model
from .checkpoint import checkpoints_dir
from .dataset import FeatureCache, TrainingData
from .engine import launched_distributed, new_accelerator
from .metadata import adapter_metadata, denoiser_config_hash
from .objectives import Objective
from .spec import TrainSpec, check_loaded_precision, training_dataset

logger = logging.getLogger(__name__)

# pipeline components that only encode training inputs (the VAE also decodes validation images)
ENCODERS = {
    "vae": ("vae",),
    "text": ("text_encoder", "text_encoder_2", "text_encoder_3"),
}


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
            else load_model(
                spec.base,
                config_dir=spec.config_dir,
                device=device,
                base_precision=spec.base_precision,
                # with a cache_dir the text encoders load only on a cache miss
                defer_text_encoders=spec.dataset.cache_dir is not None,
            )
        )
        check_loaded_precision(self.model, spec.base_precision)
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
        # quantised text encoders give other embeddings: the caches key on the storage too
        model_id = text_hash(
            self.model.source + denoiser_config_hash(self.denoiser) + self.model.storage
        )
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
        self.released: list[str] = []  # encoders moved off the device (release_encoders)

    def order(self, epoch: int) -> list[list[int]]:
        """This process's batches of an epoch (all of them in a single process)."""
        batches = self.data.epoch_order(epoch, self.spec.seed, self.spec.batch_size)
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        if world == 1:
            return batches
        return batches[rank::world] or batches[:1]

    def _latents(self, i: int, rng: random.Random, flip: bool) -> torch.Tensor:
        def encode() -> dict:
            pixels = self.data.pixels(i, rng)
            if flip:
                pixels = torch.flip(pixels, dims=[-1])
            return {"latents": self.objective.encode_images(pixels[None])[0]}

        if not self.cache_latents:
            return encode()["latents"]
        key = self.data.items[i].key + ("-flip" if flip else "")
        return self.latent_cache.get_or_compute(key, encode)["latents"]

    def _text(self, caption: str) -> dict[str, torch.Tensor]:
        return self.text_cache.get_or_compute(
            text_hash(caption),
            lambda: {k: v[0] for k, v in self.objective.encode_text([caption]).items()},
        )

    def encode_batch(
        self, indices: list[int], rngs: list[random.Random]
    ) -> tuple[torch.Tensor, dict]:
        latents, conds = [], []
        for i, rng in zip(indices, rngs, strict=True):
            flip = self.flip and rng.random() < 0.5
            caption = self.data.caption(i, rng)
            latents.append(self._latents(i, rng, flip))
            conds.append(self._text(caption))
        cond = {k: torch.stack([c[k] for c in conds]) for k in conds[0]}
        return torch.stack(latents), cond

    # ------------------------------------------------------------------ encoders off the device
    def _captions(self) -> set[str]:
        """Every caption a draw can give (dropout gives ""; nothing else is random)."""
        never = random.Random()
        never.random = lambda: 1.0  # type: ignore[method-assign]  # no dropout on this draw
        out = {self.data.caption(i, never) for i in range(len(self.data.items))}
        if self.spec.dataset.caption_dropout > 0:
            out.add("")
        return out

    def precompute_features(self) -> tuple[bool, bool]:
        """Encode, before the first step, every feature the run can draw when they are finitely
        many and all stay cached (in memory, or on disk with a cache_dir): latents of centre
        crops (and their flips), text of every caption. Returns (latents done, text done)."""
        captions = self._captions()
        text_fits = self.spec.dataset.cache_dir is not None or len(captions) <= (
            self.text_cache.max_items or len(captions)
        )
        if text_fits:
            for caption in sorted(captions):
                self._text(caption)
        if self.cache_latents:
            still = random.Random(0)  # a centre crop without the dataset's flip draws nothing
            for i in range(len(self.data.items)):
                for flip in (False, True) if self.flip else (False,):
                    self._latents(i, still, flip)
        return self.cache_latents, text_fits

    def release_encoders(self) -> list[str]:
        """Move the encoders whose outputs are all cached off the training device (to the CPU;
        nothing moves on a CPU run); returns their names. :meth:`restore_encoders` brings them
        back (validation images, the end of the run)."""
        latents_done, text_done = self.precompute_features()
        names = [n for n in ENCODERS["vae"] if latents_done] + [
            n for n in ENCODERS["text"] if text_done
        ]
        pipe = self.model.pipe
        self.released = [n for n in names if isinstance(getattr(pipe, n, None), torch.nn.Module)]
        self._place_encoders(torch.device("cpu"))
        logger.info(
            "encoders off %s while training: %s", self.device, ", ".join(self.released) or "none"
        )
        return self.released

    def _place_encoders(self, device: torch.device) -> None:
        if self.device.type == "cpu" or not self.released:
            return  # a CPU run has nowhere else to put them
        for name in self.released:
            getattr(self.model.pipe, name).to(device)
        if device.type == "cpu":
            free_memory()

    def restore_encoders(self) -> None:
        """The released encoders back on the model's device (the end of the run)."""
        self._place_encoders(self.device)
        self.released = []

    @contextmanager
    def encoders_on_device(self) -> Iterator[None]:
        """The released encoders on the device for a while (validation images)."""
        self._place_encoders(self.device)
        try:
            yield
        finally:
            self._place_encoders(torch.device("cpu"))

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
            base_precision=self.model.precision,
        )
