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
    proc = run("demo", "--out", str(out), cwd=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_demo_main_job(demo):
    out, stdout = demo
    report = json.loads((out / "demo_report.json").read_text())
    assert report["base_unchanged_after"] is True
    assert len(report["coverage"]["layers"]) == 30
    for row in report["rows"]:
        assert row["merge_vs_lycoris_forward"] < 1e-5 and row["dynamic_vs_lycoris_forward"] < 1e-5
    assert report["rows"][0]["strength0_bitwise_base"] is True
    assert report["rows"][2]["change_vs_base"] > 1e-3
    assert "30 layers wrapped" in stdout


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
