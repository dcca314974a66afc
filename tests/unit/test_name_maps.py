"""The foreign <-> diffusers name maps, derived from each denoiser's config.

Checked against the module trees of the tiny denoisers (and a UNet of another depth): every
weight-bearing Linear/Conv is reached exactly once, every target exists, fused row slices
tile the fused weight, and a few names a human reads off the published layouts map as stated.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from reference import denoiser
from torch import nn

from lycoris_core.layouts import Target, apply_transform, denoiser_name_map

FAMILIES = ("sd15", "sdxl", "sd3", "flux")


@pytest.fixture(scope="module")
def models():
    return {f: denoiser(f) for f in FAMILIES}


def _deeper_unet() -> nn.Module:
    # SDXL-like depth: 3 levels, 2 resnets per level, transformer depth 1 / 3
    return UNet2DConditionModel(
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


def _check_map(model: nn.Module, family: str) -> dict[str, tuple[Target, ...]]:
    mapping = denoiser_name_map(family, model.config)
    modules = dict(model.named_modules())
    reached: dict[str, int] = {}
    for name, targets in mapping.items():
        assert targets, name
        for t in targets:
            assert t.component == "denoiser"
            assert t.path in modules, f"{name} -> {t.path}: no such module"
            reached[t.path] = reached.get(t.path, 0) + 1
        if any(t.rows is not None for t in targets):
            start = 0
            for t in targets:  # contiguous blocks, each exactly its module's rows
                assert t.rows[0] == start
                start = t.rows[1]
                assert t.rows[1] - t.rows[0] == modules[t.path].weight.shape[0]
            ins = {modules[t.path].weight.shape[1] for t in targets}
            assert len(ins) == 1, f"{name}: fused targets differ in input width"
    wanted = [
        p
        for p, m in modules.items()
        if isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight is not None
    ]
    missing = [p for p in wanted if p not in reached]
    assert not missing, f"{family}: not reached by the map: {missing[:5]}"
    twice = [p for p, n in reached.items() if n != 1]
    assert not twice, f"{family}: reached more than once: {twice[:5]}"
    return mapping


@pytest.mark.parametrize("family", FAMILIES)
def test_every_linear_and_conv_is_reached_exactly_once(models, family):
    _check_map(models[family], family)


def test_a_deeper_unet_maps_too():
    mapping = _check_map(_deeper_unet(), "sdxl")
    # nrb 2: level 1 starts at input_blocks.4, its attention at .1, 1 transformer block
    assert mapping["input_blocks.4.1.transformer_blocks.0.attn1.to_q"] == (
        Target("denoiser", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
    )
    assert mapping["input_blocks.8.1.transformer_blocks.2.ff.net.2"][0].path == (
        "down_blocks.2.attentions.1.transformer_blocks.2.ff.net.2"
    )
    assert mapping["input_blocks.3.0.op"][0].path == "down_blocks.0.downsamplers.0.conv"
    assert mapping["output_blocks.2.2.conv"][0].path == "up_blocks.0.upsamplers.0.conv"
    assert mapping["output_blocks.5.2.conv"][0].path == "up_blocks.1.upsamplers.0.conv"
    assert mapping["middle_block.1.transformer_blocks.2.attn2.to_k"][0].path == (
        "mid_block.attentions.0.transformer_blocks.2.attn2.to_k"
    )


def test_stated_names_of_the_tiny_models(models):
    sd15 = denoiser_name_map("sd15", models["sd15"].config)
    assert sd15["input_blocks.1.1.proj_in"][0].path == "down_blocks.0.attentions.0.proj_in"
    assert (
        sd15["input_blocks.3.0.skip_connection"][0].path == "down_blocks.1.resnets.0.conv_shortcut"
    )
    assert sd15["output_blocks.1.1.conv"][0].path == "up_blocks.0.upsamplers.0.conv"
    assert sd15["out.2"][0].path == "conv_out"
    sdxl = denoiser_name_map("sdxl", models["sdxl"].config)
    assert sdxl["label_emb.0.2"][0].path == "add_embedding.linear_2"
    assert sdxl["output_blocks.1.2.conv"][0].path == "up_blocks.0.upsamplers.0.conv"
    flux = denoiser_name_map("flux", models["flux"].config)
    h = 64  # 2 heads x 32
    assert flux["single_blocks.1.linear1"] == (
        Target("denoiser", "single_transformer_blocks.1.attn.to_q", (0, h)),
        Target("denoiser", "single_transformer_blocks.1.attn.to_k", (h, 2 * h)),
        Target("denoiser", "single_transformer_blocks.1.attn.to_v", (2 * h, 3 * h)),
        Target("denoiser", "single_transformer_blocks.1.proj_mlp", (3 * h, 7 * h)),
    )
    assert flux["final_layer.adaLN_modulation.1"] == (
        Target("denoiser", "norm_out.linear", None, "swap_halves"),
    )
    sd3 = denoiser_name_map("sd3", models["sd3"].config)
    assert sd3["joint_blocks.1.context_block.adaLN_modulation.1"][0].transform == "swap_halves"
    assert sd3["joint_blocks.0.context_block.adaLN_modulation.1"][0].transform is None
    assert "joint_blocks.1.context_block.attn.proj" not in sd3  # context_pre_only


def test_swap_halves_is_its_own_inverse():
    t = torch.arange(12.0).reshape(6, 2)
    swapped = apply_transform("swap_halves", t)
    assert torch.equal(swapped[:3], t[3:]) and torch.equal(
        apply_transform("swap_halves", swapped), t
    )
    with pytest.raises(ValueError, match="unknown transform"):
        Target("denoiser", "x", None, "rotate")


def test_unknown_family_has_no_foreign_names():
    assert denoiser_name_map("generic", {}) == {}


# Names read off published full-size files (kohya SD1.5/SDXL, BFL Flux, SAI SD3), mapped from
# the stock configs alone (no model is built).
SD15_CONFIG = {
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
}
SDXL_CONFIG = {
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "addition_embed_type": "text_time",
}


@pytest.mark.parametrize(
    ("family", "config", "theirs", "ours"),
    [
        (
            "sd15",
            SD15_CONFIG,
            "input_blocks.1.1.transformer_blocks.0.attn2.to_k",
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
        ),
        ("sd15", SD15_CONFIG, "input_blocks.11.0.out_layers.3", "down_blocks.3.resnets.1.conv2"),
        ("sd15", SD15_CONFIG, "input_blocks.9.0.op", "down_blocks.2.downsamplers.0.conv"),
        ("sd15", SD15_CONFIG, "output_blocks.2.1.conv", "up_blocks.0.upsamplers.0.conv"),
        ("sd15", SD15_CONFIG, "output_blocks.5.2.conv", "up_blocks.1.upsamplers.0.conv"),
        ("sd15", SD15_CONFIG, "output_blocks.11.1.proj_out", "up_blocks.3.attentions.2.proj_out"),
        (
            "sd15",
            SD15_CONFIG,
            "output_blocks.3.0.skip_connection",
            "up_blocks.1.resnets.0.conv_shortcut",
        ),
        (
            "sdxl",
            SDXL_CONFIG,
            "input_blocks.4.1.transformer_blocks.1.attn1.to_q",
            "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q",
        ),
        (
            "sdxl",
            SDXL_CONFIG,
            "input_blocks.8.1.transformer_blocks.9.ff.net.2",
            "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2",
        ),
        (
            "sdxl",
            SDXL_CONFIG,
            "input_blocks.4.0.skip_connection",
            "down_blocks.1.resnets.0.conv_shortcut",
        ),
        (
            "sdxl",
            SDXL_CONFIG,
            "middle_block.1.transformer_blocks.9.attn2.to_out.0",
            "mid_block.attentions.0.transformer_blocks.9.attn2.to_out.0",
        ),
        (
            "sdxl",
            SDXL_CONFIG,
            "output_blocks.0.1.transformer_blocks.9.attn1.to_v",
            "up_blocks.0.attentions.0.transformer_blocks.9.attn1.to_v",
        ),
        ("sdxl", SDXL_CONFIG, "output_blocks.2.2.conv", "up_blocks.0.upsamplers.0.conv"),
        (
            "sdxl",
            SDXL_CONFIG,
            "output_blocks.8.0.skip_connection",
            "up_blocks.2.resnets.2.conv_shortcut",
        ),
        ("sdxl", SDXL_CONFIG, "label_emb.0.0", "add_embedding.linear_1"),
    ],
)
def test_full_size_unet_names(family, config, theirs, ours):
    mapping = denoiser_name_map(family, config)
    assert mapping[theirs] == (Target("denoiser", ours),)


def test_full_size_flux_and_sd3_rows():
    flux = denoiser_name_map(
        "flux",
        {
            "num_attention_heads": 24,
            "attention_head_dim": 128,
            "num_layers": 19,
            "num_single_layers": 38,
            "guidance_embeds": True,
        },
    )
    assert [t.rows for t in flux["single_blocks.37.linear1"]] == [
        (0, 3072),
        (3072, 6144),
        (6144, 9216),
        (9216, 21504),
    ]
    assert flux["double_blocks.18.txt_attn.qkv"][2] == Target(
        "denoiser", "transformer_blocks.18.attn.add_v_proj", (6144, 9216)
    )
    assert flux["guidance_in.out_layer"][0].path == "time_text_embed.guidance_embedder.linear_2"
    assert "double_blocks.19.img_attn.qkv" not in flux and "single_blocks.38.linear1" not in flux
    sd3 = denoiser_name_map(
        "sd3", {"num_attention_heads": 24, "attention_head_dim": 64, "num_layers": 24}
    )
    assert sd3["joint_blocks.23.context_block.adaLN_modulation.1"][0].transform == "swap_halves"
    assert sd3["joint_blocks.22.context_block.adaLN_modulation.1"][0].transform is None
    assert [t.rows for t in sd3["joint_blocks.5.x_block.attn.qkv"]] == [
        (0, 1536),
        (1536, 3072),
        (3072, 4608),
    ]
    sd35 = denoiser_name_map(
        "sd3",
        {
            "num_attention_heads": 24,
            "attention_head_dim": 64,
            "num_layers": 24,
            "qk_norm": "rms_norm",
            "dual_attention_layers": [0, 1],
        },
    )
    assert sd35["joint_blocks.1.x_block.attn2.qkv"][0].path == "transformer_blocks.1.attn2.to_q"
    assert (
        sd35["joint_blocks.3.context_block.attn.ln_k"][0].path
        == "transformer_blocks.3.attn.norm_added_k"
    )
    assert "joint_blocks.2.x_block.attn2.qkv" not in sd35
