"""Load Checkpoint (LyCORIS) on a real ComfyUI: a tiny SD1.5 checkpoint in models/checkpoints
and a split Flux set (diffusion_models + text_encoders + vae) appear in the node, load
offline, train 10 steps and sample; ComfyUI's stock Load Checkpoint on the same file.

Written without being run in this session (no ComfyUI server was started here)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from e2e_support import ROOT

from lycoris_core import tiny
from lycoris_core.client import run_workflow

sys.path.insert(0, str(ROOT / "tests" / "unit"))
import checkpoint_files as cf

SD15 = "checkpoints/e2e-tiny-sd15.safetensors"
FLUX = "diffusion_models/e2e-tiny-flux-fp8.safetensors"


@pytest.fixture(scope="module")
def files(comfy) -> dict[str, str]:
    models = comfy.models
    (models / "tokenizers").mkdir(exist_ok=True)
    sd = tiny.build_pipeline("sd15")
    cf.write(models / SD15, cf.checkpoint_tensors("sd15", sd))
    cf.save_tokenizers(sd, models / "tokenizers" / "tiny-sd15")
    flux = tiny.build_pipeline("flux")
    split = cf.flux_split(flux)
    cf.write(models / FLUX, cf.to_storage(split["flux.safetensors"], "scaled_fp8"))
    cf.write(models / "text_encoders" / "e2e_clip_l.safetensors", split["clip_l.safetensors"])
    cf.write(models / "text_encoders" / "e2e_t5xxl.safetensors", split["t5xxl.safetensors"])
    cf.write(models / "vae" / "e2e_ae.safetensors", split["ae.safetensors"])
    cf.save_tokenizers(flux, models / "tokenizers" / "tiny-flux")
    return {"sd15": SD15, "flux": FLUX}


def _load(base: str, tokenizers: str, **extra: str) -> dict:
    return {
        "base": base,
        "dtype": "fp32",
        "device": "cpu",
        "fp8": "keep",
        "tokenizers": tokenizers,
        **extra,
    }


def _prompt(load_inputs: dict, name: str) -> dict:
    from e2e_support import train_prompt

    prompt = train_prompt(output_name=name, steps=10, model="unused")
    prompt["1"] = {"class_type": "LycorisLoadCheckpoint", "inputs": load_inputs}
    prompt["5"] = {
        "class_type": "LycorisApply",
        "inputs": {"model": ["1", 0], "adapter": ["4", 0], "strength": 1.0, "mode": "merge"},
    }
    prompt["6"] = {
        "class_type": "LycorisSample",
        "inputs": {
            "model": ["5", 0],
            "prompt": "a disc",
            "negative_prompt": "",
            "width": 32,
            "height": 32,
            "steps": 2,
            "guidance": 3.5,
            "seed": 0,
            "batch_size": 1,
        },
    }
    prompt["7"] = {
        "class_type": "SaveImage",
        "inputs": {"images": ["6", 0], "filename_prefix": name},
    }
    return prompt


def test_files_appear_in_the_node(comfy, files):
    status, info = comfy.get("/object_info/LycorisLoadCheckpoint")
    assert status == 200
    spec = info["LycorisLoadCheckpoint"]["input"]
    assert files["sd15"] in spec["required"]["base"][0]
    assert files["flux"] in spec["required"]["base"][0]
    assert "e2e_t5xxl.safetensors" in spec["optional"]["text_encoder_2"][0]
    assert "e2e_ae.safetensors" in spec["optional"]["vae"][0]
    assert "tiny-flux" in spec["optional"]["tokenizers"][0]


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_load_train_sample(comfy, files, family, tmp_path):
    if family == "sd15":
        inputs = _load(files["sd15"], "tiny-sd15")
    else:
        inputs = _load(
            files["flux"],
            "tiny-flux",
            text_encoder_1="e2e_clip_l.safetensors",
            text_encoder_2="e2e_t5xxl.safetensors",
            vae="e2e_ae.safetensors",
        )
    result = run_workflow(comfy.url, _prompt(inputs, f"e2e_ckpt_{family}"), tmp_path, 300)
    assert result["status"] == "success", result["error"]
    text = result["outputs"]["1"]["text"][0]
    assert (
        "sd15 (sd1)" if family == "sd15" else "flux (flux-dev), stored fp8_e4m3fn (scaled)"
    ) in text
    assert (comfy.lycoris_dir / f"e2e_ckpt_{family}.safetensors").is_file()
    assert [f for f in result["files"] if f["node"] == "7"]


def test_stock_load_checkpoint_cannot_detect_the_tiny_model(comfy, files, tmp_path):
    """ComfyUI detects models from full-size widths (checkpoint-layouts.md): the tiny file
    loads in our node but not in CheckpointLoaderSimple, which says it cannot detect it."""
    prompt = {
        "1": {
            "class_type": "CheckpointLoaderSimple",
            "inputs": {"ckpt_name": Path(files["sd15"]).name},
        },
        "2": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 2]}},
        "3": {
            "class_type": "EmptyLatentImage",
            "inputs": {"width": 64, "height": 64, "batch_size": 1},
        },
        "4": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
    }
    result = run_workflow(comfy.url, prompt, tmp_path, 120)
    assert result["status"] == "error"
    assert result["error"]["node_type"] == "CheckpointLoaderSimple", result["error"]


def _host_has(module: str) -> bool:
    import os
    import subprocess

    code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    return subprocess.run([os.environ["COMFYUI_PYTHON"], "-c", code]).returncode == 0


@pytest.mark.parametrize("precision", ["fp8", "nf4"])
def test_a_quantised_base_trains_and_samples(comfy, files, precision, tmp_path):
    """The split Flux set at base_precision fp8 / nf4: the node says how it is stored, the run
    trains (bypass) and samples, and the file records the precision."""
    if precision == "nf4" and not _host_has("bitsandbytes"):
        pytest.skip("ComfyUI's environment has no bitsandbytes (pip install bitsandbytes there)")
    from safetensors import safe_open

    inputs = _load(
        files["flux"],
        "tiny-flux",
        text_encoder_1="e2e_clip_l.safetensors",
        text_encoder_2="e2e_t5xxl.safetensors",
        vae="e2e_ae.safetensors",
        base_precision=precision,
    )
    name = f"e2e_ckpt_flux_{precision}"
    result = run_workflow(comfy.url, _prompt(inputs, name), tmp_path, 300)
    assert result["status"] == "success", result["error"]
    assert f"stored {precision} (" in result["outputs"]["1"]["text"][0]
    with safe_open(str(comfy.lycoris_dir / f"{name}.safetensors"), framework="pt") as f:
        assert f.metadata()["comfyui_lycoris.base_precision"] == precision
    assert [f for f in result["files"] if f["node"] == "7"]
