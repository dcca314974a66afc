"""Tiny random-weight diffusers pipelines, one per model family.

Tests, demos and benchmarks need complete pipelines of the real diffusers classes
(``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``, ``StableDiffusion3Pipeline``,
``FluxPipeline``) without downloading anything. This module builds them in memory from
small configs: the denoisers keep the real architectures (cross-attention UNets, the SD3
MMDiT, Flux double and single blocks) with small, factorisable widths (32 and 64), so that
adapter code (LoKr factor splitting, BOFT butterflies, ...) meets the same module layout
as on the full-size models.

Tokenizers are built locally with the ``tokenizers`` backend of ``transformers``: a
byte-level BPE for CLIP (whole-word merges over a fixed word list, so any text encodes
without unknown tokens) and a Unigram vocabulary for T5.

Weights depend only on ``(family, seed)``: every component is built under its own seed,
inside ``torch.random.fork_rng`` so the caller's RNG state is left untouched.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PNDMScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers import pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from .errors import LycorisError
from .io import atomic_folder
from .picture_vae import picture_vae

logger = logging.getLogger(__name__)

__all__ = [
    "CLIP_MAX_LENGTH",
    "DEFAULT_SIZE",
    "FAMILIES",
    "T5_MAX_LENGTH",
    "build_pipeline",
    "flux_transformer_config",
    "make_tiny",
]

FAMILIES: tuple[str, ...] = ("sd15", "sdxl", "sd3", "flux")

# Image side (pixels) used for sampling; the tiny VAEs downsample by 2, so the latents are
# 16x16 (UNets: one further downsampling; SD3: 2x2 patches; Flux: 2x2 packing).
DEFAULT_SIZE: dict[str, int] = {"sd15": 32, "sdxl": 32, "sd3": 32, "flux": 32}

CLIP_MAX_LENGTH = 77
# FluxPipeline pads T5 prompts to max_sequence_length=512 by default (its maximum) and
# StableDiffusion3Pipeline to 256: the tokenizer accepts up to 512.
T5_MAX_LENGTH = 512

_CLIP_HIDDEN = 32  # CLIP text encoders: hidden size, also their projection size
_VAE_SCALING = 2.5  # picture latents (3 used directions) to about unit variance
_T5_DIM = 64  # T5 d_model = joint_attention_dim of SD3 and Flux (= 2 * CLIP hidden for SD3)

# Fixed word list of both vocabularies: common prompt words, so typical prompts encode to
# whole-word tokens. Any other text still encodes (character pieces), never to <unk> for
# ASCII input.
_WORD_LIST = """
    a an the of in on at with and or by for from to under over near into is are this that
    photo photograph picture image painting drawing sketch illustration render portrait
    landscape closeup close up view shot scene style art artwork digital oil watercolor
    pencil anime cartoon realistic photorealistic detailed highly high quality best masterpiece
    cinematic lighting light dark bright soft sharp focus blur bokeh background foreground
    cat cats dog dogs bird birds horse fish animal person people man woman girl boy child
    face eyes hair hands smile robot car house city street road building tree trees forest
    flower flowers garden mountain mountains river lake sea ocean beach sky cloud clouds sun
    moon star stars night day morning evening sunset sunrise rain snow winter summer spring
    autumn fire water stone wood glass metal gold silver red green blue yellow orange purple
    pink black white gray brown colorful small large big tiny old young new beautiful cute
    sitting standing running walking flying wearing holding looking table chair window door
    room kitchen castle bridge boat ship train space planet astronaut dragon wizard knight
    hat dress shirt jacket food cake apple coffee cup book
"""
_WORDS: tuple[str, ...] = tuple(_WORD_LIST.split())


def _component_seed(seed: int, family: str, component: str) -> int:
    """A 63-bit seed derived from (seed, family, component), distinct for each triple."""
    digest = hashlib.sha256(f"{seed}:{family}:{component}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def _seeded(seed: int, family: str, component: str, factory: Callable[[], Any]) -> Any:
    """Build one component under its own seed (the caller runs inside fork_rng)."""
    torch.manual_seed(_component_seed(seed, family, component))
    return factory()


# ---------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------


_VOCAB_MULTIPLE = 64


def _letter_pairs() -> list[tuple[str, str]]:
    return [(a, b) for a in string.ascii_lowercase for b in string.ascii_lowercase]


def _bpe_apply(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges to ``pieces``: repeatedly merge the adjacent pair of lowest rank."""
    pieces = list(pieces)
    while len(pieces) > 1:
        best = min(
            range(len(pieces) - 1),
            key=lambda i: ranks.get((pieces[i], pieces[i + 1]), len(ranks)),
        )
        if (pieces[best], pieces[best + 1]) not in ranks:
            break
        pieces[best : best + 2] = [pieces[best] + pieces[best + 1]]
    return pieces


def _clip_tokenizer() -> CLIPTokenizer:
    """Byte-level BPE in the CLIP layout: 256 byte symbols, their ``</w>`` forms, word merges.

    Every listed word becomes a single token: for each word, the merges known so far are
    applied and new merges (ranked after all earlier ones, so earlier words keep their
    tokenization) join the remaining pieces left to right. The start and end tokens close
    the vocabulary, as in the real CLIP vocabulary.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for symbol in alphabet:
        vocab[symbol] = len(vocab)
    for symbol in alphabet:
        vocab[symbol + "</w>"] = len(vocab)
    ranks: dict[tuple[str, str], int] = {}
    for word in _WORDS:
        pieces = _bpe_apply([*word[:-1], word[-1] + "</w>"], ranks)
        current = pieces[0]
        for piece in pieces[1:]:
            ranks[(current, piece)] = len(ranks)
            current += piece
            vocab.setdefault(current, len(vocab))
    # Round the vocabulary (and so the embedding rows) up to a multiple of _VOCAB_MULTIPLE
    # with two-letter word tokens, ranked after the word merges.
    for first, second in _letter_pairs():
        if (len(vocab) + 2) % _VOCAB_MULTIPLE == 0:
            break
        if first + second + "</w>" not in vocab:
            ranks[(first, second + "</w>")] = len(ranks)
            vocab[first + second + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    merges = sorted(ranks, key=ranks.__getitem__)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)


def _t5_tokenizer() -> T5Tokenizer:
    """Unigram vocabulary in the T5 layout: <pad>=0, </s>=1, <unk>=2, then pieces.

    Whole words (with the ``▁`` word-start marker) score higher than single characters, so
    listed words encode as one piece and anything else falls back to characters.
    """
    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    seen = {piece for piece, _ in vocab}
    for word in _WORDS:
        piece = "▁" + word
        if piece not in seen:
            seen.add(piece)
            vocab.append((piece, -3.0))
    for word in _WORDS:  # the same words inside other text (after "-", "(", ...)
        if word not in seen:
            seen.add(word)
            vocab.append((word, -4.0))
    for char in string.ascii_letters + string.digits + string.punctuation:
        for piece in (char, "▁" + char):
            if piece not in seen:
                seen.add(piece)
                vocab.append((piece, -8.0))
    for first, second in _letter_pairs():  # round up to a multiple of _VOCAB_MULTIPLE
        if len(vocab) % _VOCAB_MULTIPLE == 0:
            break
        if "▁" + first + second not in seen:
            seen.add("▁" + first + second)
            vocab.append(("▁" + first + second, -6.0))
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=T5_MAX_LENGTH)


# ---------------------------------------------------------------------------------------
# Text encoders, VAE, denoisers
# ---------------------------------------------------------------------------------------


def _clip_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=_CLIP_HIDDEN,
        intermediate_size=2 * _CLIP_HIDDEN,
        projection_dim=_CLIP_HIDDEN,
        num_hidden_layers=2,  # SDXL and SD3 read the penultimate hidden state
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _t5_encoder(tokenizer: T5Tokenizer) -> T5EncoderModel:
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=_T5_DIM,
        d_kv=16,
        d_ff=2 * _T5_DIM,
        num_layers=2,
        num_decoder_layers=0,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",  # T5 v1.1, as in SD3 and Flux
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config)


def _vae(latent_channels: int, shift_factor: float | None) -> AutoencoderKL:
    """The picture VAE (its latents are the image at half size), scaled to unit-ish range."""
    return picture_vae(latent_channels, _VAE_SCALING, shift_factor)


def _sd15_unet() -> UNet2DConditionModel:
    # SD 1.5 layout: cross-attention in the high-resolution blocks, a plain lowest block.
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=32,
        cross_attention_dim=_CLIP_HIDDEN,
        attention_head_dim=4,  # diffusers' name for the number of heads here
    )


_SDXL_TIME_EMBED_DIM = 16


def _sdxl_unet() -> UNet2DConditionModel:
    # SDXL layout: plain first block, cross-attention below, linear projections, text_time
    # conditioning on the pooled CLIP-G embedding plus 6 size/crop numbers.
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        transformer_layers_per_block=(1, 2),
        norm_num_groups=32,
        cross_attention_dim=2 * _CLIP_HIDDEN,  # both text encoders' hidden states, concatenated
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=_SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * _SDXL_TIME_EMBED_DIM + _CLIP_HIDDEN,
    )


def _sd3_transformer() -> SD3Transformer2DModel:
    return SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=_T5_DIM,
        caption_projection_dim=64,  # = num_attention_heads * attention_head_dim
        pooled_projection_dim=2 * _CLIP_HIDDEN,  # both CLIP projections, concatenated
        pos_embed_max_size=16,
    )


def _flux_rope_axes(attention_head_dim: int) -> tuple[int, int, int]:
    """Split a head dim over the 3 RoPE axes like FLUX.1 (16, 56, 56 of 128); all even."""
    if attention_head_dim < 8 or attention_head_dim % 4:
        raise LycorisError(
            f"flux_transformer_config: attention_head_dim={attention_head_dim} cannot be split "
            "over the 3 rotary axes; use a multiple of 4 that is at least 8, or pass "
            "axes_dims_rope explicitly (3 even numbers summing to attention_head_dim)."
        )
    first = max(2, (attention_head_dim // 8) // 2 * 2)
    rest = attention_head_dim - first
    second = (rest // 2) // 2 * 2
    return (first, second, rest - second)


def flux_transformer_config(**overrides: Any) -> dict[str, Any]:
    """The tiny ``FluxTransformer2DModel`` config (FLUX.1-dev layout) as a dict.

    Keyword overrides replace entries, e.g. to build a larger random transformer for a
    benchmark: ``FluxTransformer2DModel(**flux_transformer_config(num_layers=4, ...))``.
    When ``attention_head_dim`` is overridden without ``axes_dims_rope``, the rotary axes
    are re-derived so that they still sum to the head dim.
    """
    allowed = set(inspect.signature(FluxTransformer2DModel.__init__).parameters) - {"self"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise LycorisError(
            f"flux_transformer_config: unknown option(s) {unknown}; valid options are "
            f"{sorted(allowed)}."
        )
    config: dict[str, Any] = {
        "patch_size": 1,
        "in_channels": 64,  # 16 latent channels packed 2x2
        "out_channels": None,
        "num_layers": 2,
        "num_single_layers": 2,
        "attention_head_dim": 32,
        "num_attention_heads": 2,
        "joint_attention_dim": _T5_DIM,
        "pooled_projection_dim": _CLIP_HIDDEN,  # CLIP pooler output
        "guidance_embeds": True,
    }
    config.update(overrides)
    if "axes_dims_rope" in overrides:
        axes = tuple(int(a) for a in overrides["axes_dims_rope"])
        if sum(axes) != config["attention_head_dim"] or any(a % 2 for a in axes):
            raise LycorisError(
                f"flux_transformer_config: axes_dims_rope={axes} must be even numbers summing "
                f"to attention_head_dim={config['attention_head_dim']}."
            )
        config["axes_dims_rope"] = axes
    else:
        config["axes_dims_rope"] = _flux_rope_axes(int(config["attention_head_dim"]))
    return config


# ---------------------------------------------------------------------------------------
# Schedulers
# ---------------------------------------------------------------------------------------

_SD_BETAS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
}


def _sd15_scheduler() -> PNDMScheduler:
    return PNDMScheduler(**_SD_BETAS, skip_prk_steps=True, set_alpha_to_one=False)


def _sdxl_scheduler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(
        **_SD_BETAS,
        prediction_type="epsilon",
        timestep_spacing="leading",
        interpolation_type="linear",
        use_karras_sigmas=False,
    )


def _sd3_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def _flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


# ---------------------------------------------------------------------------------------
# Pipelines
# ---------------------------------------------------------------------------------------


def _build_sd15(seed: int) -> DiffusionPipeline:
    tokenizer = _clip_tokenizer()
    return StableDiffusionPipeline(
        vae=_seeded(seed, "sd15", "vae", lambda: _vae(4, None)),
        text_encoder=_seeded(
            seed, "sd15", "text_encoder", lambda: CLIPTextModel(_clip_config(tokenizer))
        ),
        tokenizer=tokenizer,
        unet=_seeded(seed, "sd15", "unet", _sd15_unet),
        scheduler=_sd15_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sdxl(seed: int) -> DiffusionPipeline:
    tokenizer = _clip_tokenizer()
    tokenizer_2 = _clip_tokenizer()
    return StableDiffusionXLPipeline(
        vae=_seeded(seed, "sdxl", "vae", lambda: _vae(4, None)),
        text_encoder=_seeded(
            seed, "sdxl", "text_encoder", lambda: CLIPTextModel(_clip_config(tokenizer))
        ),
        text_encoder_2=_seeded(
            seed,
            "sdxl",
            "text_encoder_2",
            lambda: CLIPTextModelWithProjection(_clip_config(tokenizer_2)),
        ),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=_seeded(seed, "sdxl", "unet", _sdxl_unet),
        scheduler=_sdxl_scheduler(),
        add_watermarker=False,
    )


def _build_sd3(seed: int) -> DiffusionPipeline:
    tokenizer = _clip_tokenizer()
    tokenizer_2 = _clip_tokenizer()
    tokenizer_3 = _t5_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=_seeded(seed, "sd3", "transformer", _sd3_transformer),
        scheduler=_sd3_scheduler(),
        vae=_seeded(seed, "sd3", "vae", lambda: _vae(16, 0.0)),
        text_encoder=_seeded(
            seed,
            "sd3",
            "text_encoder",
            lambda: CLIPTextModelWithProjection(_clip_config(tokenizer)),
        ),
        tokenizer=tokenizer,
        text_encoder_2=_seeded(
            seed,
            "sd3",
            "text_encoder_2",
            lambda: CLIPTextModelWithProjection(_clip_config(tokenizer_2)),
        ),
        tokenizer_2=tokenizer_2,
        text_encoder_3=_seeded(seed, "sd3", "text_encoder_3", lambda: _t5_encoder(tokenizer_3)),
        tokenizer_3=tokenizer_3,
    )


def _build_flux(seed: int) -> DiffusionPipeline:
    tokenizer = _clip_tokenizer()
    tokenizer_2 = _t5_tokenizer()
    return FluxPipeline(
        scheduler=_flux_scheduler(),
        vae=_seeded(seed, "flux", "vae", lambda: _vae(16, 0.0)),
        text_encoder=_seeded(
            seed, "flux", "text_encoder", lambda: CLIPTextModel(_clip_config(tokenizer))
        ),
        tokenizer=tokenizer,
        text_encoder_2=_seeded(seed, "flux", "text_encoder_2", lambda: _t5_encoder(tokenizer_2)),
        tokenizer_2=tokenizer_2,
        transformer=_seeded(
            seed,
            "flux",
            "transformer",
            lambda: FluxTransformer2DModel(**flux_transformer_config()),
        ),
    )


_BUILDERS: dict[str, Callable[[int], DiffusionPipeline]] = {
    "sd15": _build_sd15,
    "sdxl": _build_sdxl,
    "sd3": _build_sd3,
    "flux": _build_flux,
}


def _check_family(family: str) -> None:
    if family not in _BUILDERS:
        raise LycorisError(
            f"Unknown model family {family!r}; valid families are: {', '.join(FAMILIES)}."
        )


def build_pipeline(
    family: str, seed: int = 0, dtype: torch.dtype = torch.float32
) -> DiffusionPipeline:
    """Build the tiny random-weight pipeline of ``family`` in memory.

    Same ``(family, seed)`` gives bitwise identical weights; the global torch RNG state of
    the caller is preserved. Weights are initialised in float32 and then cast to ``dtype``.
    """
    _check_family(family)
    with torch.random.fork_rng(devices=[]):
        pipe = _BUILDERS[family](seed)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    logger.debug("built tiny %s pipeline (seed=%d, dtype=%s)", family, seed, dtype)
    return pipe


def make_tiny(family: str, out_dir: str | os.PathLike[str], seed: int = 0) -> Path:
    """Build the tiny ``family`` pipeline and save it (safetensors) to ``out_dir``.

    The pipeline is written into a temporary sibling folder and renamed into place, so
    ``out_dir`` either holds a complete pipeline or does not exist. ``out_dir`` must not
    exist yet or be an empty folder. Returns ``out_dir`` as a ``Path``; it loads offline
    with ``diffusers.DiffusionPipeline.from_pretrained(out_dir)``.
    """
    _check_family(family)
    target = Path(out_dir)
    with atomic_folder(target) as staging:
        build_pipeline(family, seed=seed).save_pretrained(staging, safe_serialization=True)
    logger.info("saved tiny %s pipeline (seed=%d) to %s", family, seed, target)
    return target


def denoiser_of(pipe: DiffusionPipeline) -> torch.nn.Module:
    """The pipeline's denoiser: its ``transformer`` or ``unet``."""
    model = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    if model is None:
        raise LycorisError(f"{type(pipe).__name__} has no 'transformer' or 'unet' component")
    return model


def denoiser_inputs(
    model: torch.nn.Module, seed: int = 1, dtype: torch.dtype = torch.float32, tokens: int = 64
) -> dict[str, Any]:
    """Deterministic random keyword inputs for one forward of a tiny (or bigger) denoiser.

    Supports ``UNet2DConditionModel`` (SD 1.x and SDXL conditioning) and
    ``FluxTransformer2DModel``; `tokens` is the number of image tokens (a square latent of
    that many positions for the UNet).
    """
    g = torch.Generator().manual_seed(seed)
    cfg = model.config

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    side = max(2, round(tokens**0.5))
    if type(model).__name__ == "UNet2DConditionModel":
        out: dict[str, Any] = {
            "sample": rnd(1, cfg.in_channels, side, side),
            "timestep": torch.tensor([10]),
            "encoder_hidden_states": rnd(1, 6, cfg.cross_attention_dim),
            "return_dict": False,
        }
        if cfg.addition_embed_type == "text_time":
            n = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            out["added_cond_kwargs"] = {"text_embeds": rnd(1, n), "time_ids": rnd(1, 6)}
        return out
    if type(model).__name__ == "FluxTransformer2DModel":
        txt = 6
        return {
            "hidden_states": rnd(1, tokens, cfg.in_channels),
            "encoder_hidden_states": rnd(1, txt, cfg.joint_attention_dim),
            "pooled_projections": rnd(1, cfg.pooled_projection_dim),
            "timestep": torch.tensor([0.5], dtype=dtype),
            "img_ids": torch.zeros(tokens, 3),
            "txt_ids": torch.zeros(txt, 3),
            "guidance": torch.tensor([3.5], dtype=dtype) if cfg.guidance_embeds else None,
            "return_dict": False,
        }
    raise LycorisError(f"denoiser_inputs: no input recipe for {type(model).__name__}")
