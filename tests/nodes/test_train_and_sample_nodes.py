"""The Train and Sample nodes against the fake host: image decodes per run, Cancel, OOM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_runs import FLUX, SAMPLE, SEED_WIDGETS, TRAIN, run

from lycoris_core import load_adapter, schema
from lycoris_core.training.synthetic import make_demo_dataset

IMAGES = 4


@pytest.fixture(scope="module")
def flux(nodes):
    return run(
        nodes, "LycorisLoadDiffusersModel", model=FLUX, dtype="auto", device="cpu", offload="none"
    )[0]


def _dataset(nodes, folder, center_crop=True):
    kw = {
        "resolution": 32,
        "center_crop": center_crop,
        "flip": False,
        "caption_dropout": 0.0,
        "trigger_word": "",
        "default_caption": "",
        "skip_bad": False,
    }
    return run(nodes, "LycorisDatasetFromFolder", folder=str(folder), **kw)[0]


@pytest.fixture
def count_decodes(monkeypatch):
    """Counts PIL.Image.open calls (every decode of an image file starts with one)."""
    opened = []
    original = Image.open

    def counting(*args, **kwargs):
        opened.append(args[0] if args else None)
        return original(*args, **kwargs)

    monkeypatch.setattr(Image, "open", counting)
    return opened


@pytest.mark.parametrize(
    ("center_crop", "steps"),
    [(True, 2), (False, 2), (False, 6)],
    ids=["center-crop-1-epoch", "random-crop-1-epoch", "random-crop-3-epochs"],
)
def test_one_train_run_decodes_each_image_at_most_once_per_epoch(
    nodes, flux, host_root, count_decodes, center_crop, steps
):
    folder = make_demo_dataset(host_root / f"decodes-{center_crop}", count=IMAGES, size=32)
    dataset = _dataset(nodes, folder, center_crop)
    config, _ = run(nodes, "LycorisConfig", model=flux, **SEED_WIDGETS)
    count_decodes.clear()
    params = {**TRAIN, "steps": steps, "batch_size": 2, "save_every": 0, "validation_prompt": ""}
    out = run(
        nodes,
        "LycorisTrain",
        model=flux,
        config=config,
        dataset=dataset,
        output_name=f"decodes_{center_crop}_{steps}",
        **params,
    )
    epochs = steps * params["batch_size"] // IMAGES
    assert json.loads(out[4])["steps"] == steps
    assert len(count_decodes) <= IMAGES * epochs, f"{len(count_decodes)} decodes of {IMAGES} images"
    if epochs > 1:  # decoded images are kept from loading: later epochs decode nothing
        assert len(count_decodes) <= IMAGES


def test_the_train_node_hands_over_the_adapter_it_trained(
    pack, nodes, flux, host_root, monkeypatch
):
    folder = make_demo_dataset(host_root / "handover", count=IMAGES, size=32)
    config, _ = run(nodes, "LycorisConfig", model=flux, **SEED_WIDGETS)

    def no_reading(path):
        raise AssertionError(f"the Train node read {path} back")

    monkeypatch.setattr(pack.nodes.train_nodes, "load_adapter", no_reading)
    params = {**TRAIN, "steps": 2, "save_every": 0, "validation_prompt": ""}
    adapter, path, _, _, summary = run(
        nodes,
        "LycorisTrain",
        model=flux,
        config=config,
        dataset=_dataset(nodes, folder),
        output_name="handover",
        **params,
    )
    assert tuple(json.loads(summary)) == schema.SUMMARY_KEYS
    monkeypatch.undo()
    from_file = load_adapter(path)
    assert adapter.path == path and adapter.metadata == from_file.metadata
    assert set(adapter.layers) == set(from_file.layers) and len(adapter.layers) == 30


def test_cancel_in_the_sample_node_is_the_hosts_interrupt(pack, nodes, flux):
    host = pack.nodes._host
    host.PLAIN_INTERRUPT = True  # Cancel pressed as the node starts
    try:
        with pytest.raises(host.interrupt_exception()):
            run(nodes, "LycorisSample", model=flux, **SAMPLE)
        assert host.PLAIN_INTERRUPT is False  # the host clears it as it raises
    finally:
        host.PLAIN_INTERRUPT = False


def test_cancel_in_the_train_node_is_the_hosts_interrupt_and_keeps_a_checkpoint(
    pack, nodes, flux, host_root
):
    host = pack.nodes._host
    folder = make_demo_dataset(host_root / "cancel", count=IMAGES, size=32)
    config, _ = run(nodes, "LycorisConfig", model=flux, **SEED_WIDGETS)
    host.EVENTS.clear()
    host.PLAIN_INTERRUPT = True
    try:
        with pytest.raises(host.interrupt_exception()):
            params = {**TRAIN, "steps": 4, "save_every": 0, "validation_prompt": ""}
            run(
                nodes,
                "LycorisTrain",
                model=flux,
                config=config,
                dataset=_dataset(nodes, folder),
                output_name="cancelled",
                **params,
            )
    finally:
        host.PLAIN_INTERRUPT = False
    ends = [d for e, d in host.EVENTS if e == schema.TRAIN_EVENT and "status" in d]
    assert [d["status"] for d in ends] == [schema.STATUS_CANCELLED]
    assert ends[0]["checkpoint"] and Path(ends[0]["checkpoint"]).is_dir()


def test_out_of_memory_reaches_the_host_as_torch_out_of_memory(pack, nodes, flux):
    def oom(module, args, kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    denoiser = flux.model.denoiser
    before = {k: v.clone() for k, v in denoiser.state_dict().items()}
    handle = denoiser.register_forward_pre_hook(oom, with_kwargs=True)
    try:
        with pytest.raises(torch.OutOfMemoryError) as err:
            run(nodes, "LycorisSample", model=flux, **SAMPLE)
    finally:
        handle.remove()
    assert isinstance(err.value, torch.cuda.OutOfMemoryError)  # ComfyUI's OOM_EXCEPTION
    assert isinstance(err.value, pack.lycoris_core.errors.LycorisError)  # ours, with advice
    message = str(err.value)
    assert "out of memory while sampling 2x32x32" in message and "offload 'model'" in message
    assert "Tried to allocate 20.00 GiB" in message
    assert all(torch.equal(v, before[k]) for k, v in denoiser.state_dict().items())


@pytest.mark.parametrize("precision", ["fp8", "nf4"])
def test_a_quantised_base_loads_trains_and_samples_through_the_nodes(nodes, host_root, precision):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is in the dev dependencies")
    load = {"model": FLUX, "dtype": "fp32", "device": "cpu", "offload": "none"}
    model = run(nodes, "LycorisLoadDiffusersModel", **load, base_precision=precision)[0]
    assert model.model.precision == precision
    folder = make_demo_dataset(host_root / f"q-{precision}", count=IMAGES, size=32)
    config, _ = run(nodes, "LycorisConfig", model=model, **SEED_WIDGETS)
    params = {**TRAIN, "steps": 3, "save_every": 0, "validation_prompt": ""}
    adapter, path, _, _, summary = run(
        nodes,
        "LycorisTrain",
        model=model,
        config=config,
        dataset=_dataset(nodes, folder),
        output_name=f"quantised_{precision}",
        **params,
    )
    assert json.loads(summary)["steps"] == 3
    assert load_adapter(path).metadata["comfyui_lycoris.base_precision"] == precision
    base = run(nodes, "LycorisSample", model=model, **SAMPLE)[0]
    on = run(nodes, "LycorisApply", model=model, adapter=adapter, strength=1.0, mode="merge")[0]
    images = run(nodes, "LycorisSample", model=on, **SAMPLE)[0]
    assert torch.isfinite(images).all() and not torch.equal(images, base)
    # an older workflow without the input loads as before
    plain = run(nodes, "LycorisLoadDiffusersModel", **load)[0]
    assert plain.model.precision == "fp32" and not plain.model.quantised
