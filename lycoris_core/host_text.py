"""An adapter's text-encoder layers as per-key patches of a host's text encoders (ComfyUI's CLIP).

ComfyUI keeps each encoder of a ``CLIP`` under its own name and a ``transformer.`` level:
``clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight``, ``clip_g...``,
``t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.k.weight`` (facts from ComfyUI's
``comfy/sd1_clip.py``/``comfy/sdxl_clip.py`` and ``comfy/lora.py`` ``model_lora_keys_clip``).
A file's text-encoder layer (kohya ``lora_te1_<HF path with _>``, diffusers
``text_encoder_2.<path>``, ComfyUI ``text_encoders.clip_l.transformer.<path>``) names the
pipeline encoder (:func:`lycoris_core.layouts.names.text_component`), which is one of the
host's encoders by family, and a Hugging Face module path inside it, looked up with and
without the ``text_model.`` level (transformers 5's ``CLIPTextModel`` has none). The weights
are whole modules: no offsets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from .errors import AdapterFormatError
from .host_patches import HOST, HostPlan, _layer_patches, _report
from .layouts import Target
from .layouts.names import NameIndex, text_component

if TYPE_CHECKING:
    from .adapters import Adapter

# per family: pipeline text-encoder attribute -> the host's encoder name
HOST_ENCODERS: dict[str, dict[str, str]] = {
    "sd15": {"text_encoder": "clip_l"},
    "sdxl": {"text_encoder": "clip_l", "text_encoder_2": "clip_g"},
    "sd3": {"text_encoder": "clip_l", "text_encoder_2": "clip_g", "text_encoder_3": "t5xxl"},
    "flux": {"text_encoder": "clip_l", "text_encoder_2": "t5xxl"},
}
_LEVEL = "text_model."


def _encoder_indexes(shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[NameIndex, dict]]:
    """Per host encoder: an index of its module paths and path -> weight key."""
    out: dict[str, tuple[NameIndex, dict]] = {}
    for key in shapes:
        enc, sep, rest = key.partition(".transformer.")
        module, _, param = rest.rpartition(".")
        if not sep or param != "weight" or not module:
            continue
        index, weights = out.setdefault(enc, (NameIndex(enc), {}))
        target = (Target(HOST, module),)
        index.add(module, target, "HF")
        if module.startswith(_LEVEL):
            index.add(module[len(_LEVEL) :], target, "HF")
        weights[module] = key
    return out


def plan_text_patches(
    adapter: Adapter, shapes: Mapping[str, Sequence[int]], family: str, *, strict: bool = True
) -> HostPlan:
    """The patches applying `adapter`'s text-encoder layers to a host CLIP whose state-dict
    keys have the given `shapes`; its denoiser layers are set aside (``elsewhere``)."""
    encoders = HOST_ENCODERS.get(family, HOST_ENCODERS["sdxl"])
    indexes = _encoder_indexes(shapes)
    plan = HostPlan()
    for name, layer in adapter.layers.items():
        text = text_component(name, family)
        if text is None:
            plan.elsewhere.append(name)
            continue
        attr, rest, _ = text
        enc = encoders.get(attr)
        found = indexes.get(enc) if enc is not None else None
        hit = None
        if found is not None:
            try:
                hit = found[0].lookup(rest, ("",))
            except ValueError:
                raise AdapterFormatError(
                    f"{adapter.name}: layer '{name}' maps to more than one module of {enc}"
                ) from None
        if hit is None:
            plan.unmatched.append(name)
            continue
        (target,) = hit.targets
        key = found[1][target.path]
        plan.patches.extend(_layer_patches(adapter, layer, target, key, shapes))
        plan.matched += 1
        layout = f"{enc}: {hit.layout}"
        plan.layouts[layout] = plan.layouts.get(layout, 0) + 1
    if plan.unmatched:
        _report(adapter, plan, strict, f"{family} text-encoder")
    return plan
