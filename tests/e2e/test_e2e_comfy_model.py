"""Our "Apply LyCORIS (MODEL, CLIP)" node on ComfyUI's own models, on a real ComfyUI.

* comfy_model_probe.py (run with COMFYUI_PYTHON): on a real-width SD1.5-layout UNet loaded as
  a ComfyUI MODEL, the node's patched clones, patched by ComfyUI's own ``patch_model``, give
  lycoris' own forward (lycoris' network on the diffusers twin) for LoRA, LoHa, LoKr, DoRA,
  IA3, T-LoRA, rescaled diag-OFT and DyLoRA at strengths 0.7 and -1, and agree with the stock
  ``LoraLoaderModelOnly`` where that is exact (LoRA, LoHa, LoKr); strength 0 returns the input.
* The example workflow ``checkpoint_apply_ksampler`` (stock Load Checkpoint -> Load LyCORIS ->
  Apply LyCORIS (MODEL, CLIP) -> KSampler -> VAE Decode -> Save Image) runs to an image through
  the real server, on a tiny checkpoint made by make_tiny_checkpoint.py.
"""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
from e2e_support import E2E_DIR, ROOT
from PIL import Image

from lycoris_core.client import run_workflow

TOLERANCE = 1e-4  # max abs difference of UNet outputs (values of order 1)
# against lycoris' forward: relative to the output's size (the random adapters change outputs
# of order 1 by up to 12; fp32 sums over 69 adapted layers; DyLoRA at -1 measured 1.4e-4)
RELATIVE = 3e-4
API = ROOT / "example_workflows" / "api" / "checkpoint_apply_ksampler.json"


def _run(python: str, comfy_path, script: str, *args: str, timeout: int = 900) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", DIFFUSERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [python, str(E2E_DIR / script), str(comfy_path), str(ROOT), *args],
        cwd=str(comfy_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
    assert proc.returncode == 0, f"{script} failed ({proc.returncode}):\n{tail}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_node_patches_equal_lycoris_forward(comfy_env, tmp_path):
    comfy_path, python = comfy_env
    report = _run(python, comfy_path, "comfy_model_probe.py", str(tmp_path))
    assert report["model_config"] == "SD15" and report["unmapped"] == []
    assert report["base_max_abs_diff"] < TOLERANCE, report
    lines = []
    for name, entry in report["files"].items():
        assert entry["s0_same_model"], name  # strength 0: the input MODEL, untouched
        for strength in ("s0.7", "s-1"):
            row = entry[strength]
            assert row["patches"] > 0 and row["effect"] > 1e-3, (name, strength, row)
            assert row["node_vs_lycoris"] < RELATIVE * max(1.0, row["max_abs"]), (name, row)
            assert row["node_vs_lycoris"] < row["effect"] / 100, (name, strength, row)
            # the host patches compute what our own merge computes, on any algorithm
            assert row["node_vs_ours"] < TOLERANCE * max(1.0, row["max_abs"]), (name, row)
            if "node_vs_stock" in row:
                assert row["node_vs_stock"] < TOLERANCE, (name, strength, row)
            stock = f", vs stock {row['node_vs_stock']:.2e}" if "node_vs_stock" in row else ""
            lines.append(
                f"{name} at {strength[1:]}: max |node - lycoris| = {row['node_vs_lycoris']:.2e}"
                f", vs our merge {row['node_vs_ours']:.2e}{stock} (effect {row['effect']:.3f},"
                f" output {row['max_abs']:.2f}, {row['patches']} patches)"
            )
    print("\n" + "\n".join(lines) + f"\nbase: {report['base_max_abs_diff']:.2e}")


@pytest.fixture(scope="module")
def tiny_checkpoint(comfy):
    ckpt = comfy.models / "checkpoints" / "tiny_sd15.safetensors"
    lycoris = comfy.models / "loras" / "tiny_sd15_lokr.safetensors"
    if not (ckpt.is_file() and lycoris.is_file()):
        _run(comfy.python, comfy.comfy_path, "make_tiny_checkpoint.py", str(ckpt), str(lycoris))
    return ckpt, lycoris


def test_checkpoint_workflow_runs_to_an_image(comfy, tiny_checkpoint, tmp_path):
    prompt = json.loads(API.read_text())
    result = run_workflow(comfy.url, prompt, tmp_path, timeout=600)
    assert result["status"] == "success", result["error"]
    images = [f for f in result["files"] if f["node"] == "9"]
    assert len(images) == 1 and images[0]["path"], result["files"]
    with Image.open(images[0]["path"]) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    assert pixels.shape == (64, 64, 3)
    assert np.isfinite(pixels).all()
    # strength 0 on both: a different graph (cache miss), a different image
    prompt["3"]["inputs"]["strength_model"] = 0.0
    prompt["3"]["inputs"]["strength_clip"] = 0.0
    prompt["9"]["inputs"]["filename_prefix"] = "lycoris_checkpoint_off"
    off = run_workflow(comfy.url, prompt, tmp_path / "off", timeout=600)
    assert off["status"] == "success", off["error"]
    (record,) = [f for f in off["files"] if f["node"] == "9"]
    with Image.open(record["path"]) as image:
        base = np.asarray(image.convert("RGB"), dtype=np.float32)
    assert np.abs(base - pixels).max() > 0, "the adapter changed nothing in the image"
