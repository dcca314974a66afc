"""Load Checkpoint (LyCORIS) over the fake host's folders: a checkpoint and a split Flux set."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from lycoris_core import tiny

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
import checkpoint_files as cf

SAMPLE = {
    "prompt": "a cat",
    "negative_prompt": "",
    "width": 32,
    "height": 32,
    "steps": 2,
    "guidance": 3.5,
    "seed": 1,
    "batch_size": 1,
}


@pytest.fixture(scope="module")
def files(host_root: Path) -> dict[str, str]:
    models = host_root / "models"
    for kind in ("checkpoints", "diffusion_models", "text_encoders", "vae", "tokenizers"):
        (models / kind).mkdir(parents=True, exist_ok=True)
    sd = tiny.build_pipeline("sd15")
    cf.write(models / "checkpoints" / "tiny-sd15.safetensors", cf.checkpoint_tensors("sd15", sd))
    cf.save_tokenizers(sd, models / "tokenizers" / "sd15")
    flux = tiny.build_pipeline("flux")
    split = cf.flux_split(flux)
    cf.write(
        models / "diffusion_models" / "tiny-flux-fp8.safetensors",
        cf.to_storage(split["flux.safetensors"], "scaled_fp8"),
    )
    cf.write(models / "text_encoders" / "tiny_clip_l.safetensors", split["clip_l.safetensors"])
    cf.write(models / "text_encoders" / "tiny_t5xxl.safetensors", split["t5xxl.safetensors"])
    cf.write(models / "vae" / "tiny_ae.safetensors", split["ae.safetensors"])
    cf.save_tokenizers(flux, models / "tokenizers" / "flux")
    return {
        "sd15": "checkpoints/tiny-sd15.safetensors",
        "flux": "diffusion_models/tiny-flux-fp8.safetensors",
    }


def test_lists_the_host_folders(nodes, files) -> None:
    spec = nodes["LycorisLoadCheckpoint"].INPUT_TYPES()
    assert files["sd15"] in spec["required"]["base"][0]
    assert files["flux"] in spec["required"]["base"][0]
    assert "tiny_t5xxl.safetensors" in spec["optional"]["text_encoder_2"][0]
    assert "tiny_ae.safetensors" in spec["optional"]["vae"][0]


def test_checkpoint_loads_and_shows_its_family(nodes, files) -> None:
    out = nodes["LycorisLoadCheckpoint"]().run(
        files["sd15"], "fp32", "cpu", "keep", tokenizers="sd15"
    )
    assert out["ui"]["text"] == ["Stable Diffusion 1.x/2.x: sd15 (sd1), stored fp32"]
    images = nodes["LycorisSample"]().run(out["result"][0], **SAMPLE)[0]
    assert images.shape == (1, 32, 32, 3) and torch.isfinite(images).all()


def test_split_flux_set_loads_and_samples(nodes, files) -> None:
    node = nodes["LycorisLoadCheckpoint"]()
    out = node.run(
        files["flux"],
        "fp32",
        "cpu",
        "keep",
        text_encoder_1="tiny_clip_l.safetensors",
        text_encoder_2="tiny_t5xxl.safetensors",
        vae="tiny_ae.safetensors",
        tokenizers="flux",
    )
    assert "flux (flux-dev), stored fp8_e4m3fn (scaled)" in out["ui"]["text"][0]
    handle = out["result"][0]
    assert handle.model.storage == "fp8_e4m3fn (scaled)"
    images = nodes["LycorisSample"]().run(handle, **SAMPLE)[0]
    assert images.shape == (1, 32, 32, 3) and torch.isfinite(images).all()


def test_missing_vae_is_a_typed_error_naming_the_file(nodes, files) -> None:
    with pytest.raises(Exception, match=r"tiny-flux-fp8\.safetensors: has no VAE") as info:
        nodes["LycorisLoadCheckpoint"]().run(
            files["flux"],
            "fp32",
            "cpu",
            "keep",
            text_encoder_1="tiny_clip_l.safetensors",
            text_encoder_2="tiny_t5xxl.safetensors",
            tokenizers="flux",
        )
    assert type(info.value).__name__ == "ModelLoadError"
