"""Every node's run, on the built-in tiny demo models, against the fake host (plain folders)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lycoris_core.adapters import load_adapter
from lycoris_core.config import SEED_EXAMPLE
from lycoris_core.io import read_safetensors
from lycoris_core.training.synthetic import make_demo_dataset

FLUX = "demo: tiny-flux"
SAMPLE = {
    "prompt": "a sks disc",
    "negative_prompt": "",
    "width": 32,
    "height": 32,
    "steps": 2,
    "guidance": 3.5,
    "seed": 5,
    "batch_size": 2,
}
TRAIN = {
    "steps": 6,
    "learning_rate": 3e-3,
    "batch_size": 2,
    "optimizer": "adamw",
    "scheduler": "constant",
    "precision": "no",
    "gradient_checkpointing": False,
    "save_every": 3,
    "validation_prompt": "a sks disc",
    "validation_every": 3,
    "validation_lycoris_strength": 1.0,
    "seed": 0,
    "resume": False,
}
SEED_WIDGETS = {
    "algo": "lokr",
    "multiplier": 1.0,
    "linear_dim": 10000,
    "linear_alpha": 1.0,
    "factor": 10,
    "target_modules": "Attention, FeedForward",
    "module_algo_map": json.dumps(SEED_EXAMPLE["apply_preset"]["module_algo_map"]),
    "extra": "{}",
}


def run(nodes, key, **inputs):
    """Call a node the way ComfyUI does: inside torch.inference_mode()."""
    cls = nodes[key]
    with torch.inference_mode():
        out = getattr(cls(), cls.FUNCTION)(**inputs)
    return out["result"] if isinstance(out, dict) else out


@pytest.fixture(scope="module")
def flux(nodes):
    return run(
        nodes, "LycorisLoadDiffusersModel", model=FLUX, dtype="auto", device="cpu", offload="none"
    )[0]


@pytest.fixture(scope="module")
def dataset(nodes, host_root):
    folder = make_demo_dataset(host_root / "data", count=4, size=32)
    kw = {
        "resolution": 32,
        "center_crop": True,
        "flip": False,
        "caption_dropout": 0.0,
        "trigger_word": "",
        "default_caption": "",
        "skip_bad": False,
    }
    return run(nodes, "LycorisDatasetFromFolder", folder=str(folder), **kw)[0]


@pytest.fixture(scope="module")
def trained(pack, nodes, flux, dataset, host_root):
    events = pack.nodes._host.EVENTS
    events.clear()
    config, coverage = run(nodes, "LycorisConfig", model=flux, **SEED_WIDGETS)
    assert "30 layers wrapped" in coverage and "as FluxAttention" in coverage
    outputs = run(
        nodes,
        "LycorisTrain",
        model=flux,
        config=config,
        dataset=dataset,
        output_name="node_run",
        unique_id="7",
        **TRAIN,
    )
    return config, outputs, list(events)


def test_model_choices_list_demos_and_folders(nodes, host_root):
    (host_root / "models" / "diffusers" / "mine").mkdir(parents=True)
    (host_root / "models" / "diffusers" / "mine" / "model_index.json").write_text("{}")
    choices = nodes["LycorisLoadDiffusersModel"].INPUT_TYPES()["required"]["model"][0]
    assert "mine" in choices and FLUX in choices and "demo: tiny-sd15" in choices


def test_train_node_writes_file_events_and_outputs(trained, host_root):
    _, (adapter, path, curve, validation, summary), events = trained
    assert Path(path) == host_root / "models" / "loras" / "lycoris" / "node_run.safetensors"
    assert Path(path).is_file() and len(adapter.layers) == 30
    s = json.loads(summary)
    assert s["steps"] == 6 and s["completed"] and len(s["losses"]) == 6
    assert curve.shape[0] == 1 and curve.shape[-1] == 3 and validation.shape == (1, 32, 32, 3)
    steps = [d["step"] for e, d in events if e == "lycoris.train" and "loss" in d]
    assert steps == [1, 2, 3, 4, 5, 6] and all(d["node"] == "7" for e, d in events if e != "text")
    assert any(e == "text" and "loss" in d["text"] for e, d in events)
    assert any(e == "lycoris.train" and d.get("status") == "done" for e, d in events)
    previews = [d for e, d in events if e == "lycoris.train" and "validation" in d]
    assert [d["step"] for d in previews] == [3, 6]
    ref = previews[-1]["validation"][0]
    assert (host_root / "temp" / ref["subfolder"] / ref["filename"]).is_file()


def test_same_inputs_reuse_the_finished_run(nodes, flux, dataset, trained):
    config, (_, path, *_), _ = trained
    before = Path(path).stat().st_mtime_ns
    again = run(
        nodes,
        "LycorisTrain",
        model=flux,
        config=config,
        dataset=dataset,
        output_name="node_run",
        **TRAIN,
    )
    assert json.loads(again[4])["reused"] is True and Path(path).stat().st_mtime_ns == before


def test_load_apply_sample_inspect_save(nodes, flux, trained, host_root):
    base = run(nodes, "LycorisSample", model=flux, **SAMPLE)[0]
    assert base.shape == (2, 32, 32, 3)
    adapter = run(nodes, "LycorisLoad", lycoris_name="lycoris/node_run.safetensors")[0]
    zero = run(nodes, "LycorisApply", model=flux, adapter=adapter, strength=0.0, mode="merge")[0]
    assert torch.equal(run(nodes, "LycorisSample", model=zero, **SAMPLE)[0], base)
    on = run(nodes, "LycorisApply", model=flux, adapter=adapter, strength=1.0, mode="dynamic")[0]
    assert flux.adapters == () and len(on.adapters) == 1  # handles are immutable
    images = run(nodes, "LycorisSample", model=on, **SAMPLE)[0]
    assert (images - base).abs().max() > 1e-4
    report = run(nodes, "LycorisInspect", adapter=adapter, model=flux)[0]
    assert "30 matched, 0 unmatched" in report
    saved = run(nodes, "LycorisSave", adapter=adapter, file_name="copy")[0]
    source = host_root / "models" / "loras" / "lycoris" / "node_run.safetensors"
    (got, got_meta), (want, want_meta) = read_safetensors(saved), read_safetensors(source)
    assert got_meta == want_meta and got.keys() == want.keys()  # the default layout: the trainer's
    assert all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)  # file
    kohya = run(nodes, "LycorisSave", adapter=adapter, file_name="k", layout="kohya", model=flux)
    keys = set(load_adapter(kohya[0]).layers)
    # the seed's LoKr: BFL names where a module is one BFL weight, split names inside qkv
    assert {
        "lora_unet_double_blocks_0_img_attn_proj",
        "lycoris_transformer_blocks_0_attn_to_q",
    } <= keys
    assert not any(k.endswith("_qkv") for k in keys), sorted(keys)
    assert len(keys) == len(adapter.layers)
    merged = run(nodes, "LycorisSaveMergedModel", model=on, folder_name="baked")[0]
    assert (Path(merged) / "model_index.json").is_file()
    baked = run(
        nodes,
        "LycorisLoadDiffusersModel",
        model="baked",
        dtype="auto",
        device="cpu",
        offload="none",
    )[0]
    assert (run(nodes, "LycorisSample", model=baked, **SAMPLE)[0] - images).abs().max() < 1e-4


def test_config_file_loss_plot_and_image_dataset(nodes, flux, trained, host_root):
    folder = host_root / "models" / "lycoris_configs"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "seed.json").write_text(json.dumps(SEED_EXAMPLE))
    config, coverage = run(nodes, "LycorisLoadConfig", config_file="seed.json", path="", model=flux)
    assert config == trained[0] and "30 layers wrapped" in coverage
    plot = run(nodes, "LycorisLossPlot", summary=trained[1][4], width=320, height=200)[0]
    assert plot.shape == (1, 200, 320, 3)
    images = torch.rand(2, 40, 40, 3)
    ds = run(
        nodes,
        "LycorisDatasetFromImages",
        images=images,
        captions="a\nb",
        resolution=32,
        center_crop=True,
        flip=False,
        caption_dropout=0.0,
        trigger_word="sks",
    )[0]
    assert list(ds.captions) == ["a", "b"] and ds.trigger_word == "sks"


def test_cheap_checks_fail_before_anything_loads(nodes, host_root):
    train = nodes["LycorisTrain"]
    for bad in ("../escape", "a/b", "", "x" * 200):
        assert "plain name" in train.VALIDATE_INPUTS(output_name=bad)
    assert train.VALIDATE_INPUTS(output_name="ok_name") is True
    msg = nodes["LycorisConfig"].VALIDATE_INPUTS(
        **{**SEED_WIDGETS, "extra": '{"unbalanced_factor": true}'}
    )
    assert "Did you mean 'unbalanced_factorization'" in msg
    msg = nodes["LycorisConfig"].VALIDATE_INPUTS(**{**SEED_WIDGETS, "module_algo_map": "{oops"})
    assert "module_algo_map' is not valid JSON" in msg
    assert "does not exist" in nodes["LycorisDatasetFromFolder"].VALIDATE_INPUTS(
        folder=str(host_root / "nope")
    )
    assert "not in the loras folder" in nodes["LycorisLoad"].VALIDATE_INPUTS(
        lycoris_name="missing.safetensors"
    )
    assert "plain name" in nodes["LycorisSaveMergedModel"].VALIDATE_INPUTS(folder_name="../../x")


def test_sample_node_sends_step_previews_when_enabled(pack, nodes, flux):
    host = pack.nodes._host
    host.EVENTS.clear()
    args = {**SAMPLE, "unique_id": "12"}
    off = run(nodes, "LycorisSample", model=flux, **args)[0]
    progress = [d for e, d in host.EVENTS if e == "progress"]
    assert [d["step"] for d in progress] == list(range(1, SAMPLE["steps"] + 1))
    assert all(d["preview"] is None and d["node"] == "12" for d in progress)  # the default
    host.EVENTS.clear()
    host.PLAIN_PREVIEW_SIZE = 256  # as ComfyUI's --preview-method latent2rgb --preview-size 256
    try:
        on = run(nodes, "LycorisSample", model=flux, **args)[0]
    finally:
        host.PLAIN_PREVIEW_SIZE = None
    previews = [d["preview"] for e, d in host.EVENTS if e == "progress"]
    assert len(previews) == SAMPLE["steps"]
    assert all(p[0] == "JPEG" and p[2] == 256 and p[1].mode == "RGB" for p in previews)
    f = flux.model.vae_scale_factor
    assert previews[-1][1].size == (SAMPLE["width"] // f, SAMPLE["height"] // f)
    assert torch.equal(on, off)  # previews do not touch the images


def test_a_failing_preview_never_stops_sampling(pack, nodes, flux, monkeypatch, caplog):
    host = pack.nodes._host

    def broken(model, latents):
        raise RuntimeError("this VAE cannot encode")

    monkeypatch.setattr(pack.nodes.model_nodes, "step_preview", broken)
    monkeypatch.setattr(host, "PLAIN_PREVIEW_SIZE", 256)
    host.EVENTS.clear()
    images = run(nodes, "LycorisSample", model=flux, **SAMPLE)[0]
    assert images.shape == (2, 32, 32, 3)
    progress = [d for e, d in host.EVENTS if e == "progress"]
    assert len(progress) == SAMPLE["steps"] and all(d["preview"] is None for d in progress)
    assert "step previews off for this run: this VAE cannot encode" in caplog.text
