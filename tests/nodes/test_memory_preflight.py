"""The Train and Sample nodes show the memory estimate in their status line and refuse a run
that clearly does not fit (the fake host's free-memory figure, _host.PLAIN_FREE_MEMORY)."""

from __future__ import annotations

import pytest
import torch
from test_runs import FLUX, SAMPLE, SEED_WIDGETS, TRAIN, run

from lycoris_core.training.synthetic import make_demo_dataset


@pytest.fixture(scope="module")
def setup(nodes, host_root):
    flux = run(
        nodes, "LycorisLoadDiffusersModel", model=FLUX, dtype="auto", device="cpu", offload="none"
    )[0]
    folder = make_demo_dataset(host_root / "data-memory", count=2, size=32)
    kw = {"resolution": 32, "center_crop": True, "flip": False, "caption_dropout": 0.0}
    kw |= {"trigger_word": "", "default_caption": "", "skip_bad": False}
    dataset = run(nodes, "LycorisDatasetFromFolder", folder=str(folder), **kw)[0]
    config, _ = run(nodes, "LycorisConfig", model=flux, **SEED_WIDGETS)
    return flux, dataset, config


@pytest.fixture
def free_memory(pack):
    host = pack.nodes._host
    yield host
    host.PLAIN_FREE_MEMORY = None


def _refusal(pack):
    """The pack's own MemoryPreflightError (the pack loads under its own package name)."""
    return pack.lycoris_core.memory.MemoryPreflightError


def _texts(host, node):
    return [e[1]["text"] for e in host.EVENTS if e[0] == "text" and e[1]["node"] == node]


def test_train_node_refuses_a_run_that_clearly_does_not_fit(
    pack, nodes, setup, free_memory, host_root
):
    flux, dataset, config = setup
    free_memory.EVENTS.clear()
    free_memory.PLAIN_FREE_MEMORY = 1000  # bytes
    params = TRAIN | {"steps": 2, "validation_prompt": "", "save_every": 0}
    with pytest.raises(_refusal(pack), match=r"refused above 1\.5x"):
        run(nodes, "LycorisTrain", model=flux, config=config, dataset=dataset,
            output_name="too_big", unique_id="m1", **params)  # fmt: skip
    assert not (host_root / "models" / "loras" / "lycoris" / "too_big.safetensors").exists()
    assert any("refuse" in t or "needs about" in t for t in _texts(free_memory, "m1"))
    # plenty free: it starts, and the status line showed the estimate before the first step
    free_memory.PLAIN_FREE_MEMORY = 2**40
    free_memory.EVENTS.clear()
    out = run(nodes, "LycorisTrain", model=flux, config=config, dataset=dataset,
              output_name="fits", unique_id="m2", **params)  # fmt: skip
    assert out[1].endswith("fits.safetensors")
    texts = _texts(free_memory, "m2")
    assert texts[0].startswith("memory estimate") and texts[0].endswith(": fits")


def test_sample_node_shows_the_estimate_and_refuses_when_clearly_too_big(
    pack, nodes, setup, free_memory
):
    flux = setup[0]
    free_memory.EVENTS.clear()
    free_memory.PLAIN_FREE_MEMORY = 1000
    with pytest.raises(_refusal(pack)):
        run(nodes, "LycorisSample", model=flux, **SAMPLE, unique_id="s1")
    free_memory.PLAIN_FREE_MEMORY = None  # measured: this machine has room for the tiny model
    images = run(nodes, "LycorisSample", model=flux, **SAMPLE, unique_id="s2")[0]
    assert isinstance(images, torch.Tensor) and images.shape[0] == SAMPLE["batch_size"]
    assert _texts(free_memory, "s2")[0].startswith("memory estimate")
