"""Measure the bypass-mode constants of ``lycoris_core/memory.py`` (CPU, a few minutes).

Run from the repository root::

    .venv/bin/python bench/memory_bypass_fit.py [--out bench/results/memory_bypass_fit.json]

Over a quantised base LyCORIS trains in bypass mode: no merged weights, but bitsandbytes
dequantises each layer in its forward and backward (int8, nf4), and fp8 storage upcasts each
layer's weight in its forward and again in its backward (the backward keeps only the fp8
weight). Each configuration (two random Flux transformers x fp32 bypass / fp8 / int8 / nf4 x
gradient checkpointing off / on, the seed's LoKr config, 16x16 latent tokens + 32 text tokens,
fp32 compute) runs in its own process with ``MALLOC_MMAP_THRESHOLD_=131072``: two training
steps (forward, MSE loss, backward); the peak RSS of the second (``VmHWM`` reset through
``/proc/self/clear_refs``) minus the RSS before it and the adapter's gradients, minus the
activations the estimator already counts (``activation_bytes``), is what the bypass terms
must cover. Divided by the compute-dtype bytes of the largest Linear
(:class:`lycoris_core.memory_counts.LinearLayout`), averaged over the two models: the
constants ``DEQUANT`` (fp8, int8, nf4). ``CAST_SAVED*`` (diffusers' layerwise casting, which
keeps the upcast copies for the backward: the benchmark's "bf16 storage" arm) were measured by
an earlier version of this script, when fp8 went through that hook. Then a sampling forward
(``no_grad``, its own peak) minus the inference activations, per compute-dtype byte of the
largest Linear: ``SAMPLE_TRANSIENT`` (the layer dequantised or upcast for its forward).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import apply as common  # noqa: E402
import torch  # noqa: E402
from memory import status_bytes  # noqa: E402  (bench/memory.py: VmRSS / VmHWM)

SHAPES = ((1024, 1, 1), (768, 2, 1))  # hidden, double blocks, single blocks
SIDE, TEXT = 16, 32
PRECISIONS = ("fp32", "fp8", "int8", "nf4")


def child(job: dict[str, Any]) -> dict[str, Any]:
    import memory_fit as mf

    from lycoris_core.config import SEED_EXAMPLE, LycorisConfig
    from lycoris_core.memory import Workload, activation_bytes
    from lycoris_core.memory_counts import linear_layout
    from lycoris_core.quantization import quantise_module
    from lycoris_core.targeting import create_network

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = mf.flux_model(job["d"], job["ld"], job["ls"])
    quantise_module(model, job["precision"], torch.float32)
    layout = linear_layout(model)
    inputs = mf.flux_inputs(model, SIDE, TEXT, 1)
    config = LycorisConfig.from_dict(SEED_EXAMPLE | {"bypass_mode": True}, source="seed")
    net = create_network(model, config)
    net.requires_grad_(True)
    params = [p for p in net.parameters() if p.requires_grad]
    grads = 4 * sum(p.numel() for p in params)
    if job["gc"]:
        model.enable_gradient_checkpointing()
    model.train(job["gc"])

    def step() -> None:
        out = model(**inputs)[0]
        torch.nn.functional.mse_loss(out, torch.zeros_like(out)).backward()

    step()
    for p in params:
        p.grad = None
    before = status_bytes()["VmRSS"]
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM
    step()
    extra = status_bytes()["VmHWM"] - before - grads
    work = Workload(
        width=SIDE * 16, height=SIDE * 16, gradient_checkpointing=job["gc"], text_tokens=TEXT
    )
    act = activation_bytes("flux", dict(model.config), work, 4, 8)
    # a sampling forward (no_grad): what it holds beyond the inference activations
    for p in params:
        p.grad = None
    model.eval()
    with torch.no_grad():
        model(**inputs)
        before = status_bytes()["VmRSS"]
        Path("/proc/self/clear_refs").write_text("5")
        model(**inputs)
    sample = status_bytes()["VmHWM"] - before
    sample_act = activation_bytes("flux", dict(model.config), work.__class__(mode="sample",
        width=work.width, height=work.height, text_tokens=TEXT), 4, 8)  # fmt: skip
    return {"job": job, "extra": extra, "activations": act, "layout": layout.__dict__,
            "sample_extra": sample, "sample_activations": sample_act}  # fmt: skip


def fit(records: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"dequant": {}, "residual_fp32_bypass": {}}
    for r in records:
        j, lay = r["job"], r["layout"]
        left = r["extra"] - r["activations"]
        if j["precision"] == "fp32":
            out["residual_fp32_bypass"].setdefault(str(j["gc"]), []).append(left)
        else:  # fp8 keeps only the fp8 weight for the backward: a transient upcast too
            key = f"{j['precision']}, gc {j['gc']}"
            out["dequant"].setdefault(key, []).append(left / (4 * lay["largest"]))
    sample: dict[str, list[float]] = {}
    for r in records:
        if not r["job"]["gc"]:  # a no_grad forward does not depend on it
            left = r["sample_extra"] - r["sample_activations"]
            sample.setdefault(r["job"]["precision"], []).append(left / (4 * r["layout"]["largest"]))
    out["sample_transient"] = sample
    out["means"] = {k: round(sum(v) / len(v), 2) for k, v in out["dequant"].items()} | {
        f"SAMPLE_TRANSIENT {k}": round(sum(v) / len(v), 2) for k, v in sample.items()
    }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(BENCH / "results" / "memory_bypass_fit.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(Path(args.child).read_text()))))
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    records = []
    for d, ld, ls in SHAPES:
        for precision in PRECISIONS:
            for gc in (False, True):
                job = {"d": d, "ld": ld, "ls": ls, "precision": precision, "gc": gc}
                with tempfile.TemporaryDirectory() as tmp:
                    path = Path(tmp) / "job.json"
                    path.write_text(json.dumps(job))
                    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(path)]
                    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
                records.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(records[-1], flush=True)
    result = {"machine": common.machine_info(0), "records": records, "fit": fit(records)}
    print(json.dumps(result["fit"]["means"], indent=2))
    common.write_json_atomic(Path(args.out), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
