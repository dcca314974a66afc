"""Files trained by our Train node and saved by our Save node in the kohya layout load in
ComfyUI's stock ``LoraLoader``, for SD1.5, SDXL, SD3 and Flux, and agree with our apply.

One prompt trains, inside the real ComfyUI, a LoRA (alpha != rank) and a LoKr per family on a
tiny diffusers pipeline whose denoiser ComfyUI's own model classes can hold (SD1.5 at its real
width, which ComfyUI detects; SDXL and Flux as our tiny pipelines; SD3 with ComfyUI's fixed
64 channels per head), and saves each with ``LyCORIS Save`` in the kohya layout. Then
comfy_layout_probe.py (ComfyUI's interpreter) loads the denoiser with ComfyUI's classes, applies
the Train node's file and the kohya file with the stock LoraLoader and compares the patched
weights and the outputs with the diffusers twin patched by lycoris_core.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from e2e_support import E2E_DIR, ROOT, train_prompt
from test_e2e_loraloader import MODEL_NAME as SD15_MODEL
from test_e2e_loraloader import build_tiny_sd15_768

from lycoris_core.client import run_workflow
from lycoris_core.tiny import build_pipeline

TOLERANCE = 1e-5  # max abs difference of weights (fp32: the same sums in another order)
OUT_TOLERANCE = 1e-4  # of denoiser outputs (values of order 1)
MODELS = {
    "sd15": SD15_MODEL,
    "sdxl": "tiny-sdxl-e2e",
    "sd3": "tiny-sd3-e2e",
    "flux": "tiny-flux-e2e",
}
DENOISER = {"sd15": "unet", "sdxl": "unet", "sd3": "transformer", "flux": "transformer"}
TARGETS = {
    "sd15": "Transformer2DModel, ResnetBlock2D",
    "sdxl": "Transformer2DModel, ResnetBlock2D",
    "sd3": "Attention, FeedForward, AdaLayerNormContinuous",
    "flux": "Attention, FeedForward, AdaLayerNormContinuous, FluxSingleTransformerBlock",
}
ALGOS = {
    "lora": {"algo": "lora", "linear_dim": 4, "linear_alpha": 2.0},
    "lokr": {"algo": "lokr", "linear_dim": 10000, "linear_alpha": 1.0, "factor": 4},
}
# names the kohya files must use (the published kohya/BFL/SAI names)
KOHYA_NAMES = {
    "sd15": ["lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"],
    "sdxl": ["lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k"],
    "sd3": ["lora_unet_joint_blocks_0_x_block_attn_proj"],
    "flux": ["lora_unet_double_blocks_0_img_attn_proj", "lora_unet_single_blocks_1_linear2"],
}
FUSED = {  # LoRA: fused names; LoKr: the same modules under split names
    "sd3": ("lora_unet_joint_blocks_1_x_block_attn_qkv", "lycoris_transformer_blocks_1_attn_to_q"),
    "flux": ("lora_unet_single_blocks_0_linear1", "lycoris_single_transformer_blocks_0_proj_mlp"),
}


def build_sd3_e2e(target) -> None:
    """The tiny SD3 pipeline with a transformer of ComfyUI's MMDiT shape: ComfyUI fixes
    64 channels per head and as many heads as blocks (hidden = 64 * depth)."""
    from diffusers import SD3Transformer2DModel

    pipe = build_pipeline("sd3")
    old = pipe.transformer.config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = SD3Transformer2DModel(
            sample_size=16,
            patch_size=2,
            in_channels=old.in_channels,
            out_channels=old.out_channels,
            num_layers=2,
            attention_head_dim=64,
            num_attention_heads=2,
            joint_attention_dim=old.joint_attention_dim,
            caption_projection_dim=128,
            pooled_projection_dim=old.pooled_projection_dim,
            pos_embed_max_size=16,
        )
    pipe.register_modules(transformer=transformer)
    pipe.save_pretrained(target, safe_serialization=True)


def build(family: str, target) -> None:
    if family == "sd15":
        build_tiny_sd15_768(target)
    elif family == "sd3":
        build_sd3_e2e(target)
    else:
        build_pipeline(family).save_pretrained(target, safe_serialization=True)


def file_name(family: str, algo: str, layout: str) -> str:
    return f"e2e_{family}_{algo}_{layout}"


def trainings() -> dict:
    prompt: dict = {}
    n = 100
    for family, model in MODELS.items():
        for algo, options in ALGOS.items():
            ids = tuple(str(n + i) for i in range(4))
            prompt.update(
                train_prompt(
                    output_name=file_name(family, algo, "lycoris"),
                    model=model,
                    target_modules=TARGETS[family],
                    steps=2,
                    batch_size=1,
                    learning_rate=0.01,
                    ids=ids,
                    **options,
                )
            )
            prompt[str(n + 4)] = {
                "class_type": "LycorisSave",
                "inputs": {
                    "adapter": [ids[3], 0],
                    "file_name": file_name(family, algo, "kohya"),
                    "layout": "kohya",
                    "model": [ids[0], 0],
                },
            }
            n += 10
    return prompt


@pytest.fixture(scope="module")
def trained(comfy, tmp_path_factory):
    for family, model in MODELS.items():
        target = comfy.models / "diffusers" / model
        if not target.exists():
            build(family, target)
    result = run_workflow(comfy.url, trainings(), tmp_path_factory.mktemp("kohya"), timeout=600)
    assert result["status"] == "success", result["error"]
    return comfy


def run_probe(comfy, family: str, files: list) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", DIFFUSERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    denoiser = comfy.models / "diffusers" / MODELS[family] / DENOISER[family]
    proc = subprocess.run(
        [
            comfy.python,
            str(E2E_DIR / "comfy_layout_probe.py"),
            str(comfy.comfy_path),
            str(ROOT),
            family,
            str(denoiser),
            str(files[0]),
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


@pytest.mark.parametrize("family", list(MODELS))
def test_kohya_files_load_in_stock_lora_loader(trained, family):
    comfy = trained
    lines = []
    for algo in ALGOS:
        files = [
            comfy.lycoris_dir / f"{file_name(family, algo, lay)}.safetensors"
            for lay in ("lycoris", "kohya")
        ]
        assert all(f.is_file() for f in files), files
        report = run_probe(comfy, family, files)
        assert report["unmapped_keys"] == [], report["unmapped_keys"][:5]
        assert report["base_weights_max_abs_diff"] == 0.0
        if family == "sd15":
            assert report["model_config"] == "SD15"  # detected by ComfyUI itself
        assert report["base_max_abs_diff"] < OUT_TOLERANCE, report  # the same net, twice
        for name, entry in report["files"].items():
            log = entry.pop("log")
            bad = [x for x in log if "lora key not loaded" in x or "NOT LOADED" in x]
            assert not bad, f"{name}: ComfyUI skipped keys: {bad[:5]}"
            names = set(entry.pop("names"))
            if name.endswith("_kohya.safetensors"):
                assert set(KOHYA_NAMES[family]) <= names, sorted(names)[:10]
                if family in FUSED:
                    assert FUSED[family][0 if algo == "lora" else 1] in names, sorted(names)
                if family in ("sd15", "sdxl"):
                    assert all(n.startswith("lora_unet_") for n in names)
            # every layer becomes a patch (a split part patches rows of a fused weight)
            assert entry["loaded_patches"] == entry["file_layers"], (name, entry)
            assert entry["model_patches"] > 0, (name, entry)
            for strength in ("s1", "s0.5"):
                agreement = entry[strength]
                assert agreement["weights_effect"] > 1e-4, (name, strength, agreement)
                assert agreement["changed_weights"] == entry["model_patches"], (name, agreement)
                assert agreement["weights_max_abs_diff"] < TOLERANCE, (name, strength, agreement)
                line = (
                    f"{family} {name} at {strength[1:]}: {entry['file_layers']} layers -> "
                    f"{entry['loaded_patches']} patches, 0 keys not loaded, weights max |comfy - "
                    f"lycoris_core| = {agreement['weights_max_abs_diff']:.2e} (effect "
                    f"{agreement['weights_effect']:.3f})"
                )
                assert agreement["effect_max_abs"] > 1e-3, (name, strength, agreement)
                assert agreement["max_abs_diff"] < OUT_TOLERANCE, (name, strength, agreement)
                line += f", outputs {agreement['max_abs_diff']:.2e}"
                lines.append(line)
    print("\n" + "\n".join(lines))
