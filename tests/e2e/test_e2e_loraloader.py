"""Files trained by our nodes in ComfyUI load with ComfyUI's stock LoRA loader.

A tiny diffusers SD1.5-layout pipeline (its UNet small enough to train on a CPU, yet one that
ComfyUI detects as SD15 once renamed to its layout) is written into the temporary
models/diffusers; our nodes train a LoRA/LoCon and a LoKr file on it inside ComfyUI; then
comfy_lora_probe.py, run with ComfyUI's interpreter, loads the UNet as a ComfyUI MODEL,
applies each file with the stock LoraLoaderModelOnly node and compares ComfyUI's patched
UNet with the diffusers UNet patched by lycoris_core at strengths 1 and 0.5.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from diffusers import UNet2DConditionModel
from e2e_support import E2E_DIR, ROOT, train_prompt
from transformers import CLIPTextConfig, CLIPTextModel

from lycoris_core.client import run_workflow
from lycoris_core.tiny import build_pipeline

MODEL_NAME = "tiny-sd15-768"
# Both adapters wrap the attention/feed-forward Linear layers and the ResNet/transformer
# convolutions (proj_in/out, conv1/2, conv_shortcut) and time_emb_proj: 65 layers.
TARGETS = "Transformer2DModel, ResnetBlock2D"
ALGOS = {
    "lora": {"algo": "lora", "linear_dim": 4, "linear_alpha": 2.0},
    "lokr": {"algo": "lokr", "linear_dim": 10000, "linear_alpha": 1.0, "factor": 4},
}
TOLERANCE = 1e-4  # max abs difference of UNet outputs (values of order 1)


def build_tiny_sd15_768(target) -> None:
    """The tiny SD1.5 pipeline with the host reference's ComfyUI-loadable UNet and a CLIP
    text encoder of width 768 (1 layer) so its output matches cross_attention_dim."""
    pipe = build_pipeline("sd15")
    tok = pipe.tokenizer
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tok),
                hidden_size=768,
                intermediate_size=64,
                projection_dim=768,
                num_hidden_layers=1,
                num_attention_heads=4,
                max_position_embeddings=77,
                hidden_act="quick_gelu",
                bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
        )
        unet = UNet2DConditionModel(
            block_out_channels=(320,),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D",),
            up_block_types=("CrossAttnUpBlock2D",),
            cross_attention_dim=768,
            attention_head_dim=8,
            norm_num_groups=32,
            sample_size=16,
        )
    pipe.register_modules(text_encoder=text_encoder, unet=unet)
    pipe.save_pretrained(target, safe_serialization=True)


def two_trainings() -> dict:
    """One prompt: the model and dataset nodes shared by a LoRA and a LoKr Train node."""
    prompt = {}
    for n, (name, options) in enumerate(ALGOS.items()):
        ids = ("1", str(10 + n), "3", str(20 + n))
        prompt.update(
            train_prompt(
                output_name=f"tiny768_{name}",
                model=MODEL_NAME,
                target_modules=TARGETS,
                steps=4,
                batch_size=2,
                learning_rate=0.01,
                ids=ids,
                **options,
            )
        )
    return prompt


@pytest.fixture(scope="module")
def trained(comfy, tmp_path_factory):
    target = comfy.models / "diffusers" / MODEL_NAME
    if not target.exists():
        build_tiny_sd15_768(target)
    result = run_workflow(
        comfy.url, two_trainings(), tmp_path_factory.mktemp("tiny768"), timeout=300
    )
    assert result["status"] == "success", result["error"]
    files = [comfy.lycoris_dir / f"tiny768_{name}.safetensors" for name in ALGOS]
    assert sorted(result["adapter_paths"]) == sorted(map(str, files))
    return target, files


def run_probe(comfy, unet_dir, files) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", DIFFUSERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [
            comfy.python,
            str(E2E_DIR / "comfy_lora_probe.py"),
            str(comfy.comfy_path),
            str(ROOT),
            str(unet_dir),
            *map(str, files),
        ],
        cwd=str(comfy.comfy_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
    assert proc.returncode == 0, f"probe failed ({proc.returncode}):\n{tail}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_stock_lora_loader_loads_our_files(comfy, trained):
    pipeline, files = trained
    report = run_probe(comfy, pipeline / "unet", files)
    assert report["model_config"] == "SD15", report["model_config"]
    assert report["unmapped_unet_keys"] == []
    assert report["base_max_abs_diff"] < TOLERANCE, report  # the renamed UNet is the same net
    lines = []
    for name, entry in report["files"].items():
        log = entry.pop("log")
        bad = [line for line in log if "lora key not loaded" in line or "NOT LOADED" in line]
        assert not bad, f"{name}: ComfyUI skipped keys: {bad[:5]}"
        assert entry["file_layers"] == entry["loaded_patches"] == entry["model_patches"] == 65, (
            name,
            entry,
        )
        assert entry["patch_keys_equal"], name
        for strength in ("s1", "s0.5"):
            agreement = entry[strength]
            lines.append(
                f"{name} at {strength[1:]}: max |comfy - lycoris_core| = "
                f"{agreement['max_abs_diff']:.2e}, adapter effect {agreement['effect_max_abs']:.3f}"
            )
            assert agreement["effect_max_abs"] > 1e-2, (name, strength, agreement)
            assert agreement["max_abs_diff"] < TOLERANCE, (name, strength, agreement)
    print("\n" + "\n".join(lines) + f"\nbase: {report['base_max_abs_diff']:.2e}")
