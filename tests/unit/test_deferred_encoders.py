"""Text encoders deferred at load time: a training run whose embeddings are all in its
cache_dir never loads them; anything that encodes text loads them first."""

from __future__ import annotations

import logging

import torch

from lycoris_core import LycorisConfig
from lycoris_core.config import SEED_EXAMPLE
from lycoris_core.deferred import pending
from lycoris_core.models import load_model
from lycoris_core.sampling import sample
from lycoris_core.tiny import make_tiny
from lycoris_core.training.dataset import DatasetSpec
from lycoris_core.training.loop import TrainSpec, train
from lycoris_core.training.synthetic import make_demo_dataset

ARGS = {"prompt": "a disc", "steps": 2, "width": 32, "height": 32, "seed": 4}


def test_deferred_text_encoders_load_when_a_prompt_is_encoded(tmp_path):
    folder = make_tiny("flux", tmp_path / "flux")
    eager = load_model(folder, device="cpu", dtype="fp32")
    lazy = load_model(folder, device="cpu", dtype="fp32", defer_text_encoders=True)
    assert lazy.pipe.text_encoder is None and lazy.pipe.text_encoder_2 is None
    assert set(pending(lazy.pipe)) == {"text_encoder", "text_encoder_2"}
    images = sample(lazy, [], **ARGS)
    assert not pending(lazy.pipe) and lazy.pipe.text_encoder_2 is not None
    assert torch.allclose(images, sample(eager, [], **ARGS), atol=1e-5)


def _run(folder, data, cache, out):
    config = LycorisConfig.from_dict(
        {"multiplier": 1.0, "apply_preset": {"target_module": ["Attention"]}, **SEED_EXAMPLE}
    )
    ds = DatasetSpec(folder=str(data), resolution=32, bucket_step=16, cache_dir=str(cache))
    spec = TrainSpec(base=str(folder), config=config, dataset=ds, output=str(out), steps=4)
    return train(spec)


def test_a_second_cached_run_never_loads_the_text_encoders(tmp_path, caplog):
    folder = make_tiny("flux", tmp_path / "flux")
    data = make_demo_dataset(tmp_path / "data", count=2, size=32)
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="lycoris_core.deferred"):
        first = _run(folder, data, cache, tmp_path / "a.safetensors")
    loaded = [r.getMessage() for r in caplog.records if "deferred component" in r.getMessage()]
    assert len(loaded) == 2  # the first run encodes the captions: both encoders come in
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lycoris_core.deferred"):
        second = _run(folder, data, cache, tmp_path / "b.safetensors")
    assert not [r for r in caplog.records if "deferred component" in r.getMessage()]
    assert second.completed and first.completed
    # the same features (written, then read back) through the same loop
    assert torch.allclose(torch.tensor(second.losses), torch.tensor(first.losses), atol=1e-6)
