"""The benchmarks keep working: --quick runs on small models write their JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_quick(name: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{name}.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / f"{name}.py"), "--quick", "--out", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(out.read_text())


def test_apply_benchmark_quick_run(tmp_path):
    data = run_quick("apply", tmp_path)
    assert set(data["algorithms"]) == {"lokr", "lora", "loha"}
    for name, entry in data["algorithms"].items():
        exact = entry["correctness"]
        errors = (exact["output_ours_merge_vs_forward"], exact["output_ours_dynamic_vs_forward"])
        assert max(errors) < 1e-5, name
        assert exact["ours_restore_bitwise"] and exact["ours_dynamic_restore_bitwise"]
        assert entry["apply"]["ours_enter_ms"] > 0 and entry["forward"]["plain_ms"] > 0


def test_sampling_benchmark_quick_run(tmp_path):
    data = run_quick("sampling", tmp_path)
    assert set(data["algorithms"]) == {"lora", "lokr", "loha"}
    for name, entry in data["algorithms"].items():
        assert entry["merged_vs_dynamic_max_abs"] < 1e-4, name
        assert entry["adapter_effect_max_abs"] > 1e-3, name


def test_train_benchmark_quick_run(tmp_path):
    data = run_quick("train", tmp_path)
    summary = data["summary"]
    assert summary["same_wrapped_layers"] and summary["layers_ours"] == 30
    assert set(summary["targets_met"]) >= {"step_ratio", "rss_ratio", "cache_ratio"}
    assert all(arm["step_ms"] > 0 for arm in data["arms"].values())


def test_flux_memory_gpu_benchmark_smoke_run_on_the_cpu(tmp_path):
    out = tmp_path / "flux_memory_gpu.json"
    script = ROOT / "bench" / "flux_memory_gpu.py"
    argv = [sys.executable, str(script), "--quick", "--device", "cpu", "--out", str(out)]
    proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads(out.read_text())["precisions"]
    assert set(data) == {"bf16", "fp8", "int8", "nf4"}
    weights = {p: data[p]["configs"][0]["weight_bytes"] for p in data}
    assert weights["nf4"] < weights["fp8"] < weights["bf16"] and weights["int8"] < weights["bf16"]
    assert all(len(v["configs"]) == 3 and "flux_dev_peak" in v["fit"] for v in data.values())
