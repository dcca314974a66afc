"""Base models from the files ComfyUI users have: single-file checkpoints, split sets, fp8.

``inspect_files(base, text_encoders, vae)`` detects family, variant and storage from the
headers and checks that the parts fit; ``build_pipeline(set, tokenizer_dirs, dtype=...)``
builds the diffusers pipeline offline (configs from shapes and ``facts``, weights converted
with diffusers' single-file functions, tokenizers from local folders).
"""

from __future__ import annotations

from .assemble import build_pipeline, load_files
from .header import Header, read_header
from .inspect import VARIANTS, CheckpointSet, inspect_files

__all__ = [
    "VARIANTS",
    "CheckpointSet",
    "Header",
    "build_pipeline",
    "inspect_files",
    "load_files",
    "read_header",
]
