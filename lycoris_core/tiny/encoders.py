"""The tiny pipelines' text encoders (CLIP, T5) and VAE, and the widths they fix."""

from __future__ import annotations

from diffusers import AutoencoderKL
from transformers import CLIPTextConfig, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

from ..picture_vae import picture_vae
from .vocabularies import CLIP_MAX_LENGTH

_CLIP_HIDDEN = 32  # CLIP text encoders: hidden size, also their projection size
_VAE_SCALING = 2.5  # picture latents (3 used directions) to about unit variance
_T5_DIM = 64  # T5 d_model = joint_attention_dim of SD3 and Flux (= 2 * CLIP hidden for SD3)


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
