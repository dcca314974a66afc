"""The main job: train the seed's LyCORIS config on a tiny Flux, then show what it learned.

Builds (or reuses) a tiny random FLUX.1-dev-layout pipeline and a small procedurally generated
dataset, trains the seed's ``lycoris_config.json`` (LoKr on attention and feed-forward) on it,
saves the adapter with full metadata, samples at strengths 0, 0.5 and 1 into a PNG grid, draws
the loss curve, and writes a JSON summary with the learning measures:

* the fixed-noise loss of the base model and of the trained adapter on the dataset;
* in pixel space, on the decoded samples: the mean correlation of each sample with the
  nearest training image at each strength (it rises from strength 0 to 0.5 to 1);
* the mean RMS distance of generated latents to the nearest training latent at each strength.

The tiny model's VAE is the picture VAE (:mod:`lycoris_core.picture_vae`): its latents are the
image at half size, so the decoded samples show what the denoiser draws: noise at strength 0,
discs like the training images at strength 1.
"""

from __future__ import annotations

import itertools
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .adapters import Adapter, load_adapter
from .config import SEED_EXAMPLE, LycorisConfig
from .io import atomic_write
from .models import load_model, save_merged
from .plots import grid_image, loss_curve_image
from .report import describe, format_report
from .sampling import sample
from .targeting import coverage
from .tiny import make_tiny
from .training.dataset import DatasetSpec, TrainingData
from .training.evaluate import (
    dataset_images,
    dataset_latents,
    fixed_loss,
    nearest_image_correlation,
    nearest_latent_distance,
)
from .training.loop import TrainResult, TrainSpec, TrainStepInfo, train
from .training.objectives import Objective, ObjectiveOptions
from .training.synthetic import CAPTION, make_demo_dataset, make_shapes_dataset

STRENGTHS = (0.0, 0.5, 1.0)
DEMO_STEPS = 900
DEMO_LR = 1e-2  # the seed LoKr on the disc images
RESOLUTION = 32
SAMPLE_STEPS = 20
SAMPLES = 4
BASE_STEPS = 500  # the full fine-tune that teaches the random base shapes (demo_base)
BASE_IMAGES = 128
BASE_CONFIG: dict[str, Any] = {  # every Linear of the transformer, fully trainable
    "algo": "full",
    "multiplier": 1.0,
    "linear_dim": 1,
    "linear_alpha": 1,
    "apply_preset": {"target_module": ["FluxTransformer2DModel"]},
}
TILE = 128  # pixels per image in samples_grid.png
TOKENS = 32  # T5 prompt tokens (Flux pads to 512: 4x the step time for a 6-token caption)


def demo_base(
    out: Path,
    seed: int = 0,
    steps: int = BASE_STEPS,
    on_step: Callable[[TrainStepInfo], None] | None = None,
) -> Path:
    """The demo's base model, ``out/tiny-flux``: a tiny random Flux taught shapes first.

    A random denoiser cannot denoise, and an adapter alone cannot teach it to in a few hundred
    steps; a real base model already draws images and the adapter teaches it a new motif. So
    the demo first fine-tunes every layer of the random tiny Flux (LyCORIS ``full``, through
    the same training engine) on random squares over random gradients (never a disc), and
    bakes the result in with ``save_merged``. Built once; later runs reuse the folder.
    """
    base_dir = out / "tiny-flux"
    if (base_dir / "model_index.json").is_file():
        return base_dir
    random_dir = out / "tiny-flux-random"
    if not (random_dir / "model_index.json").is_file():
        make_tiny("flux", random_dir, seed=seed)
    model = load_model(random_dir)
    shapes = make_shapes_dataset(out / "shapes", count=BASE_IMAGES, size=RESOLUTION, seed=seed)
    result = train(
        TrainSpec(
            base=model,
            config=LycorisConfig.from_dict(BASE_CONFIG, source="demo base config"),
            dataset=DatasetSpec(
                folder=str(shapes), resolution=RESOLUTION, bucket_step=model.size_multiple
            ),
            output=str(out / "tiny-flux-shapes.safetensors"),
            steps=steps,
            batch_size=8,
            lr=2e-3,
            scheduler="cosine",
            warmup_steps=min(20, steps // 10),
            seed=seed,
            objective=ObjectiveOptions(max_sequence_length=TOKENS),
        ),
        on_step=on_step,
    )
    adapter = result.adapter or load_adapter(out / "tiny-flux-shapes.safetensors")
    save_merged(model, [(adapter, 1.0)], base_dir)
    return base_dir


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _save_png(path: Path, image: Any) -> None:
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


@dataclass
class _Samples:
    """The demo's samples at each strength and how near they are to the training set."""

    rows: list[torch.Tensor]  # images [B, H, W, C] per strength
    distances: dict[float, float]  # latent, per strength
    correlations: dict[float, float]  # pixel, per strength
    dynamic: torch.Tensor  # strength 1 in dynamic mode (merged: rows[-1])


def _train_adapter(
    model: Any,
    config: LycorisConfig,
    dataset: DatasetSpec,
    adapter_path: Path,
    steps: int,
    seed: int,
    on_step: Callable[[TrainStepInfo], None] | None,
) -> TrainResult:
    """Train the seed config on the disc dataset into `adapter_path` (a previous demo's
    checkpoint and validation folders are removed first)."""
    for old in adapter_path.parent.glob(f"{adapter_path.stem}-*"):
        if old.is_dir():
            shutil.rmtree(old)
    spec = TrainSpec(
        base=model,
        config=config,
        dataset=dataset,
        output=str(adapter_path),
        steps=steps,
        batch_size=4,
        lr=DEMO_LR,
        scheduler="cosine",
        warmup_steps=min(20, steps // 10),
        save_every=max(1, steps // 2),
        validation_prompts=[CAPTION],
        validation_every=max(1, steps // 3),
        validation_steps=SAMPLE_STEPS,
        seed=seed,
        objective=ObjectiveOptions(max_sequence_length=TOKENS),
    )
    return train(spec, on_step=on_step)


def _sample_strengths(
    model: Any, adapter: Adapter, train_latents: torch.Tensor, train_images: torch.Tensor
) -> _Samples:
    """Sample at each of STRENGTHS (merged) and at 1 (dynamic), measuring each strength's
    distance (latents) and correlation (pixels) to the nearest training example."""
    args = {
        "prompt": CAPTION,
        "steps": SAMPLE_STEPS,
        "seed": 100,
        "batch_size": SAMPLES,
        "width": RESOLUTION,
        "max_sequence_length": TOKENS,
        "height": RESOLUTION,
    }
    rows, distances, correlations = [], {}, {}
    for s in STRENGTHS:
        rows.append(sample(model, [(adapter, s)], **args))
        latents = sample(model, [(adapter, s)], output="latent", **args)
        distances[s] = nearest_latent_distance(latents, train_latents)
        correlations[s] = nearest_image_correlation(rows[-1], train_images)
    dynamic = sample(model, [(adapter, 1.0)], mode="dynamic", **args)
    return _Samples(rows, distances, correlations, dynamic)


def _summary(
    out: Path,
    base_dir: Path,
    config: LycorisConfig,
    model: Any,
    result: TrainResult,
    losses: tuple[float, float],
    found: _Samples,
    started: float,
) -> dict[str, Any]:
    """What demo_summary.json holds; `losses`: base, trained; `started`: the demo's start
    (``time.perf_counter()``)."""
    loss_base, loss_trained = losses
    c = found.correlations
    rising = all(c[a] < c[b] for a, b in itertools.pairwise(STRENGTHS))
    return {
        "base": str(base_dir),
        "adapter": str(out / "demo_lokr.safetensors"),
        "config": config.to_dict(),
        "coverage": coverage(model.denoiser, config).summary(),
        "steps": result.steps_done,
        "train_seconds": round(result.seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "loss_first_10": sum(result.losses[:10]) / min(10, len(result.losses)),
        "loss_last_10": sum(result.losses[-10:]) / min(10, len(result.losses)),
        "fixed_loss": {"base": loss_base, "trained": loss_trained},
        "pixel_correlation_to_training_set": {str(s): v for s, v in c.items()},
        "latent_distance_to_training_set": {str(s): d for s, d in found.distances.items()},
        "learned": rising and loss_trained < loss_base,
        "merged_vs_dynamic_max_abs": (found.rows[-1] - found.dynamic).abs().max().item(),
        "checkpoints": result.checkpoints,
        "validation_steps": [s for s, _ in result.validation],
        "files": {
            "samples_grid": str(out / "samples_grid.png"),
            "loss_curve": str(out / "loss_curve.png"),
            "inspect": str(out / "demo_lokr.inspect.txt"),
        },
    }


def _summary_text(summary: dict[str, Any], result: TrainResult, out: Path) -> str:
    """The lines ``python -m lycoris_core demo`` prints."""
    c, d = summary["pixel_correlation_to_training_set"], summary["latent_distance_to_training_set"]
    loss = summary["fixed_loss"]
    lines = [
        f"tiny Flux: {summary['base']}",
        f"seed config: {summary['coverage']}",
        f"trained {result.steps_done} steps in {result.seconds:.0f} s -> {summary['adapter']}",
        f"loss (first 10 -> last 10 steps): {summary['loss_first_10']:.4f} -> "
        f"{summary['loss_last_10']:.4f}",
        f"fixed-noise loss on the dataset: base {loss['base']:.4f}, trained {loss['trained']:.4f}",
        "samples vs the nearest training image, mean pixel correlation (1 = same picture): "
        + ", ".join(f"strength {s}: {v:.3f}" for s, v in c.items()),
        "mean latent distance of samples to the nearest training latent: "
        + ", ".join(f"strength {s}: {v:.4f}" for s, v in d.items()),
        f"learned: {summary['learned']}",
        f"samples (rows: training images, then strength {', '.join(str(s) for s in STRENGTHS)}): "
        f"{summary['files']['samples_grid']}",
        f"loss curve: {summary['files']['loss_curve']}",
        f"summary: {out / 'demo_summary.json'}",
    ]
    return "\n".join(lines)


def run_demo(
    out: Path,
    seed: int = 0,
    steps: int = DEMO_STEPS,
    on_step: Callable[[TrainStepInfo], None] | None = None,
    base_steps: int = BASE_STEPS,
) -> str:
    """Run the demo into folder `out`; returns a text summary (also written to out/).

    The base (``out/tiny-flux``) is built on the first run (:func:`demo_base`) and reused.
    """
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    base_dir = demo_base(out, seed=seed, steps=base_steps, on_step=on_step)
    model = load_model(base_dir)
    config = LycorisConfig.from_dict(SEED_EXAMPLE, source="seed lycoris_config.json")
    _write_text(out / "lycoris_config.json", config.to_json() + "\n")
    data_dir = make_demo_dataset(out / "dataset", count=8, size=RESOLUTION, seed=seed)
    dataset = DatasetSpec(
        folder=str(data_dir), resolution=RESOLUTION, bucket_step=model.size_multiple
    )
    adapter_path = out / "demo_lokr.safetensors"
    result = _train_adapter(model, config, dataset, adapter_path, steps, seed, on_step)

    adapter = load_adapter(adapter_path)
    info = describe(adapter, model.denoiser)
    _write_text(out / "demo_lokr.inspect.txt", format_report(info) + "\n")
    data = TrainingData(dataset)
    options = ObjectiveOptions(max_sequence_length=TOKENS)
    loss_base = fixed_loss(model, data, options=options)
    loss_trained = fixed_loss(model, data, [(adapter, 1.0)], options=options)
    objective = Objective(model.pipe, model.family, options)
    train_latents = torch.stack(dataset_latents(objective, data))
    train_images = dataset_images(data)
    found = _sample_strengths(model, adapter, train_latents, train_images)
    model.restore_base()
    labels = ["training images", *(f"strength {s:g}" for s in STRENGTHS)]
    grid = grid_image([train_images[:SAMPLES], *found.rows], labels=labels, tile=TILE)
    _save_png(out / "samples_grid.png", grid)
    _save_png(out / "loss_curve.png", loss_curve_image(result.losses))

    losses = (loss_base, loss_trained)
    summary = _summary(out, base_dir, config, model, result, losses, found, started)
    _write_text(out / "demo_summary.json", json.dumps(summary, indent=2) + "\n")
    return _summary_text(summary, result, out)
