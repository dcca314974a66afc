"""Original-layout tensors -> diffusers / transformers names.

diffusers' own single-file conversion functions (``diffusers.loaders.single_file_utils``) do
the UNet, VAE, OpenCLIP and SD3 transformer, fed with our configs so nothing is fetched. Three
parts are ours because diffusers' versions do not fit: HF-layout CLIP (diffusers dispatches
text encoders by shape and drops SD3's CLIP-L projection; here the prefix decides), T5 (its
tied embedding) and the BFL Flux transformer (diffusers hard-codes FLUX.1's 3072 width for
the single blocks; here the name map of :mod:`lycoris_core.layouts`, derived from the config,
gives every split).
"""

from __future__ import annotations

from typing import Any

import torch

from .detect import UNET, Part

Tensors = dict[str, torch.Tensor]


def _strip(state: Tensors, prefix: str) -> Tensors:
    n = len(prefix)
    return {k[n:]: v for k, v in state.items() if k.startswith(prefix)}


def unet(state: Tensors, part: Part, config: dict[str, Any]) -> Tensors:
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    body = _strip(state, part.prefix)
    return convert_ldm_unet_checkpoint({UNET + k: v for k, v in body.items()}, config)


def vae(state: Tensors, part: Part, config: dict[str, Any]) -> Tensors:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    body = _strip(state, part.prefix)
    return convert_ldm_vae_checkpoint(
        {"first_stage_model." + k: v for k, v in body.items()}, config
    )


def clip(state: Tensors, part: Part, with_projection: bool) -> Tensors:
    """HF CLIP names; the ``text_model.`` level as the transformers class wants it."""
    body = _strip(state, part.prefix)
    if part.layout == "open_clip":
        body = _open_clip(body, part)
    keep = ("text_model.", "text_projection.weight", "embeddings.", "encoder.", "final_layer_norm.")
    body = {k: v for k, v in body.items() if k.startswith(keep)}  # no logit_scale and the like
    inner = {
        (k[len("text_model.") :] if k.startswith("text_model.") else k): v for k, v in body.items()
    }
    proj = inner.pop("text_projection.weight", None)
    if not with_projection:  # CLIPTextModel (transformers 5): no text_model. level
        return inner
    out = {"text_model." + k: v for k, v in inner.items()}
    if proj is not None:
        out["text_projection.weight"] = proj
    return out


def _open_clip(body: Tensors, part: Part) -> Tensors:
    """OpenCLIP names -> HF names, with diffusers' ``convert_open_clip_checkpoint``."""
    from types import SimpleNamespace

    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    hidden = body["token_embedding.weight"].shape[1]
    stub = SimpleNamespace(config=SimpleNamespace(hidden_size=hidden))
    out = convert_open_clip_checkpoint(stub, {"m." + k: v for k, v in body.items()}, prefix="m.")
    if "text_projection" not in body:
        out.pop("text_projection.weight", None)
    return out


def t5(state: Tensors, part: Part) -> Tensors:
    body = _strip(state, part.prefix)
    body.setdefault("encoder.embed_tokens.weight", body["shared.weight"])  # tied in T5
    return body


def sd3(state: Tensors, part: Part) -> Tensors:
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    return convert_sd3_transformer_checkpoint_to_diffusers(_strip(state, part.prefix))


_LEAF = {"scale": "weight"}  # BFL's RMSNorms hold ``scale`` where diffusers' hold ``weight``


def flux(state: Tensors, part: Part, config: dict[str, Any]) -> Tensors:
    """BFL Flux names -> ``FluxTransformer2DModel`` names, by the layouts' name map.

    :func:`lycoris_core.layouts.denoiser_name_map` maps modules (row splits from `config`);
    each parameter of a module (weight, bias, norm scale) takes its module's rows and
    transform. Tensors outside the map are left out.
    """
    from ..layouts import apply_transform, denoiser_name_map

    names = denoiser_name_map("flux", config)
    out: Tensors = {}
    for key, tensor in _strip(state, part.prefix).items():
        module, _, leaf = key.rpartition(".")
        for t in names.get(module, ()):
            rows = tensor if t.rows is None else tensor[t.rows[0] : t.rows[1]]
            out[f"{t.path}.{_LEAF.get(leaf, leaf)}"] = apply_transform(t.transform, rows)
    return out
