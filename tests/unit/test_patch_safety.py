"""Restore is exact in every dtype and on exceptions; adapters stack; only touched weights move."""

from __future__ import annotations

import json

import pytest
import torch
from reference import (
    Case,
    case_config,
    denoiser,
    denoiser_inputs,
    forward,
    make_reference,
    randomize,
    rel_err,
    same_state,
    state,
)
from safetensors.torch import save_file

from lycoris_core import (
    LycorisError,
    adapter_from_state_dict,
    create_network,
    load_adapter,
    patched,
)
from lycoris_core.io import read_safetensors
from lycoris_core.patching import Patch, patch_key

FILES = {
    "lora": Case("lora", {"algo": "lora", "linear_dim": 4, "linear_alpha": 2.0}),
    "lokr": Case("lokr", {"algo": "lokr", "linear_dim": 10000, "linear_alpha": 1, "factor": 4}),
    "oft": Case("oft", {"algo": "diag-oft", "linear_dim": 8, "linear_alpha": 1, "rescaled": True}),
    "full": Case("full", {"algo": "full", "linear_dim": 4, "linear_alpha": 1}),
    "dora": Case("dora", {"algo": "loha", "linear_dim": 4, "linear_alpha": 2.0, "dora_wd": True}),
}


@pytest.fixture(scope="module", params=["sd15", "flux"])
def family_files(request, tmp_path_factory):
    family = request.param
    model = denoiser(family)
    inputs = denoiser_inputs(model)
    folder = tmp_path_factory.mktemp(family)
    refs = {
        name: make_reference(
            model, case_config(case, family), inputs, folder / f"{name}.safetensors"
        )
        for name, case in FILES.items()
    }
    adapters = {name: load_adapter(ref.path) for name, ref in refs.items()}
    return family, refs, adapters


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["merge", "dynamic"])
def test_restore_is_bitwise_in_every_dtype(family_files, dtype, mode):
    family, _, adapters = family_files
    model = denoiser(family).to(dtype)
    inputs = denoiser_inputs(model, dtype=dtype)
    before = state(model)
    base = forward(model, inputs)
    stack = [(a, s) for a, s in zip(adapters.values(), (0.7, -0.4, 1.3, 0.5, 1.0), strict=True)]
    with patched(model, stack, mode=mode):
        out = forward(model, inputs)
        assert rel_err(out, base) > 1e-2  # the stack really changes the output
    assert same_state(model, before)
    assert torch.equal(forward(model, inputs), base)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_merged_and_dynamic_agree_in_half_precision(family_files, dtype):
    """Both modes stay within the dtype's own error: a few times the base model's rounding."""
    family, refs, adapters = family_files
    ref32 = refs["lokr"]
    model = denoiser(family).to(dtype)
    inputs = denoiser_inputs(model, dtype=dtype)
    tol = 5 * rel_err(forward(model, inputs), ref32.base) + 1e-3
    outs = {}
    for mode in ("merge", "dynamic"):
        with patched(model, [(adapters["lokr"], 1.5)], mode=mode):
            outs[mode] = forward(model, inputs)
        assert rel_err(outs[mode], ref32.outputs[1.5]) < tol, mode
    assert rel_err(outs["merge"], outs["dynamic"]) < tol


@pytest.mark.parametrize("mode", ["merge", "dynamic"])
def test_exception_inside_the_block_restores(family_files, mode):
    family, _, adapters = family_files
    model = denoiser(family)
    inputs = denoiser_inputs(model)
    before = state(model)
    base = forward(model, inputs)
    with pytest.raises(RuntimeError, match="boom"):
        with patched(model, [(adapters["lora"], 1.0), (adapters["oft"], 0.5)], mode=mode):
            forward(model, inputs)
            raise RuntimeError("boom")
    assert same_state(model, before)
    assert torch.equal(forward(model, inputs), base)


def test_failure_while_applying_restores_what_was_done(family_files, monkeypatch):
    family, _, adapters = family_files
    model = denoiser(family)
    before = state(model)
    import lycoris_core.patching as patching

    calls = {"n": 0}
    real = patching.accumulate

    def failing_accumulate(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise MemoryError("out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(patching, "accumulate", failing_accumulate)
    with pytest.raises(MemoryError):
        with patched(model, [(adapters["lora"], 1.0)], mode="merge"):
            pass
    assert calls["n"] == 5
    assert same_state(model, before)


def test_merge_backs_up_only_touched_weights(family_files):
    family, refs, adapters = family_files
    model = denoiser(family)
    with patched(model, [(adapters["lora"], 1.0), (adapters["lokr"], 0.5)]) as patch:
        assert set(patch._backup) == set(patch.plan)
        assert len(patch.plan) == refs["lora"].layers
        backup = sum(w.numel() + (0 if b is None else b.numel()) for w, b in patch._backup.values())
        touched = sum(model.get_submodule(p).weight.numel() for p in patch.plan)
    assert backup == touched  # weights only: these adapters never change a bias
    assert backup < sum(p.numel() for p in model.parameters())


def test_stacked_adapters_equal_stacked_lycoris_networks(tmp_path):
    model = denoiser("flux")
    inputs = denoiser_inputs(model)
    base = forward(model, inputs)
    before = state(model)
    nets, paths = [], []
    for i, case in enumerate((FILES["lora"], FILES["oft"], FILES["lokr"])):
        cfg = case_config(case, "flux")
        net = create_network(model, cfg)
        randomize(net, cfg.algo, seed=10 + i)
        path = tmp_path / f"{case.name}.safetensors"
        net.save_weights(str(path), None, {})
        nets.append(net)
        paths.append(path)
    strengths = (0.8, -0.6, 1.2)
    for net, s in zip(nets, strengths, strict=True):
        net.set_multiplier(s)
    reference = forward(model, inputs)  # three lycoris wrappers chained on the same layers
    for net in reversed(nets):
        net.restore()
    assert torch.equal(forward(model, inputs), base)
    stack = [(load_adapter(p), s) for p, s in zip(paths, strengths, strict=True)]
    for mode in ("merge", "dynamic"):
        with patched(model, stack, mode=mode):
            assert rel_err(forward(model, inputs), reference) < 2e-5
        assert same_state(model, before)


def test_patch_object_contract(family_files):
    family, _, adapters = family_files
    model = denoiser(family)
    patch = Patch(model, [(adapters["lora"], 1.0)], mode="dynamic")
    patch.apply()
    with pytest.raises(LycorisError, match="already applied"):
        patch.apply()
    patch.restore()
    patch.restore()  # idempotent
    with pytest.raises(LycorisError, match="mode must be one of merge, dynamic"):
        Patch(model, [(adapters["lora"], 1.0)], mode="bake")
    for bad in (float("nan"), float("inf"), "1.0", True):
        with pytest.raises(LycorisError, match="strength must be"):
            Patch(model, [(adapters["lora"], bad)])
    same = Patch(model, [(adapters["lora"], 1.0)], mode="dynamic")
    other = Patch(model, [(adapters["lora"], 0.5)], mode="dynamic")
    assert same.key == patch.key != other.key


def test_patched_works_under_inference_mode(family_files):
    """ComfyUI runs every node inside torch.inference_mode()."""
    family, _, adapters = family_files
    model = denoiser(family)
    inputs = denoiser_inputs(model)
    before = state(model)
    with torch.inference_mode():
        base = forward(model, inputs)
        for mode in ("merge", "dynamic"):
            with patched(model, [(adapters["lokr"], 1.0)], mode=mode):
                assert rel_err(forward(model, inputs), base) > 1e-3
            assert torch.equal(forward(model, inputs), base)
    assert same_state(model, before)


def test_patch_key_follows_contents(family_files, tmp_path):
    """Keys compare what an adapter does, not which object holds it."""
    _, _, adapters = family_files
    lora = adapters["lora"]
    tensors, metadata = read_safetensors(lora.path)
    copy_path = tmp_path / "copy.safetensors"
    save_file(tensors, str(copy_path), metadata)
    assert patch_key([(load_adapter(copy_path), 0.5)]) == patch_key([(lora, 0.5)])
    assert patch_key([(lora, 0.5)], "dynamic") != patch_key([(lora, 0.5)])
    # a file rewritten after it was read: the old object keeps the key of what it holds
    stale = load_adapter(copy_path)
    doubled = {k: v * 2 if v.dim() > 1 else v for k, v in tensors.items()}
    save_file(doubled, str(copy_path), {**metadata, "note": "rewritten"})
    assert patch_key([(stale, 1.0)]) != patch_key([(load_adapter(copy_path), 1.0)])
    # adapters made in memory: the same tensors with other options are another adapter
    state_dict = {f"{n}.{k}": t for n, la in lora.layers.items() for k, t in la.tensors.items()}
    plain = adapter_from_state_dict(state_dict)
    options = adapter_from_state_dict(state_dict, {"lycoris_config": metadata["lycoris_config"]})
    dylora = dict(json.loads(metadata["lycoris_config"]), algo="dylora", block_size=2)
    other = adapter_from_state_dict(state_dict, {"lycoris_config": json.dumps(dylora)})
    assert plain.fingerprint == other.fingerprint  # the tensors are the same ...
    assert patch_key([(plain, 1.0)]) == patch_key([(options, 1.0)])
    assert patch_key([(plain, 1.0)]) != patch_key([(other, 1.0)])  # ... their effect is not
