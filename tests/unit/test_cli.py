"""The command line, run as users run it: python -m lycoris_core ..."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lycoris_core", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    proc = run("demo", "--out", str(out), "--steps", "300", "--base-steps", "200", cwd=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_demo_main_job_learns(demo):
    out, stdout = demo
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["steps"] == 300 and summary["learned"] is True
    assert summary["fixed_loss"]["trained"] < summary["fixed_loss"]["base"]
    c = summary["pixel_correlation_to_training_set"]  # on the decoded samples
    assert c["0.0"] < c["0.5"] < c["1.0"]  # more like the training images as strength grows
    assert c["1.0"] > c["0.0"] + 0.2
    d = summary["latent_distance_to_training_set"]
    assert d["1.0"] < d["0.5"] < d["0.0"]  # closer to the training set as strength grows
    assert summary["merged_vs_dynamic_max_abs"] < 1e-4
    for name in ("samples_grid", "loss_curve", "inspect"):
        assert Path(summary["files"][name]).is_file()
    grid = Image.open(summary["files"]["samples_grid"])  # training row + 3 strengths, 128 px
    assert grid.size[1] >= 4 * 128 and grid.size[0] > 4 * 128
    assert "30 layers wrapped" in stdout and "learned: True" in stdout


def test_inspect_and_sample(demo):
    out, _ = demo
    adapter, base = out / "demo_lokr.safetensors", out / "tiny-flux"
    proc = run("inspect", str(adapter), "--base", str(base), "--json", cwd=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout)
    assert info["layers"] == 30 and len(info["matched"]) == 30 and info["unmatched"] == []
    assert info["algorithms"] == {"lokr": 30} and info["config"]["algo"] == "lokr"
    png = out / "cat.png"
    proc = run(
        "sample",
        "--base",
        str(base),
        "--adapter",
        f"{adapter}:0.5",
        "--prompt",
        "a cat",
        "--steps",
        "2",
        "--batch",
        "2",
        "--seed",
        "3",
        "--out",
        str(png),
        "--json",
        cwd=out,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["seeds"] == [3, 4] and result["patched_layers"] == 30
    assert Image.open(png).size == (64, 32)  # two 32x32 images in one row


def test_errors_exit_2_with_the_message(demo):
    out, _ = demo
    proc = run(
        "sample",
        "--base",
        str(out / "tiny-flux"),
        "--width",
        "30",
        "--out",
        str(out / "x.png"),
        cwd=out,
    )
    assert proc.returncode == 2
    assert "width 30 is not a multiple of 4" in proc.stderr and "Traceback" not in proc.stderr
    proc = run("inspect", str(out / "missing.safetensors"), cwd=out)
    assert proc.returncode == 2 and "file not found" in proc.stderr
