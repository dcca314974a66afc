"""Run by test_e2e_kohya_layout.py with COMFYUI_PYTHON (cwd COMFYUI_PATH): ComfyUI's own model
classes and stock ``LoraLoader`` on our files, for one family.

    python comfy_layout_probe.py COMFYUI_PATH REPO_ROOT FAMILY DENOISER_DIR REFERENCE LORA...

ComfyUI cannot detect the tiny models from their weights (its detection hard-codes the real
widths), so the model is built here from ComfyUI's own classes: the diffusers weights are
renamed with ComfyUI's own maps (``comfy.utils.unet_to_diffusers`` / ``mmdit_to_diffusers`` /
``flux_to_diffusers``, fused rows placed at their offsets, the adaLN swap applied), ComfyUI
derives the model config from the renamed weights (``detect_unet_config``), the widths it
cannot derive (heads, Flux sizes) are set from the diffusers config, and the model class is
``comfy.supported_models.<Family>(config).get_model()``. SD1.5 (its real width) is detected
by ComfyUI itself (``load_diffusion_model_state_dict``).

For each LORA the stock ``LoraLoader`` node patches the model at strengths 1 and 0.5; the
patched ComfyUI weights are compared with the diffusers twin patched by ``lycoris_core`` with
REFERENCE (the file our Train node wrote), renamed by the same ComfyUI map, and so are the
outputs of ComfyUI's diffusion model and the twin on the same inputs. Every log record is
kept ("lora key not loaded"). Prints one JSON line.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

COMFY, REPO, FAMILY, DENOISER_DIR, REFERENCE, *LORAS = sys.argv[1:]
sys.path.insert(0, COMFY)
sys.path.append(REPO)  # after ComfyUI: our `nodes` package must not shadow its nodes.py
os.chdir(COMFY)


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname}: {record.getMessage()}")


RECORDS = Records()
logging.getLogger().addHandler(RECORDS)
logging.getLogger().setLevel(logging.INFO)

import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True

import comfy.lora  # noqa: E402
import comfy.model_detection  # noqa: E402
import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.supported_models  # noqa: E402
import comfy.utils  # noqa: E402
import folder_paths  # noqa: E402
import torch  # noqa: E402

import nodes  # noqa: E402  (ComfyUI's nodes.py: COMFY is first on sys.path)
from lycoris_core import load_adapter, patched  # noqa: E402

torch.set_num_threads(1)
CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- the models
def load_denoiser():
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    cls = {"flux": FluxTransformer2DModel, "sd3": SD3Transformer2DModel}.get(
        FAMILY, UNet2DConditionModel
    )
    return cls.from_pretrained(DENOISER_DIR).eval()


def _per_level(value, n):
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def unet_map_config(cfg) -> dict:
    """What ``unet_to_diffusers`` reads, from a diffusers UNet config."""
    levels = len(cfg.block_out_channels)
    layers = _per_level(cfg.layers_per_block, levels)
    depth = _per_level(cfg.transformer_layers_per_block, levels)
    attn = ["CrossAttn" in t for t in cfg.down_block_types]
    up_attn = ["CrossAttn" in t for t in cfg.up_block_types]
    down = [depth[lvl] if attn[lvl] else 0 for lvl in range(levels) for _ in range(layers[lvl])]
    rev = depth[::-1]
    out = []
    for x in range(levels):  # ComfyUI pops from the end, deepest level first
        out = [rev[x] if up_attn[x] else 0] * (layers[::-1][x] + 1) + out
    return {
        "num_res_blocks": layers,
        "channel_mult": [c // cfg.block_out_channels[0] for c in cfg.block_out_channels],
        "transformer_depth": down,
        "transformer_depth_output": out,
        "transformer_depth_middle": depth[-1],
    }


def comfy_map(ref) -> dict:
    """ComfyUI's diffusers -> ComfyUI key map for this family."""
    cfg = ref.config
    if FAMILY in ("sd15", "sdxl"):
        return comfy.utils.unet_to_diffusers(unet_map_config(cfg))
    if FAMILY == "sd3":
        return comfy.utils.mmdit_to_diffusers({"depth": cfg.num_layers})
    hidden = cfg.num_attention_heads * cfg.attention_head_dim
    return comfy.utils.flux_to_diffusers(
        {
            "depth": cfg.num_layers,
            "depth_single_blocks": cfg.num_single_layers,
            "hidden_size": hidden,
        }
    )


def rename(sd: dict, mapping: dict) -> tuple[dict, list[str]]:
    """diffusers state dict -> ComfyUI's, fused rows at ComfyUI's offsets, swaps applied."""
    out, parts, unmapped = {}, {}, []
    for k, v in sd.items():
        to = mapping.get(k)
        if to is None:
            unmapped.append(k)
        elif isinstance(to, str):
            out[to] = v
        elif to[1] is None:  # (key, None, function)
            out[to[0]] = to[2](v)
        else:  # (key, (dim, offset, size))
            parts.setdefault(to[0], []).append((to[1][1], v))
    for key, pieces in parts.items():
        out[key] = torch.cat([v for _, v in sorted(pieces, key=lambda p: p[0])])
    return out, sorted(unmapped)


def comfy_model(ref, ldm: dict):
    """A ComfyUI ModelPatcher of this family holding `ldm` (ComfyUI names, no prefix)."""
    if FAMILY == "sd15":
        model = comfy.sd.load_diffusion_model_state_dict(
            {f"model.diffusion_model.{k}": v for k, v in ldm.items()}
        )
        if model is None:
            raise SystemExit("ComfyUI could not detect the SD1.5 UNet")
        return model, type(model.model.model_config).__name__
    cfg = ref.config
    detected = comfy.model_detection.detect_unet_config(ldm, "")
    if FAMILY == "sdxl":
        mc = comfy.supported_models.SDXL(detected)
        heads = _per_level(cfg.attention_head_dim, len(cfg.block_out_channels))
        head_dims = {c // h for c, h in zip(cfg.block_out_channels, heads, strict=True)}
        (mc.unet_config["num_head_channels"],) = head_dims  # diffusers' "head dim" = heads
        mc.unet_config["num_heads"] = -1
    elif FAMILY == "sd3":
        mc = comfy.supported_models.SD3(detected)
    else:
        hidden = cfg.num_attention_heads * cfg.attention_head_dim
        detected.update(
            hidden_size=hidden,
            num_heads=cfg.num_attention_heads,
            context_in_dim=cfg.joint_attention_dim,
            axes_dim=list(cfg.axes_dims_rope),
        )
        mc = comfy.supported_models.Flux(detected)
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model({}, "", device=CPU)
    missing, unexpected = model.diffusion_model.load_state_dict(ldm, strict=False)
    if missing or unexpected:
        raise SystemExit(
            f"ComfyUI {FAMILY} model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=CPU, offload_device=CPU)
    return patcher, type(mc).__name__


def patched_weights(patcher) -> dict:
    patcher.patch_model()
    try:
        return {
            k: v.detach().clone() for k, v in patcher.model.diffusion_model.state_dict().items()
        }
    finally:
        patcher.unpatch_model()


# ----------------------------------------------------------------------------- outputs
def make_inputs(ref) -> dict:
    """The same inputs for both models: the diffusers call and ComfyUI's diffusion_model call."""
    g = torch.Generator().manual_seed(0)
    cfg = ref.config

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    if FAMILY in ("sd15", "sdxl"):
        x, ctx, t = rnd(1, cfg.in_channels, 16, 16), rnd(1, 7, cfg.cross_attention_dim), 500.0
        ours = {"sample": x, "timestep": torch.tensor([t]), "encoder_hidden_states": ctx}
        theirs = {"x": x, "timesteps": torch.tensor([t]), "context": ctx}
        if cfg.addition_embed_type == "text_time":
            n = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            text, ids = rnd(1, n), rnd(1, 6) * 100
            ours["added_cond_kwargs"] = {"text_embeds": text, "time_ids": ids}
            with torch.no_grad():  # what diffusers feeds add_embedding = ComfyUI's `y`
                emb = ref.add_time_proj(ids.flatten()).reshape(1, -1)
            theirs["y"] = torch.cat([text, emb], dim=-1)
        return {"ours": ours, "theirs": theirs}
    if FAMILY == "sd3":
        x, ctx, y = rnd(1, cfg.in_channels, 8, 8), rnd(1, 5, cfg.joint_attention_dim), None
        y = rnd(1, cfg.pooled_projection_dim)
        t = torch.tensor([500.0])
        ours = {"hidden_states": x, "encoder_hidden_states": ctx, "pooled_projections": y}
        return {
            "ours": {**ours, "timestep": t},
            "theirs": {"x": x, "timesteps": t, "context": ctx, "y": y},
        }
    # Flux: ComfyUI packs 2x2 patches itself and numbers them (row, column) as diffusers does
    c, h, w = cfg.in_channels // 4, 8, 8
    x, ctx, y = (
        rnd(1, c, h, w),
        rnd(1, 5, cfg.joint_attention_dim),
        rnd(1, cfg.pooled_projection_dim),
    )
    t, guidance = torch.tensor([0.6]), torch.tensor([3.5])
    packed = x.view(1, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, -1, c * 4)
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    ours = {
        "hidden_states": packed,
        "encoder_hidden_states": ctx,
        "pooled_projections": y,
        "timestep": t,
        "img_ids": ids.reshape(-1, 3),
        "txt_ids": torch.zeros(5, 3),
        "guidance": guidance if cfg.guidance_embeds else None,
    }
    theirs = {"x": x, "timestep": t, "context": ctx, "y": y, "guidance": guidance}
    return {"ours": ours, "theirs": theirs, "unpack": (c, h, w)}


def outputs(ref, patcher, inputs, adapter=None, strength=1.0) -> torch.Tensor:
    with torch.no_grad():
        if patcher is not None:
            patcher.patch_model()
            try:
                return patcher.model.diffusion_model(**inputs["theirs"]).float()
            finally:
                patcher.unpatch_model()
        if adapter is None:
            out = ref(**inputs["ours"])[0]
        else:
            with patched(ref, [(adapter, strength)], mode="merge"):
                out = ref(**inputs["ours"])[0]
        if "unpack" in inputs:
            c, h, w = inputs["unpack"]
            out = out.view(1, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(1, c, h, w)
        return out.float()


# ----------------------------------------------------------------------------- main
def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def main() -> None:
    ref = load_denoiser()
    mapping = comfy_map(ref)
    base_sd = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    ldm, unmapped = rename(base_sd, mapping)
    base, model_class = comfy_model(ref, ldm)
    base_weights = patched_weights(base)
    report = {
        "model_class": type(base.model).__name__,
        "model_config": model_class,
        "unmapped_keys": unmapped,
        "base_weights_max_abs_diff": max_diff(ldm, {k: base_weights[k] for k in ldm}),
        "files": {},
    }
    inputs = make_inputs(ref)
    ref_base = outputs(ref, None, inputs)
    report["base_max_abs_diff"] = float((ref_base - outputs(ref, base, inputs)).abs().max())
    report["base_max_abs"] = float(ref_base.abs().max())
    reference = load_adapter(REFERENCE)
    loader = nodes.LoraLoader()
    for path in map(Path, LORAS):
        folder_paths.add_model_folder_path("loras", str(path.parent), is_default=True)
        start = len(RECORDS.lines)
        lora_sd = comfy.utils.load_torch_file(str(path), safe_load=True)
        key_map = comfy.lora.model_lora_keys_unet(base.model, {})
        loaded = comfy.lora.load_lora(lora_sd, key_map, log_missing=False)
        entry = {
            "file_layers": len(load_adapter(path).layers),
            "file_keys": len(lora_sd),
            "loaded_patches": len(loaded),
            "names": sorted({k.rsplit(".", 2)[0] for k in lora_sd})[:400],
        }
        for strength in (1.0, 0.5):
            patcher, _ = loader.load_lora(base, None, path.name, strength, 0.0)
            entry.setdefault("model_patches", len(patcher.patches))
            got = patched_weights(patcher)
            with patched(ref, [(reference, strength)], mode="merge"):
                want_sd = {k: v.detach().clone() for k, v in ref.state_dict().items()}
            want, _ = rename(want_sd, mapping)
            result = {
                "weights_max_abs_diff": max_diff(want, {k: got[k] for k in want}),
                "weights_effect": max_diff(want, ldm),
                "changed_weights": sum(not torch.equal(got[k], base_weights[k]) for k in got),
            }
            w = outputs(ref, None, inputs, reference, strength)
            result["max_abs_diff"] = float((w - outputs(ref, patcher, inputs)).abs().max())
            result["effect_max_abs"] = float((w - ref_base).abs().max())
            entry[f"s{strength:g}"] = result
        entry["log"] = RECORDS.lines[start:]
        report["files"][path.name] = entry
    print(json.dumps(report))


if __name__ == "__main__":
    main()
