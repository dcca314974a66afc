"""Run with COMFYUI_PYTHON (cwd COMFYUI_PATH): write a tiny SD1.5 checkpoint that ComfyUI's
stock Load Checkpoint detects, and a LoKr file for its UNet.

    python make_tiny_checkpoint.py COMFYUI_PATH REPO_ROOT CHECKPOINT_FILE LYCORIS_FILE

The checkpoint holds the real-width one-level SD1.5-layout UNet of comfy_model_probe.py under
ldm names (``model.diffusion_model.``), a random CLIP-L of ComfyUI's own SD1 text-encoder
shape (``cond_stage_model.``; ComfyUI builds that encoder from a fixed config, so a narrower
one would leave weights unset) and a random TAESD as the VAE (``first_stage_model.``, which
ComfyUI recognises by ``taesd_decoder``), all fp16. The LoKr file is lycoris' own network on
the diffusers twin of the UNet, saved as the seed's trainer does.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COMFY, REPO, CKPT, LYCORIS = sys.argv[1:5]
sys.path.insert(0, COMFY)
sys.path.append(REPO)
sys.path.append(str(Path(REPO) / "tests" / "e2e"))
sys.path.append(str(Path(REPO) / "tests" / "unit"))

import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True

import comfy.sd1_clip  # noqa: E402
import comfy.taesd.taesd  # noqa: E402
import comfy.utils  # noqa: E402
import safetensors.torch  # noqa: E402
import torch  # noqa: E402
from comfy_model_probe import UNET_CONFIG, tiny_unet  # noqa: E402
from reference import randomize  # noqa: E402

from lycoris_core import LycorisConfig, create_network  # noqa: E402


def random_like(sd: dict, seed: int) -> dict:
    """Finite random values of sensible size: norms 1/0, other weights N(0, 0.02)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sd.items():
        if not v.is_floating_point():
            out[k] = v
        elif v.dim() == 1 and k.endswith("weight"):
            out[k] = torch.ones(v.shape)
        elif k.endswith("bias"):
            out[k] = torch.zeros(v.shape)
        else:
            out[k] = torch.randn(v.shape, generator=g) * 0.02
    return out


def main() -> None:
    unet = tiny_unet()
    mapping = comfy.utils.unet_to_diffusers(UNET_CONFIG)
    sd = {f"model.diffusion_model.{mapping[k]}": v for k, v in unet.state_dict().items()}
    clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
    sd.update({f"cond_stage_model.{k}": v for k, v in random_like(clip.state_dict(), 1).items()})
    taesd = comfy.taesd.taesd.TAESD()
    sd.update({f"first_stage_model.{k}": v for k, v in random_like(taesd.state_dict(), 2).items()})
    sd = {k: v.half().contiguous() if v.is_floating_point() else v for k, v in sd.items()}
    safetensors.torch.save_file(sd, CKPT)

    config = LycorisConfig.from_dict(
        {"algo": "lokr", "linear_dim": 10000, "linear_alpha": 1.0, "factor": 4, "multiplier": 1.0}
    )
    net = create_network(unet, config)
    randomize(net, "lokr", seed=4)
    net.save_weights(LYCORIS, None, {"lycoris_config": json.dumps(config.to_dict())})
    print(json.dumps({"checkpoint_keys": len(sd), "lycoris_layers": len(net.loras)}))


if __name__ == "__main__":
    main()
