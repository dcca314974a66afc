"""Saving an adapter in our layout or kohya/ComfyUI's, and reading it back.

A lycoris network on each tiny denoiser (sd15, sdxl, sd3, flux) is randomised, saved by
lycoris, read, then written by :func:`save_adapter` in each layout and read back. The read-back
file must change every weight as the original adapter does (merged at 0.7 and -1, fp32
tolerance; dynamic too), and its names must be the ones kohya/ComfyUI use (written down here
from the published layouts, not taken from the core's maps). The LoRA has alpha != rank and,
for the fused Flux/SD3 weights, a different alpha per part, so the fused file must fold each
part's scale; LoKr and LoHa stay split inside fused weights.
"""

from __future__ import annotations

import json

import pytest
import torch
from reference import denoiser, randomize, same_state, state

from lycoris_core import ConfigError, LycorisConfig, create_network, load_adapter, patched
from lycoris_core.io import read_safetensors
from lycoris_core.save_layouts import LAYOUTS, fuse_lora, save_adapter

TOL = 2e-5
STRENGTHS = (0.7, -1.0)
ALGOS = {
    "lora": {"algo": "lora", "linear_dim": 4, "linear_alpha": 2.0},
    "lokr": {"algo": "lokr", "linear_dim": 10000, "linear_alpha": 1.0, "factor": 4},
    "loha": {"algo": "loha", "linear_dim": 4, "linear_alpha": 2.0},
}
TARGETS = {
    "flux": ["Attention", "FeedForward", "AdaLayerNormContinuous", "FluxSingleTransformerBlock"],
    "sd3": ["Attention", "FeedForward", "AdaLayerNormContinuous"],
}
# names a kohya/ComfyUI file of each family holds (from the layouts' published names)
FOREIGN = {
    "sd15": [
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q",
        "lora_unet_input_blocks_1_0_in_layers_2",
        "lora_unet_middle_block_1_proj_in",
        "lora_unet_output_blocks_1_1_conv",
        "lora_unet_time_embed_0",
    ],
    "sdxl": [
        "lora_unet_input_blocks_3_1_transformer_blocks_1_attn1_to_k",
        "lora_unet_input_blocks_2_0_op",
        "lora_unet_label_emb_0_0",
        "lora_unet_middle_block_1_transformer_blocks_1_ff_net_0_proj",
    ],
    "sd3": [
        "lora_unet_joint_blocks_0_x_block_attn_proj",
        "lora_unet_joint_blocks_1_x_block_mlp_fc2",
    ],
    "flux": [
        "lora_unet_double_blocks_0_img_attn_proj",
        "lora_unet_double_blocks_1_txt_mlp_0",
        "lora_unet_single_blocks_0_linear2",
        "lora_unet_single_blocks_1_modulation_lin",
    ],
}
# fused (LoRA) names and the split names the same modules keep under LoKr / LoHa
FUSED = {
    "sd3": {
        "lora_unet_joint_blocks_0_x_block_attn_qkv": ["lycoris_transformer_blocks_0_attn_to_q"],
        "lora_unet_joint_blocks_1_context_block_attn_qkv": [
            "lycoris_transformer_blocks_1_attn_add_v_proj"
        ],
    },
    "flux": {
        "lora_unet_double_blocks_0_img_attn_qkv": ["lycoris_transformer_blocks_0_attn_to_k"],
        "lora_unet_double_blocks_1_txt_attn_qkv": ["lycoris_transformer_blocks_1_attn_add_q_proj"],
        "lora_unet_single_blocks_0_linear1": [
            "lycoris_single_transformer_blocks_0_attn_to_v",
            "lycoris_single_transformer_blocks_0_proj_mlp",
        ],
    },
}
SWAPPED = {  # adaLN with swapped halves: fused name for a LoRA, split name otherwise
    "sd3": ("lora_unet_final_layer_adaLN_modulation_1", "lycoris_norm_out_linear"),
    "flux": ("lora_unet_final_layer_adaLN_modulation_1", "lycoris_norm_out_linear"),
}


@pytest.fixture(scope="module", params=["sd15", "sdxl", "sd3", "flux"])
def family_model(request):
    return request.param, denoiser(request.param)


def _file(model, family: str, algo: str, path) -> None:
    """A lycoris network of `algo` on `model`, non-zero, saved by lycoris."""
    d = {"multiplier": 1.0, **ALGOS[algo]}
    if family in TARGETS:
        d["apply_preset"] = {"target_module": TARGETS[family]}
    config = LycorisConfig.from_dict(d)
    saved = state(model)
    net = create_network(model, config)
    randomize(net, config.algo, seed=3)
    net.save_weights(str(path), None, {"lycoris_config": json.dumps(config.to_dict())})
    net.restore()
    for lora in net.loras:
        lora.org_module[0].__dict__.pop("_lycoris_wrappers", None)
    model.load_state_dict(saved)


def _vary_alphas(adapter) -> None:
    """Give the LoRA layers different alphas (1x, 2x, 3x): fused parts must fold them."""
    for i, layer in enumerate(adapter.layers.values()):
        if "alpha" in layer.tensors:
            layer.tensors["alpha"] = layer.tensors["alpha"] * (1 + i % 3)


def _merged(model, adapter, strength: float) -> dict[str, torch.Tensor]:
    with patched(model, [(adapter, strength)], mode="merge"):
        return state(model)


def _inputs(model) -> dict:
    g = torch.Generator().manual_seed(0)
    cfg = model.config

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    kind = type(model).__name__
    if kind == "UNet2DConditionModel":
        out = {
            "sample": rnd(1, cfg.in_channels, 16, 16),
            "timestep": torch.tensor([10.0]),
            "encoder_hidden_states": rnd(1, 6, cfg.cross_attention_dim),
        }
        if cfg.addition_embed_type == "text_time":
            n = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            out["added_cond_kwargs"] = {"text_embeds": rnd(1, n), "time_ids": rnd(1, 6)}
        return out
    if kind == "SD3Transformer2DModel":
        return {
            "hidden_states": rnd(1, cfg.in_channels, 8, 8),
            "encoder_hidden_states": rnd(1, 5, cfg.joint_attention_dim),
            "pooled_projections": rnd(1, cfg.pooled_projection_dim),
            "timestep": torch.tensor([10.0]),
        }
    return {
        "hidden_states": rnd(1, 16, cfg.in_channels),
        "encoder_hidden_states": rnd(1, 5, cfg.joint_attention_dim),
        "pooled_projections": rnd(1, cfg.pooled_projection_dim),
        "timestep": torch.tensor([0.5]),
        "img_ids": torch.zeros(16, 3),
        "txt_ids": torch.zeros(5, 3),
        "guidance": torch.tensor([3.5]) if cfg.guidance_embeds else None,
    }


@torch.no_grad()
def _forward(model, adapter, strength: float, mode: str) -> torch.Tensor:
    with patched(model, [(adapter, strength)], mode=mode):
        return model(**_inputs(model))[0]


@pytest.mark.parametrize("algo", list(ALGOS))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_saved_in_either_layout_gives_the_same_deltas(family_model, algo, layout, tmp_path):
    family, model = family_model
    _file(model, family, algo, tmp_path / "lycoris.safetensors")
    original = load_adapter(tmp_path / "lycoris.safetensors")
    if algo == "lora":
        _vary_alphas(original)
    before = state(model)
    out = save_adapter(original, tmp_path / "out.safetensors", layout, denoiser=model)
    back = load_adapter(out)
    names = set(back.layers)

    if layout == "lycoris":  # the same tensors under the same keys
        tensors, meta = read_safetensors(out)
        assert meta == original.metadata and names == set(original.layers)
        for name, layer in original.layers.items():
            for key, t in layer.tensors.items():
                assert torch.equal(tensors[f"{name}.{key}"], t), (name, key)
    else:
        assert set(FOREIGN[family]) <= names, sorted(names)[:8]
        fused = FUSED.get(family, {})
        if algo == "lora":  # every module has its kohya name: nothing left split
            assert set(fused) <= names and not [n for n in names if n.startswith("lycoris_")]
            assert SWAPPED[family][0] in names if family in SWAPPED else True
        else:
            split = {s for ss in fused.values() for s in ss}
            assert split <= names and not set(fused) & names, sorted(names)
            assert SWAPPED[family][1] in names if family in SWAPPED else True
        if family in ("sd15", "sdxl"):
            assert all(n.startswith("lora_unet_") for n in names)

    for s in STRENGTHS:
        want, got = _merged(model, original, s), _merged(model, back, s)
        changed = [k for k in want if not torch.equal(want[k], before[k])]
        assert len(changed) >= len(original.layers), (len(changed), len(original.layers))
        worst = max((want[k] - got[k]).abs().max().item() for k in want)
        assert worst < TOL, (s, worst)
    assert same_state(model, before)
    want = _forward(model, original, 0.7, "merge")
    got = _forward(model, back, 0.7, "dynamic")
    assert (want - got).abs().max().item() < 1e-4 * max(1.0, want.abs().max().item())


def test_fused_lora_is_the_parts_block_by_block():
    """Parts of different rank and alpha, one target left out, one swapped: the fused file's
    ``up @ down * alpha / rank`` holds each part's ``up @ down * alpha / rank`` in its rows."""
    from lycoris_core.adapters import LayerAdapter
    from lycoris_core.layouts import Target

    g = torch.Generator().manual_seed(1)
    parts = {
        "a": LayerAdapter(
            "a",
            "locon",
            {
                "lora_down.weight": torch.randn(2, 6, generator=g),
                "lora_up.weight": torch.randn(4, 2, generator=g),
                "alpha": torch.tensor(1.0),
            },
        ),
        "c": LayerAdapter(
            "c",
            "locon",
            {
                "lora_down.weight": torch.randn(3, 6, generator=g),
                "lora_up.weight": torch.randn(6, 3, generator=g),
                "alpha": torch.tensor(6.0),
                "diff_b": torch.randn(6, generator=g),
            },
        ),
    }
    targets = (
        Target("denoiser", "a", (0, 4)),
        Target("denoiser", "b", (4, 9)),
        Target("denoiser", "c", (9, 15), "swap_halves"),
    )
    out = fuse_lora(parts, targets, [4, 5, 6])
    rank = out["lora_down.weight"].shape[0]
    assert rank == 5
    fused = out["lora_up.weight"] @ out["lora_down.weight"] * (out["alpha"].item() / rank)
    a, c = parts["a"].tensors, parts["c"].tensors
    torch.testing.assert_close(fused[0:4], a["lora_up.weight"] @ a["lora_down.weight"] * 0.5)
    assert torch.equal(fused[4:9], torch.zeros(5, 6))
    dc = c["lora_up.weight"] @ c["lora_down.weight"] * 2.0
    torch.testing.assert_close(fused[9:15], torch.cat((dc[3:], dc[:3])))
    db = out["diff_b"]
    assert torch.equal(db[:9], torch.zeros(9))
    assert torch.equal(db[9:], torch.cat((c["diff_b"][3:], c["diff_b"][:3])))


def test_equal_scales_keep_the_ups_and_fold_into_alpha():
    from lycoris_core.adapters import LayerAdapter
    from lycoris_core.layouts import Target

    g = torch.Generator().manual_seed(2)
    parts = {
        p: LayerAdapter(
            p,
            "locon",
            {
                "lora_down.weight": torch.randn(4, 6, generator=g),
                "lora_up.weight": torch.randn(3, 4, generator=g),
                "alpha": torch.tensor(2.0),
            },
        )
        for p in ("q", "k")
    }
    targets = (Target("denoiser", "q", (0, 3)), Target("denoiser", "k", (3, 6)))
    out = fuse_lora(parts, targets, [3, 3])
    assert out["alpha"].item() == 0.5 * 8  # the common scale alpha/rank = 0.5, rank 8
    assert torch.equal(out["lora_up.weight"][:3, :4], parts["q"].tensors["lora_up.weight"])
    assert torch.equal(out["lora_up.weight"][3:, 4:], parts["k"].tensors["lora_up.weight"])


def test_kohya_needs_the_model_and_a_known_layout(tmp_path):
    model = denoiser("flux")
    _file(model, "flux", "lora", tmp_path / "a.safetensors")
    adapter = load_adapter(tmp_path / "a.safetensors")
    with pytest.raises(ConfigError, match="needs the model"):
        save_adapter(adapter, tmp_path / "k.safetensors", "kohya")
    with pytest.raises(ConfigError, match="not one of"):
        save_adapter(adapter, tmp_path / "k.safetensors", "peft", denoiser=model)
    assert not (tmp_path / "k.safetensors").exists()
    # a kohya file read back and saved as kohya again: the same names and tensors
    first = save_adapter(adapter, tmp_path / "k.safetensors", "kohya", denoiser=model)
    again = save_adapter(load_adapter(first), tmp_path / "k2.safetensors", "kohya", denoiser=model)
    t1, _ = read_safetensors(first)
    t2, _ = read_safetensors(again)
    assert t1.keys() == t2.keys() and all(torch.equal(t1[k], t2[k]) for k in t1)


def test_cli_convert(tmp_path, capsys):
    from lycoris_core.__main__ import main
    from lycoris_core.tiny import make_tiny

    base = make_tiny("flux", tmp_path / "tiny-flux")
    model = denoiser("flux")  # the same seed: the same weights as the folder's
    _file(model, "flux", "lora", tmp_path / "a.safetensors")
    out = tmp_path / "k.safetensors"
    assert main(["convert", str(tmp_path / "a.safetensors"), str(out), "--layout", "kohya"]) == 2
    assert "needs the model" in capsys.readouterr().err and not out.exists()
    args = ["convert", str(tmp_path / "a.safetensors"), str(out), "--layout", "kohya"]
    assert main([*args, "--base", str(base)]) == 0
    names = set(load_adapter(out).layers)
    assert "lora_unet_single_blocks_0_linear1" in names
    original = load_adapter(tmp_path / "a.safetensors")
    want, got = _merged(model, original, 1.0), _merged(model, load_adapter(out), 1.0)
    assert max((want[k] - got[k]).abs().max().item() for k in want) < TOL


def test_text_encoder_layers_keep_their_names(tmp_path):
    from safetensors.torch import save_file

    model = denoiser("flux")
    _file(model, "flux", "lora", tmp_path / "a.safetensors")
    tensors, meta = read_safetensors(tmp_path / "a.safetensors")
    g = torch.Generator().manual_seed(4)
    te = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    extra = {
        f"{te}.lora_down.weight": torch.randn(2, 32, generator=g),
        f"{te}.lora_up.weight": torch.randn(32, 2, generator=g),
        f"{te}.alpha": torch.tensor(1.0),
    }
    save_file({**tensors, **extra}, str(tmp_path / "te.safetensors"), metadata=meta)
    out = save_adapter(
        load_adapter(tmp_path / "te.safetensors"),
        tmp_path / "k.safetensors",
        "kohya",
        denoiser=model,
    )
    written, _ = read_safetensors(out)
    assert all(torch.equal(written[k], v) for k, v in extra.items())
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight" in written
