"""Architecture facts that a checkpoint's tensor shapes do not tell.

Widths, depths, block types, vocabulary sizes and most other hyperparameters are read from the
file's shapes (see ``configs.py``). What is left — attention head counts where no tensor has the
head size, activations, norm group counts, VAE latent scaling, sample sizes, T5's relative
attention distance, the SD2 prediction type — are facts of the published models, collected here
with their sources, in two profiles:

* ``standard``: the released models. Sources: the original configs of the CompVis/Stability
  repositories (``configs/stable-diffusion/v1-inference.yaml``: ``num_heads: 8``,
  ``scale_factor: 0.18215``; ``v2-inference-v.yaml``: ``num_head_channels: 64``,
  ``parameterization: "v"``, ``use_linear_in_transformer``; ``sd_xl_base.yaml``:
  ``num_head_channels: 64``, ``scale_factor: 0.13025``), the SD3 and SD3.5 model cards and
  MMDiT reference code (64-wide heads; VAE ``scaling_factor 1.5305``, ``shift_factor 0.0609``),
  Black Forest Labs' ``flux`` repository (``src/flux/model.py`` FluxParams ``axes_dim
  [16, 56, 56]``; ``ae.py`` ``scale_factor 0.3611``, ``shift_factor 0.1159``), the CLIP text
  configs of ``openai/clip-vit-large-patch14`` (12 heads of 64, quick_gelu) and LAION's OpenCLIP
  ViT-H/14 and ViT-bigG/14 (heads of 64, gelu), and ``google/t5-v1_1-xxl``
  (``relative_attention_max_distance 128``). Every released VAE uses 32 norm groups.
* ``tiny``: this project's tiny models (``lycoris_core/tiny.py``, ``picture_vae.py``), whose
  widths are far below any released model's, so the profile is chosen from the widths.

Any value can still be overridden per component by the caller (``config_overrides``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    name: str
    unet_heads_sd1: int  # SD1.x: a fixed number of heads per attention block
    unet_head_dim: int  # SD2.x / SDXL: heads = channels / head_dim
    sd3_head_dim: int  # SD3 without qk-norm (the norm's size gives it otherwise)
    clip_head_dim: int
    clip_act_l: str  # CLIP-L (SD1.x, SDXL/SD3 first encoder, Flux)
    clip_act_big: str  # OpenCLIP ViT-H (SD2) and ViT-bigG (SDXL, SD3)
    t5_max_distance: int
    vae_groups: int
    unet_sample: dict[str, int]  # latent sample size per variant
    vae_scaling: dict[str, tuple[float, float | None]]  # family -> (scaling, shift)


STANDARD = Profile(
    name="standard",
    unet_heads_sd1=8,
    unet_head_dim=64,
    sd3_head_dim=64,
    clip_head_dim=64,
    clip_act_l="quick_gelu",
    clip_act_big="gelu",
    t5_max_distance=128,
    vae_groups=32,
    unet_sample={"sd1": 64, "sd2": 96, "sdxl": 128, "sd3": 128},
    vae_scaling={
        "sd15": (0.18215, None),
        "sdxl": (0.13025, None),
        "sd3": (1.5305, 0.0609),
        "flux": (0.3611, 0.1159),
    },
)

# lycoris_core/tiny.py: UNet attention_head_dim=4 (SD1.5) and (2, 4) over (32, 64) channels
# (SDXL: 16-wide heads), SD3 4 heads of 16, CLIP 4 heads over 32, quick_gelu everywhere,
# T5 max distance 32; picture_vae.py: 1 norm group, scaling 2.5, shift 0 for SD3/Flux.
TINY = Profile(
    name="tiny",
    unet_heads_sd1=4,
    unet_head_dim=16,
    sd3_head_dim=16,
    clip_head_dim=8,
    clip_act_l="quick_gelu",
    clip_act_big="quick_gelu",
    t5_max_distance=32,
    vae_groups=1,
    unet_sample={"sd1": 16, "sd2": 16, "sdxl": 16, "sd3": 16},
    vae_scaling={
        "sd15": (2.5, None),
        "sdxl": (2.5, None),
        "sd3": (2.5, 0.0),
        "flux": (2.5, 0.0),
    },
)

PROFILES = {p.name: p for p in (STANDARD, TINY)}

# The narrowest released denoisers: SD UNets 320 model channels, SD3 medium 1536 wide (24
# heads of 64), FLUX.1 3072. Anything narrower is taken for this project's tiny layout.
_MIN_STANDARD_WIDTH = {"sd15": 320, "sdxl": 320, "sd3": 1536, "flux": 3072}


def profile_for(family: str, width: int, name: str | None = None) -> Profile:
    """The profile named `name`, else the one the denoiser width points to."""
    if name is not None:
        return PROFILES[name]
    return STANDARD if width >= _MIN_STANDARD_WIDTH[family] else TINY


# SD2.x: the 768-v models (v-prediction) and the 512-base models (epsilon) have the same
# tensors; the weights cannot tell them apart. v-prediction is the default (the 2.0/2.1
# 768 releases, the ones most used); ``prediction_type="epsilon"`` picks the base models.
SD2_DEFAULT_PREDICTION = "v_prediction"
