"""Run by test_e2e_comfy_model.py with COMFYUI_PYTHON (cwd COMFYUI_PATH): our "Apply LyCORIS
(MODEL, CLIP)" node on a real ComfyUI MODEL, against lycoris' own forward.

    python comfy_model_probe.py COMFYUI_PATH REPO_ROOT WORK_DIR

A real-width SD1.5-layout diffusers UNet (one level of 320 channels: ComfyUI detects it as
SD15 once renamed) is built with a fixed seed. Per algorithm, lycoris' own network is created
on it (``lycoris_core.create_network``, i.e. lycoris' ``apply_to``), given non-zero
parameters, and its forward recorded at each strength (lycoris' multiplier); its file is
saved and the network removed. The UNet is renamed to ComfyUI's layout and loaded as a
MODEL; our node patches clones of it and ComfyUI's own ``patch_model`` applies the patches;
the outputs are compared with lycoris' forward, and with the stock ``LoraLoaderModelOnly``
for the algorithms it loads. Prints one JSON line at the end.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import sys
from pathlib import Path

COMFY, REPO, WORK = sys.argv[1:4]
sys.path.insert(0, COMFY)
sys.path.append(REPO)  # after ComfyUI: our `nodes` package must not shadow its nodes.py
sys.path.append(str(Path(REPO) / "tests" / "unit"))  # reference.py: the lycoris cases
os.chdir(COMFY)

import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True

import comfy.lora  # noqa: E402
import comfy.model_management  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402
import folder_paths  # noqa: E402
import torch  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from reference import CASES, case_config, full_rank_dylora, randomize  # noqa: E402

import nodes  # noqa: E402  (ComfyUI's nodes.py)
from lycoris_core import LycorisConfig, create_network, load_adapter, patched  # noqa: E402

torch.set_num_threads(2)
STRENGTHS = (0.7, -1.0)
# lycoris' reference cases; those ComfyUI's stock loader applies exactly (host reference)
ALGOS = ("lora", "loha", "lokr full", "lora+dora", "ia3", "tlora", "diag-oft rescaled", "dylora")
STOCK_EXACT = ("lora", "loha", "lokr full")
# lycoris' T-LoRA takes ~8 s per module to create and ~0.3 s per module per forward at this
# width on a CPU: it wraps the cross-attention key/value projections only (8 modules)
TLORA_PRESET = {"target_name": ["*attn2.to_k", "*attn2.to_v"], "use_fnmatch": True}
UNET_CONFIG = {  # the tiny UNet's ComfyUI config (see the host reference)
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


def load_pack():
    """Our node pack as ComfyUI imports it: a package named after its folder."""
    spec = importlib.util.spec_from_file_location(
        "lycoris_pack", Path(REPO) / "__init__.py", submodule_search_locations=[REPO]
    )
    pack = importlib.util.module_from_spec(spec)
    sys.modules["lycoris_pack"] = pack
    spec.loader.exec_module(pack)
    return pack


def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(320,),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",),
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
        sample_size=16,
    ).eval()


def comfy_forward(patcher, x, t, ctx) -> torch.Tensor:
    patcher.patch_model()
    try:
        dm = patcher.model.diffusion_model
        with torch.no_grad():
            return dm(x, timesteps=t, context=ctx).float()
    finally:
        patcher.unpatch_model()


def lycoris_outputs(unet, case, path: Path, forward) -> dict[float, torch.Tensor]:
    """lycoris' own forward at each strength; the file saved; the UNet restored."""
    saved = {k: v.clone() for k, v in unet.state_dict().items()}
    config = case_config(case, "sd15")
    if config.algo == "tlora":
        config = LycorisConfig.from_dict({**config.to_dict(), "apply_preset": TLORA_PRESET})
    net = create_network(unet, config)
    randomize(net, config.algo, seed=3)
    undo = full_rank_dylora() if config.algo == "dylora" else (lambda: None)
    random.seed(3)
    try:
        outputs = {}
        for s in STRENGTHS:
            net.set_multiplier(s)
            outputs[s] = forward()
    finally:
        undo()
    net.save_weights(str(path), None, {"lycoris_config": json.dumps(config.to_dict())})
    net.restore()
    for lora in net.loras:
        lora.org_module[0].__dict__.pop("_lycoris_wrappers", None)
    unet.load_state_dict(saved)
    return outputs


def main() -> None:
    pack = load_pack()
    node = pack.nodes.host_nodes.ApplyLycorisComfy()
    work = Path(WORK)
    unet = tiny_unet()
    mapping = comfy.utils.unet_to_diffusers(UNET_CONFIG)
    sd = unet.state_dict()
    base = comfy.sd.load_diffusion_model_state_dict(
        {f"model.diffusion_model.{mapping[k]}": v for k, v in sd.items() if k in mapping}
    )
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=g)
    ctx = torch.randn(1, 77, 768, generator=g)
    t = torch.tensor([500.0])

    def ref_forward() -> torch.Tensor:
        with torch.no_grad():
            return unet(x, t, encoder_hidden_states=ctx).sample.float()

    ref_base = ref_forward()
    report = {
        "model_config": type(base.model.model_config).__name__,
        "unmapped": sorted(set(sd) - set(mapping)),
        "base_max_abs_diff": float((ref_base - comfy_forward(base, x, t, ctx)).abs().max()),
        "files": {},
    }
    folder_paths.add_model_folder_path("loras", str(work), is_default=True)
    loader = nodes.LoraLoaderModelOnly()
    cases = {c.name: c for c in CASES}
    for name in ALGOS:
        path = work / f"{name.replace(' ', '_').replace('+', '_')}.safetensors"
        want = lycoris_outputs(unet, cases[name], path, ref_forward)
        adapter = load_adapter(path)
        entry = {"layers": len(adapter.layers)}
        for s in STRENGTHS:
            model, _ = node.run(base, None, adapter, s, s)
            got = comfy_forward(model, x, t, ctx)
            with patched(unet, [(adapter, s)]):  # our own merge on the diffusers twin
                ours = ref_forward()
            row = {
                "patches": len(model.patches),
                "node_vs_lycoris": float((got - want[s]).abs().max()),
                "node_vs_ours": float((got - ours).abs().max()),
                "ours_vs_lycoris": float((ours - want[s]).abs().max()),
                "effect": float((want[s] - ref_base).abs().max()),
                "max_abs": float(want[s].abs().max()),
            }
            if name in STOCK_EXACT:
                (stock,) = loader.load_lora_model_only(base, path.name, s)
                row["node_vs_stock"] = float((got - comfy_forward(stock, x, t, ctx)).abs().max())
            entry[f"s{s:g}"] = row
        off, _ = node.run(base, None, adapter, 0.0, 0.0)
        entry["s0_same_model"] = off is base
        report["files"][name] = entry
    print(json.dumps(report))


if __name__ == "__main__":
    main()
