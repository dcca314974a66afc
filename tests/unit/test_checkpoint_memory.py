"""Memory while reading a checkpoint's tensors (lycoris_core/checkpoints/storage.py).

Tensors kept as stored come from the file's memory map; tensors that are cast or dequantised
must not also leave their stored bytes resident (mapped file pages). Measured with the
kernel's own counters (/proc/self/status RssFile, VmHWM reset through clear_refs), on files
of a few tens of MB written here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lycoris_core.checkpoints import read_header, storage
from lycoris_core.checkpoints.detect import Part

FP8 = torch.float8_e4m3fn
MB = 2**20
ROWS = COLS = 1024  # one weight: 1 MiB in fp8, 2 MiB in bf16
LAYERS = 16

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads Linux' /proc/self counters"
)


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"{key} not in /proc/self/status")


def _layers(weight_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for i in range(LAYERS):
        out[f"blocks.{i}.weight"] = (torch.randn(ROWS, COLS, generator=g) * 0.05).to(weight_dtype)
        out[f"blocks.{i}.bias"] = torch.randn(ROWS, generator=g).to(torch.bfloat16)
    return out


def _part(tmp_path: Path, name: str, tensors: dict[str, torch.Tensor]) -> Part:
    path = tmp_path / name
    save_file(tensors, str(path))
    return Part(read_header(path), "", "bfl_flux")


def _touch(tensors: dict[str, torch.Tensor]) -> None:
    for t in tensors.values():
        t.reshape(-1).view(torch.uint8)[::4096].sum()  # one byte per page


def test_upcast_fp8_leaves_no_file_pages_resident(tmp_path) -> None:
    """fp8 weights upcast to bf16 while the bf16 biases stay mapped: the fp8 bytes are not
    resident beside their copies. The same counter sees a kept fp8 read's pages."""
    src = _layers(FP8)
    weights = LAYERS * ROWS * COLS  # bytes in fp8
    part = _part(tmp_path, "fp8.safetensors", src)

    before = _status("RssFile")
    upcast = storage.read_part(part, torch.bfloat16, keep_fp8=False)
    _touch(upcast)
    grown = _status("RssFile") - before
    assert grown < weights / 4, f"file pages grew {grown / MB:.1f} MiB for upcast copies"
    for key, ref in src.items():
        assert upcast[key].dtype == torch.bfloat16
        assert torch.equal(upcast[key], ref.to(torch.bfloat16)), key  # the file read back

    before = _status("RssFile")
    kept = storage.read_part(part, torch.bfloat16, keep_fp8=True)
    _touch(kept)
    grown = _status("RssFile") - before
    assert grown > 0.75 * weights, f"kept fp8 weights mapped: only {grown / MB:.1f} MiB seen"
    assert all(kept[k].dtype == FP8 for k in src if k.endswith("weight"))


def test_cast_peak_is_the_copies_not_the_file_as_well(tmp_path) -> None:
    """bf16 file read as fp32: the peak is the fp32 copies plus about one tensor, not the
    whole file's bytes on top (as reading through the map gave). The copies are 36 MiB each,
    above glibc's largest mmap threshold (32 MiB), so each is fresh memory whatever earlier
    tests left in the heap."""
    side, layers = 3072, 3
    g = torch.Generator().manual_seed(2)
    src = {f"w{i}": torch.randn(side, side, generator=g).to(torch.bfloat16) for i in range(layers)}
    part = _part(tmp_path, "bf16.safetensors", src)
    one = side * side * 2  # one tensor as stored
    copies, file_bytes = 2 * one * layers, one * layers
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    start = _status("VmRSS")
    out = storage.read_part(part, torch.float32, keep_fp8=True)
    peak = _status("VmHWM") - start
    assert {t.dtype for t in out.values()} == {torch.float32}
    assert torch.equal(out["w1"], src["w1"].float())  # the file read back
    # copies + one tensor of scratch + slack; reads through the map add file_bytes on top
    limit = copies + one + file_bytes / 3
    assert peak < limit, f"peak {peak / MB:.1f} MiB, copies {copies / MB:.1f} MiB"


def test_scaled_fp8_dequantised_in_slices(tmp_path, monkeypatch) -> None:
    """ComfyUI's scaled fp8: ``weight.float() * scale_weight`` per element, computed over
    several slices (one not full) here; scales and the marker are not model tensors."""
    monkeypatch.setattr(storage, "_DEQUANT_SLICE", 1000)
    g = torch.Generator().manual_seed(1)
    q = (torch.randn(37, 129, generator=g) * 100).to(FP8)
    scale = torch.tensor(0.0123, dtype=torch.float32)
    bias = torch.randn(37, generator=g).to(torch.bfloat16)
    part = _part(
        tmp_path,
        "scaled.safetensors",
        {
            "scaled_fp8": torch.empty(2, dtype=FP8),
            "img_in.weight": q,
            "img_in.scale_weight": scale,
            "img_in.scale_input": torch.tensor(1.0),
            "img_in.bias": bias,
        },
    )
    out = storage.read_part(part, torch.bfloat16, keep_fp8=True)
    assert sorted(out) == ["img_in.bias", "img_in.weight"]
    want = (q.float() * 0.0123).to(torch.bfloat16)
    assert out["img_in.weight"].dtype == torch.bfloat16
    torch.testing.assert_close(out["img_in.weight"], want, rtol=2.0**-8, atol=0.0)
    assert torch.equal(out["img_in.bias"], bias)
