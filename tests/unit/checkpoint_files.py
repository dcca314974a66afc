"""Write the tiny pipelines as the single files ComfyUI users have (test fixtures).

Also the checkpoint tests' pytest fixtures (offline mode, the source pipelines, their
tokenizer folders) and :func:`write_set`.

The renaming diffusers -> original layouts is written here from the layouts' descriptions
(CompVis ldm UNet/VAE, OpenCLIP, SAI MMDiT, BFL Flux, ComfyUI's text encoder files), on its
own and in the opposite direction of the loader's conversion (which uses diffusers'
functions), so that a file written here and read back by the loader tests both.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
import torch
from safetensors.torch import save_file

from lycoris_core import tiny

Tensors = dict[str, torch.Tensor]
FP8 = torch.float8_e4m3fn


# --------------------------------------------------------------------------- ldm UNet


def _resnet(src: str, dst: str, sd: Tensors, out: Tensors) -> None:
    names = {
        "norm1": "in_layers.0",
        "conv1": "in_layers.2",
        "time_emb_proj": "emb_layers.1",
        "norm2": "out_layers.0",
        "conv2": "out_layers.3",
        "conv_shortcut": "skip_connection",
    }
    for a, b in names.items():
        for leaf in ("weight", "bias"):
            if f"{src}.{a}.{leaf}" in sd:
                out[f"{dst}.{b}.{leaf}"] = sd[f"{src}.{a}.{leaf}"]


def _same(src: str, dst: str, sd: Tensors, out: Tensors) -> None:
    for k, v in sd.items():
        if k.startswith(src + "."):
            out[dst + k[len(src) :]] = v


def unet_to_ldm(unet: Any) -> Tensors:
    sd, cfg, out = unet.state_dict(), unet.config, {}
    per = cfg.layers_per_block
    for a, b in (
        ("time_embedding.linear_1", "time_embed.0"),
        ("time_embedding.linear_2", "time_embed.2"),
        ("add_embedding.linear_1", "label_emb.0.0"),
        ("add_embedding.linear_2", "label_emb.0.2"),
        ("conv_in", "input_blocks.0.0"),
        ("conv_norm_out", "out.0"),
        ("conv_out", "out.2"),
    ):
        _same(a, b, sd, out)
    for i, _ in enumerate(cfg.down_block_types):
        for j in range(per):
            n = 1 + i * (per + 1) + j
            _resnet(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{n}.0", sd, out)
            _same(f"down_blocks.{i}.attentions.{j}", f"input_blocks.{n}.1", sd, out)
        _same(
            f"down_blocks.{i}.downsamplers.0.conv",
            f"input_blocks.{1 + i * (per + 1) + per}.0.op",
            sd,
            out,
        )
    _resnet("mid_block.resnets.0", "middle_block.0", sd, out)
    _same("mid_block.attentions.0", "middle_block.1", sd, out)
    _resnet("mid_block.resnets.1", "middle_block.2", sd, out)
    for i, kind in enumerate(cfg.up_block_types):
        for j in range(per + 1):
            n = i * (per + 1) + j
            _resnet(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{n}.0", sd, out)
            _same(f"up_blocks.{i}.attentions.{j}", f"output_blocks.{n}.1", sd, out)
        up = 2 if kind.startswith("CrossAttn") else 1
        _same(
            f"up_blocks.{i}.upsamplers.0.conv",
            f"output_blocks.{i * (per + 1) + per}.{up}.conv",
            sd,
            out,
        )
    assert len(out) == len(sd)  # every tensor placed
    return out


# --------------------------------------------------------------------------- ldm VAE


def _vae_resnet(src: str, dst: str, sd: Tensors, out: Tensors) -> None:
    for k, v in sd.items():
        if k.startswith(src + "."):
            out[dst + k[len(src) :].replace("conv_shortcut", "nin_shortcut")] = v


def _vae_attention(src: str, dst: str, sd: Tensors, out: Tensors) -> None:
    names = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for a, b in names.items():
        for leaf in ("weight", "bias"):
            t = sd[f"{src}.{a}.{leaf}"]
            out[f"{dst}.{b}.{leaf}"] = (
                t[:, :, None, None] if leaf == "weight" and a != "group_norm" else t
            )


def vae_to_ldm(vae: Any) -> Tensors:
    sd, out = vae.state_dict(), {}
    levels = len(vae.config.block_out_channels)
    for part in ("encoder", "decoder"):
        _same(f"{part}.conv_in", f"{part}.conv_in", sd, out)
        _same(f"{part}.conv_out", f"{part}.conv_out", sd, out)
        _same(f"{part}.conv_norm_out", f"{part}.norm_out", sd, out)
        _vae_resnet(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", sd, out)
        _vae_resnet(f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", sd, out)
        _vae_attention(f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", sd, out)
    for i in range(levels):
        for j in range(vae.config.layers_per_block):
            _vae_resnet(
                f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", sd, out
            )
        _same(
            f"encoder.down_blocks.{i}.downsamplers.0.conv",
            f"encoder.down.{i}.downsample.conv",
            sd,
            out,
        )
        for j in range(vae.config.layers_per_block + 1):
            _vae_resnet(
                f"decoder.up_blocks.{i}.resnets.{j}",
                f"decoder.up.{levels - 1 - i}.block.{j}",
                sd,
                out,
            )
        _same(
            f"decoder.up_blocks.{i}.upsamplers.0.conv",
            f"decoder.up.{levels - 1 - i}.upsample.conv",
            sd,
            out,
        )
    for q in ("quant_conv", "post_quant_conv"):
        _same(q, q, sd, out)
    assert len(out) == len(sd)
    return out


# --------------------------------------------------------------------------- text encoders


def hf_clip(encoder: Any) -> Tensors:
    """HF names with the ``text_model.`` level, as the files have them."""
    out = {}
    for k, v in encoder.state_dict().items():
        if k.endswith("position_ids"):
            continue
        out[k if k.startswith(("text_model.", "text_projection")) else "text_model." + k] = v
    return out


def open_clip(encoder: Any) -> Tensors:
    sd = {k.removeprefix("text_model."): v for k, v in encoder.state_dict().items()}
    out = {
        "token_embedding.weight": sd["embeddings.token_embedding.weight"],
        "positional_embedding": sd["embeddings.position_embedding.weight"],
        "ln_final.weight": sd["final_layer_norm.weight"],
        "ln_final.bias": sd["final_layer_norm.bias"],
        "text_projection": sd["text_projection.weight"].T.contiguous(),
    }
    for i in range(encoder.config.num_hidden_layers):
        s, d = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            out[f"{d}attn.in_proj_{leaf}"] = torch.cat(
                [sd[f"{s}self_attn.{p}_proj.{leaf}"] for p in "qkv"]
            ).contiguous()
            out[f"{d}attn.out_proj.{leaf}"] = sd[f"{s}self_attn.out_proj.{leaf}"]
            out[f"{d}ln_1.{leaf}"] = sd[f"{s}layer_norm1.{leaf}"]
            out[f"{d}ln_2.{leaf}"] = sd[f"{s}layer_norm2.{leaf}"]
            out[f"{d}mlp.c_fc.{leaf}"] = sd[f"{s}mlp.fc1.{leaf}"]
            out[f"{d}mlp.c_proj.{leaf}"] = sd[f"{s}mlp.fc2.{leaf}"]
    return out


def t5_file(encoder: Any) -> Tensors:
    return {k: v for k, v in encoder.state_dict().items() if k != "encoder.embed_tokens.weight"}


# --------------------------------------------------------------------------- SD3 (SAI)


def _swap(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a]).contiguous()


def sd3_to_sai(model: Any) -> Tensors:
    sd, out = model.state_dict(), {}
    direct = {
        "pos_embed.proj": "x_embedder.proj",
        "context_embedder": "context_embedder",
        "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
        "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
        "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
        "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
        "proj_out": "final_layer.linear",
    }
    for a, b in direct.items():
        _same(a, b, sd, out)
    out["pos_embed"] = sd["pos_embed.pos_embed"]
    for leaf in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{leaf}"] = _swap(sd[f"norm_out.linear.{leaf}"])
    n = model.config.num_layers
    for i in range(n):
        s, x, c = (
            f"transformer_blocks.{i}.",
            f"joint_blocks.{i}.x_block.",
            f"joint_blocks.{i}.context_block.",
        )
        last = i == n - 1
        for leaf in ("weight", "bias"):
            out[f"{x}attn.qkv.{leaf}"] = torch.cat([sd[f"{s}attn.to_{p}.{leaf}"] for p in "qkv"])
            out[f"{c}attn.qkv.{leaf}"] = torch.cat(
                [sd[f"{s}attn.add_{p}_proj.{leaf}"] for p in "qkv"]
            )
            out[f"{x}attn.proj.{leaf}"] = sd[f"{s}attn.to_out.0.{leaf}"]
            out[f"{x}adaLN_modulation.1.{leaf}"] = sd[f"{s}norm1.linear.{leaf}"]
            ctx = sd[f"{s}norm1_context.linear.{leaf}"]
            out[f"{c}adaLN_modulation.1.{leaf}"] = _swap(ctx) if last else ctx
            out[f"{x}mlp.fc1.{leaf}"] = sd[f"{s}ff.net.0.proj.{leaf}"]
            out[f"{x}mlp.fc2.{leaf}"] = sd[f"{s}ff.net.2.{leaf}"]
            if not last:
                out[f"{c}attn.proj.{leaf}"] = sd[f"{s}attn.to_add_out.{leaf}"]
                out[f"{c}mlp.fc1.{leaf}"] = sd[f"{s}ff_context.net.0.proj.{leaf}"]
                out[f"{c}mlp.fc2.{leaf}"] = sd[f"{s}ff_context.net.2.{leaf}"]
    return out


# --------------------------------------------------------------------------- Flux (BFL)


def flux_to_bfl(model: Any) -> Tensors:
    sd, out = model.state_dict(), {}
    direct = {
        "x_embedder": "img_in",
        "context_embedder": "txt_in",
        "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
        "proj_out": "final_layer.linear",
    }
    for a, b in direct.items():
        _same(a, b, sd, out)
    for leaf in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{leaf}"] = _swap(sd[f"norm_out.linear.{leaf}"])
    for i in range(model.config.num_layers):
        s, d = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        pairs = {
            "norm1.linear": "img_mod.lin",
            "norm1_context.linear": "txt_mod.lin",
            "attn.to_out.0": "img_attn.proj",
            "attn.to_add_out": "txt_attn.proj",
            "ff.net.0.proj": "img_mlp.0",
            "ff.net.2": "img_mlp.2",
            "ff_context.net.0.proj": "txt_mlp.0",
            "ff_context.net.2": "txt_mlp.2",
        }
        for a, b in pairs.items():
            _same(s + a, d + b, sd, out)
        for leaf in ("weight", "bias"):
            out[f"{d}img_attn.qkv.{leaf}"] = torch.cat(
                [sd[f"{s}attn.to_{p}.{leaf}"] for p in "qkv"]
            )
            out[f"{d}txt_attn.qkv.{leaf}"] = torch.cat(
                [sd[f"{s}attn.add_{p}_proj.{leaf}"] for p in "qkv"]
            )
        out[f"{d}img_attn.norm.query_norm.scale"] = sd[f"{s}attn.norm_q.weight"]
        out[f"{d}img_attn.norm.key_norm.scale"] = sd[f"{s}attn.norm_k.weight"]
        out[f"{d}txt_attn.norm.query_norm.scale"] = sd[f"{s}attn.norm_added_q.weight"]
        out[f"{d}txt_attn.norm.key_norm.scale"] = sd[f"{s}attn.norm_added_k.weight"]
    for i in range(model.config.num_single_layers):
        s, d = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        _same(s + "norm.linear", d + "modulation.lin", sd, out)
        _same(s + "proj_out", d + "linear2", sd, out)
        for leaf in ("weight", "bias"):
            out[f"{d}linear1.{leaf}"] = torch.cat(
                [sd[f"{s}attn.to_{p}.{leaf}"] for p in "qkv"] + [sd[f"{s}proj_mlp.{leaf}"]]
            )
        out[f"{d}norm.query_norm.scale"] = sd[f"{s}attn.norm_q.weight"]
        out[f"{d}norm.key_norm.scale"] = sd[f"{s}attn.norm_k.weight"]
    return out


# --------------------------------------------------------------------------- whole files


def checkpoint_tensors(family: str, pipe: Any) -> Tensors:
    """One ComfyUI-style checkpoint of an SD1.x / SDXL / SD3 pipeline."""
    out: Tensors = {}

    def put(prefix: str, tensors: Tensors) -> None:
        out.update({prefix + k: v for k, v in tensors.items()})

    put("first_stage_model.", vae_to_ldm(pipe.vae))
    if family == "sd15":
        put("model.diffusion_model.", unet_to_ldm(pipe.unet))
        put("cond_stage_model.transformer.", hf_clip(pipe.text_encoder))
    elif family == "sdxl":
        put("model.diffusion_model.", unet_to_ldm(pipe.unet))
        put("conditioner.embedders.0.transformer.", hf_clip(pipe.text_encoder))
        put("conditioner.embedders.1.model.", open_clip(pipe.text_encoder_2))
    elif family == "sd3":
        put("model.diffusion_model.", sd3_to_sai(pipe.transformer))
        put("text_encoders.clip_l.transformer.", hf_clip(pipe.text_encoder))
        put("text_encoders.clip_g.transformer.", hf_clip(pipe.text_encoder_2))
        put("text_encoders.t5xxl.transformer.", t5_file(pipe.text_encoder_3))
    else:
        raise ValueError(family)
    return out


def flux_split(pipe: Any) -> dict[str, Tensors]:
    """The files of a split Flux set: diffusion model (BFL), clip_l, t5xxl, ae."""
    return {
        "flux.safetensors": flux_to_bfl(pipe.transformer),
        "clip_l.safetensors": hf_clip(pipe.text_encoder),
        "t5xxl.safetensors": t5_file(pipe.text_encoder_2),
        "ae.safetensors": vae_to_ldm(pipe.vae),
    }


def to_storage(tensors: Tensors, storage: str, prefix: str = "") -> Tensors:
    """Cast as the file would store it: fp32, fp16, bf16, fp8 (matrices and kernels under
    `prefix` as e4m3fn, the rest bf16) or scaled_fp8 (ComfyUI's: weight / scale as e4m3fn
    float32 ``scale_weight`` each, a ``scale_input`` each, a ``scaled_fp8`` marker)."""
    out: Tensors = {}
    for k, v in tensors.items():
        v = v.detach().contiguous()
        two_d = k.startswith(prefix) and k.endswith(".weight") and v.ndim == 2
        if storage in ("fp32", "fp16", "bf16"):
            out[k] = v.to(
                {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[storage]
            )
        elif storage == "fp8":  # every matrix and conv kernel fp8
            big = k.startswith(prefix) and k.endswith(".weight") and v.ndim >= 2
            out[k] = v.to(FP8) if big else v.to(torch.bfloat16)
        elif storage == "scaled_fp8":
            if two_d:
                scale = (v.abs().max().float() / 448.0).clamp(min=1e-12)
                out[k] = (v.float() / scale).to(FP8)
                out[k[: -len("weight")] + "scale_weight"] = scale.reshape(())
                out[k[: -len("weight")] + "scale_input"] = torch.tensor(1.0)
            else:
                out[k] = v.to(torch.bfloat16)
        else:
            raise ValueError(storage)
    if storage == "scaled_fp8":
        out[prefix + "scaled_fp8"] = torch.empty(2, dtype=FP8)
    return out


def write(path: Path, tensors: Tensors) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def save_tokenizers(pipe: Any, folder: Path) -> Path:
    """The pipeline's tokenizers in the diffusers layout (tokenizer/, tokenizer_2/, ...)."""
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tok = getattr(pipe, name, None)
        if tok is not None:
            tok.save_pretrained(str(folder / name))
    return folder


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args!r}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        # tokenizers fall back to the HF cache: an empty one, never the developer's own
        mp.setenv("HF_HUB_CACHE", str(tmp_path_factory.mktemp("empty-hf-cache")))
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def source() -> dict[str, object]:
    return {f: tiny.build_pipeline(f) for f in tiny.FAMILIES}


@pytest.fixture(scope="module")
def tokenizers(source: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {f: save_tokenizers(p, root / f) for f, p in source.items()}


def write_set(
    family: str, pipe: object, storage: str, folder: Path
) -> tuple[Path, list, Path | None]:
    """(base, text encoder files, vae file): one checkpoint, or Flux's split set."""
    if family == "flux":
        files = {}
        for name, tensors in flux_split(pipe).items():
            if name == "flux.safetensors":
                tensors = to_storage(tensors, storage)
            files[name] = write(folder / name, tensors)
        encoders = [files["clip_l.safetensors"], files["t5xxl.safetensors"]]
        return files["flux.safetensors"], encoders, files["ae.safetensors"]
    tensors = to_storage(checkpoint_tensors(family, pipe), storage, "model.diffusion_model.")
    return write(folder / f"{family}-{storage}.safetensors", tensors), [], None


def write_gguf(path: Path, tensors: Tensors, quant: str = "Q8_0") -> Path:
    """A GGUF file as city96's Flux quantisations are laid out (BFL names): 2-D weights
    quantised (`quant`, a ``gguf.GGMLQuantizationType`` name), everything else F32."""
    import gguf

    kind = gguf.GGMLQuantizationType[quant]
    writer = gguf.GGUFWriter(str(path), arch="flux")
    for name, t in tensors.items():
        data = t.detach().float().numpy()
        if t.ndim == 2 and name.endswith(".weight") and data.shape[-1] % 32 == 0:
            writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
