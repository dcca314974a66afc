"""Benchmark: training memory of FLUX.1-dev's real width per base precision, extrapolated per block.

Run on a CUDA machine from the repository root (about 3-5 minutes on an H100/H200)::

    .venv/bin/python bench/flux_memory_gpu.py [--out bench/results/flux_memory_gpu.json]

For each base precision (bf16, fp8, int8, nf4; compute bf16) and three block counts of a random
Flux transformer at FLUX.1's widths (hidden 3072 = 24 heads x 128, T5 4096, CLIP 768): one
training step and a second one (AdamW state exists from the second on) of the seed's LoKr config
on 1024 px (64 x 64 = 4096 image tokens) and 512 T5 tokens, batch 1, gradient checkpointing on,
bf16 autocast, with ``torch.cuda.max_memory_allocated`` after each configuration. The peak is
fitted as ``a + d * double_blocks + s * single_blocks`` from (1, 1), (2, 1) and (1, 2) blocks and
extrapolated to FLUX.1-dev's 19 + 38 blocks. The estimator's figure for the same run is
printed beside it. ``--quick --device cpu`` runs a small model on the CPU (the smoke test).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import apply as common  # noqa: E402  (machine info, JSON)
import torch  # noqa: E402

FLUX_DEV_BLOCKS = (19, 38)
BLOCKS = ((1, 1), (2, 1), (1, 2))
FULL = {"attention_head_dim": 128, "num_attention_heads": 24, "text": 4096, "pooled": 768}
QUICK = {"attention_head_dim": 32, "num_attention_heads": 2, "text": 64, "pooled": 32}
PRECISIONS = ("bf16", "fp8", "int8", "nf4")


def build(shape: dict[str, int], double: int, single: int, device: str, dtype: torch.dtype):
    from diffusers import FluxTransformer2DModel

    from lycoris_core.tiny import flux_transformer_config

    cfg = flux_transformer_config(
        num_layers=double,
        num_single_layers=single,
        attention_head_dim=shape["attention_head_dim"],
        num_attention_heads=shape["num_attention_heads"],
        joint_attention_dim=shape["text"],
        pooled_projection_dim=shape["pooled"],
        guidance_embeds=True,
    )
    with torch.device(device):
        model = FluxTransformer2DModel(**cfg).to(dtype)
    return model.requires_grad_(False)


def inputs(model: Any, img: int, txt: int, device: str, dtype: torch.dtype) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    cfg = model.config

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    return {
        "hidden_states": rnd(1, img, cfg.in_channels),
        "encoder_hidden_states": rnd(1, txt, cfg.joint_attention_dim),
        "pooled_projections": rnd(1, cfg.pooled_projection_dim),
        "timestep": torch.tensor([0.5], device=device, dtype=dtype),
        "img_ids": torch.zeros(img, 3, device=device),
        "txt_ids": torch.zeros(txt, 3, device=device),
        "guidance": torch.tensor([3.5], device=device, dtype=dtype),
        "return_dict": False,
    }


def peak_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    from lycoris_core.training.loop import _peak_memory

    return _peak_memory(torch.device(device))


def one_config(args: argparse.Namespace, precision: str, double: int, single: int) -> dict:
    from lycoris_core import LycorisConfig, create_network
    from lycoris_core.config import SEED_EXAMPLE
    from lycoris_core.quantization import quantise_module

    dev, dt = args.device, torch.bfloat16 if args.device == "cuda" else torch.float32
    shape = QUICK if args.quick else FULL
    if dev == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build(shape, double, single, dev, dt)
    quantise_module(model, precision if precision != "bf16" else "auto", dt)
    model.enable_gradient_checkpointing()
    model.train()
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    net = create_network(model, LycorisConfig.from_dict(SEED_EXAMPLE))
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    feed = inputs(model, args.image_tokens, args.text_tokens, dev, dt)
    t0, losses = time.perf_counter(), []
    for _ in range(2):
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            out = model(**feed)[0]
        loss = out.float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    peak = peak_bytes(dev)
    net.restore()
    del model, net, opt, feed
    return {
        "precision": precision,
        "double": double,
        "single": single,
        "weight_bytes": weights,
        "peak_bytes": peak,
        "seconds": round(time.perf_counter() - t0, 2),
        "losses": losses,
    }


def fit(rows: list[dict]) -> dict[str, float]:
    """a, d, s of peak = a + d * double + s * single, from the three block counts."""
    a_mat = torch.tensor([[1.0, r["double"], r["single"]] for r in rows], dtype=torch.float64)
    b = torch.tensor([float(r["peak_bytes"]) for r in rows], dtype=torch.float64)
    a, d, s = torch.linalg.lstsq(a_mat, b[:, None]).solution[:, 0].tolist()
    dev = a + d * FLUX_DEV_BLOCKS[0] + s * FLUX_DEV_BLOCKS[1]
    return {"base": a, "per_double": d, "per_single": s, "flux_dev_peak": dev}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small width (smoke test)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--precisions", nargs="+", default=list(PRECISIONS))
    ap.add_argument("--image-tokens", type=int, default=4096)
    ap.add_argument("--text-tokens", type=int, default=512)
    ap.add_argument("--out", default=str(BENCH / "results" / "flux_memory_gpu.json"))
    args = ap.parse_args()
    if args.quick:
        args.image_tokens, args.text_tokens = 64, 16
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu --quick for a smoke run")
    t_start = time.perf_counter()
    results: dict[str, Any] = {"precisions": {}, "flux_dev_blocks": FLUX_DEV_BLOCKS}
    for precision in args.precisions:
        rows = [one_config(args, precision, d, s) for d, s in BLOCKS]
        results["precisions"][precision] = {"configs": rows, "fit": fit(rows)}
        f = results["precisions"][precision]["fit"]
        print(
            f"{precision:5s} per double {f['per_double'] / 2**30:6.2f} GiB, per single "
            f"{f['per_single'] / 2**30:6.2f} GiB, rest {f['base'] / 2**30:6.2f} GiB -> "
            f"FLUX.1-dev ({FLUX_DEV_BLOCKS[0]}+{FLUX_DEV_BLOCKS[1]} blocks) "
            f"{f['flux_dev_peak'] / 2**30:6.1f} GiB",
            flush=True,
        )
    results["machine"] = common.machine_info(0)
    results["seconds"] = round(time.perf_counter() - t_start, 1)
    common.write_json_atomic(Path(args.out), results)
    print(json.dumps({p: round(v["fit"]["flux_dev_peak"] / 2**30, 2)
                      for p, v in results["precisions"].items()}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
