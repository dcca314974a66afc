"""Training on tiny models: learning, resume, cancel, NaN safety, files, metadata."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reference import same_state, state
from safetensors import safe_open

from lycoris_core import LycorisConfig, load_adapter
from lycoris_core.config import SEED_EXAMPLE
from lycoris_core.models import load_model
from lycoris_core.tiny import FAMILIES, make_tiny
from lycoris_core.training.checkpoint import list_checkpoints, load_state, resolve_resume
from lycoris_core.training.dataset import DatasetSpec, TrainingData
from lycoris_core.training.evaluate import fixed_loss
from lycoris_core.training.loop import TrainingAborted, TrainSpec, train
from lycoris_core.training.synthetic import make_demo_dataset

ROOT = Path(__file__).resolve().parents[2]
ATTN_FF = {"target_module": ["Attention", "FeedForward"]}
ALGOS = {
    "lokr full": SEED_EXAMPLE,
    "lokr low-rank": {"algo": "lokr", "linear_dim": 2, "linear_alpha": 2, "factor": 4},
    "lora": {"algo": "lora", "linear_dim": 4, "linear_alpha": 4},
    "loha": {"algo": "loha", "linear_dim": 4, "linear_alpha": 4},
    "diag-oft": {"algo": "diag-oft", "linear_dim": 8, "linear_alpha": 1},
    "full": {"algo": "full", "linear_dim": 4, "linear_alpha": 1},
}


def config(name: str) -> LycorisConfig:
    d = {"multiplier": 1.0, "apply_preset": ATTN_FF, **ALGOS[name]}
    return LycorisConfig.from_dict(d)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data = make_demo_dataset(root / "data", count=4, size=32)
    models = {f: load_model(make_tiny(f, root / f), device="cpu") for f in FAMILIES}
    return root, data, models


def spec_for(model, data, out, **kw) -> TrainSpec:
    ds = DatasetSpec(folder=str(data), resolution=32, bucket_step=model.size_multiple)
    args = {"config": config("lokr full"), "steps": 20, "lr": 1e-3, **kw}
    return TrainSpec(base=model, dataset=ds, output=str(out), **args)


def learned(model, data, path) -> tuple[float, float]:
    td = TrainingData(DatasetSpec(folder=str(data), resolution=32, bucket_step=model.size_multiple))
    return fixed_loss(model, td), fixed_loss(model, td, [(load_adapter(path), 1.0)])


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_learns_and_leaves_the_base_unchanged(tiny, family, tmp_path):
    _, data, models = tiny
    model = models[family]
    before = state(model.denoiser)
    out = tmp_path / "a.safetensors"
    seen = []
    result = train(spec_for(model, data, out, lr=3e-3), on_step=seen.append)
    assert result.completed and result.steps_done == 20 and out.is_file()
    assert [i.step for i in seen] == list(range(1, 21)) and all(i.total == 20 for i in seen)
    assert all(torch.isfinite(torch.tensor(i.loss)) and i.lr > 0 for i in seen)
    assert same_state(model.denoiser, before)  # the network was removed again
    assert not any(hasattr(m, "_lycoris_wrappers") for m in model.denoiser.modules())
    base_loss, trained_loss = learned(model, data, out)
    assert trained_loss < base_loss, (base_loss, trained_loss)


@pytest.mark.parametrize("algo", [a for a in ALGOS if a != "lokr full"])
def test_each_algorithm_learns(tiny, algo, tmp_path):
    _, data, models = tiny
    model = models["flux"]
    out = tmp_path / "a.safetensors"
    train(spec_for(model, data, out, config=config(algo)))
    base_loss, trained_loss = learned(model, data, out)
    assert trained_loss < base_loss, (base_loss, trained_loss)


def test_resume_reproduces_the_uninterrupted_run_bitwise(tiny, tmp_path):
    _, data, models = tiny
    model = models["sd15"]
    kw = {"steps": 20, "scheduler": "cosine", "warmup_steps": 3, "batch_size": 2}
    full = train(spec_for(model, data, tmp_path / "full.safetensors", **kw))
    seen: list[int] = []
    part = train(
        spec_for(model, data, tmp_path / "part.safetensors", **kw),
        on_step=lambda info: seen.append(info.step),
        should_stop=lambda: len(seen) >= 10,
    )
    assert not part.completed and part.steps_done == 10 and part.stopped_reason == "cancelled"
    resumed = train(
        spec_for(
            model,
            data,
            tmp_path / "part.safetensors",
            resume=str(tmp_path / "part.safetensors"),
            **kw,
        )
    )
    assert resumed.completed and resumed.losses == full.losses  # float-equal, step by step
    a = load_adapter(tmp_path / "full.safetensors")
    b = load_adapter(tmp_path / "part.safetensors")
    for name, layer in a.layers.items():
        for key, tensor in layer.tensors.items():
            assert torch.equal(tensor, b.layers[name].tensors[key]), (name, key)


def test_cancel_saves_a_resumable_checkpoint(tiny, tmp_path):
    _, data, models = tiny
    model = models["flux"]
    out = tmp_path / "run.safetensors"
    steps_seen = []
    result = train(
        spec_for(model, data, out, steps=10),
        on_step=lambda i: steps_seen.append(i.step),
        should_stop=lambda: len(steps_seen) >= 4,
    )
    assert not result.completed and result.steps_done == 4 and not out.exists()
    ckpt = resolve_resume(out)
    assert ckpt.step == 4 and Path(result.adapter_path) == ckpt.adapter
    assert load_state(ckpt)["kind"] == "cancelled"
    assert load_adapter(ckpt.adapter).layers
    finished = train(spec_for(model, data, out, steps=10, resume=str(out)))
    assert finished.completed and finished.steps_done == 10 and len(finished.losses) == 10


class HostInterrupt(Exception):
    """What ComfyUI's ProgressBar raises on Cancel."""


def test_interrupt_from_on_step_saves_first_then_propagates(tiny, tmp_path):
    _, data, models = tiny
    model = models["sd3"]
    before = state(model.denoiser)
    out = tmp_path / "run.safetensors"

    def on_step(info):
        if info.step == 3:
            raise HostInterrupt("interrupted by the user")

    with pytest.raises(HostInterrupt):
        train(spec_for(model, data, out), on_step=on_step)
    ckpt = resolve_resume(out)
    assert ckpt.step == 3 and load_state(ckpt)["kind"] == "interrupted"
    assert same_state(model.denoiser, before)


def test_non_finite_loss_aborts_at_that_step_and_keeps_the_previous_checkpoint(tiny, tmp_path):
    _, data, models = tiny
    model = models["sd15"]
    calls = {"n": 0}

    def poison(module, args, output):  # fault injection in the model, not in the loop
        calls["n"] += 1
        if calls["n"] == 5:
            return (output[0] * float("nan"),)
        return output

    handle = model.denoiser.register_forward_hook(poison)
    out = tmp_path / "nan.safetensors"
    try:
        with pytest.raises(TrainingAborted) as err:
            train(spec_for(model, data, out, save_every=1, steps=10))
    finally:
        handle.remove()
    msg = str(err.value)
    assert "non-finite loss" in msg and "at step 5" in msg and "step-000004" in msg
    assert "FeedForward" in msg and "Attention" in msg  # the seed's advice: FF is targeted
    saved = list_checkpoints(out.with_name("nan-checkpoints"))
    assert [c.step for c in saved] == [1, 2, 3, 4]
    assert load_adapter(saved[-1].adapter).layers and load_state(saved[-1])["step"] == 4


def test_metadata_and_compatibility_of_the_saved_file(tiny, tmp_path):
    _, data, models = tiny
    model = models["flux"]
    out = tmp_path / "meta.safetensors"
    train(spec_for(model, data, out, steps=3))
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert json.loads(meta["lycoris_config"]) == config("lokr full").to_dict()
    for key in (
        "modelspec.sai_model_spec",
        "modelspec.architecture",
        "modelspec.title",
        "modelspec.resolution",
        "ss_network_module",
        "ss_network_dim",
        "ss_network_alpha",
        "ss_network_args",
        "ss_steps",
        "comfyui_lycoris.base_model",
        "comfyui_lycoris.denoiser_config_sha256",
        "comfyui_lycoris.dataset_sha256",
        "comfyui_lycoris.versions",
        "comfyui_lycoris.training_spec",
    ):
        assert meta.get(key), key
    assert meta["modelspec.architecture"] == "flux-1-dev/lora" and meta["ss_steps"] == "3"
    assert all(k.startswith("lycoris_") for k in keys)
    from lycoris import create_lycoris_from_weights  # the file loads in lycoris itself

    net, _ = create_lycoris_from_weights(1.0, str(out), model.denoiser)
    assert len(net.loras) == len(load_adapter(out).layers) == 30


def test_validation_images_at_the_seed_strength(tiny, tmp_path):
    _, data, models = tiny
    model = models["flux"]
    out = tmp_path / "val.safetensors"
    result = train(
        spec_for(
            model,
            data,
            out,
            steps=4,
            validation_every=2,
            validation_prompts=["a sks disc"],
            validation_lycoris_strength=0.5,
            validation_steps=2,
        )
    )
    assert [s for s, _ in result.validation] == [2, 4]
    assert result.validation[0][1].shape == (1, 32, 32, 3)
    pngs = sorted(p.name for p in out.with_name("val-validation").iterdir())
    assert pngs == ["step-000002-0.png", "step-000004-0.png"]


def test_training_runs_inside_inference_mode(tiny, tmp_path):
    """ComfyUI calls every node under torch.inference_mode()."""
    _, data, models = tiny
    with torch.inference_mode():
        result = train(spec_for(models["sd15"], data, tmp_path / "im.safetensors", steps=2))
    assert result.completed


def test_bad_specs_are_typed_errors(tiny, tmp_path):
    _, data, models = tiny
    from lycoris_core import LycorisError

    with pytest.raises(LycorisError, match="steps must be >= 1"):
        train(spec_for(models["flux"], data, tmp_path / "x.safetensors", steps=0))
    with pytest.raises(LycorisError, match=r"output must be a \.safetensors path"):
        train(spec_for(models["flux"], data, tmp_path / "x.ckpt"))
    with pytest.raises(LycorisError, match="optimizer 'sgdx' is unknown"):
        train(spec_for(models["flux"], data, tmp_path / "x.safetensors", optimizer="sgdx"))


KILLER = """
import sys, torch
from lycoris_core.training.checkpoint import save_checkpoint
folder = sys.argv[1]
save_checkpoint(folder, 1, {"a": torch.ones(4)}, {}, {"step": 1}, {})
print("first", flush=True)
big = {f"t{i}": torch.randn(1024, 1024) for i in range(64)}  # ~256 MB: slow to write
save_checkpoint(folder, 2, big, {}, {"step": 2}, {})
print("second", flush=True)
"""


def test_a_writer_killed_mid_save_leaves_the_previous_checkpoint(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLER, str(tmp_path / "ckpts")],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout.readline().strip() == "first"
    import time

    deadline = time.time() + 60
    while time.time() < deadline:  # wait until the second checkpoint is being written
        if any(p.name.startswith(".step-000002") for p in (tmp_path / "ckpts").iterdir()):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    found = list_checkpoints(tmp_path / "ckpts")
    assert [c.step for c in found] == [1]
    assert load_state(found[0])["step"] == 1
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(found[0].adapter))["a"], torch.ones(4))


def test_a_model_loaded_under_inference_mode_still_trains(tiny, tmp_path):
    """ComfyUI runs the loader node inside torch.inference_mode(): its weights must train."""
    root, data, _ = tiny
    with torch.inference_mode():
        model = load_model(root / "sd15", device="cpu")
        assert not any(torch.is_inference(p) for p in model.denoiser.parameters())
        result = train(spec_for(model, data, tmp_path / "im.safetensors", steps=2))
    assert result.completed


def test_a_cast_under_inference_mode_keeps_trainable_weights():
    """A dtype cast (or a move to the GPU) inside inference_mode makes inference tensors."""
    from lycoris_core.models import from_pipeline
    from lycoris_core.tiny import build_pipeline

    with torch.inference_mode():
        model = from_pipeline(build_pipeline("flux"), "demo", dtype="bf16", device="cpu")
    assert model.denoiser.dtype == torch.bfloat16
    assert not any(torch.is_inference(p) for p in model.denoiser.parameters())
