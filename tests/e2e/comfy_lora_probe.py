"""Run by test_e2e_loraloader.py with COMFYUI_PYTHON (cwd COMFYUI_PATH): ComfyUI's own LoRA
loading of our trained files, on a tiny SD1.5-layout UNet saved in diffusers format.

    python comfy_lora_probe.py COMFYUI_PATH REPO_ROOT UNET_DIR LORA_FILE [LORA_FILE ...]

For each file it records what ComfyUI logged (every record of every logger), how many of
the file's layers ComfyUI's key map matched (``comfy.lora.load_lora``), how many weight
patches the stock ``LoraLoaderModelOnly`` node added, and the numeric agreement between
ComfyUI's patched UNet and the diffusers UNet patched by ``lycoris_core.patched`` at
strengths 1 and 0.5 (same weights, same inputs). Prints one JSON line at the end.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

COMFY, REPO, UNET_DIR, *LORAS = sys.argv[1:]
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
import comfy.model_management  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402
import folder_paths  # noqa: E402
import safetensors.torch  # noqa: E402
import torch  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402

import nodes  # noqa: E402  (ComfyUI's nodes.py: COMFY is first on sys.path)
from lycoris_core import load_adapter, patched  # noqa: E402

torch.set_num_threads(1)

# The tiny UNet's ComfyUI config (see the host reference): one level of 320 channels.
UNET_CONFIG = {
    "model_channels": 320,
    "num_res_blocks": [1],
    "channel_mult": [1],
    "transformer_depth": [1],
    "transformer_depth_output": [1, 1],
    "transformer_depth_middle": 1,
    "context_dim": 768,
    "num_heads": 8,
    "use_linear_in_transformer": False,
}


def comfy_unet(diffusers_sd: dict) -> object:
    mapping = comfy.utils.unet_to_diffusers(UNET_CONFIG)
    unmapped = sorted(set(diffusers_sd) - set(mapping))
    ldm = {
        f"model.diffusion_model.{mapping[k]}": v for k, v in diffusers_sd.items() if k in mapping
    }
    model = comfy.sd.load_diffusion_model_state_dict(ldm)
    if model is None:
        raise SystemExit("ComfyUI could not detect the model type of the tiny UNet")
    return model, unmapped


def comfy_forward(patcher, x, t, ctx) -> torch.Tensor:
    patcher.patch_model()
    try:
        dm = patcher.model.diffusion_model
        dtype = next(dm.parameters()).dtype
        with torch.no_grad():
            out = dm(x.to(dtype), timesteps=t, context=ctx.to(dtype))
        return out.float()
    finally:
        patcher.unpatch_model()


def main() -> None:
    unet_dir = Path(UNET_DIR)
    weights = safetensors.torch.load_file(str(unet_dir / "diffusion_pytorch_model.safetensors"))
    base, unmapped = comfy_unet(weights)
    ref = UNet2DConditionModel.from_pretrained(str(unet_dir)).eval()

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=g)
    ctx = torch.randn(1, 77, 768, generator=g)
    t = torch.tensor([500.0])

    def ref_forward() -> torch.Tensor:
        with torch.no_grad():
            return ref(x, t, encoder_hidden_states=ctx).sample.float()

    report = {
        "model_class": type(base.model).__name__,
        "model_config": type(base.model.model_config).__name__,
        "unet_dtype": str(next(base.model.diffusion_model.parameters()).dtype),
        "unmapped_unet_keys": unmapped,
        "files": {},
    }
    ref_base = ref_forward()
    comfy_base = comfy_forward(base, x, t, ctx)
    report["base_max_abs_diff"] = float((ref_base - comfy_base).abs().max())
    report["base_max_abs"] = float(ref_base.abs().max())

    key_map = comfy.lora.model_lora_keys_unet(base.model, {})
    report["lycoris_keys_in_map"] = sum(1 for k in key_map if k.startswith("lycoris_"))
    loader = nodes.LoraLoaderModelOnly()
    for path in map(Path, LORAS):
        folder_paths.add_model_folder_path("loras", str(path.parent), is_default=True)
        start = len(RECORDS.lines)
        lora_sd = comfy.utils.load_torch_file(str(path), safe_load=True)
        layers = sorted({k.split(".", 1)[0] for k in lora_sd})
        loaded = comfy.lora.load_lora(lora_sd, key_map)
        (model,) = loader.load_lora_model_only(base, path.name, 1.0)
        (half,) = loader.load_lora_model_only(base, path.name, 0.5)
        entry = {
            "file_layers": len(layers),
            "file_keys": len(lora_sd),
            "loaded_patches": len(loaded),
            "model_patches": len(model.patches),
            "patch_keys_equal": sorted(model.patches) == sorted(loaded),
        }
        adapter = load_adapter(path)
        for strength, patcher in ((1.0, model), (0.5, half)):
            with patched(ref, [(adapter, strength)], mode="merge"):
                want = ref_forward()
            got = comfy_forward(patcher, x, t, ctx)
            entry[f"s{strength:g}"] = {
                "max_abs_diff": float((want - got).abs().max()),
                "effect_max_abs": float((want - ref_base).abs().max()),
                "max_abs": float(want.abs().max()),
            }
        entry["log"] = RECORDS.lines[start:]
        report["files"][path.name] = entry
    print(json.dumps(report))


if __name__ == "__main__":
    main()
