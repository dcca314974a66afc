"""Benchmark: sampling a Flux-family pipeline with LyCORIS adapters, merged and dynamic, on CPU.

Run from the repository root::

    .venv/bin/python bench/sampling.py [--quick] [--out bench/results/sampling.json]

The pipeline is the tiny Flux (VAE, CLIP, T5, scheduler) with a random transformer large
enough that one step takes well over 50 ms on CPU (the same ~168M-parameter model as
bench/apply.py). For LoRA and LoKr (the seed's config) and LoHa it measures, side by side in one
run (fp32, 1 thread, medians of interleaved rounds), the time of ``sample()``:

* base: no adapters;
* merged, warm: the adapter set was already patched by the previous call (the cache);
* merged, cold: the base was active before, so the call merges (and the next one restores);
* dynamic, warm and cold, the same way.

Targets: merged (warm) / base <= 1.02; dynamic (warm) / base <= 1.10 for LoRA and LoKr.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import apply as common  # noqa: E402  (bench/apply.py: model, adapter files, machine info)
import torch  # noqa: E402

from lycoris_core import load_adapter  # noqa: E402
from lycoris_core.models import LoadedModel  # noqa: E402
from lycoris_core.sampling import sample  # noqa: E402

MERGED_TARGET = 1.02
DYNAMIC_TARGET = 1.10
ALGOS = ("lora", "lokr", "loha")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(
    quick: bool, seed: int, device: str = "cpu", dtype: str = "fp32"
) -> tuple[LoadedModel, int]:
    """bench/apply.py's transformer in the tiny Flux pipeline."""
    shape = common.MODEL_QUICK if quick else common.MODEL_DEFAULT
    model, params = common.build_flux_pipeline_model(
        shape, seed, "bench: tiny Flux components + random transformer", device, DTYPES[dtype]
    )
    if not quick and params < common.MIN_PARAMS_DEFAULT:
        raise SystemExit(f"transformer has {params:,} parameters, expected >= 150M")
    return model, params


def timed(model: LoadedModel, adapters: list, mode: str, args: dict[str, Any]) -> float:
    t0 = time.perf_counter()
    sample(model, adapters, mode=mode, **args)
    return time.perf_counter() - t0


def run(
    quick: bool,
    out: Path,
    seed: int = 0,
    device: str = "cpu",
    dtype: str = "fp32",
    size: int | None = None,
    steps: int | None = None,
) -> dict[str, Any]:
    if device == "cpu":
        torch.set_num_threads(1)
    model, params = build(quick, seed, device, dtype)
    # CPU default 64x64 px -> 16x16 latents -> 64 image tokens
    size = size or (32 if quick else 64)
    steps = steps or (2 if quick else 3)
    rounds = 3 if quick else 4
    args = {
        "prompt": "a photo of a cat",
        "steps": steps,
        "seed": 1,
        "width": size,
        "height": size,
        "max_sequence_length": 64,  # T5 tokens (the pipeline default 512 would dominate)
    }
    result: dict[str, Any] = {
        "benchmark": "sampling",
        "machine": {**common.machine_info(params), "dtype": str(DTYPES[dtype]).split(".")[-1]},
        "settings": {
            "size": size,
            "steps": steps,
            "rounds": rounds,
            "quick": quick,
            "device": device,
            "dtype": dtype,
        },
        "algorithms": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for algo in ALGOS:
            path = Path(tmp) / f"{algo}.safetensors"
            common.make_file(model.denoiser, algo, path, seed=10 + len(files))
            files[algo] = load_adapter(path)
        base_image = sample(model, **args)  # warm-up (allocations, thread pools)
        step_ms = timed(model, [], "merge", args) / steps * 1000
        result["base_step_ms"] = step_ms
        for algo, adapter in files.items():
            stack = [(adapter, 1.0)]
            t: dict[str, list[float]] = {k: [] for k in ("base", "mc", "mw", "dc", "dw")}
            for _ in range(rounds):
                t["base"].append(timed(model, [], "merge", args))
                t["mc"].append(timed(model, stack, "merge", args))  # merges
                t["mw"].append(timed(model, stack, "merge", args))  # cached
                t["base"].append(timed(model, [], "merge", args))
                t["dc"].append(timed(model, stack, "dynamic", args))
                t["dw"].append(timed(model, stack, "dynamic", args))
            merged = sample(model, stack, mode="merge", **args)
            dynamic = sample(model, stack, mode="dynamic", **args)
            model.restore_base()
            med = {k: statistics.median(v) * 1000 for k, v in t.items()}
            low = {k: min(v) * 1000 for k, v in t.items()}
            result["algorithms"][algo] = {
                "ms": med,
                "min_ms": low,
                "merged_warm_over_base_min": low["mw"] / low["base"],
                "dynamic_warm_over_base_min": low["dw"] / low["base"],
                "raw_s": t,
                "merged_warm_over_base": med["mw"] / med["base"],
                "merged_cold_over_base": med["mc"] / med["base"],
                "dynamic_warm_over_base": med["dw"] / med["base"],
                "dynamic_cold_over_base": med["dc"] / med["base"],
                "merged_vs_dynamic_max_abs": (merged - dynamic).abs().max().item(),
                "adapter_effect_max_abs": (merged - base_image).abs().max().item(),
            }
    common.write_json_atomic(out, result)
    return result


def report(res: dict[str, Any]) -> str:
    rows = []
    for algo, r in res["algorithms"].items():
        dyn_ok = r["dynamic_warm_over_base"] <= DYNAMIC_TARGET
        rows.append(
            [
                algo,
                f"{r['ms']['base']:.0f}",
                f"{r['merged_warm_over_base']:.3f} ({r['merged_warm_over_base_min']:.3f})",
                f"{r['merged_cold_over_base']:.3f}",
                f"{r['dynamic_warm_over_base']:.3f} ({r['dynamic_warm_over_base_min']:.3f})",
                f"{r['dynamic_cold_over_base']:.3f}",
                f"{r['merged_vs_dynamic_max_abs']:.1e}",
                "met" if r["merged_warm_over_base"] <= MERGED_TARGET else "MISSED",
                ("met" if dyn_ok else "MISSED") if algo in ("lora", "lokr") else "(none)",
            ]
        )
    header = [
        "algo",
        "base ms",
        "merged/base",
        "merged cold",
        "dynamic/base",
        "dynamic cold",
        "merged~dyn",
        "merged target",
        "dynamic target",
    ]
    m = res["machine"]
    return "\n".join(
        [
            f"sampling {res['settings']}, {m['model_params']:,} transformer params, "
            f"{res['base_step_ms']:.0f} ms per step (base); ratios: median (min) of rounds",
            common.fmt_table(rows, header),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, smoke run")
    parser.add_argument("--out", default=str(BENCH / "results" / "sampling.json"))
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--size", type=int, default=None, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps")
    a = parser.parse_args(argv)
    res = run(a.quick, Path(a.out), 0, a.device, a.dtype, a.size, a.steps)
    print(report(res))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
