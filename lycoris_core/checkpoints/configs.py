"""diffusers / transformers configs from a checkpoint's tensor shapes plus ``facts.py``.

Every function takes ``shapes``: the component's tensor names (its file prefix removed) mapped
to their shapes, read from the header only, so a wrong file is refused before any weight is
read. Names are those of the original layouts: ldm UNet/VAE (CompVis ``ldm`` code), SAI MMDiT
(SD3), BFL Flux, HF CLIP/T5 (as ComfyUI stores text encoders).
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import ModelLoadError
from ..tiny.denoisers import _flux_rope_axes
from .facts import Profile

Shapes = dict[str, tuple[int, ...]]


def _count(shapes: Shapes, pattern: str) -> int:
    """How many distinct integers fill the ``(\\d+)`` of `pattern` among the names."""
    rx = re.compile(pattern)
    return len({m.group(1) for k in shapes if (m := rx.match(k))})


def _need(shapes: Shapes, key: str, what: str) -> tuple[int, ...]:
    if key not in shapes:
        raise ModelLoadError(
            f"{what}: tensor {key!r} is missing; the file is not a complete {what}"
        )
    return shapes[key]


# --------------------------------------------------------------------------- ldm UNet


def _unet_levels(shapes: Shapes) -> tuple[list[int], list[int], int]:
    """Per level: channels and transformer depth (0 = no attention); res blocks per level."""
    chans: list[int] = []
    depths: list[int] = []
    per_level = 0
    count = 0
    k = 1
    while (
        f"input_blocks.{k}.0.op.weight" in shapes
        or f"input_blocks.{k}.0.out_layers.3.weight" in shapes
    ):
        if f"input_blocks.{k}.0.op.weight" in shapes:  # a downsampler closes the level
            per_level = max(per_level, count)
            count = 0
        else:
            if count == 0:
                chans.append(shapes[f"input_blocks.{k}.0.out_layers.3.weight"][0])
                depths.append(_count(shapes, rf"input_blocks\.{k}\.1\.transformer_blocks\.(\d+)\."))
            count += 1
        k += 1
    per_level = max(per_level, count)
    return chans, depths, per_level


def unet_config(shapes: Shapes, variant: str, profile: Profile, pooled_dim: int | None) -> dict:
    """``UNet2DConditionModel`` config of an ldm UNet (SD1.x, SD2.x, SDXL)."""
    what = "UNet"
    conv_in = _need(shapes, "input_blocks.0.0.weight", what)
    chans, depths, per_level = _unet_levels(shapes)
    if not chans:
        raise ModelLoadError("UNet: no resnet blocks found under input_blocks; not an ldm UNet")
    attn_key = next((k for k in shapes if k.endswith("attn2.to_k.weight")), None)
    if attn_key is None:
        raise ModelLoadError(
            "UNet: no cross-attention (attn2.to_k) found; not a text-to-image UNet"
        )
    proj_in = next(k for k in shapes if k.endswith("1.proj_in.weight"))
    mid_depth = _count(shapes, r"middle_block\.1\.transformer_blocks\.(\d+)\.")
    if variant == "sd1":
        heads: Any = profile.unet_heads_sd1
    else:
        heads = tuple(max(1, c // profile.unet_head_dim) for c in chans)
    layers = tuple(max(d, 1) for d in depths)
    if mid_depth:
        layers = (*layers[:-1], mid_depth) if depths[-1] == 0 else layers
    cfg: dict[str, Any] = {
        "sample_size": profile.unet_sample["sdxl" if variant.startswith("sdxl") else variant],
        "in_channels": conv_in[1],
        "out_channels": _need(shapes, "out.2.weight", what)[0],
        "down_block_types": tuple("CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths),
        "up_block_types": tuple(
            "CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depths)
        ),
        "block_out_channels": tuple(chans),
        "layers_per_block": per_level,
        "cross_attention_dim": shapes[attn_key][1],
        "attention_head_dim": heads,
        "use_linear_projection": len(shapes[proj_in]) == 2,
        "transformer_layers_per_block": layers if len(set(layers)) > 1 else layers[0],
        "upcast_attention": variant == "sd2",
    }
    if "label_emb.0.0.weight" in shapes:  # SDXL: pooled text + size/crop ids (5 for refiner)
        adm = shapes["label_emb.0.0.weight"][1]
        ids = 5 if variant == "sdxl-refiner" else 6
        if pooled_dim is None:
            raise ModelLoadError("UNet: an SDXL UNet needs its CLIP-G text encoder (pooled size)")
        if (adm - pooled_dim) % ids:
            raise ModelLoadError(
                f"UNet: added-conditioning input {adm} does not fit a pooled text embedding of "
                f"{pooled_dim} plus {ids} size ids; the text encoder is of another model"
            )
        cfg.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=(adm - pooled_dim) // ids,
            projection_class_embeddings_input_dim=adm,
        )
    return cfg


# --------------------------------------------------------------------------- ldm VAE


def vae_config(shapes: Shapes, family: str, profile: Profile) -> dict:
    """``AutoencoderKL`` config of an ldm VAE (``encoder.down.N`` / ``decoder.up.N`` names)."""
    what = "VAE"
    conv_in = _need(shapes, "encoder.conv_in.weight", what)
    levels = _count(shapes, r"encoder\.down\.(\d+)\.")
    chans = [shapes[f"encoder.down.{i}.block.0.conv2.weight"][0] for i in range(levels)]
    per = _count(shapes, r"encoder\.down\.0\.block\.(\d+)\.")
    latent = _need(shapes, "decoder.conv_in.weight", what)[1]
    scaling, shift = profile.vae_scaling[family]
    return {
        "in_channels": conv_in[1],
        "out_channels": _need(shapes, "decoder.conv_out.weight", what)[0],
        "down_block_types": ("DownEncoderBlock2D",) * levels,
        "up_block_types": ("UpDecoderBlock2D",) * levels,
        "block_out_channels": tuple(chans),
        "layers_per_block": per,
        "latent_channels": latent,
        "norm_num_groups": profile.vae_groups,
        "sample_size": 32 if profile.name == "tiny" else 1024 if family != "sd15" else 512,
        "scaling_factor": scaling,
        "shift_factor": shift,
        "use_quant_conv": "quant_conv.weight" in shapes,
        "use_post_quant_conv": "post_quant_conv.weight" in shapes,
    }


# --------------------------------------------------------------------------- text encoders


def clip_config(shapes: Shapes, profile: Profile, big: bool, tokens: dict[str, int]) -> dict:
    """``CLIPTextConfig`` kwargs from HF-named CLIP shapes (``text_model.`` prefix removed).

    `big`: OpenCLIP ViT-H/bigG (gelu in the released models); `tokens`: bos/eos/pad ids of
    the tokenizer the encoder is used with.
    """
    what = "CLIP text encoder"
    vocab, hidden = _need(shapes, "embeddings.token_embedding.weight", what)
    positions = _need(shapes, "embeddings.position_embedding.weight", what)[0]
    layers = _count(shapes, r"encoder\.layers\.(\d+)\.")
    inter = _need(shapes, "encoder.layers.0.mlp.fc1.weight", what)[0]
    proj = shapes.get("text_projection.weight", (hidden, hidden))[0]
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "projection_dim": proj,
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, hidden // profile.clip_head_dim),
        "max_position_embeddings": positions,
        "hidden_act": profile.clip_act_big if big else profile.clip_act_l,
        **tokens,
    }


def t5_config(shapes: Shapes, profile: Profile, tokens: dict[str, int]) -> dict:
    """``T5Config`` kwargs (encoder only) from T5 shapes (``shared.weight``, ``encoder.*``).

    The head count is the width of the relative attention bias (``[buckets, heads]``)."""
    what = "T5 text encoder"
    vocab, d_model = _need(shapes, "shared.weight", what)
    bias = _need(
        shapes, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", what
    )
    inner = _need(shapes, "encoder.block.0.layer.0.SelfAttention.q.weight", what)[0]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in shapes
    ff_key = "wi_0" if gated else "wi"
    d_ff = _need(shapes, f"encoder.block.0.layer.1.DenseReluDense.{ff_key}.weight", what)[0]
    return {
        "vocab_size": vocab,
        "d_model": d_model,
        "d_kv": inner // bias[1],
        "d_ff": d_ff,
        "num_layers": _count(shapes, r"encoder\.block\.(\d+)\."),
        "num_decoder_layers": 0,
        "num_heads": bias[1],
        "relative_attention_num_buckets": bias[0],
        "relative_attention_max_distance": profile.t5_max_distance,
        "dropout_rate": 0.0,
        "feed_forward_proj": "gated-gelu" if gated else "relu",
        "is_encoder_decoder": False,
        "use_cache": False,
        **tokens,
    }


# --------------------------------------------------------------------------- transformers


def sd3_config(shapes: Shapes, profile: Profile) -> dict:
    """``SD3Transformer2DModel`` config from SAI MMDiT names (``joint_blocks.N``)."""
    what = "SD3 transformer"
    patch = _need(shapes, "x_embedder.proj.weight", what)
    hidden, in_ch, p, _ = patch
    layers = _count(shapes, r"joint_blocks\.(\d+)\.")
    qk = shapes.get("joint_blocks.0.x_block.attn.ln_q.weight")
    head_dim = qk[0] if qk else profile.sd3_head_dim
    pos = shapes.get("pos_embed")
    max_size = round((pos[1]) ** 0.5) if pos else None
    dual = tuple(i for i in range(layers) if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in shapes)
    final = _need(shapes, "final_layer.linear.weight", what)[0]
    return {
        "sample_size": profile.unet_sample["sd3"],
        "patch_size": p,
        "in_channels": in_ch,
        "out_channels": final // (p * p),
        "num_layers": layers,
        "attention_head_dim": head_dim,
        "num_attention_heads": hidden // head_dim,
        "joint_attention_dim": _need(shapes, "context_embedder.weight", what)[1],
        "caption_projection_dim": _need(shapes, "context_embedder.weight", what)[0],
        "pooled_projection_dim": _need(shapes, "y_embedder.mlp.0.weight", what)[1],
        "pos_embed_max_size": max_size,
        "dual_attention_layers": dual,
        "qk_norm": "rms_norm" if qk else None,
    }


def flux_config(shapes: Shapes) -> dict:
    """``FluxTransformer2DModel`` config from BFL names; the head size is the qk-norm's size,
    the rotary axes follow FLUX.1's split (16, 56, 56 of 128), generalised in ``tiny.py``."""
    what = "Flux transformer"
    img_in = _need(shapes, "img_in.weight", what)
    head_dim = _need(shapes, "double_blocks.0.img_attn.norm.query_norm.scale", what)[0]
    final = _need(shapes, "final_layer.linear.weight", what)[0]
    return {
        "patch_size": 1,
        "in_channels": img_in[1],
        "out_channels": final if final != img_in[1] else None,
        "num_layers": _count(shapes, r"double_blocks\.(\d+)\."),
        "num_single_layers": _count(shapes, r"single_blocks\.(\d+)\."),
        "attention_head_dim": head_dim,
        "num_attention_heads": img_in[0] // head_dim,
        "joint_attention_dim": _need(shapes, "txt_in.weight", what)[1],
        "pooled_projection_dim": _need(shapes, "vector_in.in_layer.weight", what)[1],
        "guidance_embeds": "guidance_in.in_layer.weight" in shapes,
        "axes_dims_rope": _flux_rope_axes(head_dim),
    }
