"""On CUDA: the encoders leave the GPU once the features are cached and come back for
validation and at the end; the preflight reads CUDA's free memory."""

from __future__ import annotations

import torch

from lycoris_core.config import SEED_EXAMPLE, LycorisConfig
from lycoris_core.memory import Workload, estimate_memory, free_memory_bytes
from lycoris_core.models import from_pipeline
from lycoris_core.tiny import build_pipeline
from lycoris_core.training.dataset import DatasetSpec
from lycoris_core.training.loop import TrainSpec, train
from lycoris_core.training.synthetic import make_demo_dataset


def test_encoders_leave_the_gpu_while_training(tmp_path):
    model = from_pipeline(build_pipeline("flux"), "tiny flux", device="cuda", dtype="fp32")
    data = make_demo_dataset(tmp_path / "data", count=2, size=32)
    seen: list[set[str]] = []

    def on_step(info):
        pipe = model.pipe
        seen.append({n for n in ("vae", "text_encoder", "text_encoder_2")
                     if getattr(pipe, n).device.type == "cuda"})  # fmt: skip

    spec = TrainSpec(
        base=model,
        config=LycorisConfig.from_dict(SEED_EXAMPLE, source="seed"),
        dataset=DatasetSpec(folder=str(data), resolution=32, bucket_step=16),
        output=str(tmp_path / "out.safetensors"),
        steps=4,
        validation_prompts=["a disc"],
        validation_every=2,
        validation_steps=2,
    )
    result = train(spec, on_step=on_step)
    assert result.completed and len(result.validation) == 2
    assert seen == [set()] * 4  # off the GPU at every step (validation brought them back)
    assert model.pipe.vae.device.type == "cuda"  # the handle is as it was after the run
    assert model.pipe.text_encoder_2.device.type == "cuda"


def test_preflight_reads_cuda_free_memory():
    free = free_memory_bytes(torch.device("cuda"))
    assert 0 < free <= torch.cuda.get_device_properties(0).total_memory
    model = from_pipeline(build_pipeline("flux"), "tiny flux", device="cuda")
    est = estimate_memory(model, Workload(mode="sample", width=64, height=64))
    assert est.free is not None and est.verdict == "fits"
