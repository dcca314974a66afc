"""Sampling tiny pipelines loaded from disk, with adapters at strengths (the real loading path)."""

from __future__ import annotations

import json

import pytest
import torch
from reference import Case, case_config, randomize, same_state, state
from safetensors.torch import save_file

from lycoris_core import Adapter, AdapterFormatError, LycorisError, create_network, load_adapter
from lycoris_core.errors import ModelLoadError
from lycoris_core.models import LoadedModel, load_model, save_merged
from lycoris_core.sampling import SamplingCancelled, sample
from lycoris_core.tiny import FAMILIES, make_tiny

LORA = Case("lora", {"algo": "lora", "linear_dim": 4, "linear_alpha": 2.0})
LOKR = Case("lokr", {"algo": "lokr", "linear_dim": 10000, "linear_alpha": 1, "factor": 4})
ARGS = {"prompt": "a photo of a cat", "steps": 2, "seed": 7}


def _adapter(model: LoadedModel, case: Case, path, seed: int):
    """A non-zero lycoris adapter for this model's denoiser, saved to `path`."""
    cfg = case_config(case, "flux" if model.family.name != "sd15" else "sd15")
    net = create_network(model.denoiser, cfg)
    randomize(net, cfg.algo, seed)
    net.save_weights(str(path), None, {"lycoris_config": json.dumps(cfg.to_dict())})
    net.restore()
    return load_adapter(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    folders = {f: make_tiny(f, root / f) for f in FAMILIES}
    models = {f: load_model(folders[f], device="cpu") for f in FAMILIES}
    adapters = {
        f: {
            "lora": _adapter(models[f], LORA, root / f"{f}-lora.safetensors", 1),
            "lokr": _adapter(models[f], LOKR, root / f"{f}-lokr.safetensors", 2),
        }
        for f in FAMILIES
    }
    return folders, models, adapters


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_samples_with_adapters(tiny, family):
    _, models, adapters = tiny
    model = models[family]
    assert model.family.name == family
    before = state(model.denoiser)
    base = sample(model, **ARGS)
    assert base.shape == (1, model.default_size, model.default_size, 3)
    assert base.dtype == torch.float32 and base.min() >= 0 and base.max() <= 1
    assert torch.equal(sample(model, **ARGS), base)  # same seed reproduces
    off = sample(model, [(adapters[family]["lora"], 0.0)], **ARGS)
    assert torch.equal(off, base)  # strength 0 == no adapter, bitwise
    for name in ("lora", "lokr"):
        merged = sample(model, [(adapters[family][name], 1.0)], mode="merge", **ARGS)
        dynamic = sample(model, [(adapters[family][name], 1.0)], mode="dynamic", **ARGS)
        assert (merged - base).abs().max() > 1e-3, f"{name} has no effect"
        assert (merged - dynamic).abs().max() < 1e-4, name
    model.restore_base()
    assert same_state(model.denoiser, before)


def test_patch_is_kept_between_calls_with_the_same_set(tiny):
    _, models, adapters = tiny
    model = models["flux"]
    sample(model, [(adapters["flux"]["lora"], 0.7)], **ARGS)
    first = model.active_patch
    sample(model, [(adapters["flux"]["lora"], 0.7)], **ARGS)
    assert model.active_patch is first  # not re-merged
    sample(model, [(adapters["flux"]["lora"], 0.8)], **ARGS)
    assert model.active_patch is not first and not first.applied
    sample(model, [], **ARGS)
    assert model.active_patch is None


def test_an_unchanged_set_is_not_bound_again(tiny, monkeypatch):
    """The patch cache's key is computed before binding: an unchanged set binds nothing."""
    _, models, adapters = tiny
    model = models["flux"]
    lora = adapters["flux"]["lora"]
    bound: list[str] = []
    real_bind = Adapter.bind

    def counting_bind(self, module, strict=True, **where):
        bound.append(self.name)
        return real_bind(self, module, strict=strict, **where)

    monkeypatch.setattr(Adapter, "bind", counting_bind)
    model.restore_base()
    base = sample(model, **ARGS)
    first = sample(model, [(lora, 0.7)], **ARGS)
    assert len(bound) == 1
    again = sample(model, [(lora, 0.7)], **ARGS)
    reloaded = sample(model, [(load_adapter(lora.path), 0.7)], **ARGS)  # same file, new object
    assert len(bound) == 1  # cached: neither call bound the set again
    stronger = sample(model, [(lora, 0.8)], **ARGS)
    assert len(bound) == 2  # a changed strength binds
    dynamic = sample(model, [(lora, 0.8)], mode="dynamic", **ARGS)
    assert len(bound) == 3  # so does a changed mode
    model.restore_base()
    fresh = sample(model, [(lora, 0.7)], **ARGS)  # no cache: bound and merged anew
    assert len(bound) == 4
    assert (first - base).abs().max() > 1e-3  # the adapter has an effect
    assert (stronger - first).abs().max() > 1e-4
    for cached in (again, reloaded):
        assert (cached - fresh).abs().max() < 1e-5
    assert (dynamic - stronger).abs().max() < 1e-4


def test_alternating_strengths_never_drift(tiny):
    folders, models, adapters = tiny
    model = models["sd15"]
    lora, lokr = adapters["sd15"]["lora"], adapters["sd15"]["lokr"]
    for i in range(50):
        s = (-1.3, 0.4, 1.7, 0.9, -0.2)[i % 5]
        stack = [(lora, s)] if i % 2 else [(lora, s), (lokr, 1 - s)]
        mode = ("merge", "dynamic")[i % 3 == 0]
        sample(model, stack, mode=mode, **{**ARGS, "steps": 1})
    model.restore_base()
    fresh = load_model(folders["sd15"], device="cpu")
    assert same_state(model.denoiser, state(fresh.denoiser))  # bitwise: the restored weights
    # two models with equal weights at other addresses: fp32 rounding may differ per CPU
    torch.testing.assert_close(sample(model, **ARGS), sample(fresh, **ARGS), rtol=0, atol=1e-5)


def test_batch_seeds_are_per_image(tiny):
    _, models, adapters = tiny
    model = models["flux"]
    batch = sample(model, [(adapters["flux"]["lokr"], 1.0)], batch_size=2, **ARGS)
    second = sample(model, [(adapters["flux"]["lokr"], 1.0)], **{**ARGS, "seed": ARGS["seed"] + 1})
    assert (batch[1] - second[0]).abs().max() < 1e-5  # image i uses seed + i
    assert (batch[0] - batch[1]).abs().max() > 1e-2


def test_progress_and_cancel_within_one_step(tiny):
    _, models, adapters = tiny
    model = models["sd3"]
    seen = []
    sample(model, **{**ARGS, "steps": 4}, on_step=seen.append)
    assert [i.step for i in seen] == [1, 2, 3, 4] and all(i.total == 4 for i in seen)
    assert seen[-1].eta == 0 and seen[0].latents is not None
    before = state(model.denoiser)
    seen.clear()
    with pytest.raises(SamplingCancelled, match="after step 2 of 6"):
        sample(
            model,
            [(adapters["sd3"]["lora"], 1.0)],
            **{**ARGS, "steps": 6},
            on_step=seen.append,
            should_stop=lambda: len(seen) >= 2,
        )
    assert [i.step for i in seen] == [1, 2]
    model.restore_base()
    assert same_state(model.denoiser, before)


def test_save_merged_pipeline(tiny, tmp_path):
    _, models, adapters = tiny
    model = models["flux"]
    model.restore_base()  # earlier tests may have left their last patch applied (the cache)
    before = state(model.denoiser)
    stack = [(adapters["flux"]["lora"], 0.6), (adapters["flux"]["lokr"], -0.5)]
    expected = sample(model, stack, mode="dynamic", **ARGS)
    out = save_merged(model, stack, tmp_path / "merged")
    assert model.active_patch is None and same_state(model.denoiser, before)
    baked = load_model(out, device="cpu")
    assert (sample(baked, **ARGS) - expected).abs().max() < 1e-4
    with pytest.raises(LycorisError, match="not empty"):
        save_merged(model, stack, out)
    assert not any(p.name.startswith(".merged") for p in tmp_path.iterdir())


def test_single_file_denoiser_with_config_folder(tiny, tmp_path):
    folders, models, _ = tiny
    src = models["flux"]
    path = tmp_path / "flux_transformer.safetensors"
    save_file({k: v.contiguous() for k, v in src.denoiser.state_dict().items()}, str(path))
    loaded = load_model(path, config_dir=folders["flux"], device="cpu")
    assert loaded.family.name == "flux"
    assert same_state(loaded.denoiser, state(src.denoiser))
    with pytest.raises(ModelLoadError, match="config"):
        load_model(path, device="cpu")
    with pytest.raises(ModelLoadError, match="another model family"):
        load_model(path, config_dir=folders["sd3"], device="cpu")


def test_bad_inputs_are_typed_errors(tiny, tmp_path):
    folders, models, adapters = tiny
    with pytest.raises(ModelLoadError, match=r"no model_index\.json"):
        load_model(tmp_path, device="cpu")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model_index.json").write_text(json.dumps({"_class_name": "NoSuchPipeline"}))
    with pytest.raises(ModelLoadError, match=r"'NoSuchPipeline'.*not provided by diffusers"):
        load_model(bad, device="cpu")
    with pytest.raises(ModelLoadError, match="not the requested family 'sdxl'"):
        load_model(folders["sd15"], family="sdxl", device="cpu")
    ckpt = tmp_path / "model.ckpt"
    torch.save({"a": torch.zeros(1)}, ckpt)
    with pytest.raises(ModelLoadError, match="pickle"):
        load_model(ckpt, config_dir=folders["sd15"], device="cpu")
    model = models["flux"]
    with pytest.raises(LycorisError, match="width 30 is not a multiple of 4"):
        sample(model, **ARGS, width=30, height=32)
    with pytest.raises(LycorisError, match="steps must be an integer >= 1"):
        sample(model, **{**ARGS, "steps": 0})
    with pytest.raises(LycorisError, match="use at most 999"):
        sample(models["sd15"], **{**ARGS, "steps": 1000})
    with pytest.raises(AdapterFormatError, match="matches 0 modules"):
        sample(model, [(adapters["sd15"]["lora"], 1.0)], **ARGS)
    assert model.active_patch is None
