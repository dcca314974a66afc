"""The Apply node's strength_clip reaches the file's text-encoder layers (ComfyUI's
strength_clip); a workflow saved without it gives them the model strength."""

from __future__ import annotations

import sys

import torch
from safetensors.torch import save_file

from lycoris_core.tiny import build_pipeline

PACK = "comfyui_lycoris_under_test"  # tests/nodes/conftest.py loads the pack under this name


def run(nodes, key, **inputs):
    cls = nodes[key]
    with torch.inference_mode():  # as ComfyUI calls nodes
        return getattr(cls(), cls.FUNCTION)(**inputs)


TE = "lora_te_text_model_encoder_layers_0_self_attn_v_proj"
UNET = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def test_strength_clip_reaches_the_text_encoders(nodes, tmp_path):
    pipe = build_pipeline("sd15")
    v_proj = pipe.text_encoder.get_submodule("encoder.layers.0.self_attn.v_proj")
    to_q = pipe.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    g = torch.Generator().manual_seed(11)
    down_t, up_t = (
        torch.randn(2, v_proj.in_features, generator=g),
        torch.randn(v_proj.out_features, 2, generator=g),
    )
    down_u, up_u = (
        torch.randn(2, to_q.in_features, generator=g),
        torch.randn(to_q.out_features, 2, generator=g),
    )
    tensors = {
        f"{TE}.lora_down.weight": down_t,
        f"{TE}.lora_up.weight": up_t,
        f"{TE}.alpha": torch.tensor(1.0),  # scale 1/2
        f"{UNET}.lora_down.weight": down_u,
        f"{UNET}.lora_up.weight": up_u,
    }
    save_file(tensors, str(tmp_path / "te.safetensors"))
    te_delta, unet_delta = (up_t @ down_t) * 0.5, up_u @ down_u  # unet: no alpha = scale 1
    w_te, w_unet = v_proj.weight.detach().clone(), to_q.weight.detach().clone()

    pack_core = sys.modules[PACK + ".lycoris_core"]
    handles = sys.modules[PACK + ".nodes.handles"]
    base = handles.ModelHandle(pack_core.models.from_pipeline(pipe, "tiny-sd15"))
    adapter = pack_core.load_adapter(tmp_path / "te.safetensors")

    def applied(**extra):
        out = run(nodes, "LycorisApply", model=base, adapter=adapter, mode="merge", **extra)[0]
        out.model.use_adapters(list(out.adapters), mode=out.mode)
        got = (v_proj.weight.detach() - w_te, to_q.weight.detach() - w_unet)
        out.model.restore_base()
        return got

    for clip in (0.0, 0.5, -1.0):
        dt, du = applied(strength=0.8, strength_clip=clip)
        torch.testing.assert_close(dt, clip * te_delta, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(du, 0.8 * unet_delta, atol=1e-5, rtol=1e-5)
    dt, _ = applied(strength=0.8)  # an older workflow without the input
    torch.testing.assert_close(dt, 0.8 * te_delta, atol=1e-5, rtol=1e-5)
    assert torch.equal(v_proj.weight, w_te) and torch.equal(to_q.weight, w_unet)
