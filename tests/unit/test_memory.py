"""The memory preflight (lycoris_core/memory.py) and encoders off the device while training."""

from __future__ import annotations

import json

import pytest
import torch

from lycoris_core.__main__ import main
from lycoris_core.config import SEED_EXAMPLE, LycorisConfig
from lycoris_core.memory import (
    REFUSE_FACTOR,
    MemoryPreflightError,
    Workload,
    estimate_memory,
    estimate_training,
    module_weight_bytes,
    preflight,
)
from lycoris_core.models import from_pipeline, load_model
from lycoris_core.targeting import create_network
from lycoris_core.tiny import build_pipeline, make_tiny
from lycoris_core.training.dataset import DatasetSpec
from lycoris_core.training.job import TrainJob
from lycoris_core.training.loop import TrainSpec, train
from lycoris_core.training.synthetic import make_demo_dataset

SEED = LycorisConfig.from_dict(SEED_EXAMPLE, source="seed example")
WORK = Workload(width=64, height=64, batch_size=2)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    return {f: make_tiny(f, root / f) for f in ("flux", "sdxl")}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("memory-data"), count=2, size=32)


def _spec(model, data, tmp_path, cache_dir=None, **kw):
    base = {"steps": 4, "lr": 1e-3, "batch_size": 1, "seed": 0}
    return TrainSpec(
        base=model,
        config=SEED,
        dataset=DatasetSpec(folder=str(data), resolution=32, bucket_step=16, cache_dir=cache_dir),
        output=str(tmp_path / "out.safetensors"),
        **(base | kw),
    )


@pytest.mark.parametrize("family", ["flux", "sdxl"])
def test_components_add_up_and_counts_equal_the_real_model(folders, family):
    folder_est = estimate_memory(folders[family], WORK, SEED, device="cpu", dtype="fp32")
    model = load_model(folders[family], device="cpu", dtype="fp32")
    loaded_est = estimate_memory(model, WORK, SEED)
    for est in (folder_est, loaded_est):
        by_phase = {
            p: sum(i.bytes for i in est.items if i.phase in ("run", p)) for p in ("encode", "step")
        }
        assert est.total == max(by_phase.values()) > 0
        assert est.to_dict()["total"] == est.total
    # weights from the safetensors headers (before loading) == the loaded modules' bytes
    pipe = model.pipe
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            item = next(i for i in folder_est.items if i.name.startswith(f"{name} weights"))
            assert item.bytes == module_weight_bytes(module)[0], name
    # adapter parameters counted on the meta device == the real network's
    net = create_network(model.denoiser, SEED)
    try:
        real = sum(p.numel() for p in net.parameters())
    finally:
        net.restore()
    adapter = next(i for i in loaded_est.items if i.name.startswith("adapter weights"))
    assert adapter.bytes == 4 * real and f"{real:,} parameters" in adapter.note
    optim = next(i for i in loaded_est.items if i.name.startswith("optimizer state"))
    assert optim.bytes == 8 * real  # AdamW: exp_avg + exp_avg_sq in fp32
    assert loaded_est.needed < loaded_est.total  # the loaded weights are already allocated


def test_checkpointing_batch_and_resolution_move_the_activations(folders):
    def act(**kw):
        est = estimate_memory(folders["flux"], Workload(**kw), SEED, device="cpu")
        return next(i.bytes for i in est.items if i.name.startswith("activations"))

    base = act(width=256, height=256)
    assert act(width=256, height=256, gradient_checkpointing=True) < base
    assert act(width=256, height=256, batch_size=2) == pytest.approx(2 * base, rel=1e-6)
    assert act(width=512, height=512) > 2 * base  # 4x the image tokens (+ fixed text tokens)
    bf16 = estimate_memory(folders["flux"], WORK, SEED, device="cpu", dtype="bf16")
    fp32 = estimate_memory(folders["flux"], WORK, SEED, device="cpu", dtype="fp32")
    w16 = next(i.bytes for i in bf16.items if i.name.startswith("transformer weights"))
    w32 = next(i.bytes for i in fp32.items if i.name.startswith("transformer weights"))
    assert w16 * 2 == w32


def test_a_clearly_too_big_run_is_refused_before_loading(folders, data, tmp_path, monkeypatch):
    import lycoris_core.models as models

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the preflight refused")

    monkeypatch.setattr(models, "load_model", no_loading)
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(SEED_EXAMPLE))
    out = tmp_path / "never.safetensors"
    args = ["train", "--base", str(folders["flux"]), "--config", str(cfg), "--data", str(data)]
    args += ["--out", str(out), "--steps", "1", "--resolution", "32", "--device", "cpu"]
    assert main([*args, "--free-gb", "0.000001"]) == 2
    assert not out.exists()
    est = estimate_memory(folders["flux"], WORK, SEED, device="cpu", free_bytes=1000)
    with pytest.raises(MemoryPreflightError) as info:
        preflight(est)
    text = str(info.value)
    assert "transformer weights" in text and "activations" in text and "refused above" in text
    assert not isinstance(info.value, torch.OutOfMemoryError)  # nothing was allocated


def test_options_name_the_cheapest_change_that_fits(folders):
    big = Workload(width=512, height=512, batch_size=2)
    full = estimate_memory(folders["flux"], big, SEED, device="cpu")
    ckpt = estimate_memory(
        folders["flux"],
        Workload(width=512, height=512, batch_size=2, gradient_checkpointing=True),
        SEED,
        device="cpu",
    )
    free = ckpt.needed  # with checkpointing it fits; without it needs more than 1.5x that
    assert free < full.needed / REFUSE_FACTOR
    est = estimate_memory(folders["flux"], big, SEED, device="cpu", free_bytes=free)
    assert est.verdict == "refuse"
    assert est.options[0].startswith("gradient checkpointing on")
    tight = estimate_memory(folders["flux"], big, SEED, device="cpu", free_bytes=full.needed - 1)
    assert tight.verdict == "tight" and preflight(tight) is tight  # starts, with a warning


def test_a_run_that_fits_starts_and_one_that_does_not_is_refused(folders, data, tmp_path):
    model = load_model(folders["flux"], device="cpu")
    job = TrainJob.prepare(_spec(model, data, tmp_path, steps=1))
    est = estimate_training(job.spec)
    with pytest.raises(MemoryPreflightError):
        job.preflight(free_bytes=int(est.needed / (2 * REFUSE_FACTOR)))
    assert job.preflight(free_bytes=10 * est.needed).verdict == "fits"
    assert job.run().completed


def _count_encoder_calls(pipe):
    calls = {"vae": 0, "text": 0}
    encode = pipe.vae.encode

    def counted(*a, **k):
        calls["vae"] += 1
        return encode(*a, **k)

    pipe.vae.encode = counted
    for name in ("text_encoder", "text_encoder_2"):
        pipe.components[name].register_forward_hook(
            lambda *a: calls.__setitem__("text", calls["text"] + 1)
        )
    return calls


def test_encoders_run_only_before_the_first_step_and_not_at_all_with_a_filled_cache(data, tmp_path):
    cache = tmp_path / "cache"
    model = from_pipeline(build_pipeline("flux"), "tiny flux", device="cpu")
    calls = _count_encoder_calls(model.pipe)
    at_step: list[dict] = []
    spec = _spec(
        model,
        data,
        tmp_path,
        cache_dir=str(cache),
        steps=6,
        validation_prompts=["a disc"],
        validation_every=3,
        validation_steps=2,
    )
    result = train(spec, on_step=lambda info: at_step.append(dict(calls)))
    assert result.completed and len(result.validation) == 2  # validation still works
    assert at_step[0]["vae"] == 2 and at_step[0]["text"] >= 2  # 2 images; both encoders
    # no latent is encoded after the first step; text encoders only for the validation prompt
    # (at steps 3 and 6): steps 2, 4 and 5 draw cached epochs
    assert all(c["vae"] == 2 for c in at_step)
    assert at_step[1] == at_step[0] and at_step[3] == at_step[4] == at_step[2]
    assert at_step[2]["text"] > at_step[0]["text"]  # validation encoded its prompt
    # a second run with the cache filled never calls the encoders for training
    calls.update(vae=0, text=0)
    (tmp_path / "b").mkdir()
    again = _spec(model, data, tmp_path / "b", cache_dir=str(cache), steps=3)
    assert train(again).completed
    assert calls == {"vae": 0, "text": 0}


def test_cli_estimate_json(folders, tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(SEED_EXAMPLE))
    base = ["estimate", "--base", str(folders["sdxl"]), "--device", "cpu", "--json"]
    assert main([*base, "--config", str(cfg), "--resolution", "64", "--free-gb", "0.000001"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["verdict"] == "refuse" and out["options"]
    step = [i["bytes"] for i in out["items"] if i["phase"] in ("run", "step")]
    encode = [i["bytes"] for i in out["items"] if i["phase"] in ("run", "encode")]
    assert out["total"] == max(sum(step), sum(encode))
    assert {i["name"].split()[0] for i in out["items"]} >= {"unet", "vae", "adapter", "optimizer"}
    assert main([*base, "--sample", "--width", "64", "--height", "64"]) == 0
    sample = json.loads(capsys.readouterr().out)
    assert sample["workload"]["mode"] == "sample" and sample["verdict"] in ("fits", "tight")
    assert not any(i["name"].startswith("adapter") for i in sample["items"])
    assert main(["estimate", "--base", str(folders["sdxl"]), "--device", "cpu"]) == 2  # no config


def test_cli_estimate_takes_the_base_precision(folders, tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(SEED_EXAMPLE))
    base = ["estimate", "--base", str(folders["flux"]), "--device", "cpu", "--json"]
    weights = {}
    for precision in ("auto", "fp8", "nf4"):
        assert main([*base, "--config", str(cfg), "--base-precision", precision]) == 0
        items = json.loads(capsys.readouterr().out)["items"]
        weights[precision] = next(i["bytes"] for i in items if i["name"].startswith("transformer"))
    assert weights["nf4"] < weights["fp8"] < weights["auto"]


# --------------------------------------------------------------------------- quantised bases


def _state_dict_bytes(module):
    """Bytes of a module's saved tensors: bitsandbytes serialises its scales there (4-bit:
    absmax, code books; int8: SCB) beside a packed JSON entry and a format tag, left out;
    a tied tensor (T5's shared embedding) once."""
    seen = {}
    for key, t in module.state_dict().items():
        if "quant_state.bitsandbytes__" in key or key.endswith("weight_format"):
            continue
        seen[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
    return sum(seen.values())


@pytest.mark.parametrize("precision", ["fp8", "int8", "nf4"])
def test_quantised_weight_bytes_match_the_layers_tensors_and_the_folder_count(folders, precision):
    from lycoris_core.quantization import layer_precision

    model = load_model(folders["flux"], device="cpu", dtype="fp32", base_precision=precision)
    before = estimate_memory(folders["flux"], WORK, SEED, device="cpu", base_precision=precision)
    t5 = model.pipe.text_encoder_2
    t5(input_ids=torch.ones(1, 4, dtype=torch.long))  # int8 moves its row scales to .state
    for name in ("transformer", "text_encoder_2"):
        module = model.pipe.components[name]
        four_bit = sum(layer_precision(m) == "nf4" for m in module.modules())
        # the nested fp32 offset of a 4-bit layer is inside bitsandbytes' packed JSON entry
        assert module_weight_bytes(module)[0] == _state_dict_bytes(module) + 4 * four_bit, name
        item = next(i for i in before.items if i.name.startswith(f"{name} weights"))
        assert item.bytes == module_weight_bytes(module)[0], name  # headers + shapes == loaded
        assert precision in item.name
    plain = load_model(folders["flux"], device="cpu", dtype="fp32")
    for name in ("vae", "text_encoder"):  # CLIP and the VAE stay as loaded
        assert module_weight_bytes(model.pipe.components[name]) == module_weight_bytes(
            plain.pipe.components[name]
        )


def _item(est, prefix):
    return next((i for i in est.items if i.name.startswith(prefix)), None)


def test_folder_weights_nf4_below_fp8_below_bf16(folders):
    def weights(name, **kw):
        est = estimate_memory(folders["flux"], WORK, SEED, device="cpu", **kw)
        return _item(est, f"{name} weights").bytes

    for name in ("transformer", "text_encoder_2"):
        bf16 = weights(name, base_precision="bf16")
        nf4 = weights(name, dtype="bf16", base_precision="nf4")
        assert nf4 < weights(name, dtype="bf16", base_precision="fp8") < bf16
        # what is not a quantisable Linear stays at the compute dtype
        fp8_fp32 = weights(name, dtype="fp32", base_precision="fp8")
        assert weights(name, dtype="bf16", base_precision="fp8") < fp8_fp32
    # the spec's base_precision reaches the estimate of a folder
    spec = TrainSpec(
        base=str(folders["flux"]),
        config=SEED,
        dataset=DatasetSpec(folder="unused", resolution=64),
        output="unused.safetensors",
        base_precision="nf4",
    )
    est = estimate_training(spec, device="cpu")
    assert _item(est, "transformer weights").bytes == weights("transformer", base_precision="nf4")


def test_bypass_over_a_quantised_base_has_no_merged_weights(folders):
    from lycoris_core import memory_terms as memory

    plain = load_model(folders["flux"], device="cpu", dtype="fp32")
    linears = [m for m in plain.denoiser.modules() if type(m) is torch.nn.Linear]
    largest = max(m.weight.numel() for m in linears)

    def est(precision, gc=False, config=SEED):
        work = Workload(width=64, height=64, gradient_checkpointing=gc)
        kw = {"dtype": "fp32", "base_precision": precision}
        return estimate_memory(folders["flux"], work, config, device="cpu", **kw)

    assert _item(est("fp32"), "adapter forward (merged weights)").bytes > 0
    assert (
        _item(est("fp32", config=SEED.with_overrides(bypass_mode=True)), "adapter forward") is None
    )
    for precision in ("fp8", "int8", "nf4"):
        for gc in (False, True):
            e = est(precision, gc)
            assert _item(e, "adapter forward") is None
            item = _item(e, "dequantised layer")  # one layer at a time, at fp32
            assert item.bytes == int(memory.DEQUANT[(precision, gc)] * largest * 4)
    loaded = load_model(folders["flux"], device="cpu", dtype="fp32", base_precision="nf4")
    assert _item(estimate_memory(loaded, WORK, SEED), "dequantised layer").bytes > 0
    # sampling: the layer being dequantised, over a quantised base only
    sample = Workload(mode="sample", width=64, height=64)
    assert _item(estimate_memory(loaded, sample), "dequantised layer").bytes == int(
        memory.SAMPLE_TRANSIENT["nf4"] * largest * 4
    )
    assert _item(estimate_memory(plain, sample), "dequantised layer") is None


def test_options_offer_fp8_then_nf4_when_they_fit(folders):
    # a tiny picture: the weights dominate, so storing them smaller is what fits
    work = Workload(width=16, height=16, text_tokens=8, gradient_checkpointing=True)

    def est(free=None, **kw):
        return estimate_memory(
            folders["flux"], work, SEED, device="cpu", dtype="fp32", free_bytes=free, **kw
        )

    free = est(base_precision="fp8").needed
    refused = est(free)
    assert refused.verdict in ("tight", "refuse") and refused.needed > free
    labels = [o.split(" ->")[0] for o in refused.options]
    assert "base_precision fp8" in labels and "base_precision nf4" in labels
    assert labels.index("base_precision fp8") < labels.index("base_precision nf4")
    # a base already stored nf4 is not offered another precision
    small = est(base_precision="nf4")
    again = est(small.needed // 2, base_precision="nf4")
    assert again.options and not any(o.startswith("base_precision") for o in again.options)
