# ruff: noqa: F811  (pytest fixtures imported from checkpoint_files, used as arguments)
"""Bad input for single-file base models: typed errors naming the files and the fix."""

from __future__ import annotations

import checkpoint_files as cf
import pytest
import torch
from checkpoint_files import offline, source, write_set  # noqa: F401 (fixtures)

from lycoris_core import tiny
from lycoris_core.checkpoints import build_pipeline, inspect_files
from lycoris_core.errors import ModelLoadError


def test_truncated_file(source, tmp_path) -> None:
    base, _, _ = write_set("sd15", source["sd15"], "fp16", tmp_path)
    data = base.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ModelLoadError, match=r"cut\.safetensors: truncated"):
        inspect_files(cut)


def test_lora_picked_as_checkpoint(tmp_path) -> None:
    lora = {
        f"lora_unet_down_blocks_0_attn.lora_down.weight{i}": torch.zeros(4, 8) for i in range(3)
    }
    f = cf.write(tmp_path / "style.safetensors", lora)
    with pytest.raises(ModelLoadError, match=r"style\.safetensors: a LoRA/LyCORIS adapter"):
        inspect_files(f)


def test_unsupported_architecture(tmp_path) -> None:
    f = cf.write(tmp_path / "other.safetensors", {"blocks.0.weight": torch.zeros(2, 2)})
    with pytest.raises(ModelLoadError, match=r"other\.safetensors: unsupported architecture"):
        inspect_files(f)


def test_flux_with_sdxl_text_encoder_names_both_files(source, tmp_path) -> None:
    base, encoders, vae = write_set("flux", source["flux"], "fp32", tmp_path)
    big = tiny.build_pipeline("sdxl").text_encoder_2
    from transformers import CLIPTextConfig, CLIPTextModel

    wide = CLIPTextModel(
        CLIPTextConfig(**{**big.config.to_dict(), "hidden_size": 48, "intermediate_size": 96})
    )
    g = cf.write(tmp_path / "clip_g.safetensors", cf.hf_clip(wide))
    with pytest.raises(ModelLoadError, match=r"clip_g\.safetensors does not fit flux\.safetensors"):
        inspect_files(base, [g, encoders[1]], vae)


def test_vae_of_another_latent_size(source, tmp_path) -> None:
    base, encoders, _ = write_set("flux", source["flux"], "fp32", tmp_path)
    sd_vae = cf.write(tmp_path / "sd_vae.safetensors", cf.vae_to_ldm(source["sd15"].vae))
    with pytest.raises(
        ModelLoadError, match=r"sd_vae\.safetensors does not fit flux\.safetensors: a VAE with 4"
    ):
        inspect_files(base, encoders, sd_vae)


def test_missing_parts_and_wrong_roles(source, tmp_path) -> None:
    base, encoders, vae = write_set("flux", source["flux"], "fp32", tmp_path)
    with pytest.raises(ModelLoadError, match="has no VAE component"):
        inspect_files(base, encoders)
    with pytest.raises(ModelLoadError, match=r"ae\.safetensors: is a vae file, not a base model"):
        inspect_files(vae)
    with pytest.raises(ModelLoadError, match="not a text encoder"):
        inspect_files(base, [vae], vae)
    with pytest.raises(ModelLoadError, match="pickle"):
        inspect_files(tmp_path / "model.ckpt")


def test_missing_tokenizer_says_what_to_pass(source, tmp_path) -> None:
    base, _, _ = write_set("sd15", source["sd15"], "fp16", tmp_path)
    with pytest.raises(ModelLoadError, match=r"no CLIP .* tokenizer for the clip_l text encoder"):
        build_pipeline(inspect_files(base), [tmp_path / "nothing"])


def test_gguf_without_the_package_says_how_to_install(tmp_path, monkeypatch) -> None:
    import sys

    from lycoris_core.checkpoints import load_files

    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    f = tmp_path / "flux1-dev-Q4_K_S.gguf"
    f.write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match=r"Q4_K_S\.gguf: GGUF files need .*pip install gguf"):
        load_files(f)
