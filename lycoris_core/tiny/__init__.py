"""Tiny random-weight diffusers pipelines, one per model family.

Tests, demos and benchmarks need complete pipelines of the real diffusers classes
(``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``, ``StableDiffusion3Pipeline``,
``FluxPipeline``) without downloading anything. This package builds them in memory from
small configs: the denoisers keep the real architectures (cross-attention UNets, the SD3
MMDiT, Flux double and single blocks) with small, factorisable widths (32 and 64), so that
adapter code (LoKr factor splitting, BOFT butterflies, ...) meets the same module layout
as on the full-size models.

Modules: ``vocabularies`` (CLIP BPE and T5 Unigram tokenizers built locally from a word
list), ``encoders`` (text encoders, VAE), ``denoisers`` (UNets, MMDiT, Flux transformer
config), ``schedulers``, ``pipelines`` (assembly per family, ``build_pipeline``,
``make_tiny``), ``inputs`` (a denoiser's forward inputs).

Weights depend only on ``(family, seed)``: every component is built under its own seed,
inside ``torch.random.fork_rng`` so the caller's RNG state is left untouched.
"""

from .denoisers import flux_transformer_config
from .inputs import denoiser_inputs, denoiser_of
from .pipelines import DEFAULT_SIZE, FAMILIES, build_pipeline, make_tiny
from .vocabularies import CLIP_MAX_LENGTH, T5_MAX_LENGTH

__all__ = [
    "CLIP_MAX_LENGTH",
    "DEFAULT_SIZE",
    "FAMILIES",
    "T5_MAX_LENGTH",
    "build_pipeline",
    "denoiser_inputs",
    "denoiser_of",
    "flux_transformer_config",
    "make_tiny",
]
