"""Benchmark: training memory of a 166.6M-parameter Flux-layout transformer over a bf16,
fp8, int8 and nf4 base, estimate vs measured.

Run from the repository root::

    .venv/bin/python bench/memory.py [--quick] [--reference] [--bf16-compute] [--steps 2]
        [--precisions bf16s fp8 int8 nf4] [--resolutions 32 64] [--out bench/results/memory.json]

Side by side in one run, each configuration in its own fresh subprocess (a clean peak RSS;
``--parallel`` of them at a time, default 1; results appended to ``<out>.partial.jsonl`` so an
interrupted run resumes): the denoiser's Linear weights stored as

* ``bf16s``: bf16, computed in fp32 (diffusers' layerwise casting on each Linear; this CPU has
  no bf16 instructions: a bf16 step is ~20x slower than fp32), trained in bypass mode like
  the quantised arms;
* ``fp8`` / ``int8`` / ``nf4``: ``base_precision`` fp8 (layerwise casting) / bitsandbytes
  int8 / nf4, computing in fp32 (bypass mode, as the trainer sets it);
* ``--reference``: fp32 (lycoris' default merged mode); ``--bf16-compute``: the whole model bf16,
  stored and computed (merged mode), at the first size only,

x gradient checkpointing off / on at the first size, off at the others. Each child builds the
tiny Flux pipeline's VAE and text encoders with a random transformer of hidden 1024 (8 heads x
128), 3 double + 3 single blocks (``bench/apply.py``'s ``MODEL_DEFAULT``: 166.6M parameters),
built on the meta device and filled layer by layer, each Linear stored at the arm's precision
as soon as it is filled (so no arm holds more than one full-precision layer beyond its stored
model: ``build_peak`` in the JSON), then trains the seed's LoKr config for ``--steps`` steps
(AdamW, batch 1, 32 T5 tokens, 1 thread; default 2: AdamW creates its state after the first
backward, so only from the second step on does a step hold optimizer state and activations
together, the peak the estimate describes) through ``lycoris_core.training.train``, then samples
2 steps (no guidance batch, latents out) with its peak measured apart (``VmHWM`` reset).

Per configuration: the stored denoiser bytes (``module_weight_bytes``: parameters, buffers
and bitsandbytes' scales); ``estimate_training(spec)`` (the preflight's figure) against the
measured peak RSS of the process (``VmHWM``) minus its RSS before the model was built (the
Python, torch and diffusers runtime, which no estimate of the run covers; measured after a
one-step warm-up run on the tiny pipeline at the arm's precision, so lazily loaded libraries
are in it), the estimate's relative error, the median step time after the first step, the loss
at each step; the same for sampling. Targets: the estimate within 20% of the measured peak for
at least 6 configurations; stored bytes fp8 <= 0.51x and nf4 <= 0.30x bf16; peak training RSS
fp8 <= 0.65x bf16 (ratios against both bf16 arms). The children run with
``MALLOC_MMAP_THRESHOLD_=131072``: glibc's default dynamic threshold keeps freed blocks of up
to 32 MB in the heap, and the RSS of a default process then stays well above what torch holds
(``--default-malloc`` adds a default process to show by how much). Writes JSON with the
machine info to ``--out``.
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

import apply as common  # noqa: E402  (machine info, JSON, the 166.6M model shape)
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


# the arms: how the denoiser's Linear weights are stored; every arm computes in fp32 (this
# CPU has no bf16 instructions: a bf16 training step took 370 s against 28 s in fp32)
PRECISIONS = ("fp32", "bf16", "bf16s", "fp8", "int8", "nf4")
LABELS = {
    "bf16s": "bf16 storage, fp32 compute",
    "fp32": "fp32 (merged mode)",
    "bf16": "bf16 compute (merged mode)",
}


def filled_transformer(
    shape: dict[str, Any], dtype: torch.dtype, seed: int, precision: str = "fp32"
) -> torch.nn.Module:
    """A random Flux transformer built on the meta device, its parameters created at `dtype`
    (normal(0, 1/sqrt(fan_in)) matrices, unit norm scales, zero biases), each Linear stored
    at `precision` as soon as it is filled (``quantise_module`` on that layer alone, or for
    "bf16s" bf16 storage through diffusers' layerwise casting, fp32 compute), so no arm
    ever holds more than one full-precision layer beyond its stored model."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    from lycoris_core.tiny import flux_transformer_config

    with init_empty_weights():
        model = FluxTransformer2DModel(**flux_transformer_config(**shape))
    g = torch.Generator().manual_seed(seed)
    # children before their parents (a parent's Linear children are filled when it comes),
    # by name: a list of the modules would keep each replaced full-precision layer alive
    for path in reversed([n for n, _ in model.named_modules()]):
        module = model.get_submodule(path)
        for name, p in list(module.named_parameters(recurse=False)):
            if p.dim() >= 2:
                t = torch.randn(p.shape, generator=g, dtype=torch.float32).to(dtype)
                t.mul_(p.shape[1] ** -0.5)
            elif "norm" in type(module).__name__.lower() and name == "weight":
                t = torch.ones(p.shape, dtype=dtype)
            else:
                t = torch.zeros(p.shape, dtype=dtype)
            module._parameters[name] = torch.nn.Parameter(t, requires_grad=False)
        for parent_name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear and precision not in ("fp32", "bf16"):
                setattr(module, parent_name, _stored(child, precision, dtype))
        del module
    return model.eval()


def _stored(layer: torch.nn.Linear, precision: str, dtype: torch.dtype) -> torch.nn.Module:
    from lycoris_core.quantization import quantise_module

    if precision == "bf16s":
        from diffusers.hooks.layerwise_casting import apply_layerwise_casting_hook

        apply_layerwise_casting_hook(layer, torch.bfloat16, dtype, non_blocking=False)
        return layer
    holder = torch.nn.Module()
    holder.add_module("layer", layer)
    quantise_module(holder, precision, dtype)
    return holder.layer


def warm_up(tmp: Path, dtype: torch.dtype, precision: str = "fp32") -> None:
    """One step on the tiny Flux pipeline (at the arm's base precision: bf16 storage warms
    up as fp8, the same casting hooks): what the runtime loads lazily on first use (the
    libraries' modules, bitsandbytes, autograd, accelerate) is in the RSS before the
    measured run starts."""
    from lycoris_core.config import SEED_EXAMPLE, LycorisConfig
    from lycoris_core.models import from_pipeline
    from lycoris_core.tiny import build_pipeline
    from lycoris_core.training.dataset import DatasetSpec
    from lycoris_core.training.loop import TrainSpec, train
    from lycoris_core.training.objectives import ObjectiveOptions
    from lycoris_core.training.synthetic import make_demo_dataset

    base = {"bf16s": "fp8", "fp32": "auto"}.get(precision, precision)
    model = from_pipeline(
        build_pipeline("flux"), "warm-up", dtype=dtype, device="cpu", base_precision=base
    )
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
    from lycoris_core.memory import estimate_training, module_weight_bytes
    from lycoris_core.memory_counts import meta_denoiser
    from lycoris_core.models import LoadedModel
    from lycoris_core.tiny import build_pipeline, flux_transformer_config
    from lycoris_core.training.dataset import DatasetSpec
    from lycoris_core.training.loop import TrainSpec, train
    from lycoris_core.training.objectives import ObjectiveOptions
    from lycoris_core.training.synthetic import make_demo_dataset

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[job["dtype"]]
    precision = job.get("precision", "fp32")
    with tempfile.TemporaryDirectory(prefix="bench_memory_warmup_") as tmp:
        warm_up(Path(tmp), dtype, precision)  # every library loaded, thread pools started
    gc.collect()
    before = status_bytes()["VmRSS"]
    pipe = build_pipeline("flux", seed=0)
    shape = {
        **job["shape"],
        "joint_attention_dim": pipe.text_encoder_2.config.d_model,
        "pooled_projection_dim": pipe.text_encoder.config.hidden_size,
    }
    pipe.to(dtype=dtype)  # the tiny encoders and VAE
    pipe.transformer = filled_transformer(shape, dtype, seed=0, precision=precision)
    build_peak = status_bytes()["VmHWM"]
    denoiser_bytes = module_weight_bytes(pipe.transformer)[0]
    meta = meta_denoiser(type(pipe.transformer), flux_transformer_config(**shape))
    params = sum(p.numel() for p in meta.parameters())
    model = LoadedModel(
        pipe=pipe, family=FAMILIES["flux"], source="bench/memory.py", device=torch.device("cpu"),
        dtype=dtype,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        data = make_demo_dataset(Path(tmp) / "data", count=2, size=job["resolution"], seed=0)
        spec = TrainSpec(
            base=model,
            # bf16 storage is no quantised base: bypass mode as the quantised arms train
            config=LycorisConfig.from_dict(
                SEED_EXAMPLE | ({"bypass_mode": True} if precision == "bf16s" else {}),
                source="seed example",
            ),
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
    sample = sampling(model, job["resolution"], before)
    return sample | {
        "job": job,
        "params": params,
        "completed": result.completed,
        "rss_before_build": before,
        "build_peak": build_peak,
        "denoiser_bytes": denoiser_bytes,
        "peak_rss": peak,
        "measured": measured,
        "estimate": est.total,
        "estimate_items": {i.name: i.bytes for i in est.items},
        "rel_err": est.total / measured - 1,
        "step_s": statistics.median(times[1:]) if len(times) > 1 else times[0],
        "first_step_s": times[0],
        "losses": losses,
    }


def sampling(model: Any, resolution: int, before: int) -> dict[str, Any]:
    """A 2-step sampling run of the pipeline after training (no guidance batch, latents out):
    its peak RSS above the runtime (``VmHWM`` reset first) against the sampling estimate."""
    from lycoris_core.memory import Workload, estimate_memory

    work = Workload(mode="sample", width=resolution, height=resolution, text_tokens=TEXT_TOKENS)
    est = estimate_memory(model, work)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            model.pipe(
                prompt="a disc", height=resolution, width=resolution, num_inference_steps=2,
                guidance_scale=3.5, max_sequence_length=TEXT_TOKENS, output_type="latent",
                generator=torch.Generator().manual_seed(0),
            )  # fmt: skip
    except Exception as exc:  # a figure missing, not the run
        return {"sample_error": f"{type(exc).__name__}: {exc}"}
    measured = status_bytes()["VmHWM"] - before
    return {
        "sample_estimate": est.total,
        "sample_measured": measured,
        "sample_rel_err": est.total / measured - 1,
        "sample_s": (time.perf_counter() - t0) / 2,
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
        what = (job.get("precision", job["dtype"]), job["gc"], job["resolution"], job["malloc"])
        print(*what, f"{r['rel_err']:+.3f} {r['step_s']:.1f}s", flush=True)
        return r

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        fresh = list(pool.map(one, todo))
    results = have + fresh
    return [next(r for r in results if r["job"] == j) for j in jobs]


def label(job: dict[str, Any]) -> str:
    p = job.get("precision", job["dtype"])
    return LABELS.get(p, p) + (" (default malloc)" if job["malloc"] == "default" else "")


def report(res: dict[str, Any]) -> str:
    mb = 2**20
    rows = [
        [
            label(r["job"]),
            "on" if r["job"]["gc"] else "off",
            str(r["job"]["resolution"]),
            f"{r['denoiser_bytes'] / mb:.0f}",
            f"{r['estimate'] / mb:.0f}",
            f"{r['measured'] / mb:.0f}",
            f"{r['rel_err'] * 100:+.1f}%",
            f"{r['peak_rss'] / mb:.0f}",
            f"{r['step_s']:.1f}",
            f"{r['losses'][-1]:.4f}",
        ]
        for r in res["configs"] + res["default_malloc"]
    ]
    for row, r in zip(rows, res["configs"] + res["default_malloc"], strict=True):
        if "sample_measured" in r:
            row += [f"{r['sample_estimate'] / mb:.0f}", f"{r['sample_measured'] / mb:.0f}"]
            row += [f"{r['sample_rel_err'] * 100:+.1f}%", f"{r['sample_s']:.1f}"]
        else:
            row += ["-"] * 4
    header = ["base", "ckpt", "px", "denoiser MB", "estimate MB", "measured MB", "error"]
    header += ["peak RSS MB", "step s", "loss", "sample est MB", "sample MB", "error", "s/step"]
    s = res["summary"]
    return (
        common.fmt_table(rows, header)
        + f"\nwithin {TARGET:.0%}: {s['within_target']}/{len(res['configs'])} configurations "
        + f"(target {TARGET_CONFIGS}): {'PASS' if s['pass'] else 'MISS'}"
        + f"\nstored denoiser bytes / bf16 storage: {s['stored_over_bf16']}"
        + f"\npeak RSS / bf16 storage (same ckpt, px): {s['peak_over_bf16']}"
        + f"\nmeasured (peak - runtime) / bf16 storage: {s['measured_over_bf16']}"
        + f"\npeak RSS / bf16 compute: {s['peak_over_bf16_compute']}"
        + f"\nmeasured / bf16 compute: {s['measured_over_bf16_compute']}"
    )


def ratios(configs: list[dict[str, Any]], key: str, to: str = "bf16s") -> dict[str, float]:
    """`key` of each arm over the `to` arm (bf16 storage, or bf16 compute) of the same
    checkpointing and size."""
    out = {}
    for r in configs:
        j = r["job"]
        other = {"precision": to, "dtype": "bf16" if to == "bf16" else "fp32"}
        twin = next((q for q in configs if q["job"] == j | other), None)
        if twin is None or twin is r:
            continue
        name = f"{j['precision']}, ckpt {'on' if j['gc'] else 'off'}, {j['resolution']} px"
        out[name] = round(r[key] / twin[key], 3)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a small transformer, 1 step")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=1, help="children at a time")
    parser.add_argument("--precisions", nargs="+", default=["bf16s", "fp8", "int8", "nf4"])
    parser.add_argument("--resolutions", nargs="+", type=int, default=list(RESOLUTIONS))
    parser.add_argument("--reference", action="store_true", help="also fp32 (merged mode)")
    parser.add_argument(
        "--bf16-compute",
        action="store_true",
        help="also bf16 storage and compute (merged mode) at the first size: slow on a CPU "
        "without bf16 instructions",
    )
    parser.add_argument("--default-malloc", action="store_true", help="also a default process")
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
    base = {"dtype": "fp32", "steps": steps, "shape": shape, "malloc": "fixed"}
    precisions = (["fp32"] if args.reference else []) + list(args.precisions)
    # the first size with checkpointing off and on, then the other sizes without
    jobs = [
        base | {"precision": p, "gc": g, "resolution": r}
        for i, r in enumerate(args.resolutions)
        for g in ((False, True) if i == 0 else (False,))
        for p in precisions
    ]
    if args.bf16_compute:
        bf16 = base | {"dtype": "bf16", "precision": "bf16", "resolution": args.resolutions[0]}
        jobs += [bf16 | {"gc": False}, bf16 | {"gc": True}]
    if args.default_malloc:
        jobs.append(jobs[0] | {"malloc": "default"})
    partial = Path(args.out).with_suffix(".partial.jsonl")
    if args.partial:  # what finished so far (an interrupted run), without running the rest
        have = [json.loads(line) for line in partial.read_text().splitlines() if line.strip()]
        jobs = [j for j in jobs if any(h["job"] == j for h in have)]
    done = run_all(jobs, partial, args.parallel)
    configs = [r for r in done if r["job"]["malloc"] == "fixed"]
    within = sum(abs(r["rel_err"]) <= TARGET for r in configs)
    res = {
        "machine": common.machine_info(configs[0]["params"]) | {"dtype": "fp32 compute"},
        "complete": not args.partial,
        "settings": {
            "steps": steps,
            "text_tokens": TEXT_TOKENS,
            "shape": shape,
            "threads": 1,
            "config": "the seed's LoKr (Attention + FeedForward); bypass mode but for fp32",
            "optimizer": "adamw",
            "arms": {p: LABELS.get(p, f"base_precision {p}, fp32 compute") for p in precisions},
        },
        "configs": configs,
        "default_malloc": [r for r in done if r["job"]["malloc"] == "default"],
        "summary": {
            "within_target": within,
            "target": f"|estimate/measured - 1| <= {TARGET} for >= {TARGET_CONFIGS} configs",
            "pass": within >= TARGET_CONFIGS,
            "stored_over_bf16": ratios(configs, "denoiser_bytes"),
            "peak_over_bf16": ratios(configs, "peak_rss"),
            "measured_over_bf16": ratios(configs, "measured"),
            "peak_over_bf16_compute": ratios(configs, "peak_rss", "bf16"),
            "measured_over_bf16_compute": ratios(configs, "measured", "bf16"),
        },
    }
    return common.finish(res, args.out, t_start, report)


if __name__ == "__main__":
    sys.exit(main())
