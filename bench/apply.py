"""Benchmark: applying LyCORIS files to a ~170M-parameter random Flux transformer on CPU.

Run from the repository root::

    .venv/bin/python bench/apply.py [--quick] [--out bench/results/apply.json] [--profile]

For three adapter files (LoKr with the seed's config, LoRA and LoHa, both with alpha != rank)
it measures, side by side in one run (fp32, 1 thread, medians of interleaved repeats):

* ours: ``load_adapter`` once, then ``with patched(model, [(adapter, 1.0)], mode="merge")``
  enter (merge + backup) and exit (restore), separately and together;
* lycoris: ``create_lycoris_from_weights(1.0, path, model)`` + ``merge_to(1.0)`` (the seed's
  inference example), with and without the file read (``weights_sd=``); lycoris cannot unmerge,
  so the weights are put back from a saved copy between repeats, outside the timed region;
* exactness: merged weights ours vs lycoris, and model outputs of ours (merged and dynamic)
  and of lycoris' ``merge_to`` against lycoris' *forward* (``apply_to``), the reference;
* forward cost: dynamic-mode and merged-mode forward time divided by the plain forward;
* where our merge time goes (cProfile of ``patched`` merge enter + exit).

Targets: ours/lycoris apply time <= 0.5; dynamic/plain <= 1.10 for LoRA and LoKr.
Writes every figure plus machine info as JSON to ``--out`` (atomically).
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import pstats
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from lycoris_core.config import SEED_EXAMPLE  # noqa: E402

THREADS = 1
torch.set_num_threads(THREADS)

# --------------------------------------------------------------------------- settings

# default: hidden 1024 (8 heads x 128), 3 double + 3 single blocks: ~168M parameters
MODEL_DEFAULT = {
    "num_layers": 3,
    "num_single_layers": 3,
    "attention_head_dim": 128,
    "num_attention_heads": 8,
    "joint_attention_dim": 1024,
    "pooled_projection_dim": 256,
}
MODEL_QUICK = {
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 32,
    "num_attention_heads": 4,
    "joint_attention_dim": 64,
    "pooled_projection_dim": 32,
}
MIN_PARAMS_DEFAULT = 150_000_000

TARGETS = ["Attention", "FeedForward"]
CONFIGS: dict[str, dict[str, Any]] = {
    "lokr": SEED_EXAMPLE,  # the seed's config
    "lora": {
        "algo": "lora",
        "multiplier": 1.0,
        "linear_dim": 16,
        "linear_alpha": 8,
        "apply_preset": {"target_module": TARGETS},
    },
    "loha": {
        "algo": "loha",
        "multiplier": 1.0,
        "linear_dim": 8,
        "linear_alpha": 4,
        "apply_preset": {"target_module": TARGETS},
    },
}
# the trainable factor tensors of each lycoris module type (delta is multilinear in them)
FACTORS = {
    "lokr": ("lokr_w1", "lokr_w2"),
    "lora": ("lora_down.weight", "lora_up.weight"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
}
DELTA_REL_RMS = 0.3  # adapter delta RMS relative to the base weight RMS, per layer

RATIO_TARGET = 0.5  # ours / lycoris apply time
DYNAMIC_TARGET = 1.10  # dynamic forward / plain forward, LoRA and LoKr
DYNAMIC_TARGET_ALGOS = ("lora", "lokr")


# --------------------------------------------------------------------------- helpers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass


def now() -> float:
    return time.perf_counter()


def med_ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1000.0


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (b is the reference)."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def git_info() -> dict[str, Any]:
    import subprocess

    def git(*a: str) -> str:
        try:
            r = subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=10)
            return r.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "commit": git("rev-parse", "HEAD"),
        "lycoris_core_dirty": bool(git("status", "--porcelain", "--", "lycoris_core")),
    }


def machine_info(params: int) -> dict[str, Any]:
    return {
        "git": git_info(),
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "load_avg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": version("diffusers"),
        "lycoris_lora": version("lycoris-lora"),
        "safetensors": version("safetensors"),
        "torch_threads": torch.get_num_threads(),
        "dtype": "float32",
        "model_params": params,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def finish(res: dict[str, Any], out_arg: str, t_start: float, report: Callable) -> int:
    """Close a benchmark run: end load and total time, print the report, write the JSON."""
    if hasattr(os, "getloadavg"):
        res["machine"]["load_avg_at_end"] = list(os.getloadavg())
    res["total_seconds"] = now() - t_start
    print(report(res))
    out = Path(out_arg)
    if not out.is_absolute():
        out = Path.cwd() / out
    write_json_atomic(out, res)
    print(f"\nwrote {out} ({res['total_seconds']:.0f} s)")
    return 0


# --------------------------------------------------------------------------- model


def build_flux_pipeline_model(
    shape: dict[str, Any],
    seed: int,
    source: str,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[Any, int]:
    """The tiny Flux pipeline (VAE, CLIP, T5) with a random transformer of `shape` (a
    flux_transformer_config keyword set; the text widths come from the tiny encoders), frozen,
    on `device` in `dtype`, as a LoadedModel; and the transformer's parameter count."""
    from diffusers import FluxTransformer2DModel

    from lycoris_core.families import FAMILIES
    from lycoris_core.models import LoadedModel
    from lycoris_core.tiny import build_pipeline, flux_transformer_config

    pipe = build_pipeline("flux", seed=seed)
    shape = {
        **shape,
        "joint_attention_dim": pipe.text_encoder_2.config.d_model,
        "pooled_projection_dim": pipe.text_encoder.config.hidden_size,
    }
    seed_everything(seed)
    transformer = FluxTransformer2DModel(**flux_transformer_config(**shape)).eval()
    pipe.transformer = transformer.requires_grad_(False)
    params = sum(p.numel() for p in transformer.parameters())
    pipe.to(device, dtype)
    model = LoadedModel(
        pipe=pipe,
        family=FAMILIES["flux"],
        source=source,
        device=torch.device(device),
        dtype=dtype,
    )
    return model, params


def build_model(quick: bool, seed: int) -> tuple[nn.Module, int]:
    from diffusers import FluxTransformer2DModel

    from lycoris_core.tiny import flux_transformer_config

    seed_everything(seed)
    model = FluxTransformer2DModel(
        **flux_transformer_config(**(MODEL_QUICK if quick else MODEL_DEFAULT))
    )
    model = model.eval().requires_grad_(False)
    params = sum(p.numel() for p in model.parameters())
    if not quick and params < MIN_PARAMS_DEFAULT:
        raise SystemExit(f"model has {params:,} parameters, expected >= {MIN_PARAMS_DEFAULT:,}")
    return model, params


def model_inputs(model: nn.Module, img_side: int, txt: int, seed: int) -> dict[str, Any]:
    """Batch 1: img_side^2 image tokens (a packed latent grid), `txt` text tokens."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    seq = img_side * img_side
    rows = torch.arange(img_side).repeat_interleave(img_side)
    cols = torch.arange(img_side).repeat(img_side)
    img_ids = torch.stack([torch.zeros(seq), rows.float(), cols.float()], dim=1)
    return {
        "hidden_states": torch.randn(1, seq, cfg.in_channels, generator=g),
        "encoder_hidden_states": torch.randn(1, txt, cfg.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(1, cfg.pooled_projection_dim, generator=g),
        "timestep": torch.tensor([0.5]),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(txt, 3),
        "guidance": torch.tensor([3.5]) if cfg.guidance_embeds else None,
        "return_dict": False,
    }


@torch.no_grad()
def forward(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    return model(**inputs)[0]


def timed_forward(model: nn.Module, inputs: dict[str, Any]) -> tuple[float, torch.Tensor]:
    t0 = now()
    out = forward(model, inputs)
    return now() - t0, out


# --------------------------------------------------------------------------- adapter files


@torch.no_grad()
def randomize(net: Any, algo: str, seed: int) -> None:
    """Fill every factor with deterministic non-zero values; delta RMS = 0.3 x weight RMS."""
    g = torch.Generator().manual_seed(seed)
    for lora in net.loras:
        params = dict(lora.named_parameters())
        if set(params) != set(FACTORS[algo]):
            raise SystemExit(f"{lora.lora_name}: unexpected parameters {sorted(params)}")
        for p in params.values():
            p.copy_(torch.randn(p.shape, generator=g).to(p.dtype))
        # RMS of the delta these unit-variance factors give (scale = alpha/rank, or 1)
        scale = float(lora.scale)
        if algo == "lora":
            unit = (params["lora_up.weight"] @ params["lora_down.weight"]).pow(2).mean().sqrt()
        elif algo == "lokr":
            w1, w2 = params["lokr_w1"], params["lokr_w2"]
            unit = w1.pow(2).mean().sqrt() * w2.pow(2).mean().sqrt()  # RMS of kron(w1, w2)
        else:
            h1 = params["hada_w1_a"] @ params["hada_w1_b"]
            h2 = params["hada_w2_a"] @ params["hada_w2_b"]
            unit = (h1 * h2).pow(2).mean().sqrt()
        base = lora.org_module[0].weight.float().pow(2).mean().sqrt()
        c = (DELTA_REL_RMS * base / (scale * unit)).item() ** (1.0 / len(params))
        for p in params.values():
            p.mul_(c)


def make_file(model: nn.Module, algo: str, path: Path, seed: int) -> int:
    """Create, randomise and save a lycoris network (seed trainer's format); remove it."""
    from lycoris_core import LycorisConfig, create_network

    config = LycorisConfig.from_dict(CONFIGS[algo], source=f"bench {algo}")
    net = create_network(model, config)
    randomize(net, algo, seed)
    meta = {"lycoris_config": json.dumps(config.to_dict())}
    net.save_weights(str(path), None, meta)
    layers = len(net.loras)
    net.restore()
    drop_lycoris(net)
    return layers


def drop_lycoris(net: Any) -> None:
    for lora in getattr(net, "loras", []):
        lora.org_module[0].__dict__.pop("_lycoris_wrappers", None)
        lora.org_module[0].__dict__.pop("_lycoris_original_forward", None)


# --------------------------------------------------------------------------- weights


class Weights:
    """Copies of the weights (and biases) of the adapted modules, to restore after lycoris."""

    def __init__(self, model: nn.Module, paths: list[str]) -> None:
        self.model = model
        self.mods = {p: model.get_submodule(p) for p in paths}
        self.saved = {p: self._get(m) for p, m in self.mods.items()}

    @staticmethod
    def _get(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        b = getattr(m, "bias", None)
        return m.weight.detach().clone(), None if b is None else b.detach().clone()

    def current(self) -> dict[str, torch.Tensor]:
        return {p: m.weight.detach().clone() for p, m in self.mods.items()}

    @torch.no_grad()
    def restore(self) -> None:
        for p, m in self.mods.items():
            w, b = self.saved[p]
            m.weight.copy_(w)
            if b is not None:
                m.bias.copy_(b)

    def unchanged(self) -> bool:
        for p, m in self.mods.items():
            w, b = self.saved[p]
            if not torch.equal(m.weight, w):
                return False
            if b is not None and not torch.equal(m.bias, b):
                return False
        return True


def state_equal(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now_sd = model.state_dict()
    return now_sd.keys() == before.keys() and all(
        torch.equal(now_sd[k], v) for k, v in before.items()
    )


# --------------------------------------------------------------------------- lycoris


def lycoris_create(path: Path, model: nn.Module, sd: dict[str, torch.Tensor] | None = None) -> Any:
    import lycoris

    net, _ = lycoris.create_lycoris_from_weights(1.0, str(path), model, weights_sd=sd)
    return net


@contextmanager
def quiet_lycoris() -> Iterator[None]:
    import logging

    lg = logging.getLogger("LyCORIS")
    level = lg.level
    lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lg.setLevel(level)


# --------------------------------------------------------------------------- measurements


def time_apply(
    model: nn.Module,
    path: Path,
    adapter: Any,
    sd: dict[str, torch.Tensor],
    weights: Weights,
    repeats: int,
) -> dict[str, Any]:
    """Ours (load, enter, exit) and lycoris (create [+ file read] + merge_to), interleaved."""
    from lycoris_core import load_adapter, patched

    t: dict[str, list[float]] = {
        k: []
        for k in (
            "ours_load",
            "ours_enter",
            "ours_exit",
            "lyc_file_create",
            "lyc_file_merge",
            "lyc_sd_create",
            "lyc_sd_merge",
            "restore_from_copy",
        )
    }

    def ours() -> None:
        gc.collect()
        t0 = now()
        load_adapter(path)
        t["ours_load"].append(now() - t0)
        gc.collect()
        t0 = now()
        with patched(model, [(adapter, 1.0)], mode="merge"):
            t1 = now()
        t2 = now()
        t["ours_enter"].append(t1 - t0)
        t["ours_exit"].append(t2 - t1)

    def lyc(use_sd: bool) -> None:
        key = "lyc_sd" if use_sd else "lyc_file"
        gc.collect()
        t0 = now()
        net = lycoris_create(path, model, sd if use_sd else None)
        t1 = now()
        net.merge_to(1.0)
        t2 = now()
        t[key + "_create"].append(t1 - t0)
        t[key + "_merge"].append(t2 - t1)
        drop_lycoris(net)
        del net
        t0 = now()
        weights.restore()
        t["restore_from_copy"].append(now() - t0)

    steps: list[Callable[[], None]] = [ours, lambda: lyc(False), lambda: lyc(True)]
    with quiet_lycoris():
        for s in steps:  # warm-up (page cache, allocator, lazy imports)
            s()
        for v in t.values():
            v.clear()
        for i in range(repeats):
            order = steps if i % 2 == 0 else steps[::-1]
            for s in order:
                s()
    if not weights.unchanged():
        raise SystemExit("weights differ from the base after the apply timings")
    sd_total = [a + b for a, b in zip(t["lyc_sd_create"], t["lyc_sd_merge"], strict=True)]
    file_total = [a + b for a, b in zip(t["lyc_file_create"], t["lyc_file_merge"], strict=True)]
    ours_both = [a + b for a, b in zip(t["ours_enter"], t["ours_exit"], strict=True)]
    ours_load_enter = [a + b for a, b in zip(t["ours_load"], t["ours_enter"], strict=True)]
    r = {k + "_ms": med_ms(v) for k, v in t.items()}
    r.update({k + "_min_ms": min(v) * 1000.0 for k, v in t.items()})
    r.update(
        ours_enter_exit_ms=med_ms(ours_both),
        ours_load_enter_ms=med_ms(ours_load_enter),
        lyc_file_total_ms=med_ms(file_total),
        lyc_sd_total_ms=med_ms(sd_total),
        repeats=repeats,
        raw_s={k: v for k, v in t.items()},
    )
    # the two rows of the comparison (target: ratio <= 0.5)
    r["ratio_merge_only"] = r["ours_enter_ms"] / r["lyc_sd_total_ms"]
    r["ratio_with_file"] = r["ours_load_enter_ms"] / r["lyc_file_total_ms"]
    # informational: ours including the exact restore vs lycoris (which has no unmerge)
    r["ratio_enter_exit_vs_lyc_sd"] = r["ours_enter_exit_ms"] / r["lyc_sd_total_ms"]
    return r


@torch.no_grad()
def correctness(
    model: nn.Module,
    path: Path,
    adapter: Any,
    inputs: dict[str, Any],
    weights: Weights,
    base_state: dict[str, torch.Tensor],
    base_out: torch.Tensor,
) -> dict[str, Any]:
    from lycoris_core import patched

    r: dict[str, Any] = {}
    w0 = {p: w for p, (w, _) in weights.saved.items()}
    with quiet_lycoris():
        # reference: lycoris forward (apply_to), strength 1.0
        net = lycoris_create(path, model)
        r["lycoris_layers"] = len(net.loras)
        net.apply_to()
        ref = forward(model, inputs)
        net.restore()
        drop_lycoris(net)
        del net
        if not weights.unchanged():
            raise SystemExit("lycoris apply_to/restore changed the weights")
        # lycoris merge_to
        net = lycoris_create(path, model)
        net.merge_to(1.0)
        lyc_w = weights.current()
        lyc_out = forward(model, inputs)
        drop_lycoris(net)
        del net
        weights.restore()
    # ours, merged
    with patched(model, [(adapter, 1.0)], mode="merge") as patch:
        r["ours_layers"] = patch.num_layers
        ours_w = weights.current()
        ours_out = forward(model, inputs)
    r["ours_restore_bitwise"] = state_equal(model, base_state)
    # ours, dynamic
    with patched(model, [(adapter, 1.0)], mode="dynamic"):
        dyn_out = forward(model, inputs)
    r["ours_dynamic_restore_bitwise"] = state_equal(model, base_state)

    r["weights_ours_vs_lycoris_merge"] = max(rel_err(ours_w[p], lyc_w[p]) for p in ours_w)
    r["delta_ours_vs_lycoris_merge"] = max(
        rel_err(ours_w[p] - w0[p], lyc_w[p] - w0[p]) for p in ours_w
    )
    # ratio of the merged deltas (lycoris / ours), e.g. 0.5 = alpha/rank applied twice
    num = sum(((lyc_w[p] - w0[p]).double() * (ours_w[p] - w0[p]).double()).sum() for p in ours_w)
    den = sum(((ours_w[p] - w0[p]).double() ** 2).sum() for p in ours_w)
    r["delta_scale_lycoris_merge_over_ours"] = float(num / den)
    r["output_ours_merge_vs_forward"] = rel_err(ours_out, ref)
    r["output_ours_dynamic_vs_forward"] = rel_err(dyn_out, ref)
    r["output_lycoris_merge_vs_forward"] = rel_err(lyc_out, ref)
    r["output_adapter_effect"] = rel_err(base_out, ref)  # how much the adapter changes the output
    r["finite"] = bool(torch.isfinite(ref).all() and torch.isfinite(ours_out).all())
    return r


def time_forwards(
    model: nn.Module, adapter: Any, inputs: dict[str, Any], repeats: int
) -> dict[str, Any]:
    """Plain / dynamic / merged forward, interleaved repeat by repeat."""
    from lycoris_core import patched

    t: dict[str, list[float]] = {"plain": [], "dynamic": [], "merged": [], "dynamic_enter": []}

    def plain() -> None:
        t["plain"].append(timed_forward(model, inputs)[0])

    def dynamic() -> None:
        t0 = now()
        with patched(model, [(adapter, 1.0)], mode="dynamic"):
            t["dynamic_enter"].append(now() - t0)
            t["dynamic"].append(timed_forward(model, inputs)[0])

    def merged() -> None:
        with patched(model, [(adapter, 1.0)], mode="merge"):
            t["merged"].append(timed_forward(model, inputs)[0])

    steps = [plain, dynamic, merged]
    for s in steps:  # warm-up
        s()
    for v in t.values():
        v.clear()
    for i in range(repeats):
        for s in steps if i % 2 == 0 else steps[::-1]:
            s()
    r = {k + "_ms": med_ms(v) for k, v in t.items()}
    r.update({k + "_min_ms": min(v) * 1000.0 for k, v in t.items()})
    r["dynamic_over_plain"] = r["dynamic_ms"] / r["plain_ms"]
    r["merged_over_plain"] = r["merged_ms"] / r["plain_ms"]
    r["dynamic_over_plain_paired_median"] = statistics.median(
        d / p for d, p in zip(t["dynamic"], t["plain"], strict=True)
    )
    r["repeats"] = repeats
    r["raw_s"] = t
    return r


def profile_merge(model: nn.Module, adapter: Any, repeats: int) -> dict[str, Any]:
    """cProfile of `patched` merge enter + exit; per-call seconds of the parts that matter."""
    from lycoris_core import patched

    prof = cProfile.Profile()
    total = 0.0
    for _ in range(repeats):
        gc.collect()
        t0 = now()
        prof.enable()
        with patched(model, [(adapter, 1.0)], mode="merge"):
            pass
        prof.disable()
        total += now() - t0
    st = pstats.Stats(prof)
    stats = st.stats  # type: ignore[attr-defined]

    def find(func: str, file_part: str = "") -> tuple | None:
        for key in stats:
            if key[2] == func and file_part in key[0]:
                return key
        return None

    def cum(func: str, file_part: str = "") -> float:
        key = find(func, file_part)
        return 0.0 if key is None else stats[key][3] / repeats

    def cum_all(func: str, file_part: str) -> float:
        """Cumulative time of every function `func` in files matching `file_part`."""
        keys = [k for k in stats if k[2] == func and file_part in k[0]]
        return sum(stats[k][3] for k in keys) / repeats

    def own(func: str, file_part: str = "") -> float:
        key = find(func, file_part)
        return 0.0 if key is None else stats[key][2] / repeats

    def by_caller(func: str, caller: str) -> float:
        key = find(func)
        if key is None:
            return 0.0
        return sum(v[3] for c, v in stats[key][4].items() if c[2] == caller) / repeats

    out = {
        "profiled_total_ms": total / repeats * 1000,
        "sections_ms": {
            "Patch.__init__ (bind + shape checks)": cum("__init__", "patching.py") * 1000,
            "  Adapter.bind": cum("bind", "adapters.py") * 1000,
            "Patch._merge": cum("_merge", "patching.py") * 1000,
            "  algorithms.accumulate (build the merged weight)": cum(
                "accumulate", "algorithms/__init__.py"
            )
            * 1000,
            "    <algorithm>.delta (weight-dependent algorithms)": cum_all("delta", "algorithms/")
            * 1000,
            "  _merge self (loop, swap in)": own("_merge", "patching.py") * 1000,
            "Patch.restore": cum("restore", "patching.py") * 1000,
        },
        "top_tottime": [],
    }
    st.sort_stats("tottime")
    for key in st.fcn_list[:12]:  # type: ignore[attr-defined]
        _cc, nc, tt, ct, _ = stats[key]
        out["top_tottime"].append(
            {
                "function": f"{Path(key[0]).name}:{key[1]}({key[2]})",
                "calls_per_apply": nc / repeats,
                "tottime_ms": tt / repeats * 1000,
                "cumtime_ms": ct / repeats * 1000,
            }
        )
    return out


# --------------------------------------------------------------------------- report


def fmt_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(str(x).rjust(w) for x, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join([line, sep, *body])


def report(res: dict[str, Any]) -> str:
    lines = []
    m = res["machine"]
    lines.append(
        f"\n{m['cpu']}, {m['torch_threads']} thread(s), torch {m['torch']}, diffusers "
        f"{m['diffusers']}, lycoris-lora {m['lycoris_lora']}, fp32"
    )
    lines.append(
        f"model: FluxTransformer2DModel {res['model']['params']:,} params; forward input "
        f"{res['model']['image_tokens']} image + {res['model']['text_tokens']} text tokens"
    )
    rows, rows2, rows3 = [], [], []
    for algo, a in res["algorithms"].items():
        ap, co, fw = a["apply"], a["correctness"], a["forward"]
        ok_ratio = ap["ratio_merge_only"] <= RATIO_TARGET and ap["ratio_with_file"] <= RATIO_TARGET
        rows.append(
            [
                algo,
                str(a["layers"]),
                f"{ap['ours_load_ms']:.1f}",
                f"{ap['ours_enter_ms']:.1f}",
                f"{ap['ours_exit_ms']:.1f}",
                f"{ap['lyc_sd_total_ms']:.1f}",
                f"{ap['ratio_merge_only']:.2f}",
                f"{ap['ours_load_enter_ms']:.1f}",
                f"{ap['lyc_file_total_ms']:.1f}",
                f"{ap['ratio_with_file']:.2f}",
                "met" if ok_ratio else "MISSED",
            ]
        )
        rows2.append(
            [
                algo,
                f"{co['weights_ours_vs_lycoris_merge']:.1e}",
                f"{co['delta_ours_vs_lycoris_merge']:.1e}",
                f"{co['delta_scale_lycoris_merge_over_ours']:.3f}",
                f"{co['output_ours_merge_vs_forward']:.1e}",
                f"{co['output_ours_dynamic_vs_forward']:.1e}",
                f"{co['output_lycoris_merge_vs_forward']:.1e}",
                f"{co['output_adapter_effect']:.2f}",
            ]
        )
        dyn_ok = fw["dynamic_over_plain"] <= DYNAMIC_TARGET
        rows3.append(
            [
                algo,
                f"{fw['plain_ms']:.0f}",
                f"{fw['dynamic_ms']:.0f}",
                f"{fw['dynamic_over_plain']:.3f}",
                f"{fw['merged_over_plain']:.3f}",
                f"{fw['dynamic_enter_ms']:.1f}",
                ("met" if dyn_ok else "MISSED") if algo in DYNAMIC_TARGET_ALGOS else "(no target)",
            ]
        )
    lines.append(
        "\nApply (ms, medians; target ratio <= 0.5). A: ours enter (merge + backup) vs lycoris"
        " create_lycoris_from_weights(weights_sd=) + merge_to; B: ours load_adapter + enter vs"
        " lycoris create_lycoris_from_weights(file) + merge_to"
    )
    lines.append(
        fmt_table(
            rows,
            [
                "algo",
                "layers",
                "ours load",
                "ours enter",
                "ours exit",
                "lyc sd+merge",
                "ratio A",
                "ours load+enter",
                "lyc file+merge",
                "ratio B",
                "target",
            ],
        )
    )
    lines.append(
        "\nExactness (max relative error; reference = lycoris forward via apply_to; 'effect' ="
        " how much the adapter changes the output)"
    )
    lines.append(
        fmt_table(
            rows2,
            [
                "algo",
                "W ours~lyc",
                "dW ours~lyc",
                "dW lyc/ours",
                "out ours merge",
                "out ours dyn",
                "out lyc merge_to",
                "effect",
            ],
        )
    )
    lines.append("\nForward (ms, medians of interleaved repeats; target dynamic/plain <= 1.10)")
    lines.append(
        fmt_table(
            rows3, ["algo", "plain", "dynamic", "dyn/plain", "merged/plain", "dyn setup", "target"]
        )
    )
    lines.append("\nWhere our merge (enter + exit) time goes (cProfile, ms per apply)")
    for algo, a in res["algorithms"].items():
        p = a["profile"]
        lines.append(f"  {algo}: profiled total {p['profiled_total_ms']:.1f} ms")
        for k, v in p["sections_ms"].items():
            lines.append(f"    {k:<46s} {v:8.1f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small model, smoke run (tests)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "apply.json"))
    ap.add_argument(
        "--repeats", type=int, default=None, help="apply repeats (default 9, quick 5; >= 5)"
    )
    ap.add_argument(
        "--forward-repeats",
        type=int,
        default=None,
        help="forward repeats (default 9, quick 7; >= 7)",
    )
    ap.add_argument("--profile", action="store_true", help="print the cProfile top functions")
    args = ap.parse_args(argv)
    t_start = now()

    import logging

    logging.getLogger("lycoris_core").setLevel(logging.WARNING)
    from lycoris_core import load_adapter
    from lycoris_core.io import read_safetensors

    repeats = max(5, args.repeats or (5 if args.quick else 9))
    fwd_repeats = max(7, args.forward_repeats or (7 if args.quick else 9))
    img_side, txt = (8, 16) if args.quick else (16, 64)

    model, params = build_model(args.quick, seed=0)
    print(f"model: FluxTransformer2DModel, {params:,} parameters (fp32)", flush=True)
    inputs = model_inputs(model, img_side, txt, seed=1)
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    base_out = forward(model, inputs)

    res: dict[str, Any] = {
        "benchmark": "bench/apply.py",
        "quick": args.quick,
        "machine": machine_info(params),
        "model": {
            "class": "FluxTransformer2DModel",
            "config": MODEL_QUICK if args.quick else MODEL_DEFAULT,
            "params": params,
            "image_tokens": img_side * img_side,
            "text_tokens": txt,
            "batch": 1,
        },
        "configs": CONFIGS,
        "delta_rel_rms": DELTA_REL_RMS,
        "targets": {
            "apply_ratio_ours_over_lycoris_max": RATIO_TARGET,
            "dynamic_over_plain_max": DYNAMIC_TARGET,
            "dynamic_target_algos": list(DYNAMIC_TARGET_ALGOS),
        },
        "algorithms": {},
    }

    with tempfile.TemporaryDirectory(prefix="bench_apply_") as tmp:
        for i, algo in enumerate(CONFIGS):
            t_algo = now()
            path = Path(tmp) / f"{algo}.safetensors"
            with quiet_lycoris():
                layers = make_file(model, algo, path, seed=10 + i)
            if not state_equal(model, base_state):
                raise SystemExit(f"{algo}: creating the file changed the model")
            adapter = load_adapter(path)
            sd, _ = read_safetensors(path)
            # long-lived objects out of the collector's way: gc.collect() between timed
            # regions then costs microseconds instead of ~0.2 s
            gc.collect()
            gc.freeze()
            paths = sorted(adapter.bind(model))
            weights = Weights(model, paths)
            print(
                f"{algo}: {layers} layers wrapped, file {path.stat().st_size / 1e6:.2f} MB, "
                f"{adapter.num_params():,} adapter params",
                flush=True,
            )
            entry: dict[str, Any] = {"layers": layers, "file_bytes": path.stat().st_size}
            entry["adapter_params"] = adapter.num_params()
            entry["correctness"] = correctness(
                model, path, adapter, inputs, weights, base_state, base_out
            )
            entry["apply"] = time_apply(model, path, adapter, sd, weights, repeats)
            entry["forward"] = time_forwards(model, adapter, inputs, fwd_repeats)
            entry["profile"] = profile_merge(model, adapter, repeats=3)
            if not state_equal(model, base_state):
                raise SystemExit(f"{algo}: the model is not back to its base state")
            entry["seconds"] = now() - t_algo
            res["algorithms"][algo] = entry
            ap_, fw_ = entry["apply"], entry["forward"]
            print(
                f"  ours enter {ap_['ours_enter_ms']:.1f} ms vs lycoris "
                f"{ap_['lyc_sd_total_ms']:.1f} ms; dynamic/plain "
                f"{fw_['dynamic_over_plain']:.3f} ({entry['seconds']:.0f} s)",
                flush=True,
            )
            if args.profile:
                for row in entry["profile"]["top_tottime"]:
                    print(
                        f"    {row['tottime_ms']:8.2f} ms self {row['cumtime_ms']:8.2f} ms cum "
                        f"x{row['calls_per_apply']:.0f}  {row['function']}"
                    )
            del sd, adapter, weights
            gc.unfreeze()
            gc.collect()

    algos = res["algorithms"]
    res["summary"] = {
        "apply_ratio_target_met": {
            a: v["apply"]["ratio_merge_only"] <= RATIO_TARGET
            and v["apply"]["ratio_with_file"] <= RATIO_TARGET
            for a, v in algos.items()
        },
        "dynamic_target_met": {
            a: algos[a]["forward"]["dynamic_over_plain"] <= DYNAMIC_TARGET
            for a in DYNAMIC_TARGET_ALGOS
        },
        "ours_matches_forward": {
            a: v["correctness"]["output_ours_merge_vs_forward"] < 1e-4 for a, v in algos.items()
        },
        "restore_bitwise": {
            a: v["correctness"]["ours_restore_bitwise"]
            and v["correctness"]["ours_dynamic_restore_bitwise"]
            for a, v in algos.items()
        },
    }
    return finish(res, args.out, t_start, report)


if __name__ == "__main__":
    raise SystemExit(main())
