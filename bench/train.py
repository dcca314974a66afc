"""Benchmark: LyCORIS training steps on a Flux-family pipeline on CPU, ours vs a minimal loop.

Run from the repository root::

    .venv/bin/python bench/train.py [--quick] [--out bench/results/train.json]

Side by side in one run (fp32, 1 thread, batch 1, AdamW lr 1e-4, grad-norm clip 1.0, the seed's
LoKr config on the same wrapped layers):

* ours: ``lycoris_core.training.train(TrainSpec(...))``, step time from the ``on_step``
  callbacks;
* reference: a minimal loop written here with lycoris + diffusers only: ``apply_preset`` +
  ``create_lycoris`` + ``apply_to``, VAE / ``encode_prompt`` features, Flux flow matching
  (logit-normal sigmas, the scheduler's dynamic shift, 2x2 packing), MSE to ``noise - x0``,
  backward, clip, AdamW step.

Every run happens in a subprocess of this script (``--child``), so the parent stays small.
Denoiser configuration: ``--rounds`` processes, each running ours and the reference A/B/B/A
(A = ours and the reference in turn), a fresh model per run and ``gc.collect()`` between runs:

* step time: median over all measured steps of all runs of an arm (steps after the first
  epoch, which fills our feature cache; the reference precomputed its features). Alternating
  inside a process needs no start-up between runs, so drift from other load on the machine
  falls on both arms alike; several processes average out per-process effects (memory layout,
  which core), which were seen to favour one arm by up to ~10% for a whole process;
* peak RSS: VmHWM of each process right after its first run, i.e. of that arm alone in a
  fresh process (``ru_maxrss`` is recorded too; it agrees here).

Two configurations (see ``CONFIGS``):

* ``denoiser``: a 28M-parameter random Flux transformer (hidden 512, 2+2 blocks) with the tiny
  VAE / CLIP / T5, 64 px images, 64 T5 tokens; features cached in both arms (ours caches
  latents and text embeddings in the first epoch, the reference precomputes them once).
  Targets: step time ours/reference <= 1.05, peak RSS ours/reference <= 1.10.
* ``encoders``: a small transformer (hidden 64 like the tiny pipeline's, 1+1 blocks) at 192 px
  (the tiny VAE attends over 96x96 positions) with the pipeline's default T5 length (512):
  VAE + text encoders take about half of an uncached step. Target: ours cached step <= 0.6 x
  ours uncached step (uncached: a feature cache that never stores, patched in here, so latents
  and text are encoded every step; ``center_crop=False``, the loop's own switch, re-encodes
  only the latents and is reported too). The reference runs both ways as well.

Also a cProfile of a few cached steps of both arms (where the time goes). Writes every figure
plus machine info as JSON to ``--out`` (atomically).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import json
import math
import os
import pstats
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import apply as common  # noqa: E402  (bench/apply.py: machine info, JSON, table, seeds)
import torch  # noqa: E402

torch.set_num_threads(1)

# --------------------------------------------------------------------------- settings

STEP_TARGET = 1.05  # ours / reference step time (features cached in both)
RSS_TARGET = 1.10  # ours / reference peak RSS
CACHE_TARGET = 0.60  # ours cached step / ours uncached step (encoders configuration)

LR = 1e-4
SEED = 0
# the seed's LoKr config, spelled for lycoris directly: diffusers' Flux attention class is
# FluxAttention (our targeting resolves the seed's "Attention" to it)
REFERENCE_PRESET = {
    "target_module": ["FluxAttention", "FeedForward"],
    "module_algo_map": {"FluxAttention": {"factor": 10}, "FeedForward": {"factor": 4}},
}
REFERENCE_KWARGS = {"linear_dim": 10000, "linear_alpha": 1, "algo": "lokr", "factor": 10}

# transformer overrides of flux_transformer_config ({} = the tiny pipeline's transformer);
# joint_attention_dim / pooled_projection_dim always come from the tiny text encoders
CONFIGS: dict[str, dict[str, Any]] = {
    "denoiser": {
        "transformer": {
            "num_layers": 2,
            "num_single_layers": 2,
            "attention_head_dim": 128,
            "num_attention_heads": 4,
        },
        "image_size": 64,  # -> 32x32 latents -> 256 image tokens
        "images": 2,
        "max_sequence_length": 64,
        "steps": 10,  # first epoch (2 steps, cache misses) + 8 measured
    },
    "encoders": {
        "transformer": {"num_layers": 1, "num_single_layers": 1},  # hidden 64, 1+1 blocks
        "image_size": 192,  # -> 96x96 latents (VAE attention over 9216 positions), 2304 tokens
        "images": 2,
        "max_sequence_length": None,  # the pipeline's default: 512 T5 tokens
        "steps": 10,  # first epoch (2 steps) + 8 measured
    },
}
QUICK_CONFIGS: dict[str, dict[str, Any]] = {
    "denoiser": {
        "transformer": {},
        "image_size": 32,
        "images": 2,
        "max_sequence_length": 16,
        "steps": 5,
    },
    "encoders": {
        "transformer": {},
        "image_size": 64,
        "images": 2,
        "max_sequence_length": 64,
        "steps": 5,
    },
}

# arms: (implementation, feature mode)
OURS_MODES = ("cached", "no_cache", "latents_uncached")
REFERENCE_MODES = ("cached", "no_cache")


def now() -> float:
    return time.perf_counter()


def skip_steps(cfg: dict[str, Any]) -> int:
    """Steps left out of the medians: warm-up and the first epoch (our cache fills there)."""
    return max(2, int(cfg["images"]))


def memory() -> dict[str, int]:
    """Peak and current RSS of this process in bytes.

    ``vm_hwm`` (/proc/self/status VmHWM) is the peak RSS of this exec'd image only;
    ``ru_maxrss`` can carry the parent's peak over the fork/exec on Linux, so it is recorded
    but the ratio uses VmHWM where available.
    """
    out = {"ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    names = {"VmHWM": "vm_hwm", "VmRSS": "vm_rss"}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in names:
                out[names[key]] = int(value.split()[0]) * 1024  # kB
    except OSError:  # pragma: no cover - non-Linux
        pass
    return out


def peak_rss(mem: dict[str, int]) -> int:
    return mem.get("vm_hwm", mem["ru_maxrss"])


# --------------------------------------------------------------------------- model and data


def build_model(cfg: dict[str, Any], seed: int) -> tuple[Any, int]:
    """The tiny Flux pipeline with a (bigger) random transformer, as a LoadedModel."""
    return common.build_flux_pipeline_model(
        cfg["transformer"], seed, "bench/train.py: tiny Flux components + random transformer"
    )


def make_data(folder: Path, cfg: dict[str, Any]) -> Path:
    from lycoris_core.training.synthetic import make_demo_dataset

    return make_demo_dataset(folder, count=cfg["images"], size=cfg["image_size"], seed=SEED)


# --------------------------------------------------------------------------- ours


@contextlib.contextmanager
def no_feature_cache() -> Iterator[None]:
    """The loop's feature caches never store: latents and text are encoded every step."""
    from lycoris_core.training import session
    from lycoris_core.training.dataset import FeatureCache

    class NoCache(FeatureCache):
        def get_or_compute(self, key: str, compute: Callable[[], dict]) -> dict:
            self.misses += 1
            return compute()

    saved = session.FeatureCache
    session.FeatureCache = NoCache
    try:
        yield
    finally:
        session.FeatureCache = saved


@contextlib.contextmanager
def timed_encoders(acc: dict[str, float]) -> Iterator[None]:
    """Accumulate the seconds spent in Objective.encode_images / encode_text (two timer calls)."""
    from lycoris_core.training.objectives import Objective

    saved = {name: getattr(Objective, name) for name in ("encode_images", "encode_text")}

    def wrap(fn: Callable, key: str) -> Callable:
        def timed(self: Any, *a: Any, **k: Any) -> Any:
            t0 = now()
            try:
                return fn(self, *a, **k)
            finally:
                acc[key] += now() - t0

        return timed

    for name, fn in saved.items():
        setattr(Objective, name, wrap(fn, name))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(Objective, name, fn)


def adapter_shapes(path: str) -> dict[str, list[int]]:
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as f:
        return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118


def run_ours(job: dict[str, Any], cfg: dict[str, Any], data: str, tmp: Path) -> dict[str, Any]:
    from lycoris_core.config import SEED_EXAMPLE, LycorisConfig
    from lycoris_core.training.dataset import DatasetSpec
    from lycoris_core.training.loop import TrainSpec, train
    from lycoris_core.training.objectives import ObjectiveOptions

    mode = job["mode"]
    model, params = build_model(cfg, SEED)
    steps, skip = job.get("steps") or cfg["steps"], skip_steps(cfg)
    spec = TrainSpec(
        base=model,
        config=LycorisConfig.from_dict(SEED_EXAMPLE, source="seed example"),
        dataset=DatasetSpec(
            folder=data,
            resolution=cfg["image_size"],
            bucket_step=model.size_multiple,
            center_crop=mode != "latents_uncached",  # False: the loop re-encodes latents
        ),
        output=str(tmp / "ours.safetensors"),
        steps=steps,
        batch_size=1,
        lr=LR,
        optimizer="adamw",
        mixed_precision="no",
        seed=SEED,
        objective=ObjectiveOptions(max_sequence_length=cfg["max_sequence_length"]),
    )
    acc = {"encode_images": 0.0, "encode_text": 0.0}
    stamps: list[float] = []
    encode_s: list[float] = []
    losses: list[float] = []
    prof = cProfile.Profile() if job.get("profile") else None

    def on_step(info: Any) -> None:
        stamps.append(now())
        encode_s.append(acc["encode_images"] + acc["encode_text"])
        acc["encode_images"] = acc["encode_text"] = 0.0
        losses.append(info.loss)
        if prof is not None:
            if info.step == skip:
                prof.enable()
            elif info.step == info.total:
                prof.disable()

    mem_before = memory()
    cache = no_feature_cache() if mode == "no_cache" else contextlib.nullcontext()
    t0 = now()
    with cache, timed_encoders(acc):
        result = train(spec, on_step=on_step)
    total = now() - t0
    if not result.completed or result.steps_done != steps:
        raise SystemExit(f"ours: training stopped early ({result.stopped_reason})")
    out = step_record(t0, stamps, skip, losses, encode_s)
    out.update(
        params=params,
        layers=result.layers,
        adapter_shapes=adapter_shapes(result.adapter_path),
        mem_before_train=mem_before,
        seconds_in_train=total,
    )
    if prof is not None:
        out["profile"] = profile_sections(prof, steps - skip, out["raw_step_s"][skip:])
    return out


def step_record(
    t0: float, stamps: list[float], skip: int, losses: list[float], encode_s: list[float]
) -> dict[str, Any]:
    times = [b - a for a, b in zip([t0, *stamps[:-1]], stamps, strict=True)]
    measured = times[skip:]
    return {
        "raw_step_s": times,
        "measured_steps": len(measured),
        "step_ms": statistics.median(measured) * 1000,
        "step_min_ms": min(measured) * 1000,
        "encode_ms": statistics.median(encode_s[skip:]) * 1000,
        "first_step_ms": times[0] * 1000,
        "loss_mean": statistics.fmean(losses),
    }


# --------------------------------------------------------------------------- reference


def run_reference(job: dict[str, Any], cfg: dict[str, Any], data: str, tmp: Path) -> dict[str, Any]:
    """A minimal lycoris + diffusers training loop (batch 1, fp32)."""
    import lycoris
    import numpy as np
    import torch.nn.functional as F
    from diffusers import FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    from PIL import Image

    mode = job["mode"]
    model, params = build_model(cfg, SEED)
    pipe = model.pipe
    transformer, vae = pipe.transformer, pipe.vae
    steps, skip = job.get("steps") or cfg["steps"], skip_steps(cfg)
    msl = cfg["max_sequence_length"] or 512
    images = sorted(Path(data).glob("*.png"))
    captions = [p.with_suffix(".txt").read_text(encoding="utf-8").strip() for p in images]
    prof = cProfile.Profile() if job.get("profile") else None

    mem_before = memory()
    t0 = now()
    torch.manual_seed(SEED)
    with common.quiet_lycoris():
        lycoris.LycorisNetwork.apply_preset(REFERENCE_PRESET)
        net = lycoris.create_lycoris(transformer, 1.0, **REFERENCE_KWARGS)
    net.apply_to()
    transformer.eval()
    net.train()
    params_t = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params_t, lr=LR, weight_decay=0.0)  # TrainSpec's default
    vcfg = vae.config
    scaling, shift = float(vcfg.scaling_factor), float(vcfg.shift_factor or 0.0)
    scfg = pipe.scheduler.config
    dev, dtype = torch.device("cpu"), torch.float32

    @torch.no_grad()
    def encode(i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        t = now()
        with Image.open(images[i]) as img:
            array = np.array(img.convert("RGB"), dtype=np.uint8)
        pixels = torch.from_numpy(array).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        lat = (vae.encode(pixels).latent_dist.mode() - shift) * scaling
        embeds, pooled, _ = pipe.encode_prompt(
            prompt=[captions[i]],
            prompt_2=None,
            device=dev,
            num_images_per_prompt=1,
            max_sequence_length=msl,
        )
        return lat.float(), embeds.float(), pooled.float(), now() - t

    cached = [encode(i) for i in range(len(images))] if mode == "cached" else None
    gen = torch.Generator().manual_seed(SEED)
    stamps: list[float] = []
    encode_s: list[float] = []
    losses: list[float] = []
    phases: list[tuple[float, ...]] = []
    for step in range(steps):
        if prof is not None and step == skip:
            prof.enable()
        t_a = now()
        i = step % len(images)
        if cached is not None:
            lat, embeds, pooled, _ = cached[i]
            enc = 0.0
        else:
            lat, embeds, pooled, enc = encode(i)
        t_b = now()
        b, c, h, w = lat.shape
        noise = torch.randn(lat.shape, generator=gen)
        s = torch.sigmoid(torch.randn(b, generator=gen))  # logit-normal(0, 1)
        mu = calculate_shift(
            (h // 2) * (w // 2),
            scfg.get("base_image_seq_len", 256),
            scfg.get("max_image_seq_len", 4096),
            scfg.get("base_shift", 0.5),
            scfg.get("max_shift", 1.15),
        )
        sigmas = math.exp(mu) / (math.exp(mu) + (1 / s - 1))
        sig = sigmas.view(b, 1, 1, 1)
        noisy = (1 - sig) * lat + sig * noise
        guidance = torch.full((b,), 1.0) if transformer.config.guidance_embeds else None
        pred = transformer(
            hidden_states=FluxPipeline._pack_latents(noisy, b, c, h, w),
            timestep=sigmas,
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=embeds,
            txt_ids=torch.zeros(embeds.shape[1], 3),
            img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, dev, dtype),
            return_dict=False,
        )[0]
        loss = F.mse_loss(pred.float(), FluxPipeline._pack_latents(noise - lat, b, c, h, w))
        t_c = now()
        loss.backward()
        t_d = now()
        torch.nn.utils.clip_grad_norm_(params_t, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        stamps.append(now())
        encode_s.append(enc)
        phases.append((t_b - t_a, t_c - t_b, t_d - t_c, stamps[-1] - t_d))
    if prof is not None:
        prof.disable()
    total = now() - t0
    out = step_record(t0, stamps, skip, losses, encode_s)
    names = ("data + encode", "noise + forward + loss", "backward", "clip + AdamW + zero_grad")
    out["phases_ms"] = {
        name: statistics.median(p[k] for p in phases[skip:]) * 1000 for k, name in enumerate(names)
    }
    out.update(
        params=params,
        layers=len(net.loras),
        adapter_shapes={k: list(v.shape) for k, v in net.state_dict().items()},
        mem_before_train=mem_before,
        seconds_in_train=total,
    )
    if prof is not None:
        out["profile"] = profile_sections(prof, steps - skip, out["raw_step_s"][skip:])
    net.restore()
    return out


# --------------------------------------------------------------------------- profile


def profile_sections(prof: cProfile.Profile, steps: int, step_s: list[float]) -> dict[str, Any]:
    """Per-step ms of the parts of a training step (non-overlapping, plus a remainder)."""
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]

    def cum(func: str, file_part: str, largest: bool = False) -> float:
        keys = [k for k in stats if k[2] == func and file_part in k[0]]
        if not keys:
            return 0.0
        values = [stats[k][3] for k in keys]
        return (max(values) if largest else sum(values)) / steps * 1000

    parts = {
        "data/features (ours: encode_batch, cache lookups + stack)": cum(
            "encode_batch", "session.py"
        ),
        "transformer forward": cum("forward", "transformer_flux.py", largest=True),
        "backward": cum("backward", "_tensor.py"),
        "clip_grad_norm_": cum("clip_grad_norm_", "clip_grad.py"),
        "optimizer.step (AdamW)": cum("wrapper", "optim/optimizer.py", largest=True),
        "optimizer.zero_grad": cum("zero_grad", "optimizer.py"),
        "lr scheduler step (ours)": cum("step", "lr_scheduler.py"),
        "peak-memory query (ours: _peak_memory)": cum("_peak_memory", "loop.py"),
        "bench on_step callback": cum("on_step", "train.py"),
    }
    total = sum(step_s) / len(step_s) * 1000
    parts["rest (noise, sigmas, packing, loss, loop bookkeeping, info)"] = total - sum(
        parts.values()
    )
    top = []
    st = pstats.Stats(prof)
    st.sort_stats("tottime")
    for key in st.fcn_list[:15]:  # type: ignore[attr-defined]
        _cc, nc, tt, ct, _ = stats[key]
        top.append(
            {
                "function": f"{Path(key[0]).name}:{key[1]}({key[2]})",
                "calls_per_step": nc / steps,
                "tottime_ms": tt / steps * 1000,
                "cumtime_ms": ct / steps * 1000,
            }
        )
    return {
        "steps": steps,
        "profiled_step_ms": total,
        "sections_ms": parts,
        "loss_objective_ms": cum("loss", "objectives.py"),
        "lycoris_lokr_forward_ms": cum("forward", "lokr.py"),
        "top_tottime": top,
    }


# --------------------------------------------------------------------------- child process


def child_main(jobs_path: Path, out_path: Path) -> int:
    import logging

    logging.getLogger("lycoris_core").setLevel(logging.WARNING)
    spec = json.loads(jobs_path.read_text())
    results = []
    for n, job in enumerate(spec["jobs"]):
        cfg = spec["configs"][job["config"]]
        data = spec["data"][job["config"]]
        with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
            fn = run_ours if job["arm"] == "ours" else run_reference
            r = fn(job, cfg, data, Path(tmp))
        r["job"] = job
        r["mem_after"] = memory()
        gc.collect()  # the previous job's model (pipelines hold reference cycles)
        # peak RSS only counts for a process's first job (and only jobs marked for it)
        r["alone_in_process"] = n == 0
        results.append(r)
    common.write_json_atomic(out_path, {"results": results})
    return 0


def run_child(jobs: list[dict[str, Any]], spec: dict[str, Any], tmp: Path, n: int) -> list[dict]:
    jobs_path, out_path = tmp / f"jobs-{n}.json", tmp / f"result-{n}.json"
    jobs_path.write_text(json.dumps({**spec, "jobs": jobs}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(jobs_path)]
    cmd += ["--child-out", str(out_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(
            f"child {[j['arm'] + '/' + j['mode'] for j in jobs]} failed (rc {proc.returncode}):\n"
            + proc.stdout[-3000:]
            + proc.stderr[-3000:]
        )
    return json.loads(out_path.read_text())["results"]


# --------------------------------------------------------------------------- schedule


def job(arm: str, mode: str, config: str, **flags: Any) -> dict[str, Any]:
    """One training run. Flags: `timing` (counts for the step time), `rss` (first job of a
    fresh process: counts for peak RSS), `profile` (cProfile of the measured steps)."""
    base = {"timing": False, "rss": False, "profile": False}
    return {"arm": arm, "mode": mode, "config": config, **base, **flags}


def schedule(quick: bool, rounds: int, configs: dict[str, dict]) -> list[list[dict[str, Any]]]:
    """Child processes (each a list of jobs run one after the other), in run order.

    * denoiser config (features cached), `rounds` processes, each A/B/B/A with A = ours and
      the reference in turn: every run counts for the step time, and the first run of each
      process, alone in a fresh process, for peak RSS. Alternating inside a process needs no
      start-up between runs; several processes average out per-process effects (memory layout,
      which core) that otherwise favour one arm for a whole process;
    * cache (encoders config, the five arms): one process running them in turn `rounds` times,
      rotated and reversed from round to round;
    * cProfile of ours and the reference (denoiser config, fewer steps): one process, A/B/B/A.
    """
    ours, ref = (job(a, "cached", "denoiser", timing=True) for a in ("ours", "reference"))
    enc = [job("ours", m, "encoders", timing=True) for m in OURS_MODES]
    enc += [job("reference", m, "encoders", timing=True) for m in REFERENCE_MODES]
    prof_steps = skip_steps(configs["denoiser"]) + (2 if quick else 5)
    prof_o, prof_r = (
        job(a, "cached", "denoiser", profile=True, steps=prof_steps) for a in ("ours", "reference")
    )
    if quick:  # two processes; their first jobs count for peak RSS
        return [
            [{**ours, "rss": True, "process": 0}, *enc[:3], prof_o],
            [{**ref, "rss": True, "process": 1}, *enc[3:], prof_r],
        ]
    groups: list[list[dict[str, Any]]] = []
    for p in range(rounds):
        a, b = (ours, ref) if p % 2 == 0 else (ref, ours)
        runs = [{**a, "rss": True}, b, b, a]
        groups.append([{**j, "process": p} for j in runs])
    cycle: list[dict[str, Any]] = []
    for r in range(rounds):
        k = r % len(enc)
        rotated = [{**j, "round": r} for j in enc[k:] + enc[:k]]
        cycle += rotated if r % 2 == 0 else rotated[::-1]
    groups.append(cycle)
    groups.append([prof_o, prof_r, prof_r, prof_o])
    return groups


# --------------------------------------------------------------------------- summary


def pooled(results: list[dict], arm: str, mode: str, config: str, which: str) -> dict[str, Any]:
    """Figures of one arm over its runs flagged `which` ("timing" or "rss")."""
    rs = [
        r
        for r in results
        if (r["job"]["arm"], r["job"]["mode"], r["job"]["config"]) == (arm, mode, config)
        and r["job"][which]
    ]
    if not rs:
        return {}
    skip = len(rs[0]["raw_step_s"]) - rs[0]["measured_steps"]
    steps = [t for r in rs for t in r["raw_step_s"][skip:]]
    out: dict[str, Any] = {
        "runs": len(rs),
        "step_ms": statistics.median(steps) * 1000,
        "step_min_ms": min(steps) * 1000,
        "step_ms_per_run": [r["step_ms"] for r in rs],
        "encode_ms": statistics.median(r["encode_ms"] for r in rs),
        "first_step_ms": statistics.median(r["first_step_ms"] for r in rs),
        "loss_mean": statistics.fmean(r["loss_mean"] for r in rs),
        "layers": rs[0]["layers"],
        "params": rs[0]["params"],
    }
    if "phases_ms" in rs[0]:
        out["phases_ms"] = {
            k: statistics.median(r["phases_ms"][k] for r in rs) for k in rs[0]["phases_ms"]
        }
    alone = [r for r in rs if r["alone_in_process"]] if which == "rss" else []
    if alone:
        out["peak_rss_bytes"] = statistics.median(peak_rss(r["mem_after"]) for r in alone)
        out["peak_rss_per_run"] = [peak_rss(r["mem_after"]) for r in alone]
        out["ru_maxrss_per_run"] = [r["mem_after"]["ru_maxrss"] for r in alone]
        out["rss_before_train_bytes"] = statistics.median(
            r["mem_before_train"].get("vm_rss", 0) for r in alone
        )
        out["train_rss_increase_bytes"] = out["peak_rss_bytes"] - out["rss_before_train_bytes"]
    return out


def summarize(results: list[dict]) -> dict[str, Any]:
    arms: dict[str, Any] = {}
    for config in ("denoiser", "encoders"):
        for arm, modes in (("ours", OURS_MODES), ("reference", REFERENCE_MODES)):
            for mode in modes:
                timing = pooled(results, arm, mode, config, "timing")
                if timing:
                    fresh = pooled(results, arm, mode, config, "rss")
                    arms[f"{arm}/{mode}/{config}"] = {**timing, "fresh_process": fresh}
    ours, ref = arms["ours/cached/denoiser"], arms["reference/cached/denoiser"]
    ours_f, ref_f = ours["fresh_process"], ref["fresh_process"]
    enc_c, enc_u = arms["ours/cached/encoders"], arms["ours/no_cache/encoders"]
    enc_l = arms["ours/latents_uncached/encoders"]
    ref_c, ref_u = arms["reference/cached/encoders"], arms["reference/no_cache/encoders"]

    # the same layers and tensors (names and shapes) in both arms
    def shapes(arm: str) -> dict[str, list[int]]:
        for r in results:
            if r["job"]["arm"] == arm and r["job"]["config"] == "denoiser":
                return r["adapter_shapes"]
        return {}

    ours_sd, ref_sd = shapes("ours"), shapes("reference")
    layer_names = sorted({k.split(".")[0] for k in ours_sd})
    per_process: dict[int, dict[str, list[float]]] = {}
    for r in results:
        j = r["job"]
        if j["config"] == "denoiser" and j["timing"]:
            skip = len(r["raw_step_s"]) - r["measured_steps"]
            arm_steps = per_process.setdefault(j["process"], {}).setdefault(j["arm"], [])
            arm_steps += r["raw_step_s"][skip:]
    paired = [
        statistics.median(v["ours"]) / statistics.median(v["reference"])
        for v in per_process.values()
        if v.get("ours") and v.get("reference")
    ] or [ours["step_ms"] / ref["step_ms"]]  # --quick: the arms run in different processes
    by_round: dict[int, dict[str, float]] = {}
    for r in results:
        j = r["job"]
        if j["config"] == "encoders" and j["arm"] == "ours":
            by_round.setdefault(j.get("round", 0), {})[j["mode"]] = r["step_ms"]
    cache_per_round = [
        v["cached"] / v["no_cache"] for v in by_round.values() if {"cached", "no_cache"} <= set(v)
    ]
    summary = {
        "step_ratio": ours["step_ms"] / ref["step_ms"],
        "step_ratio_per_process": paired,
        "step_ratio_per_process_median": statistics.median(paired),
        "step_ratio_min": ours["step_min_ms"] / ref["step_min_ms"],
        "step_ratio_fresh_processes": ours_f["step_ms"] / ref_f["step_ms"],
        "rss_ratio": ours_f["peak_rss_bytes"] / ref_f["peak_rss_bytes"],
        "train_rss_increase_ratio": (
            ours_f["train_rss_increase_bytes"] / ref_f["train_rss_increase_bytes"]
            if ref_f["train_rss_increase_bytes"] > 0
            else None
        ),
        "cache_ratio": enc_c["step_ms"] / enc_u["step_ms"],
        "cache_ratio_per_round": cache_per_round,
        "cache_ratio_min": enc_c["step_min_ms"] / enc_u["step_min_ms"],
        "cache_ratio_latents_only": enc_c["step_ms"] / enc_l["step_ms"],
        "reference_cache_ratio": ref_c["step_ms"] / ref_u["step_ms"],
        "uncached_step_ratio_ours_over_reference": enc_u["step_ms"] / ref_u["step_ms"],
        "cached_step_ratio_encoders_config": enc_c["step_ms"] / ref_c["step_ms"],
        "encoder_share_uncached_ours": enc_u["encode_ms"] / enc_u["step_ms"],
        "encoder_share_uncached_reference": ref_u["encode_ms"] / ref_u["step_ms"],
        # what the cache saves per step vs what encoding costs in the uncached step (ideal ~1)
        "cache_saving_over_encode_ms_ours": (enc_u["step_ms"] - enc_c["step_ms"])
        / enc_u["encode_ms"],
        "same_wrapped_layers": bool(ours_sd) and ours_sd == ref_sd,
        "wrapped_layers": len(layer_names),
        "layers_ours": ours["layers"],
        "layers_reference": ref["layers"],
        "adapter_tensors": len(ours_sd),
        "adapter_params": sum(math.prod(s) for s in ours_sd.values()),
        "wrapped_layer_names": layer_names,
    }
    if not summary["same_wrapped_layers"]:
        only_o = sorted(set(ours_sd) - set(ref_sd))[:10]
        only_r = sorted(set(ref_sd) - set(ours_sd))[:10]
        summary["wrapped_layer_diff"] = {"only_ours": only_o, "only_reference": only_r}
    summary["targets_met"] = {
        "step_ratio": summary["step_ratio"] <= STEP_TARGET,
        "rss_ratio": summary["rss_ratio"] <= RSS_TARGET,
        "cache_ratio": summary["cache_ratio"] <= CACHE_TARGET,
    }
    return {"arms": arms, "summary": summary}


def left(rows: list[list[str]]) -> list[list[str]]:
    """First column left-aligned (fmt_table right-aligns every cell)."""
    width = max(len(r[0]) for r in rows)
    return [[r[0].ljust(width), *r[1:]] for r in rows]


def merge_profiles(profiles: list[dict[str, Any]]) -> dict[str, Any]:
    """Median per section over the profiled runs of one arm."""
    if not profiles:
        return {}
    out = dict(profiles[0])
    out["runs"] = len(profiles)
    out["steps"] = sum(p["steps"] for p in profiles)
    for key in ("profiled_step_ms", "loss_objective_ms", "lycoris_lokr_forward_ms"):
        out[key] = statistics.median(p[key] for p in profiles)
    out["sections_ms"] = {
        k: statistics.median(p["sections_ms"][k] for p in profiles) for k in out["sections_ms"]
    }
    out["top_tottime_first_run"] = out.pop("top_tottime")
    return out


def mb(x: float) -> str:
    return f"{x / 2**20:.0f}"


def report(res: dict[str, Any]) -> str:
    a, s = res["arms"], res["summary"]
    m = res["machine"]
    cfg = res["configs"]
    ours, ref = a["ours/cached/denoiser"], a["reference/cached/denoiser"]
    ours_f, ref_f = ours["fresh_process"], ref["fresh_process"]
    enc_c, enc_u = a["ours/cached/encoders"], a["ours/no_cache/encoders"]
    enc_l = a["ours/latents_uncached/encoders"]
    ref_c, ref_u = a["reference/cached/encoders"], a["reference/no_cache/encoders"]
    met = s["targets_met"]

    def ok(flag: bool) -> str:
        return "met" if flag else "MISSED"

    rows = [
        [
            "step ms, denoiser cfg, cached features",
            f"{ours['step_ms']:.1f}",
            f"{ref['step_ms']:.1f}",
            f"{s['step_ratio']:.3f}",
            f"<= {STEP_TARGET}",
            ok(met["step_ratio"]),
        ],
        [
            "  median of per-process ratios / min-step ratio",
            "",
            "",
            f"{s['step_ratio_per_process_median']:.3f} / {s['step_ratio_min']:.3f}",
            "",
            "(info)",
        ],
        [
            "  step ms, each arm alone in a fresh process",
            f"{ours_f['step_ms']:.1f}",
            f"{ref_f['step_ms']:.1f}",
            f"{s['step_ratio_fresh_processes']:.3f}",
            "",
            "(info)",
        ],
        [
            "peak RSS MB, denoiser cfg (fresh process)",
            mb(ours_f["peak_rss_bytes"]),
            mb(ref_f["peak_rss_bytes"]),
            f"{s['rss_ratio']:.3f}",
            f"<= {RSS_TARGET}",
            ok(met["rss_ratio"]),
        ],
        [
            "  RSS increase during training MB",
            mb(ours_f["train_rss_increase_bytes"]),
            mb(ref_f["train_rss_increase_bytes"]),
            f"{s['train_rss_increase_ratio']:.3f}" if s["train_rss_increase_ratio"] else "-",
            "",
            "(info)",
        ],
        [
            "cached / uncached step, encoders cfg (ours)",
            f"{enc_c['step_ms']:.1f} / {enc_u['step_ms']:.1f}",
            f"{ref_c['step_ms']:.1f} / {ref_u['step_ms']:.1f}",
            f"{s['cache_ratio']:.3f} (ref {s['reference_cache_ratio']:.3f})",
            f"<= {CACHE_TARGET}",
            ok(met["cache_ratio"]),
        ],
        [
            "  cached / latents-only uncached (center_crop=False)",
            f"{enc_c['step_ms']:.1f} / {enc_l['step_ms']:.1f}",
            "",
            f"{s['cache_ratio_latents_only']:.3f}",
            "",
            "(info)",
        ],
        [
            "  uncached step ms, encoders cfg",
            f"{enc_u['step_ms']:.1f}",
            f"{ref_u['step_ms']:.1f}",
            f"{s['uncached_step_ratio_ours_over_reference']:.3f}",
            "",
            "(info)",
        ],
        [
            "  cached step ms, encoders cfg",
            f"{enc_c['step_ms']:.1f}",
            f"{ref_c['step_ms']:.1f}",
            f"{s['cached_step_ratio_encoders_config']:.3f}",
            "",
            "(info)",
        ],
        [
            "  encoder share of the uncached step",
            f"{s['encoder_share_uncached_ours']:.0%}",
            f"{s['encoder_share_uncached_reference']:.0%}",
            "",
            "",
            "(info)",
        ],
    ]
    d, e = cfg["denoiser"], cfg["encoders"]

    def shape(c: dict[str, Any], params: int) -> str:
        t = c["transformer"]
        blocks = f"{t.get('num_layers', 2)}+{t.get('num_single_layers', 2)} blocks"
        hidden = t.get("attention_head_dim", 32) * t.get("num_attention_heads", 2)
        return (
            f"Flux transformer {params:,} params (hidden {hidden}, {blocks}), "
            f"{c['image_size']} px ({(c['image_size'] // 4) ** 2} image tokens), "
            f"T5 {c['max_sequence_length'] or 512} tokens, {c['images']} images, "
            f"{c['steps']} steps (first {skip_steps(c)} not measured)"
        )

    phases = ref_u.get("phases_ms", {})
    lines = [
        f"\n{m['cpu']}, {m['torch_threads']} thread(s), torch {m['torch']}, diffusers "
        f"{m['diffusers']}, lycoris-lora {m['lycoris_lora']}, fp32, batch 1, AdamW",
        f"denoiser cfg: {shape(d, ours['params'])}",
        f"encoders cfg: {shape(e, enc_c['params'])}",
        f"wrapped layers: ours {s['layers_ours']}, reference {s['layers_reference']}; same "
        f"names and shapes: {s['same_wrapped_layers']} ({s['adapter_tensors']} tensors, "
        f"{s['adapter_params']:,} params)",
        (
            "--quick: a smoke run, one short run per arm on tiny models; the figures mean little"
            if res["quick"]
            else f"step time: {ours['runs']} runs per arm in {len(s['step_ratio_per_process'])} "
            "processes (A/B/B/A in each), median of all measured steps; per-process ratios "
            + ", ".join(f"{x:.3f}" for x in s["step_ratio_per_process"])
        ),
        f"peak RSS: {ours_f['runs']} runs per arm, each alone in a fresh process (VmHWM)",
        "",
        common.fmt_table(left(rows), ["figure", "ours", "reference", "ratio", "target", "result"]),
        "",
        f"encoders cfg, uncached: ours encodes {enc_u['encode_ms']:.0f} ms per step; the cache "
        f"saves {enc_u['step_ms'] - enc_c['step_ms']:.0f} ms "
        f"({s['cache_saving_over_encode_ms_ours']:.2f} x the encode time); per-round "
        "cached/uncached "
        + ", ".join(f"{x:.3f}" for x in s["cache_ratio_per_round"])
        + f" (min-step ratio {s['cache_ratio_min']:.3f})",
        "encoders cfg, reference uncached phases: "
        + ", ".join(f"{k} {v:.0f}" for k, v in phases.items())
        + " ms",
    ]
    prof_o, prof_r = res.get("profile", {}).get("ours"), res.get("profile", {}).get("reference")
    if prof_o and prof_r:
        lines.append(
            f"\nWhere a cached step goes (cProfile, ms per step, denoiser cfg, "
            f"{prof_o['steps']} steps; profiled step {prof_o['profiled_step_ms']:.1f} vs "
            f"{prof_r['profiled_step_ms']:.1f} ms)"
        )
        prow = [
            [k, f"{v:.2f}", f"{prof_r['sections_ms'].get(k, 0.0):.2f}"]
            for k, v in prof_o["sections_ms"].items()
        ]
        lines.append(common.fmt_table(left(prow), ["section", "ours", "reference"]))
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny configs, smoke run (tests)")
    ap.add_argument("--out", default=str(BENCH / "results" / "train.json"))
    ap.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="A/B/B/A processes (denoiser config) and encoders-config rounds (default 4)",
    )
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child_main(Path(args.child), Path(args.child_out))

    t_start = now()
    load_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    configs = QUICK_CONFIGS if args.quick else CONFIGS
    groups = schedule(args.quick, max(1, args.rounds), configs)
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp_name:
        tmp = Path(tmp_name)
        data = {name: str(make_data(tmp / f"data-{name}", cfg)) for name, cfg in configs.items()}
        spec = {"configs": configs, "data": data}
        for n, jobs in enumerate(groups):
            t0 = now()
            got = run_child(jobs, spec, tmp, n)
            results += got
            desc = ", ".join(
                f"{r['job']['arm']}/{r['job']['mode']}/{r['job']['config']}"
                + (" (profile)" if r["job"]["profile"] else "")
                + f" {r['step_ms']:.1f} ms"
                for r in got
            )
            print(f"[{n + 1}/{len(groups)}] {desc} ({now() - t0:.0f} s)", flush=True)

    res: dict[str, Any] = {
        "benchmark": "bench/train.py",
        "quick": args.quick,
        "machine": {},
        "configs": configs,
        "settings": {
            "rounds": 1 if args.quick else max(1, args.rounds),
            "batch_size": 1,
            "lr": LR,
            "optimizer": "adamw",
            "mixed_precision": "no",
            "max_grad_norm": 1.0,
            "seed_config": "SEED_EXAMPLE (lokr, factor 10 / FeedForward 4, linear_dim 10000)",
            "reference_preset": REFERENCE_PRESET,
            "reference_kwargs": REFERENCE_KWARGS,
            "skip_steps": {k: skip_steps(c) for k, c in configs.items()},
            "measured_steps_per_run": configs["denoiser"]["steps"]
            - skip_steps(configs["denoiser"]),
            "step_ratio_mode": "features cached in both (ours: cache filled in epoch 1; "
            "reference: precomputed once); steps of the first epoch left out; runs alternated "
            "A/B/B/A in each of `rounds` processes; median of all measured steps per arm",
            "schedule": [[f"{j['arm']}/{j['mode']}/{j['config']}" for j in g] for g in groups],
            "cache_ratio_mode": "ours cached vs ours with a feature cache that never stores "
            "(latents + text encoded every step)",
            "rss": "VmHWM of each denoiser process after its first run (that arm alone)",
        },
        "targets": {
            "step_ratio_max": STEP_TARGET,
            "rss_ratio_max": RSS_TARGET,
            "cache_ratio_max": CACHE_TARGET,
        },
    }
    res.update(summarize(results))
    res["profile"] = {
        arm: merge_profiles(
            [r["profile"] for r in results if r["job"]["profile"] and r["job"]["arm"] == arm]
        )
        for arm in ("ours", "reference")
    }
    res["runs"] = [
        {k: v for k, v in r.items() if k not in ("adapter_shapes", "profile")} for r in results
    ]
    res["machine"] = common.machine_info(res["arms"]["ours/cached/denoiser"]["params"])
    res["machine"]["load_avg_at_start"] = load_start
    return common.finish(res, args.out, t_start, report)


if __name__ == "__main__":
    raise SystemExit(main())
