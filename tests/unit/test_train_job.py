"""The training job (lycoris_core/training/job.py): reuse stamps, resume check, precision,
summary, the dataset loaded once, and the trained adapter handed back in memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lycoris_core import LycorisConfig, load_adapter
from lycoris_core.models import load_model
from lycoris_core.schema import REUSED, SUMMARY_KEYS
from lycoris_core.tiny import make_tiny
from lycoris_core.training import CheckpointError, DatasetSpec, TrainingData
from lycoris_core.training.job import (
    TrainJob,
    check_resume,
    effective_precision,
    read_stamp,
    reusable_summary,
    stamp_path,
    write_stamp,
)
from lycoris_core.training.loop import TrainSpec
from lycoris_core.training.synthetic import make_demo_dataset

CONFIG = {
    "algo": "lora",
    "multiplier": 1.0,
    "linear_dim": 2,
    "linear_alpha": 2,
    "apply_preset": {"target_module": ["Attention"]},
}


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    root = tmp_path_factory.mktemp("job")
    data = make_demo_dataset(root / "data", count=4, size=32)
    return load_model(make_tiny("flux", root / "flux"), device="cpu"), data


def spec(model, data, out, **kw) -> TrainSpec:
    ds = DatasetSpec(folder=str(data), resolution=32, bucket_step=8)
    args = {"config": LycorisConfig.from_dict(CONFIG), "steps": 2, "lr": 1e-3, **kw}
    return TrainSpec(base=model, dataset=ds, output=str(out), **args)


def test_a_finished_job_is_reused_and_hands_back_its_adapter(flux, tmp_path):
    model, data = flux
    out = tmp_path / "a.safetensors"
    job = TrainJob.prepare(spec(model, data, out, mixed_precision="bf16"))
    assert job.reused is None and job.spec.mixed_precision == "no"  # CPU: no autocast
    assert isinstance(job.spec.data, TrainingData)
    result = job.run()
    assert result.completed and read_stamp(out)["hash"] == job.fingerprint
    from_file = load_adapter(out)
    assert result.adapter is not None and result.adapter.path == str(out)
    assert result.adapter.metadata == from_file.metadata
    assert result.adapter.fingerprint == from_file.fingerprint
    assert set(result.adapter.layers) == set(from_file.layers)
    for name, layer in from_file.layers.items():
        mine = result.adapter.layers[name]
        assert mine.algo == layer.algo and set(mine.tensors) == set(layer.tensors)
        assert all(torch.equal(mine.tensors[k], t) for k, t in layer.tensors.items())

    again = TrainJob.prepare(spec(model, data, out, mixed_precision="bf16"))
    assert again.fingerprint == job.fingerprint
    assert again.reused is not None and again.reused[REUSED] is True
    assert set(again.reused) == {*SUMMARY_KEYS, REUSED} and again.reused["steps"] == 2
    other = TrainJob.prepare(spec(model, data, out, steps=3))
    assert other.reused is None and other.fingerprint != job.fingerprint
    flipped = dict(spec(model, data, out).__dict__)
    flipped["dataset"] = DatasetSpec(folder=str(data), resolution=32, bucket_step=8, flip=True)
    assert TrainJob.prepare(TrainSpec(**flipped)).reused is None  # flips are part of a run


def test_unreadable_or_stale_stamps_count_as_absent(tmp_path, caplog):
    out = tmp_path / "b.safetensors"
    out.write_bytes(b"adapter")
    assert reusable_summary(out, "h") is None  # no stamp
    write_stamp(out, "h", {"steps": 1})
    assert reusable_summary(out, "h") == {"steps": 1, REUSED: True}
    assert reusable_summary(out, "other") is None
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # atomic: no leftovers
    for garbage in (b"{not json", b"\xff\xfe\x00", b"[1, 2]", b'{"hash": 3, "summary": {}}'):
        stamp_path(out).write_bytes(garbage)
        assert read_stamp(out) is None and reusable_summary(out, "h") is None
    assert "run stamp" in caplog.text
    write_stamp(out, "h", {"steps": 1})
    out.write_bytes(b"another adapter, written later")  # e.g. a run that crashed before its stamp
    assert reusable_summary(out, "h") is None


def test_resume_needs_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="has no checkpoint; turn resume off"):
        check_resume(tmp_path / "c.safetensors")


def test_precision_rule():
    assert effective_precision("bf16", torch.device("cpu")) == "no"
    assert effective_precision("fp16", torch.device("cuda")) == "fp16"
    assert effective_precision("no", torch.device("cuda")) == "no"


def test_the_stamp_is_json_with_the_summary(flux, tmp_path):
    out = tmp_path / "d.safetensors"
    out.write_bytes(b"x")
    path = write_stamp(out, "f" * 64, {"steps": 3})
    assert path == Path(str(out)[: -len(".safetensors")] + ".run.json")
    stamp = json.loads(path.read_text())
    assert stamp["hash"] == "f" * 64 and stamp["summary"] == {"steps": 3}
