"""Benchmark: peak memory (RSS, CPU) while loading an fp8 single file vs the same model in bf16.

Run from the repository root::

    .venv/bin/python bench/checkpoint_memory.py [--out bench/results/checkpoint_memory.json]
    .venv/bin/python bench/checkpoint_memory.py --params 2e9 [--repeats 2]

By default a ~170M-parameter random Flux transformer (the tiny layout with wider dims, as in
``bench/apply.py``) is written as a ComfyUI split set (BFL-layout diffusion model + CLIP-L +
T5 + ae files, renamed by the test fixtures' writer ``tests/unit/checkpoint_files.py``), once
with the transformer in bf16 and once in fp8 e4m3fn. ``--params N`` instead writes a
transformer of about N parameters with FLUX.1's widths (hidden 3072 = 24 heads x 128, T5
4096, CLIP 768) and fewer blocks (double:single 1:2 as FLUX.1's 19:38): its files are
streamed tensor by tensor (random weights, never the whole model in memory; a 2B bf16 file
is 4 GB), into a temporary folder deleted afterwards. Each set is then loaded by
``lycoris_core.checkpoints.load_files`` (compute dtype bf16; fp8 kept through layerwise
casting) in a fresh subprocess, interleaved, repeated; each child reports its peak RSS
(VmRSS sampled every 2 ms by a thread, up to having read every weight once; with its
anonymous and file-backed shares at that moment) and its RSS after every import (baseline).
Target: fp8 / bf16 < 0.6. The model's own share is the peak above the baseline; the whole
peak includes ~0.4 GB of imported libraries, which dominate at the default size.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHAPE = {
    "num_layers": 3,
    "num_single_layers": 3,
    "attention_head_dim": 128,
    "num_attention_heads": 8,
    "joint_attention_dim": 1024,
    "pooled_projection_dim": 256,
}
# --params: FLUX.1's widths (FLUX.1-dev's transformer config); only the block counts shrink
WIDE = {
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
}
REPEATS = 2
_STATUS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")


def _status_mb() -> dict[str, float]:
    """VmRSS, RssAnon, RssFile and VmHWM of this process (/proc/self/status), MiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":", 1)[0]
        if key in _STATUS:
            out[key] = int(line.split()[1]) / 1024
    return out


def _rss_mb() -> float:
    """Current resident set size (VmRSS), MiB."""
    rss = _status_mb().get("VmRSS")
    return rss if rss is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(folder: str, storage: str) -> None:
    """Load one set and print JSON: the RSS after every import (baseline), the highest RSS
    seen (sampled every 2 ms by a thread) while loading and reading every weight once, its
    anonymous / file-backed shares at that moment, VmHWM, the load time."""
    import threading
    import time

    import diffusers  # noqa: F401
    import torch
    import transformers  # noqa: F401
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel  # noqa: F401
    from diffusers.hooks import apply_layerwise_casting  # noqa: F401
    from transformers import CLIPTextModel, T5EncoderModel  # noqa: F401

    from lycoris_core.checkpoints import load_files

    d = Path(folder)
    start = _status_mb()
    base = start["VmRSS"]
    peak = [base]
    at_peak = [start]
    done = threading.Event()

    def note() -> None:
        now = _status_mb()
        if now["VmRSS"] > peak[0]:
            peak[0], at_peak[0] = now["VmRSS"], now

    def sample() -> None:
        while not done.is_set():
            note()
            time.sleep(0.002)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    pipe, found = load_files(
        d / f"flux-{storage}.safetensors",
        [d / "clip_l.safetensors", d / "t5xxl.safetensors"],
        d / "ae.safetensors",
        tokenizer_dirs=[d / "tokenizers"],
        dtype=torch.bfloat16,
    )
    load_s = time.perf_counter() - t0
    note()
    loaded = peak[0]
    # tensors kept as stored (bf16 here, fp8 when kept) are safetensors' memory map of the
    # file: their pages count in RSS once read. Read every page of every weight, as sampling
    # would, then measure.
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for t in [*component.parameters(), *component.buffers()]:
                t.detach().contiguous().view(torch.uint8).flatten()[::4096].sum()  # each page
    done.set()
    watcher.join()
    note()
    end = _status_mb()
    params = sum(p.numel() for p in pipe.transformer.parameters())
    print(
        json.dumps(
            {
                "baseline_mb": base,
                "baseline_anon_mb": start["RssAnon"],
                "baseline_file_mb": start["RssFile"],
                "after_load_mb": loaded,
                "peak_mb": peak[0],
                "peak_anon_mb": at_peak[0]["RssAnon"],
                "peak_file_mb": at_peak[0]["RssFile"],
                "hwm_mb": end["VmHWM"],
                "load_s": round(load_s, 2),
                "storage": found.storage,
                "transformer_params": params,
            }
        )
    )


def _small_parts(shape: dict, transformer: object) -> object:
    """The tiny Flux pipeline with `transformer`, CLIP/T5 widened to `shape`'s text dims."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, T5EncoderModel

    from lycoris_core.tiny import build_pipeline

    pipe = build_pipeline("flux")
    torch.manual_seed(0)
    pipe.transformer = transformer
    clip = pipe.text_encoder.config.to_dict()
    clip.update(hidden_size=shape["pooled_projection_dim"], intermediate_size=512)
    pipe.text_encoder = CLIPTextModel(CLIPTextConfig(**clip))
    t5 = pipe.text_encoder_2.config
    t5.d_model, t5.num_layers = shape["joint_attention_dim"], 1
    pipe.text_encoder_2 = T5EncoderModel(t5)
    return pipe


def _fixtures():
    sys.path.insert(0, str(ROOT / "tests" / "unit"))
    import checkpoint_files as cf

    return cf


def _write_sets(folder: Path) -> dict:
    """The default (small) sets: a randomly initialised model, renamed and saved whole."""
    import torch
    from diffusers import FluxTransformer2DModel

    from lycoris_core.tiny import flux_transformer_config

    cf = _fixtures()
    torch.manual_seed(0)
    pipe = _small_parts(SHAPE, FluxTransformer2DModel(**flux_transformer_config(**SHAPE)))
    split = cf.flux_split(pipe)
    for name in ("clip_l.safetensors", "t5xxl.safetensors", "ae.safetensors"):
        cf.write(folder / name, cf.to_storage(split[name], "bf16"))
    sizes = {}
    for storage in ("bf16", "fp8"):
        path = cf.write(
            folder / f"flux-{storage}.safetensors",
            cf.to_storage(split["flux.safetensors"], storage),
        )
        sizes[storage] = round(path.stat().st_size / 2**20, 1)
    cf.save_tokenizers(pipe, folder / "tokenizers")
    return sizes


def _meta_flux(**blocks: int) -> object:
    import torch
    from diffusers import FluxTransformer2DModel

    from lycoris_core.tiny import flux_transformer_config

    with torch.device("meta"):
        return FluxTransformer2DModel(**flux_transformer_config(**WIDE, **blocks))


def shape_for(params: float) -> dict:
    """FLUX.1's widths with block counts giving about `params` transformer parameters:
    double:single blocks 1:2 (FLUX.1: 19:38), the singles then fill up to `params`. The
    per-block counts are read off meta-device models (exact, nothing allocated)."""

    def count(d: int, s: int) -> int:
        return sum(p.numel() for p in _meta_flux(num_layers=d, num_single_layers=s).parameters())

    one = count(1, 1)
    per_double, per_single = count(2, 1) - one, count(1, 2) - one
    base = one - per_double - per_single
    double = max(1, round((params - base) / (per_double + 2 * per_single)))
    single = max(0, round((params - base - double * per_double) / per_single))
    return {**WIDE, "num_layers": double, "num_single_layers": single}


_ST_DTYPES = {
    "torch.bfloat16": "BF16",
    "torch.float16": "F16",
    "torch.float32": "F32",
    "torch.float8_e4m3fn": "F8_E4M3",
}


def _stream_files(paths: dict[str, Path], specs: dict, make: Callable[[str], dict]) -> None:
    """Write one .safetensors file per storage in `paths`, tensor by tensor.

    `specs[storage]` maps names to meta tensors (dtype, shape); `make(name)` gives that
    tensor in every storage. The format (https://github.com/huggingface/safetensors,
    "Format"): 8-byte little-endian header length, the JSON header (``dtype``, ``shape``,
    ``data_offsets`` per tensor; padded with spaces to 8 bytes), then the tensor bytes in the
    header's order. Only one tensor (in each storage) is in memory at a time."""
    import torch

    files = {}
    try:
        for storage, path in paths.items():
            header, offset = {}, 0
            for name, m in specs[storage].items():
                n = m.numel() * m.element_size()
                header[name] = {
                    "dtype": _ST_DTYPES[str(m.dtype)],
                    "shape": list(m.shape),
                    "data_offsets": [offset, offset + n],
                }
                offset += n
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)
            files[storage] = f = path.open("wb")
            f.write(struct.pack("<Q", len(blob)) + blob)
        for name in next(iter(specs.values())):
            tensors = make(name)
            for storage, f in files.items():
                t, m = tensors[storage], specs[storage][name]
                assert t.dtype == m.dtype and t.shape == m.shape, name
                f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    finally:
        for f in files.values():
            f.close()


def _write_big_sets(folder: Path, shape: dict) -> dict:
    """The --params sets: the transformer's names and shapes from a meta-device model
    (renamed to BFL by the fixtures' writer), each tensor then drawn (seeded by its name:
    N(0, 0.02) matrices and biases, unit norm scales) and written in bf16 and fp8 at once."""
    import torch

    cf = _fixtures()
    model = _meta_flux(num_layers=shape["num_layers"], num_single_layers=shape["num_single_layers"])
    pipe = _small_parts(shape, model)
    for name, tensors in (
        ("clip_l.safetensors", cf.hf_clip(pipe.text_encoder)),
        ("t5xxl.safetensors", cf.t5_file(pipe.text_encoder_2)),
        ("ae.safetensors", cf.vae_to_ldm(pipe.vae)),
    ):
        cf.write(folder / name, cf.to_storage(tensors, "bf16"))
    cf.save_tokenizers(pipe, folder / "tokenizers")
    meta = cf.flux_to_bfl(model)  # names and shapes only: every tensor is on meta
    storages = ("bf16", "fp8")
    specs = {s: cf.to_storage(meta, s) for s in storages}

    def make(name: str) -> dict:
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        m = meta[name]
        if name.endswith(".scale"):
            v = torch.ones(m.shape)
        else:
            v = torch.randn(m.shape, generator=g).mul_(0.02)
        return {s: cf.to_storage({name: v}, s)[name] for s in storages}

    paths = {s: folder / f"flux-{s}.safetensors" for s in storages}
    _stream_files(paths, specs, make)
    return {s: round(paths[s].stat().st_size / 2**20, 1) for s in storages}


def _run_child(folder: Path, storage: str) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", str(folder), storage],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        env={
            "PYTHONPATH": str(ROOT),
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "PATH": "/usr/bin:/bin",
        },
    )
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _machine() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem = next(
        (
            int(line.split()[1]) / 2**20
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal:")
        ),
        0.0,
    )
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "memory_gib": round(mem, 1),
    }


_FIELDS = (
    "baseline_mb",
    "after_load_mb",
    "peak_mb",
    "peak_anon_mb",
    "peak_file_mb",
    "hwm_mb",
    "load_s",
)


def _default_out(params: float | None) -> Path:
    name = "checkpoint_memory" if params is None else f"checkpoint_memory_{params / 1e9:g}b"
    return ROOT / "bench" / "results" / f"{name}.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, help="transformer size, e.g. 2e9 (FLUX.1 widths)")
    ap.add_argument("--repeats", type=int, default=REPEATS, help="loads per storage")
    ap.add_argument(
        "--out", help="result JSON (default bench/results/checkpoint_memory[_<N>b].json)"
    )
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    t0 = time.perf_counter()
    shape = SHAPE if args.params is None else shape_for(args.params)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sizes = _write_sets(folder) if args.params is None else _write_big_sets(folder, shape)
        write_s = time.perf_counter() - t0
        runs: dict[str, list[dict]] = {"bf16": [], "fp8": []}
        for _ in range(args.repeats):
            for storage in ("bf16", "fp8"):  # interleaved
                runs[storage].append(_run_child(folder, storage))
    med = {s: {k: statistics.median(r[k] for r in rs) for k in _FIELDS} for s, rs in runs.items()}
    inc = {s: med[s]["peak_mb"] - med[s]["baseline_mb"] for s in med}
    result = {
        "shape": shape,
        "file_mb": sizes,
        "transformer_params": runs["fp8"][0]["transformer_params"],
        "storage": {s: rs[0]["storage"] for s, rs in runs.items()},
        "median": med,
        "load_increment_mb": inc,
        "ratio_peak_fp8_over_bf16": round(med["fp8"]["peak_mb"] / med["bf16"]["peak_mb"], 3),
        "ratio_increment_fp8_over_bf16": round(inc["fp8"] / inc["bf16"], 3),
        "target": "< 0.6",
        "runs": runs,
        "write_s": round(write_s, 1),
        "wall_s": round(time.perf_counter() - t0, 1),
        "machine": _machine(),
    }
    Path(args.out or _default_out(args.params)).write_text(json.dumps(result, indent=2) + "\n")
    keys = (
        "file_mb",
        "transformer_params",
        "load_increment_mb",
        "ratio_peak_fp8_over_bf16",
        "ratio_increment_fp8_over_bf16",
        "wall_s",
    )
    print(json.dumps({k: result[k] for k in keys}, indent=2))


if __name__ == "__main__":
    main()
