"""Training on CUDA: bf16 autocast, fp16 with GradScaler, gradient checkpointing, memory."""

from __future__ import annotations

import time

import pytest
import torch

from lycoris_core import LycorisConfig, load_adapter
from lycoris_core.config import SEED_EXAMPLE
from lycoris_core.device import free_memory
from lycoris_core.models import load_model
from lycoris_core.tiny import make_tiny
from lycoris_core.training.dataset import DatasetSpec, TrainingData
from lycoris_core.training.evaluate import fixed_loss
from lycoris_core.training.loop import TrainSpec, train
from lycoris_core.training.synthetic import make_demo_dataset

FIGURES: dict = {}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-train")
    return make_tiny("flux", root / "flux"), make_demo_dataset(root / "data", count=4, size=32)


@pytest.mark.parametrize(
    ("precision", "checkpointing"), [("bf16", False), ("fp16", False), ("bf16", True)]
)
def test_mixed_precision_training_learns(setup, tmp_path, precision, checkpointing):
    folder, data = setup
    model = load_model(folder, device="cuda", dtype="fp32")
    ds = DatasetSpec(folder=str(data), resolution=32, bucket_step=model.size_multiple)
    out = tmp_path / "a.safetensors"
    t0 = time.perf_counter()
    result = train(
        TrainSpec(
            base=model,
            config=LycorisConfig.from_dict(SEED_EXAMPLE),
            dataset=ds,
            output=str(out),
            steps=30,
            lr=3e-3,
            mixed_precision=precision,
            gradient_checkpointing=checkpointing,
        )
    )
    seconds = time.perf_counter() - t0
    assert result.completed and all(torch.isfinite(torch.tensor(result.losses)))
    td = TrainingData(ds)
    assert fixed_loss(model, td, [(load_adapter(out), 1.0)]) < fixed_loss(model, td)
    FIGURES[f"train_{precision}_ckpt{int(checkpointing)}"] = {
        "seconds": seconds,
        "peak_bytes": torch.cuda.max_memory_allocated(),
    }


def test_memory_is_released_after_training(setup, tmp_path):
    folder, data = setup
    model = load_model(folder, device="cuda", dtype="fp32")
    free_memory()
    level = torch.cuda.memory_allocated()
    ds = DatasetSpec(folder=str(data), resolution=32, bucket_step=model.size_multiple)
    train(
        TrainSpec(
            base=model,
            config=LycorisConfig.from_dict(SEED_EXAMPLE),
            dataset=ds,
            output=str(tmp_path / "a.safetensors"),
            steps=5,
            mixed_precision="bf16",
        )
    )
    free_memory()
    # lower is fine (a failed test's traceback released late); higher is a leak
    assert torch.cuda.memory_allocated() <= level


def teardown_module(module):
    from gpu_figures import write_figures

    write_figures("gpu_training", FIGURES)
