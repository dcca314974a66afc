"""Adapters as per-key patches of a host model under its original names (ComfyUI's MODEL).

The host state dict is built from each tiny denoiser with the family's name map (ldm UNet,
BFL Flux with fused qkv/linear1 and swapped adaLN halves, SAI SD3); the patches are applied
to it as a host does (key by key, slices through offsets), renamed back and compared with our
own merge of the same file on the diffusers model (fp32 tolerance), for non-zero adapters of
every algorithm family, in our naming and in foreign namings, at strengths 0.7 and -1.
"""

from __future__ import annotations

import pytest
import torch
from reference import CASES, case_config, denoiser, make_reference, state
from torch import nn

from lycoris_core import load_adapter, patched
from lycoris_core.adapters import adapter_from_state_dict
from lycoris_core.errors import AdapterFormatError
from lycoris_core.host_config import denoiser_config, family_of_keys
from lycoris_core.host_patches import DENOISER_PREFIX, patched_weights, plan_patches
from lycoris_core.layouts import apply_transform, denoiser_name_map

P = DENOISER_PREFIX
STRENGTHS = (0.7, -1.0)
ALGOS = ("lora", "lokr full", "loha", "lora+dora", "ia3", "diag-oft rescaled", "tlora", "full")
ALGOS += ("boft", "glora", "lora+norms", "dylora")
_CASES = {c.name: c for c in CASES}


def _foreign_map(model: nn.Module, family: str):
    return denoiser_name_map(family, dict(model.config))


def host_state(model: nn.Module, family: str) -> dict[str, torch.Tensor]:
    """The denoiser's weights under the host's names (fused rows concatenated)."""
    mods = dict(model.named_modules())
    out = {}
    for foreign, targets in _foreign_map(model, family).items():
        for param in ("weight", "bias"):
            parts = [getattr(mods[t.path], param, None) for t in targets]
            if any(not isinstance(p, torch.Tensor) for p in parts):
                continue
            rows = [
                apply_transform(t.transform, p.detach())
                for t, p in zip(targets, parts, strict=True)
            ]
            out[f"{P}{foreign}.{param}"] = torch.cat(rows).clone()
    return out


def back_to_ours(model: nn.Module, family: str, host: dict) -> dict[str, torch.Tensor]:
    """Host tensors renamed back to diffusers parameter names."""
    out = {}
    for foreign, targets in _foreign_map(model, family).items():
        for param in ("weight", "bias"):
            key = f"{P}{foreign}.{param}"
            if key not in host:
                continue
            for t in targets:
                a, b = t.rows or (0, host[key].shape[0])
                out[f"{t.path}.{param}"] = apply_transform(t.transform, host[key][a:b])
    return out


def check_equal(model, family, adapter, strength, tol=2e-5) -> int:
    """Host patches == our merge on every parameter; returns how many parameters changed."""
    host = host_state(model, family)
    shapes = {k: tuple(v.shape) for k, v in host.items()}
    plan = plan_patches(adapter, shapes, family)
    with patched(model, [(adapter, strength)]):
        merged = state(model)
    base = state(model)
    got = back_to_ours(model, family, {**host, **patched_weights(plan.patches, host, strength)})
    changed = 0
    for name, value in got.items():
        want = merged[name].float()
        err = (value - want).abs().max().item()
        scale = max(want.abs().max().item(), 1e-6)
        assert err <= tol * scale, f"{family} {name}: max abs error {err:.3g} (scale {scale:.3g})"
        changed += not torch.equal(merged[name], base[name])
    assert changed, "the adapter changed nothing: the comparison would be trivial"
    return changed


@pytest.fixture(scope="module")
def models():
    return {}


def _model(models, family):
    if family not in models:
        models[family] = denoiser(family)
    return models[family]


def _ref(models, family, case_name, tmp_path):
    case = _CASES[case_name]
    model = _model(models, family)
    from reference import denoiser_inputs

    inputs = denoiser_inputs(model)
    path = tmp_path / f"{family}-{case_name.replace(' ', '_')}.safetensors"
    make_reference(model, case_config(case, family), inputs, path, strengths=(1.0,))
    return model, load_adapter(path)


PAIRS = [(f, c) for c in ALGOS for f in ("sd15", "flux") if f in _CASES[c].families]
PAIRS.remove(("flux", "tlora"))  # ~25 s to build; T-LoRA on Linear is covered by sd15's attention
PAIRS += [("sdxl", c) for c in ("lora", "lokr full", "lora+dora", "ia3")]


@pytest.mark.parametrize(("family", "case"), PAIRS)
def test_our_files_as_host_patches_equal_our_merge(models, family, case, tmp_path):
    model, adapter = _ref(models, family, case, tmp_path)
    for s in STRENGTHS:
        check_equal(model, family, adapter, s)


def _kohya(adapter, model, family):
    """The same tensors under kohya ldm names (``lora_unet_input_blocks_...``)."""
    ours_to_ldm = {}
    for foreign, targets in _foreign_map(model, family).items():
        if len(targets) == 1 and targets[0].plain:
            ours_to_ldm[targets[0].path.replace(".", "_")] = foreign.replace(".", "_")
    sd = {}
    for name, layer in adapter.layers.items():
        ldm = ours_to_ldm[name.removeprefix("lycoris_")]
        for suffix, t in layer.tensors.items():
            sd[f"lora_unet_{ldm}.{suffix}"] = t
    return adapter_from_state_dict(sd, adapter.metadata, source="kohya")


@pytest.mark.parametrize("case", ["lora", "lokr full", "lora+dora", "ia3", "diag-oft rescaled"])
def test_kohya_ldm_files_patch_whole_keys(models, case, tmp_path):
    model, ours = _ref(models, "sdxl", case, tmp_path)
    adapter = _kohya(ours, model, "sdxl")
    host = host_state(model, "sdxl")
    plan = plan_patches(adapter, {k: v.shape for k, v in host.items()}, "sdxl")
    assert all(p.offset is None for p in plan.patches)
    assert len(plan.layouts) == 1 and "ldm names" in next(iter(plan.layouts))
    for s in STRENGTHS:
        check_equal(model, "sdxl", adapter, s)


def _random_file(shapes: dict[str, tuple[int, int]], algo: str) -> dict[str, torch.Tensor]:
    """A file over layers {name: (out, in)}, from independent random tensors."""
    g = torch.Generator().manual_seed(5)
    sd = {}
    for name, (out_f, in_f) in shapes.items():
        if algo == "lora":
            sd[f"{name}.lora_down.weight"] = torch.randn(4, in_f, generator=g) * 0.2
            sd[f"{name}.lora_up.weight"] = torch.randn(out_f, 4, generator=g) * 0.2
            sd[f"{name}.alpha"] = torch.tensor(2.0)
            sd[f"{name}.dora_scale"] = 1 + 0.1 * torch.randn(out_f, 1, generator=g)
        else:  # LoKr whose Kronecker blocks cross the q/k/v boundaries
            sd[f"{name}.lokr_w1"] = torch.randn(4, 2, generator=g) * 0.3
            sd[f"{name}.lokr_w2"] = torch.randn(out_f // 4, in_f // 2, generator=g) * 0.3
    return sd


def _foreign_file(model, family: str, names: tuple[str, ...], algo: str):
    host = host_state(model, family)
    shapes = {f"lora_unet_{n.replace('.', '_')}": host[f"{P}{n}.weight"].shape for n in names}
    return adapter_from_state_dict(_random_file(shapes, algo), source=f"{family} file")


BFL = ("double_blocks.0.img_attn.qkv", "single_blocks.0.linear1", "final_layer.adaLN_modulation.1")
SAI = ("joint_blocks.0.x_block.attn.qkv", "joint_blocks.1.context_block.adaLN_modulation.1")
SAI += ("final_layer.adaLN_modulation.1",)


@pytest.mark.parametrize("algo", ["lora", "lokr"])
def test_bfl_fused_files_patch_the_fused_key(models, algo):
    model = _model(models, "flux")
    adapter = _foreign_file(model, "flux", BFL, algo)
    host = host_state(model, "flux")
    plan = plan_patches(adapter, {k: v.shape for k, v in host.items()}, "flux")
    assert {p.key for p in plan.patches} == {
        f"{P}double_blocks.0.img_attn.qkv.weight",
        f"{P}single_blocks.0.linear1.weight",
        f"{P}final_layer.adaLN_modulation.1.weight",
    }
    for s in STRENGTHS:
        check_equal(model, "flux", adapter, s)


@pytest.mark.parametrize("algo", ["lora", "lokr"])
def test_sai_fused_files_and_diffusers_names_on_sd3(models, algo):
    model = _model(models, "sd3")
    adapter = _foreign_file(model, "sd3", SAI, algo)
    for s in STRENGTHS:
        check_equal(model, "sd3", adapter, s)
    mods = dict(model.named_modules())
    ours = ("transformer_blocks.0.attn.to_k", "norm_out.linear", "transformer_blocks.0.ff.net.2")
    shapes = {f"lycoris_{n.replace('.', '_')}": tuple(mods[n].weight.shape) for n in ours}
    adapter = adapter_from_state_dict(_random_file(shapes, algo), source="sd3 ours")
    for s in STRENGTHS:
        check_equal(model, "sd3", adapter, s)


def test_diffusers_names_on_fused_keys_use_offsets(models, tmp_path):
    model, adapter = _ref(models, "flux", "lora", tmp_path)
    host = host_state(model, "flux")
    plan = plan_patches(adapter, {k: v.shape for k, v in host.items()}, "flux")
    h = model.config.num_attention_heads * model.config.attention_head_dim
    offsets = {p.offset for p in plan.patches if p.key == f"{P}double_blocks.0.img_attn.qkv.weight"}
    assert offsets == {(0, 0, h), (0, h, h), (0, 2 * h, h)}


@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux", "sd3"])
def test_config_from_host_keys_gives_the_same_map(models, family):
    model = _model(models, family)
    host = host_state(model, family)
    shapes = {k[len(P) :]: tuple(v.shape) for k, v in host.items()}
    assert family_of_keys(shapes) == family
    derived = denoiser_name_map(family, denoiser_config(family, shapes))
    assert derived == _foreign_map(model, family)


def test_deeper_unet_config_from_keys():
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel(
        sample_size=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 32, 64),
        layers_per_block=2,
        transformer_layers_per_block=(1, 1, 3),
        norm_num_groups=32,
        cross_attention_dim=16,
        attention_head_dim=4,
    )
    host = host_state(model, "sdxl")
    shapes = {k[len(P) :]: tuple(v.shape) for k, v in host.items()}
    assert denoiser_name_map("sdxl", denoiser_config("sdxl", shapes)) == _foreign_map(model, "sdxl")


def test_a_file_for_another_family_is_a_typed_error(models, tmp_path):
    _, adapter = _ref(models, "flux", "lora", tmp_path)
    host = host_state(_model(models, "sd15"), "sd15")
    with pytest.raises(AdapterFormatError, match=r"match no weight .*SD3/Flux transformer file"):
        plan_patches(adapter, {k: v.shape for k, v in host.items()}, "sd15")


# --------------------------------------------------------------------------- text encoders


def _host_clip(family: str) -> dict[str, torch.Tensor]:
    """A host CLIP state dict (ComfyUI's names) from the tiny pipeline's text encoders."""
    from lycoris_core.host_text import HOST_ENCODERS
    from lycoris_core.tiny import build_pipeline

    pipe = build_pipeline(family)
    out = {}
    for attr, enc in HOST_ENCODERS[family].items():
        for k, v in getattr(pipe, attr).state_dict().items():
            k = k if k.startswith("text_model.") or enc == "t5xxl" else f"text_model.{k}"
            out[f"{enc}.transformer.{k}"] = v.detach().clone()
    return out


def test_text_encoder_layers_patch_the_host_clip():
    from lycoris_core.host_text import plan_text_patches

    host = _host_clip("sdxl")
    g = torch.Generator().manual_seed(7)
    names = {  # file layer -> the host key it must patch
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": "clip_l.transformer."
        "text_model.encoder.layers.0.self_attn.q_proj.weight",
        "text_encoder.encoder.layers.1.mlp.fc1": "clip_l.transformer."
        "text_model.encoder.layers.1.mlp.fc1.weight",
        "lora_te2_text_model_encoder_layers_0_self_attn_out_proj": "clip_g.transformer."
        "text_model.encoder.layers.0.self_attn.out_proj.weight",
    }
    sd, want = {}, {}
    for name, key in names.items():
        out_f, in_f = host[key].shape
        down, up = torch.randn(3, in_f, generator=g), torch.randn(out_f, 3, generator=g)
        sd.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up})
        sd[f"{name}.alpha"] = torch.tensor(1.5)
        want[key] = up @ down * (1.5 / 3)
    sd["lycoris_down_blocks_0_resnets_0_conv1.lora_down.weight"] = torch.zeros(1, 1)  # denoiser's
    sd["lycoris_down_blocks_0_resnets_0_conv1.lora_up.weight"] = torch.zeros(1, 1)
    adapter = adapter_from_state_dict(sd, source="te file")
    plan = plan_text_patches(adapter, {k: v.shape for k, v in host.items()}, "sdxl")
    assert plan.matched == 3 and plan.elsewhere == ["lycoris_down_blocks_0_resnets_0_conv1"]
    for s in STRENGTHS:
        got = patched_weights(plan.patches, host, s)
        assert set(got) == set(names.values())
        for key, dw in want.items():
            torch.testing.assert_close(got[key], host[key] + s * dw, rtol=1e-5, atol=1e-5)


def test_text_layers_for_a_missing_encoder_are_a_typed_error():
    from lycoris_core.host_text import plan_text_patches

    host = _host_clip("sd15")
    sd = {
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(2, 4),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(4, 2),
    }
    adapter = adapter_from_state_dict(sd, source="te2 file")
    with pytest.raises(AdapterFormatError, match="1 of 1 layers match no weight"):
        plan_text_patches(adapter, {k: v.shape for k, v in host.items()}, "sd15")
