"""Benchmark: peak memory (RSS, CPU) while loading an fp8 single file vs the same model in bf16.

Run from the repository root::

    .venv/bin/python bench/checkpoint_memory.py [--out bench/results/checkpoint_memory.json]

A ~170M-parameter random Flux transformer (the tiny layout with wider dims, as in
``bench/apply.py``) is written as a ComfyUI split set (BFL-layout diffusion model + CLIP-L +
T5 + ae files, renamed by the test fixtures' writer ``tests/unit/checkpoint_files.py``), once
with the transformer in bf16 and once in fp8 e4m3fn. Each set is then loaded by
``lycoris_core.checkpoints.load_files`` (compute dtype bf16; fp8 kept through layerwise
casting) in a fresh subprocess, interleaved, repeated; each child reports its peak RSS
(VmRSS sampled every 2 ms by a thread, up to having read every weight once) and its RSS
after every import (baseline). Target: fp8 / bf16 < 0.6, for the peak above the baseline
(the model's own share; the peak itself includes ~0.5 GB of imported libraries).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
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
REPEATS = 2


def _rss_mb() -> float:
    """Current resident set size (VmRSS), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(folder: str, storage: str) -> None:
    """Load one set and print {baseline_mb, peak_mb} as JSON: the RSS after every import,
    and the highest RSS seen (sampled every 2 ms by a thread) while loading."""
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
    base = _rss_mb()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.002)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    pipe, found = load_files(
        d / f"flux-{storage}.safetensors",
        [d / "clip_l.safetensors", d / "t5xxl.safetensors"],
        d / "ae.safetensors",
        tokenizer_dirs=[d / "tokenizers"],
        dtype=torch.bfloat16,
    )
    loaded = max(peak[0], _rss_mb())
    # safetensors maps bf16 tensors from the file lazily (their pages count once read), fp8
    # ones are copied: read every byte of every weight, as sampling would, then measure.
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for t in [*component.parameters(), *component.buffers()]:
                t.detach().contiguous().view(torch.uint8).flatten()[::4096].sum()  # each page
    done.set()
    watcher.join()
    peak[0] = max(peak[0], _rss_mb())
    params = sum(p.numel() for p in pipe.transformer.parameters())
    print(
        json.dumps(
            {
                "baseline_mb": base,
                "after_load_mb": loaded,
                "peak_mb": peak[0],
                "storage": found.storage,
                "transformer_params": params,
            }
        )
    )


def _write_sets(folder: Path) -> dict:
    import torch
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5EncoderModel

    sys.path.insert(0, str(ROOT / "tests" / "unit"))
    import checkpoint_files as cf

    from lycoris_core.tiny import build_pipeline, flux_transformer_config

    pipe = build_pipeline("flux")
    torch.manual_seed(0)
    pipe.transformer = FluxTransformer2DModel(**flux_transformer_config(**SHAPE))
    clip = pipe.text_encoder.config.to_dict()
    clip.update(hidden_size=SHAPE["pooled_projection_dim"], intermediate_size=512)
    pipe.text_encoder = CLIPTextModel(CLIPTextConfig(**clip))
    t5 = pipe.text_encoder_2.config
    t5.d_model, t5.num_layers = SHAPE["joint_attention_dim"], 1
    pipe.text_encoder_2 = T5EncoderModel(t5)
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "checkpoint_memory.json"))
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sizes = _write_sets(folder)
        runs: dict[str, list[dict]] = {"bf16": [], "fp8": []}
        for _ in range(REPEATS):
            for storage in ("bf16", "fp8"):  # interleaved
                runs[storage].append(_run_child(folder, storage))
    med = {
        s: {
            k: statistics.median(r[k] for r in rs)
            for k in ("baseline_mb", "after_load_mb", "peak_mb")
        }
        for s, rs in runs.items()
    }
    inc = {s: med[s]["peak_mb"] - med[s]["baseline_mb"] for s in med}
    result = {
        "file_mb": sizes,
        "transformer_params": runs["fp8"][0]["transformer_params"],
        "storage": {s: rs[0]["storage"] for s, rs in runs.items()},
        "median": med,
        "load_increment_mb": inc,
        "ratio_peak_fp8_over_bf16": round(med["fp8"]["peak_mb"] / med["bf16"]["peak_mb"], 3),
        "ratio_increment_fp8_over_bf16": round(inc["fp8"] / inc["bf16"], 3),
        "target": "< 0.6",
        "runs": runs,
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps(
            {
                k: result[k]
                for k in (
                    "file_mb",
                    "transformer_params",
                    "load_increment_mb",
                    "ratio_peak_fp8_over_bf16",
                    "ratio_increment_fp8_over_bf16",
                )
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
