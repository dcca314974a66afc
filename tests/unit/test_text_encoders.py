"""Text-encoder layers of adapter files, applied to the tiny pipelines' text encoders.

Each file is written here with its own names (kohya ``lora_te*_``, diffusers/PEFT
``text_encoder_2.``, ComfyUI ``text_encoders.<name>.transformer.``) next to denoiser layers;
the expected change of each module is computed from the file's tensors. Merged and dynamic,
the denoiser layers apply at the model strength and the text-encoder layers at the text
strength; every component comes back bitwise.
"""

from __future__ import annotations

import pytest
import torch
from reference import build_pipeline, same_state, state
from safetensors.torch import save_file
from test_layouts import LAYOUTS, TOL, Writer, _err, _module_input, _reference_forward

from lycoris_core import AdapterFormatError, load_adapter, patched_pipeline
from lycoris_core.families import FAMILIES
from lycoris_core.models import from_pipeline
from lycoris_core.pipeline_patch import pipeline_patch_key

# family -> [(written layer name, component, module path, algorithm)]
FILES = {
    "sd15": [
        (
            "lora_te_text_model_encoder_layers_0_self_attn_v_proj",
            "text_encoder",
            "encoder.layers.0.self_attn.v_proj",
            "lora",
        ),
        (
            "lora_te_text_model_encoder_layers_1_mlp_fc2",
            "text_encoder",
            "encoder.layers.1.mlp.fc2",
            "loha",
        ),
        (
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
            "unet",
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
            "lora",
        ),
    ],
    "sdxl": [
        (
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
            "text_encoder",
            "encoder.layers.0.self_attn.q_proj",
            "lora",
        ),
        (
            "lora_te2_text_model_encoder_layers_0_mlp_fc1",
            "text_encoder_2",
            "text_model.encoder.layers.0.mlp.fc1",
            "lora",
        ),
        (
            "lora_te2_text_model_encoder_layers_1_self_attn_out_proj",
            "text_encoder_2",
            "text_model.encoder.layers.1.self_attn.out_proj",
            "lokr",
        ),
        (
            "lora_unet_input_blocks_3_1_transformer_blocks_1_attn1_to_k",
            "unet",
            "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_k",
            "lora",
        ),
    ],
    "sd3": [
        (
            "lora_te3_encoder_block_0_layer_0_SelfAttention_k",
            "text_encoder_3",
            "encoder.block.0.layer.0.SelfAttention.k",
            "lora",
        ),
        (
            "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj",
            "text_encoder_2",
            "text_model.encoder.layers.0.self_attn.q_proj",
            "peft",
        ),
        (
            "lora_te1_text_model_encoder_layers_1_mlp_fc1",
            "text_encoder",
            "text_model.encoder.layers.1.mlp.fc1",
            "lora",
        ),
        (
            "transformer.transformer_blocks.0.attn.to_q",
            "transformer",
            "transformer_blocks.0.attn.to_q",
            "peft",
        ),
    ],
    "flux": [
        (
            "text_encoders.t5xxl.transformer.encoder.block.0.layer.1.DenseReluDense.wi_0",
            "text_encoder_2",
            "encoder.block.0.layer.1.DenseReluDense.wi_0",
            "lora",
        ),
        (
            "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.out_proj",
            "text_encoder",
            "encoder.layers.0.self_attn.out_proj",
            "lora",
        ),
        (
            "lora_unet_single_blocks_1_linear2",
            "transformer",
            "single_transformer_blocks.1.proj_out",
            "lora",
        ),
    ],
}


@pytest.fixture(scope="module")
def pipes():
    return {f: build_pipeline(f) for f in FILES}


def _components(pipe) -> dict[str, torch.nn.Module]:
    names = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
    return {c: getattr(pipe, c) for c in names if getattr(pipe, c, None) is not None}


def write(pipe, family: str, path) -> dict:
    """The file; returns {(component, module path): f(s) -> (dW, db)}."""
    writer = Writer(7)
    tensors, expected = {}, {}
    for name, component, module_path, algo in FILES[family]:
        m = getattr(pipe, component).get_submodule(module_path)
        layout = LAYOUTS["peft_transformer" if algo == "peft" else "kohya_internal"]
        layer, fn = writer.layer(
            "lora" if algo == "peft" else algo, layout, m.weight.detach(), False
        )
        for suffix, t in layer.items():
            tensors[name + suffix] = t.contiguous()
        expected[(component, module_path)] = fn
    save_file(tensors, str(path))
    return expected


def _check(pipe, expected, strength: float, text_strength: float | None, mode: str, adapter):
    comps = _components(pipe)
    before = {c: state(m) for c, m in comps.items()}
    g = torch.Generator().manual_seed(3)
    inputs = {k: _module_input(comps[k[0]].get_submodule(k[1]), g) for k in expected}
    ts = strength if text_strength is None else text_strength
    entry = (adapter, strength) if text_strength is None else (adapter, strength, text_strength)
    with patched_pipeline(pipe, [entry], mode=mode) as patch:
        assert set(patch.patches) == {"denoiser"} | {c for c, _ in expected if c.startswith("text")}
        for (component, module_path), fn in expected.items():
            m = comps[component].get_submodule(module_path)
            s = ts if component.startswith("text") else strength
            w0 = before[component][f"{module_path}.weight"]
            dw, _ = fn(w0, None, s)
            want = _reference_forward(m, inputs[(component, module_path)], w0 + dw, m.bias)
            got = m(inputs[(component, module_path)])
            assert _err(got, want) < TOL, f"{mode} {component}.{module_path}"
    for c, m in comps.items():
        assert same_state(m, before[c]), f"{c} not restored"
        assert not any(mod._forward_hooks for mod in m.modules())


@pytest.mark.parametrize("family", list(FILES))
def test_text_encoder_layers_apply_at_their_own_strength(pipes, tmp_path, family):
    pipe = pipes[family]
    path = tmp_path / "a.safetensors"
    expected = write(pipe, family, path)
    adapter = load_adapter(path)
    for mode in ("merge", "dynamic"):
        _check(pipe, expected, 0.7, -1.0, mode, adapter)
        _check(pipe, expected, -1.0, None, mode, adapter)  # the text strength defaults to it


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_prompt_encoding_sees_the_text_layers(pipes, tmp_path, family):
    pipe = pipes[family]
    path = tmp_path / "a.safetensors"
    write(pipe, family, path)
    adapter = load_adapter(path)
    encode = FAMILIES[family].encode_text

    def embeds():
        with torch.no_grad():
            return encode(pipe, ["a red cube"], "cpu", None)["prompt_embeds"]

    base = embeds()
    with patched_pipeline(pipe, [(adapter, 1.0, 1.0)], mode="merge"):
        merged = embeds()
    with patched_pipeline(pipe, [(adapter, 1.0, 1.0)], mode="dynamic"):
        dynamic = embeds()
    with patched_pipeline(pipe, [(adapter, 1.0, 0.0)], mode="merge") as patch:
        assert set(patch.patches) == {"denoiser"}
        assert torch.equal(embeds(), base)
    assert (merged - base).abs().max() > 1e-4
    assert _err(dynamic, merged) < TOL
    assert torch.equal(embeds(), base)


def test_use_adapters_applies_a_civitai_style_sd15_file_strictly(pipes, tmp_path):
    """kohya SD1.5 files with lora_te_ layers used to fail with strict=True."""
    pipe = pipes["sd15"]
    path = tmp_path / "civitai.safetensors"
    write(pipe, "sd15", path)
    model = from_pipeline(pipe, "tiny-sd15")
    adapter = load_adapter(path)
    before = state(pipe.text_encoder)
    patch = model.use_adapters([(adapter, 0.8)])
    assert patch.layers_per_component() == {"denoiser": 1, "text_encoder": 2}
    assert not same_state(pipe.text_encoder, before)
    again = model.use_adapters([(load_adapter(path), 0.8, 0.8)])
    assert again is patch  # same contents and strengths: still applied
    assert model.prompt_key == ((adapter.content_key, 0.8),)
    other = model.use_adapters([(adapter, 0.8, 0.3)])
    assert other is not patch and other.key != patch.key
    assert model.prompt_key == ((adapter.content_key, 0.3),)
    model.restore_base()
    assert same_state(pipe.text_encoder, before) and model.prompt_key == ()
    k1 = pipeline_patch_key([(adapter, 1.0)])
    assert (
        k1 == pipeline_patch_key([(adapter, 1.0, 1.0)]) != pipeline_patch_key([(adapter, 1.0, 0.5)])
    )


def test_text_layers_on_a_bare_denoiser_are_named_as_such(pipes, tmp_path):
    from lycoris_core import patched

    pipe = pipes["sd15"]
    path = tmp_path / "a.safetensors"
    write(pipe, "sd15", path)
    with pytest.raises(
        AdapterFormatError, match=r"2 of 3 layers .* 2 of them are text-encoder layers"
    ):
        with patched(pipe.unet, [(load_adapter(path), 1.0)]):
            pass


def test_unknown_text_encoder_layer_is_reported(pipes, tmp_path):
    pipe = pipes["sdxl"]
    path = tmp_path / "a.safetensors"
    write(pipe, "sdxl", path)
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    tensors["lora_te2_text_model_encoder_layers_9_mlp_fc1.lora_up.weight"] = torch.ones(4, 2)
    tensors["lora_te2_text_model_encoder_layers_9_mlp_fc1.lora_down.weight"] = torch.ones(2, 4)
    save_file(tensors, str(path))
    with pytest.raises(AdapterFormatError, match=r"1 of 3 layers match no module .*strict=False"):
        with patched_pipeline(pipe, [(load_adapter(path), 1.0)]):
            pass


def test_inspect_a_pipeline_reports_each_component(pipes, tmp_path):
    from lycoris_core.report import describe, format_report

    pipe = pipes["sdxl"]
    path = tmp_path / "a.safetensors"
    write(pipe, "sdxl", path)
    info = describe(load_adapter(path), pipe)
    comps = info["components"]
    assert set(comps) == {"denoiser", "text_encoder", "text_encoder_2"}
    assert comps["denoiser"]["layout"] == "ldm names, '.'->'_', prefix 'lora_unet_'"
    assert comps["denoiser"]["model"] == "an SDXL UNet"
    assert (comps["text_encoder"]["matched"], comps["text_encoder_2"]["matched"]) == (1, 2)
    assert comps["text_encoder_2"]["layout"] == "diffusers names, '.'->'_', prefix 'lora_te2_'"
    assert info["unmatched"] == [] and len(info["matched"]) == 4
    text = format_report(info)
    assert "text_encoder_2: diffusers names" in text and "2 matched, 0 unmatched" in text
