"""Reading adapter files: formats, prefixes, metadata, and the errors users get."""

from __future__ import annotations

import json
import logging
import pickle

import pytest
import torch
from reference import (
    Case,
    case_config,
    denoiser,
    denoiser_inputs,
    forward,
    make_reference,
    rel_err,
    same_state,
    state,
)
from safetensors.torch import load_file, save_file

from lycoris_core import AdapterFormatError, adapter_from_state_dict, load_adapter, patched

LORA = Case("lora", {"algo": "lora", "linear_dim": 4, "linear_alpha": 2.0})
LOHA = Case("loha", {"algo": "loha", "linear_dim": 4, "linear_alpha": 2.0})


@pytest.fixture(scope="module")
def flux_lora(tmp_path_factory):
    model = denoiser("flux")
    inputs = denoiser_inputs(model)
    path = tmp_path_factory.mktemp("flux") / "lora.safetensors"
    ref = make_reference(model, case_config(LORA, "flux"), inputs, path)
    return model, inputs, ref


def _resave(src, dst, rename=lambda k: k, metadata=None, drop=()):
    tensors = load_file(str(src))
    out = {rename(k): v for k, v in tensors.items() if not any(k.startswith(d) for d in drop)}
    save_file(out, str(dst), metadata=metadata)
    return dst


def test_kohya_prefix_applies_like_lycoris_prefix(flux_lora, tmp_path):
    model, inputs, ref = flux_lora
    kohya = _resave(
        ref.path, tmp_path / "kohya.safetensors", lambda k: k.replace("lycoris_", "lora_unet_", 1)
    )
    adapter = load_adapter(kohya)
    assert all(name.startswith("lora_unet_") for name in adapter.layers)
    with patched(model, [(adapter, 1.5)]):
        assert rel_err(forward(model, inputs), ref.outputs[1.5]) < 2e-5


def test_custom_prefix_from_metadata(flux_lora, tmp_path):
    model, inputs, ref = flux_lora
    cfg = case_config(LORA, "flux").to_dict()
    cfg["apply_preset"]["lora_prefix"] = "mynet"
    path = _resave(
        ref.path,
        tmp_path / "prefixed.safetensors",
        lambda k: k.replace("lycoris_", "mynet_", 1),
        metadata={"lycoris_config": json.dumps(cfg)},
    )
    with patched(model, [(load_adapter(path), 1.0)], mode="dynamic"):
        assert rel_err(forward(model, inputs), ref.outputs[1.0]) < 2e-5


def test_file_for_another_architecture_matches_nothing(flux_lora):
    _, _, ref = flux_lora
    unet = denoiser("sd15")
    before = state(unet)
    with pytest.raises(AdapterFormatError, match=r"layers match no module .* matches 0 modules"):
        with patched(unet, [(load_adapter(ref.path), 1.0)]):
            pass
    assert same_state(unet, before)


def test_unmatched_keys_strict_and_lenient(flux_lora, tmp_path, caplog):
    model, inputs, ref = flux_lora
    tensors = load_file(str(ref.path))
    tensors["lycoris_not_a_module.lora_up.weight"] = torch.ones(4, 2)
    tensors["lycoris_not_a_module.lora_down.weight"] = torch.ones(2, 4)
    tensors["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.ones(4, 2)
    tensors["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.ones(2, 4)
    path = tmp_path / "extra.safetensors"
    save_file(tensors, str(path))
    adapter = load_adapter(path)
    before = state(model)
    with pytest.raises(AdapterFormatError) as err:
        with patched(model, [(adapter, 1.0)]):
            pass
    msg = str(err.value)
    assert "2 of" in msg and "lycoris_not_a_module" in msg and "strict=False" in msg
    assert same_state(model, before)
    with caplog.at_level(logging.WARNING, logger="lycoris_core"):
        with patched(model, [(adapter, 1.0)], strict=False):
            assert rel_err(forward(model, inputs), ref.outputs[1.0]) < 2e-5
    warnings = [r for r in caplog.records if "match no module" in r.getMessage()]
    assert len(warnings) == 1


def test_shape_mismatch_names_layer_and_shapes(tmp_path):
    from diffusers import FluxTransformer2DModel

    from lycoris_core.tiny import flux_transformer_config

    model = denoiser("flux")
    ref = make_reference(
        model, case_config(LORA, "flux"), denoiser_inputs(model), tmp_path / "a.safetensors"
    )
    wider = FluxTransformer2DModel(**flux_transformer_config(attention_head_dim=48))
    with pytest.raises(AdapterFormatError, match=r"does not fit '.*' \(weight shape \(96, 96\)\)"):
        with patched(wider, [(load_adapter(ref.path), 1.0)]):
            pass


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickle_formats_are_refused(tmp_path, suffix):
    path = tmp_path / f"adapter{suffix}"
    torch.save({"lycoris_x.lora_up.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(AdapterFormatError, match=r"pickle-based files .* refused"):
        load_adapter(path)


def test_pickle_disguised_as_safetensors_is_refused(tmp_path):
    path = tmp_path / "adapter.safetensors"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    with pytest.raises(AdapterFormatError, match="pickle-based"):
        load_adapter(path)


def test_truncated_and_missing_files(flux_lora, tmp_path):
    _, _, ref = flux_lora
    data = ref.path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFormatError, match=r"cut.safetensors: not a readable"):
        load_adapter(cut)
    with pytest.raises(AdapterFormatError, match=r"nope.safetensors: file not found"):
        load_adapter(tmp_path / "nope.safetensors")


def test_unknown_tensors_are_reported():
    sd = {
        "lycoris_a.lora_up.weight": torch.zeros(4, 2),
        "lycoris_a.lora_down.weight": torch.zeros(2, 4),
        "lycoris_a.mystery": torch.zeros(1),
        "lycoris_b.something_else": torch.zeros(1),
    }
    with pytest.raises(AdapterFormatError, match=r"layer 'lycoris_a' \(locon\) has unknown"):
        adapter_from_state_dict(dict(list(sd.items())[:3]))
    with pytest.raises(AdapterFormatError, match="match no LyCORIS algorithm"):
        adapter_from_state_dict({"lycoris_b.something_else": torch.zeros(1)})
    with pytest.raises(AdapterFormatError, match=r"not '<layer>\.<tensor>'"):
        adapter_from_state_dict({"flat": torch.zeros(1)})


def test_metadata_and_algorithm_summary(flux_lora):
    _, _, ref = flux_lora
    adapter = load_adapter(ref.path)
    assert adapter.config is not None and adapter.config.algo == "lora"
    assert adapter.algorithms() == {"locon": ref.layers}
    assert len(adapter.fingerprint) == 16 and adapter.num_params() > 0


def test_loha_alpha_not_rank_is_exact_where_lycoris_merge_to_is_not(tmp_path):
    """lycoris' merge_to applies alpha/rank twice for LoHa; the forward (and we) once."""
    from lycoris import create_lycoris_from_weights

    model = denoiser("flux")
    inputs = denoiser_inputs(model)
    ref = make_reference(model, case_config(LOHA, "flux"), inputs, tmp_path / "loha.safetensors")
    before = state(model)
    with patched(model, [(load_adapter(ref.path), 1.0)]):
        ours = forward(model, inputs)
    assert rel_err(ours, ref.outputs[1.0]) < 2e-5
    net, _ = create_lycoris_from_weights(1.0, str(ref.path), model)
    net.merge_to(1.0)
    theirs = forward(model, inputs)
    model.load_state_dict(before)
    assert rel_err(theirs, ref.outputs[1.0]) > 100 * rel_err(ours, ref.outputs[1.0])


def test_fingerprint_is_content_based(flux_lora, tmp_path):
    _, _, ref = flux_lora
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(ref.path.read_bytes())
    a, b = load_adapter(ref.path), load_adapter(copy)
    assert a.fingerprint == b.fingerprint
    in_memory = adapter_from_state_dict(load_file(str(ref.path)))
    changed = load_file(str(ref.path))
    first = next(iter(changed))
    changed[first] = changed[first] + 1
    assert in_memory.fingerprint != adapter_from_state_dict(changed).fingerprint
    assert len(in_memory.fingerprint) == 16
