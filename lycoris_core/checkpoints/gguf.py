"""GGUF denoisers (city96's Flux/SD3 quantisations) through diffusers' GGUF support.

The ``gguf`` package is optional: without it a typed error says how to install it. With it,
the tensor shapes come from the GGUF header (``gguf.GGUFReader``), our config is written to a
temporary folder, and diffusers' ``from_single_file(..., quantization_config=
GGUFQuantizationConfig(compute_dtype))`` reads the weights, kept quantised.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelLoadError


def _reader(path: Path) -> Any:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ModelLoadError(
            f"{path}: GGUF files need the optional 'gguf' package: pip install gguf "
            "(in ComfyUI's Python environment), then load the file again"
        ) from None
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError/struct errors on bad files
        raise ModelLoadError(f"{path}: not a readable GGUF file ({exc}); re-download it") from None


def gguf_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names -> logical shapes (GGUF stores dimensions innermost first)."""
    reader = _reader(path)
    return {t.name: tuple(int(s) for s in reversed(list(t.shape))) for t in reader.tensors}


def load_gguf_denoiser(path: Path, dtype: torch.dtype) -> tuple[str, Any]:
    """(family, denoiser) of a GGUF Flux or SD3 file, its weights kept GGUF-quantised."""
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig, SD3Transformer2DModel

    from . import configs, facts

    shapes = gguf_shapes(path)
    if "double_blocks.0.img_attn.qkv.weight" in shapes:
        family, cls, cfg = "flux", FluxTransformer2DModel, configs.flux_config(shapes)
    elif "joint_blocks.0.x_block.attn.qkv.weight" in shapes:
        prof = facts.profile_for("sd3", shapes["x_embedder.proj.weight"][0])
        family, cls, cfg = "sd3", SD3Transformer2DModel, configs.sd3_config(shapes, prof)
    else:
        raise ModelLoadError(f"{path}: a GGUF file of an unsupported architecture (Flux, SD3 only)")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(
            json.dumps({"_class_name": cls.__name__, **cfg}), encoding="utf-8"
        )
        model = cls.from_single_file(
            str(path),
            config=tmp,
            local_files_only=True,
            torch_dtype=dtype,
            quantization_config=GGUFQuantizationConfig(compute_dtype=dtype),
        )
    return family, model
