"""Training under `accelerate launch` with 2 CPU processes (gloo): accelerate's DDP syncs."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from lycoris_core.config import SEED_EXAMPLE
from lycoris_core.tiny import make_tiny
from lycoris_core.training.synthetic import make_demo_dataset

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def file_hash(path: Path) -> str:
    """The same digest as TrainResult.network_sha256, from the saved fp32 file."""
    h = hashlib.sha256()
    for key, tensor in sorted(load_file(str(path)).items()):
        h.update(key.encode())
        h.update(tensor.float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def train_cmd(
    tmp: Path, out: Path, launcher: list[str], extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    args = [
        "-m",
        "lycoris_core",
        "train",
        "--base",
        str(tmp / "flux"),
        "--config",
        str(tmp / "cfg.json"),
        "--data",
        str(tmp / "data"),
        "--resolution",
        "32",
        "--steps",
        "4",
        "--lr",
        "1e-3",
        "--save-every",
        "2",
        "--out",
        str(out),
        "--json",
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        launcher + args, capture_output=True, text=True, timeout=300, cwd=tmp, env=env
    )


def launcher() -> list[str]:
    return [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
    ]


def test_two_processes_agree_and_only_rank_0_writes(tmp_path):
    make_tiny("flux", tmp_path / "flux")
    make_demo_dataset(tmp_path / "data", count=4, size=32)
    (tmp_path / "cfg.json").write_text(json.dumps(SEED_EXAMPLE))
    proc = train_cmd(tmp_path, tmp_path / "ddp" / "a.safetensors", launcher())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    hashes = re.findall(r'"network_sha256": "([0-9a-f]+)"', proc.stdout)
    assert len(hashes) == 2 and hashes[0] == hashes[1]  # both ranks hold the same adapter
    assert file_hash(tmp_path / "ddp" / "a.safetensors") == hashes[0]
    steps = sorted(p.name for p in (tmp_path / "ddp" / "a-checkpoints").iterdir())
    assert steps == ["step-000002", "step-000004"]
    single = train_cmd(tmp_path, tmp_path / "one" / "a.safetensors", [sys.executable])
    assert single.returncode == 0, single.stderr[-3000:]
    # two processes averaged gradients over different batches: not the single-process result
    assert re.findall(r'"network_sha256": "([0-9a-f]+)"', single.stdout)[0] != hashes[0]
    # two processes resumed from the step-2 checkpoint (each restores its own RNG and noise
    # generator states) end where the uninterrupted two-process run ended
    step2 = tmp_path / "ddp" / "a-checkpoints" / "step-000002"
    resumed = train_cmd(
        tmp_path, tmp_path / "resumed" / "a.safetensors", launcher(), ("--resume", str(step2))
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert re.findall(r'"network_sha256": "([0-9a-f]+)"', resumed.stdout) == hashes
