"""The loop on accelerate and its one loss smoothing; the objective's scheduler-driven shift."""

from __future__ import annotations

import math

import pytest
import torch

from lycoris_core import LycorisConfig
from lycoris_core.config import SEED_EXAMPLE
from lycoris_core.models import load_model
from lycoris_core.plots import smooth
from lycoris_core.tiny import make_tiny
from lycoris_core.training.checkpoint import load_state, resolve_resume
from lycoris_core.training.dataset import DatasetSpec
from lycoris_core.training.loop import TrainSpec, train
from lycoris_core.training.objectives import Objective
from lycoris_core.training.synthetic import make_demo_dataset


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    data = make_demo_dataset(root / "data", count=4, size=32)
    return load_model(make_tiny("flux", root / "flux"), device="cpu"), data


def spec(model, data, out, **kw) -> TrainSpec:
    ds = DatasetSpec(folder=str(data), resolution=32, bucket_step=model.size_multiple)
    args = {"config": LycorisConfig.from_dict(SEED_EXAMPLE), "steps": 6, "lr": 1e-3, **kw}
    return TrainSpec(base=model, dataset=ds, output=str(out), **args)


def test_the_loss_curve_image_smooths_like_the_streamed_smoothed_loss(flux, tmp_path):
    """One smoothing: plots.smooth (the IMAGE's dark curve) over the run's losses is exactly
    the smoothed_loss stream, also across a cancel and resume."""
    model, data = flux
    out = tmp_path / "run.safetensors"
    streamed: list[float] = []
    part = train(
        spec(model, data, out),
        on_step=lambda info: streamed.append(info.smoothed_loss),
        should_stop=lambda: len(streamed) >= 3,
    )
    assert not part.completed and part.steps_done == 3
    done = train(
        spec(model, data, out, resume=str(out)),
        on_step=lambda info: streamed.append(info.smoothed_loss),
    )
    assert done.completed and len(done.losses) == 6 and len(streamed) == 6
    assert smooth(done.losses) == streamed
    assert streamed[0] == done.losses[0]  # bias-corrected: no pull towards zero at the start


def test_bf16_autocasts_on_cpu_and_runs_follow_each_others_precision(flux, tmp_path):
    """accelerate keeps a process-wide state; each run in one process gets its own precision."""
    model, data = flux
    fp32 = train(spec(model, data, tmp_path / "a.safetensors", steps=2))
    bf16 = train(spec(model, data, tmp_path / "b.safetensors", steps=2, mixed_precision="bf16"))
    again = train(spec(model, data, tmp_path / "c.safetensors", steps=2))
    assert fp32.completed and bf16.completed and again.completed
    assert bf16.losses != fp32.losses  # autocast ran: bf16 matmuls change the losses
    assert again.losses == fp32.losses  # and the next fp32 run is fp32 again (same code path)


def test_gradient_accumulation_resumes_like_the_uninterrupted_run(flux, tmp_path):
    """accelerate's accumulation counter and the data position survive a cancel + resume."""
    model, data = flux
    kw = {"grad_accum": 2, "steps": 4, "batch_size": 1}
    full = train(spec(model, data, tmp_path / "full.safetensors", **kw))
    out = tmp_path / "part.safetensors"
    seen: list[int] = []
    train(spec(model, data, out, **kw), on_step=seen.append, should_stop=lambda: len(seen) >= 2)
    ckpt = resolve_resume(out)
    state = load_state(ckpt)
    assert ckpt.step == 2 and state["kind"] == "cancelled"
    assert (state["epoch"], state["position"]) == (0, 4)  # 2 steps x 2 of the epoch's 4 batches
    assert (ckpt.state / "model.safetensors").is_file() and ckpt.adapter.is_file()
    resumed = train(spec(model, data, out, resume=str(out), **kw))
    assert resumed.completed and resumed.losses == full.losses  # float-equal, step by step
    assert resumed.network_sha256 == full.network_sha256


def _uniform_draws(n: int, seed: int) -> torch.Tensor:
    return torch.sigmoid(torch.randn(n, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("shift_type", ["exponential", "linear"])
def test_flux_sigmas_follow_the_schedulers_time_shift_type(flux, shift_type):
    from diffusers import FlowMatchEulerDiscreteScheduler

    model, _ = flux
    cfg = dict(model.pipe.scheduler.config)
    assert cfg["use_dynamic_shifting"]
    pipe = type("Pipe", (), {})()
    pipe.vae, pipe.transformer = model.pipe.vae, model.pipe.transformer
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(cfg, time_shift_type=shift_type)
    objective = Objective(pipe, model.family)
    seq = 1024
    sigmas = objective.sigmas(8, torch.Generator().manual_seed(5), seq)
    u = _uniform_draws(8, 5)  # logit-normal(0, 1) draws of the same generator
    slope = (cfg["max_shift"] - cfg["base_shift"]) / (
        cfg["max_image_seq_len"] - cfg["base_image_seq_len"]
    )
    mu = cfg["base_shift"] + slope * (seq - cfg["base_image_seq_len"])
    exponential = math.exp(mu) / (math.exp(mu) + (1 / u - 1))
    linear = mu / (mu + (1 / u - 1))
    expected, other = (linear, exponential) if shift_type == "linear" else (exponential, linear)
    assert torch.allclose(sigmas, expected, atol=1e-6)
    assert not torch.allclose(sigmas, other, atol=1e-3)


def test_a_checkpoint_of_the_earlier_layout_is_named_as_such(tmp_path):
    from lycoris_core.training.checkpoint import CheckpointError

    step = tmp_path / "run-checkpoints" / "step-000004"
    step.mkdir(parents=True)
    torch.save({"step": 4}, step / "state.pt")
    (step / "adapter.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"earlier version.*state\.pt"):
        resolve_resume(tmp_path / "run.safetensors")
    with pytest.raises(CheckpointError, match="no complete checkpoint found"):
        resolve_resume(tmp_path / "other.safetensors")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # creates the marker file when unpickled


def test_resume_refuses_a_progress_file_that_is_not_plain_data(flux, tmp_path):
    import pickle

    from lycoris_core.training.checkpoint import CheckpointError

    model, data = flux
    step = tmp_path / "run-checkpoints" / "step-000001"
    (step / "state").mkdir(parents=True)
    marker = tmp_path / "ran"
    (step / "state" / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    (step / "adapter.safetensors").write_bytes(b"")
    out = tmp_path / "run.safetensors"
    with pytest.raises(CheckpointError, match=r"custom_checkpoint_0\.pkl: cannot be read"):
        train(spec(model, data, out, resume=str(out)))
    assert not marker.exists()
