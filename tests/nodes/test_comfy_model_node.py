"""The Apply LyCORIS (MODEL, CLIP) node's glue, with stand-ins for ComfyUI's ModelPatcher/CLIP.

The stand-ins keep what the node relies on (``clone``, ``add_patches`` taking keys or
``(key, offset)`` tuples, ``model_state_dict``) and apply the patches the way ComfyUI's
``comfy.lora.calculate_weight`` does (a narrowed view for an offset, the whole key otherwise),
so the test checks the node end to end against a LoRA delta computed independently here.
The same node on the real ComfyUI classes: tests/e2e/test_e2e_comfy_model.py.
"""

from __future__ import annotations

import torch

P = "diffusion_model."
H = 8  # Flux-like fused qkv: 3 blocks of H rows


class FakePatcher:
    def __init__(self, sd: dict[str, torch.Tensor]) -> None:
        self.sd = sd
        self.patches: dict[str, list] = {}

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        return self.sd

    def clone(self) -> FakePatcher:
        n = FakePatcher(self.sd)
        n.patches = {k: list(v) for k, v in self.patches.items()}
        return n

    def add_patches(self, patches: dict, strength_patch: float = 1.0) -> list:
        for k, v in patches.items():
            key, offset = (k, None) if isinstance(k, str) else k
            self.patches.setdefault(key, []).append((strength_patch, v, offset))
        return list(patches)

    def weights(self) -> dict[str, torch.Tensor]:
        out = {}
        for key, patches in self.patches.items():
            w = self.sd[key].float().clone()
            for strength, v, offset in patches:
                part = w if offset is None else w.narrow(*offset)
                v.calculate_weight(part, key, strength, 1.0, offset, None, torch.float32, None)
            out[key] = w
        return out


class FakeClip:
    def __init__(self, sd: dict[str, torch.Tensor]) -> None:
        self.patcher = FakePatcher(sd)

    def clone(self) -> FakeClip:
        n = FakeClip(self.patcher.sd)
        n.patcher = self.patcher.clone()
        return n

    def add_patches(self, patches: dict, strength_patch: float = 1.0) -> list:
        return self.patcher.add_patches(patches, strength_patch)


def _flux_host() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sd = {
        f"{P}double_blocks.0.img_attn.proj.weight": torch.randn(H, H, generator=g),
        f"{P}double_blocks.0.img_attn.qkv.weight": torch.randn(3 * H, H, generator=g),
        f"{P}double_blocks.0.img_mlp.0.weight": torch.randn(4 * H, H, generator=g),
    }
    return sd


def _lora(g, out_f, in_f):
    return torch.randn(2, in_f, generator=g), torch.randn(out_f, 2, generator=g)


def test_node_patches_model_slices_and_clip(nodes):
    from lycoris_core.adapters import adapter_from_state_dict

    node = nodes["LycorisApplyComfy"]()
    g = torch.Generator().manual_seed(1)
    model = FakePatcher(_flux_host())
    clip_key = "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    clip = FakeClip({clip_key: torch.randn(H, H, generator=g)})
    (dk, uk), (dp, up), (dc, uc) = _lora(g, H, H), _lora(g, H, H), _lora(g, H, H)
    sd = {
        "lycoris_transformer_blocks_0_attn_to_k.lora_down.weight": dk,  # diffusers name: rows H:2H
        "lycoris_transformer_blocks_0_attn_to_k.lora_up.weight": uk,
        "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": dp,  # BFL name: whole key
        "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": up,
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": dc,
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": uc,
    }
    adapter = adapter_from_state_dict(sd, source="mixed file")
    new_model, new_clip = node.run(model, clip, adapter, 0.7, -1.0)
    assert new_model is not model and new_clip is not clip and model.patches == {}
    qkv = f"{P}double_blocks.0.img_attn.qkv.weight"
    assert set(new_model.patches) == {qkv, f"{P}double_blocks.0.img_attn.proj.weight"}
    assert new_model.patches[qkv][0][2] == (0, H, H)
    got = new_model.weights()
    base = model.sd[qkv]
    want = base.clone()
    want[H : 2 * H] += 0.7 * uk @ dk  # alpha absent: scale 1
    torch.testing.assert_close(got[qkv], want, rtol=1e-5, atol=1e-5)
    proj = f"{P}double_blocks.0.img_attn.proj.weight"
    torch.testing.assert_close(got[proj], model.sd[proj] + 0.7 * up @ dp, rtol=1e-5, atol=1e-5)
    clip_w = new_clip.patcher.weights()[clip_key]
    torch.testing.assert_close(clip_w, clip.patcher.sd[clip_key] - uc @ dc, rtol=1e-5, atol=1e-5)
    # strength 0: the inputs themselves
    off_model, off_clip = node.run(model, clip, adapter, 0.0, 0.0)
    assert off_model is model and off_clip is clip
