"""Benchmark: training memory of a 168M-parameter Flux-layout transformer, estimate vs measured.

Run from the repository root::

    .venv/bin/python bench/memory.py [--quick] [--steps 3] [--out bench/results/memory.json]

Side by side in one run, each configuration in its own fresh subprocess (a clean peak RSS;
``--parallel`` of them at a time, results appended to ``<out>.partial.jsonl`` so an interrupted
run resumes):
base dtype fp32 vs bf16 (the whole pipeline stored and computed in it, mixed precision off) x
gradient checkpointing off / on x two resolutions. Each child builds the tiny Flux pipeline's
VAE and text encoders with a random transformer of hidden 1024 (8 heads x 128), 3 double + 3
single blocks (``bench/apply.py``'s ``MODEL_DEFAULT``: 168M parameters), built on the meta
device and filled in place at its dtype (so a bf16 run never holds an fp32 copy), then trains
the seed's LoKr config for ``--steps`` steps (AdamW, batch 1, 32 T5 tokens, 1 thread; default
2: AdamW creates its state after the first backward, so only from the second step on does a
step hold optimizer state and activations together, the peak the estimate describes) through
``lycoris_core.training.train``.

Per configuration: ``estimate_training(spec)`` (the preflight's figure) against the measured
peak RSS of the process (``VmHWM``) minus its RSS before the model was built (the Python,
torch and diffusers runtime, which no estimate of the run covers; measured after a one-step
warm-up run on the tiny pipeline, so lazily loaded libraries are in it), the estimate's relative
error, the median step time after the first step, and the loss at each step. Target: the
estimate within 20% of the measured peak for at least 6 configurations. The measured children
run with ``MALLOC_MMAP_THRESHOLD_=131072``: glibc's default dynamic threshold keeps freed blocks
of up to 32 MB in the heap, and the RSS of a default process then stays well above what torch
holds (two extra runs, fp32 and bf16 without checkpointing, show by how much). Writes JSON with
the machine info to ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import apply as common  # noqa: E402  (machine info, JSON, the 168M model shape)
import torch  # noqa: E402

TARGET = 0.20  # |estimate / measured - 1|
TARGET_CONFIGS = 6
TEXT_TOKENS = 32
# the tiny Flux VAE halves the picture: 32 px -> 16x16 latents -> 64 image tokens, 64 px -> 256
RESOLUTIONS = (32, 64)
# glibc keeps freed blocks below its (dynamic, up to 32 MB) mmap threshold in the heap, so the
# RSS of a default process stays above what torch holds; the measured runs fix the threshold
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
QUICK_SHAPE = {"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 64,
               "num_attention_heads": 4}  # fmt: skip


def status_bytes() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(value.split()[0]) * 1024
    return out


def filled_transformer(shape: dict[str, Any], dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """A random Flux transformer built on the meta device, its parameters created at `dtype`
    (normal(0, 1/sqrt(fan_in)) matrices, unit norm scales, zero biases)."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    from lycoris_core.tiny import flux_transformer_config

    with init_empty_weights():
        model = FluxTransformer2DModel(**flux_transformer_config(**shape))
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.dim() >= 2:
                t = torch.randn(p.shape, generator=g, dtype=torch.float32).to(dtype)
                t.mul_(p.shape[1] ** -0.5)
            elif "norm" in type(module).__name__.lower() and name == "weight":
                t = torch.ones(p.shape, dtype=dtype)
            else:
                t = torch.zeros(p.shape, dtype=dtype)
            module._parameters[name] = torch.nn.Parameter(t, requires_grad=False)
    return model.eval()


def warm_up(tmp: Path, dtype: torch.dtype) -> None:
    """One step on the tiny Flux pipeline: what the runtime loads lazily on first use (the
    libraries' modules, autograd, accelerate) is in the RSS before the measured run starts."""
    from lycoris_core.config import SEED_EXAMPLE, LycorisConfig
    from lycoris_core.models import from_pipeline
    from lycoris_core.tiny import build_pipeline
    from lycoris_core.training.dataset import DatasetSpec
    from lycoris_core.training.loop import TrainSpec, train
    from lycoris_core.training.objectives import ObjectiveOptions
    from lycoris_core.training.synthetic import make_demo_dataset

    model = from_pipeline(build_pipeline("flux"), "warm-up", dtype=dtype, device="cpu")
    data = make_demo_dataset(tmp / "data", count=1, size=32, seed=0)
    spec = TrainSpec(
        base=model,
        config=LycorisConfig.from_dict(SEED_EXAMPLE, source="seed example"),
        dataset=DatasetSpec(folder=str(data), resolution=32, bucket_step=16),
        output=str(tmp / "warm.safetensors"),
        steps=1,
        objective=ObjectiveOptions(max_sequence_length=8),
    )
    train(spec)


def child(job: dict[str, Any]) -> dict[str, Any]:
    """One configuration in this (fresh) process."""
    torch.set_num_threads(1)
    import logging

    logging.getLogger("lycoris_core").setLevel(logging.WARNING)
    from lycoris_core.config import SEED_EXAMPLE, LycorisConfig
    from lycoris_core.families import FAMILIES
    from lycoris_core.memory import estimate_training
    from lycoris_core.models import LoadedModel
    from lycoris_core.tiny import build_pipeline
    from lycoris_core.training.dataset import DatasetSpec
    from lycoris_core.training.loop import TrainSpec, train
    from lycoris_core.training.objectives import ObjectiveOptions
    from lycoris_core.training.synthetic import make_demo_dataset

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[job["dtype"]]
    with tempfile.TemporaryDirectory(prefix="bench_memory_warmup_") as tmp:
        warm_up(Path(tmp), dtype)  # every library loaded, thread pools started
    gc.collect()
    before = status_bytes()["VmRSS"]
    pipe = build_pipeline("flux", seed=0)
    shape = {
        **job["shape"],
        "joint_attention_dim": pipe.text_encoder_2.config.d_model,
        "pooled_projection_dim": pipe.text_encoder.config.hidden_size,
    }
    pipe.to(dtype=dtype)  # the tiny encoders and VAE
    pipe.transformer = filled_transformer(shape, dtype, seed=0)
    params = sum(p.numel() for p in pipe.transformer.parameters())
    model = LoadedModel(
        pipe=pipe, family=FAMILIES["flux"], source="bench/memory.py", device=torch.device("cpu"),
        dtype=dtype,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        data = make_demo_dataset(Path(tmp) / "data", count=2, size=job["resolution"], seed=0)
        spec = TrainSpec(
            base=model,
            config=LycorisConfig.from_dict(SEED_EXAMPLE, source="seed example"),
            dataset=DatasetSpec(folder=str(data), resolution=job["resolution"], bucket_step=16),
            output=str(Path(tmp) / "out.safetensors"),
            steps=job["steps"],
            lr=1e-4,
            gradient_checkpointing=job["gc"],
            objective=ObjectiveOptions(max_sequence_length=TEXT_TOKENS),
        )
        est = estimate_training(spec)
        stamps: list[float] = []
        losses: list[float] = []

        def on_step(info: Any) -> None:
            stamps.append(time.perf_counter())
            losses.append(info.loss)

        t0 = time.perf_counter()
        result = train(spec, on_step=on_step)
    peak = status_bytes()["VmHWM"]
    times = [b - a for a, b in zip([t0, *stamps[:-1]], stamps, strict=True)]
    measured = peak - before
    return {
        "job": job,
        "params": params,
        "completed": result.completed,
        "rss_before_build": before,
        "peak_rss": peak,
        "measured": measured,
        "estimate": est.total,
        "estimate_items": {i.name: i.bytes for i in est.items},
        "rel_err": est.total / measured - 1,
        "step_s": statistics.median(times[1:]) if len(times) > 1 else times[0],
        "first_step_s": times[0],
        "losses": losses,
    }


def run_child(job: dict[str, Any], tmp: Path) -> dict[str, Any]:
    path = tmp / "job.json"
    path.write_text(json.dumps(job))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.update(MALLOC_ENV if job.get("malloc", "fixed") == "fixed" else {})
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"child {job} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_all(jobs: list[dict[str, Any]], partial: Path, parallel: int) -> list[dict[str, Any]]:
    """Every job in its own child, `parallel` at a time (peak RSS is per process; step times
    share the cores). Each result is appended to `partial` as it arrives; a rerun takes the
    results already there and runs only the rest."""
    from concurrent.futures import ThreadPoolExecutor

    have = []
    if partial.is_file():
        have = [json.loads(line) for line in partial.read_text().splitlines() if line.strip()]
    todo = [j for j in jobs if all(h["job"] != j for h in have)]

    def one(job: dict[str, Any]) -> dict[str, Any]:
        with tempfile.TemporaryDirectory() as tmp:
            r = run_child(job, Path(tmp))
        with open(partial, "a") as fh:
            fh.write(json.dumps(r) + "\n")
        print(job["dtype"], job["gc"], job["resolution"], job["malloc"], f"{r['rel_err']:+.3f}")
        return r

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        fresh = list(pool.map(one, todo))
    results = have + fresh
    return [next(r for r in results if r["job"] == j) for j in jobs]


def report(res: dict[str, Any]) -> str:
    mb = 2**20
    rows = [
        [
            r["job"]["dtype"],
            "on" if r["job"]["gc"] else "off",
            str(r["job"]["resolution"]),
            f"{r['estimate'] / mb:.0f}",
            f"{r['measured'] / mb:.0f}",
            f"{r['rel_err'] * 100:+.1f}%",
            f"{r['step_s']:.2f}",
            f"{r['losses'][-1]:.4f}",
        ]
        for r in res["configs"]
    ]
    for r in res["default_malloc"]:
        label = f"{r['job']['dtype']} (default malloc)"
        est, got = f"{r['estimate'] / mb:.0f}", f"{r['measured'] / mb:.0f}"
        err, step = f"{r['rel_err'] * 100:+.1f}%", f"{r['step_s']:.2f}"
        rows.append([label, "off", str(r["job"]["resolution"]), est, got, err, step])
        rows[-1].append(f"{r['losses'][-1]:.4f}")
    header = ["dtype", "ckpt", "px", "estimate MB", "measured MB", "error", "step s", "loss"]
    s = res["summary"]
    return (
        common.fmt_table(rows, header)
        + f"\nwithin {TARGET:.0%}: {s['within_target']}/{len(res['configs'])} configurations "
        + f"(target {TARGET_CONFIGS}): {'PASS' if s['pass'] else 'MISS'}"
        + f"\npeak RSS bf16/fp32 (same ckpt, px): {s['bf16_over_fp32']}"
        + f"\ndefault malloc / fixed mmap threshold: {s['default_malloc_over_fixed']}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a small transformer, 2 steps")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=2, help="children at a time")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--resolutions", nargs="+", type=int, default=list(RESOLUTIONS))
    parser.add_argument(
        "--partial", action="store_true", help="report the results in <out>.partial.jsonl only"
    )
    parser.add_argument("--out", default=str(BENCH / "results" / "memory.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(Path(args.child).read_text()))))
        return 0
    t_start = time.perf_counter()
    shape = QUICK_SHAPE if args.quick else common.MODEL_DEFAULT
    shape = {
        k: v for k, v in shape.items() if k not in ("joint_attention_dim", "pooled_projection_dim")
    }
    steps = 1 if args.quick else args.steps
    jobs = [
        {"dtype": d, "gc": g, "resolution": r, "steps": steps, "shape": shape, "malloc": "fixed"}
        for d in args.dtypes
        for g in (False, True)
        for r in args.resolutions
    ]
    # the first dtype without checkpointing at the second size, in a default process
    jobs.append(jobs[1] | {"malloc": "default"})
    partial = Path(args.out).with_suffix(".partial.jsonl")
    if args.partial:  # what finished so far (an interrupted run), without running the rest
        have = [json.loads(line) for line in partial.read_text().splitlines() if line.strip()]
        jobs = [j for j in jobs if any(h["job"] == j for h in have)]
    done = run_all(jobs, partial, args.parallel)
    configs = [r for r in done if r["job"]["malloc"] == "fixed"]
    default_malloc = [r for r in done if r["job"]["malloc"] == "default"]
    within = sum(abs(r["rel_err"]) <= TARGET for r in configs)
    ratios = {}
    for r in configs:
        if r["job"]["dtype"] == "bf16":
            twin = next(
                (q for q in configs if q["job"] | {"dtype": "bf16"} == r["job"] and q is not r),
                None,
            )
            if twin is None:
                continue
            key = f"ckpt {'on' if r['job']['gc'] else 'off'}, {r['job']['resolution']} px"
            ratios[key] = round(r["peak_rss"] / twin["peak_rss"], 3)
    res = {
        "machine": common.machine_info(configs[0]["params"]) | {"dtype": "fp32 and bf16"},
        "complete": not args.partial,
        "settings": {
            "steps": steps,
            "text_tokens": TEXT_TOKENS,
            "shape": shape,
            "threads": 1,
            "config": "the seed's LoKr (Attention + FeedForward)",
            "optimizer": "adamw",
        },
        "configs": configs,
        "default_malloc": default_malloc,
        "summary": {
            "within_target": within,
            "target": f"|estimate/measured - 1| <= {TARGET} for >= {TARGET_CONFIGS} configs",
            "pass": within >= TARGET_CONFIGS,
            "bf16_over_fp32": ratios,
            "default_malloc_over_fixed": {
                r["job"]["dtype"]: round(
                    r["measured"]
                    / next(
                        q["measured"] for q in configs if q["job"] == r["job"] | {"malloc": "fixed"}
                    ),
                    3,
                )
                for r in default_malloc
            },
        },
    }
    return common.finish(res, args.out, t_start, report)


if __name__ == "__main__":
    sys.exit(main())
