"""Device policy on a CPU-only machine, offload checks, out-of-memory advice."""

from __future__ import annotations

import pytest
import torch

from lycoris_core.device import (
    DeviceError,
    OutOfMemoryError,
    oom_advice,
    place_pipeline,
    resolve_device,
    resolve_dtype,
    training_attention,
)


def test_auto_device_and_dtype_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("this checks the CPU-only policy")
    assert resolve_device("auto").type in ("cpu", "mps")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16") == torch.bfloat16 and resolve_dtype("float16") == torch.float16


def test_bad_names_are_typed_errors():
    with pytest.raises(DeviceError, match="use one of auto, fp32, fp16, bf16"):
        resolve_dtype("int8")
    with pytest.raises(DeviceError, match="not a device name"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            resolve_device("cuda")


def test_offload_needs_a_gpu():
    class Pipe:
        def to(self, device):
            self.device = device

    pipe = Pipe()
    place_pipeline(pipe, torch.device("cpu"), "none")
    assert pipe.device == torch.device("cpu")
    with pytest.raises(DeviceError, match=r"offload 'model' .* device is cpu"):
        place_pipeline(pipe, torch.device("cpu"), "model")
    with pytest.raises(DeviceError, match="not a mode"):
        place_pipeline(pipe, torch.device("cpu"), "disk")


def test_out_of_memory_is_rewritten_with_advice():
    with pytest.raises(OutOfMemoryError) as err:
        with oom_advice("sampling 1x1024x1024", model_bytes=2**31, adapter_bytes=2**28):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    msg = str(err.value)
    assert "sampling 1x1024x1024" in msg and "2.00 GB" in msg and "0.25 GB" in msg
    assert "lower resolution" in msg and "offload 'model'" in msg
    assert isinstance(err.value.__cause__, torch.OutOfMemoryError)


def test_training_attention_keeps_cuda_attention_off_cudnn():
    # cuDNN attention gave NaN gradients on an H100 (see training_attention); the flags are
    # process-wide switches, checkable without a GPU.
    before = torch.backends.cuda.cudnn_sdp_enabled()
    with training_attention(torch.device("cuda")):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled()
        assert torch.backends.cuda.mem_efficient_sdp_enabled()
        assert torch.backends.cuda.math_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
    with training_attention(torch.device("cpu")):
        assert torch.backends.cuda.cudnn_sdp_enabled() == before
