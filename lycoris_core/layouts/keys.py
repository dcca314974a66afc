"""Tensor keys of adapter files: ``<layer name><suffix>``, the suffix found from the right.

Facts (from ComfyUI's ``comfy/lora.py`` / ``comfy/weight_adapter`` and diffusers'
``loaders/lora_conversion_utils.py``): LoRA down/up pairs come under several spellings, all
the same tensors: ``.lora_down/up.weight`` (kohya, lycoris), ``.lora_A/B.weight`` (PEFT,
diffusers, ai-toolkit), ``.lora.down/up.weight``, ``_lora.down/up.weight`` (old diffusers
attention processors), ``.lora_linear_layer.down/up.weight``, ``.lora_A/B.default.weight``.
They are normalised to lycoris' own suffixes, so the algorithm objects never see a layout.
ComfyUI's trainer writes ``.diff_b`` (a bias delta) beside any algorithm and ``.diff`` for
1-D weights (GroupNorm/LayerNorm), which is the norm algorithm's ``w_norm``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

LORA_DOWN, LORA_UP = "lora_down.weight", "lora_up.weight"

LORA_ALIASES: dict[str, str] = {
    ".lora_A.weight": LORA_DOWN,
    ".lora_B.weight": LORA_UP,
    ".lora_A.default.weight": LORA_DOWN,
    ".lora_B.default.weight": LORA_UP,
    ".lora.down.weight": LORA_DOWN,
    ".lora.up.weight": LORA_UP,
    "_lora.down.weight": LORA_DOWN,
    "_lora.up.weight": LORA_UP,
    ".lora_linear_layer.down.weight": LORA_DOWN,
    ".lora_linear_layer.up.weight": LORA_UP,
}
"""Foreign LoRA suffixes (with their separator) -> lycoris' suffix."""

BIAS_DIFF = "diff_b"
"""A bias delta, allowed beside any algorithm's tensors (ComfyUI's trainer writes it)."""

_DIFF, _W_NORM, _B_NORM = "diff", "w_norm", "b_norm"


def suffix_table() -> list[tuple[str, str]]:
    """(suffix with separator, canonical suffix), longest first: the registry's suffixes
    (read now, so a newly registered algorithm's are included), DoRA's, ``diff_b`` and the
    LoRA aliases."""
    from ..algorithms import MODIFIERS, REGISTRY

    table: dict[str, str] = {}
    for algorithm in REGISTRY.values():
        for s in algorithm.all_suffixes:
            table["." + s] = s
    for modifier in MODIFIERS:
        table["." + modifier.suffix] = modifier.suffix
    table["." + BIAS_DIFF] = BIAS_DIFF
    table.update(LORA_ALIASES)
    return sorted(table.items(), key=lambda kv: -len(kv[0]))


def split_key(key: str, table: list[tuple[str, str]]) -> tuple[str, str, str] | None:
    """``(layer name, canonical suffix, suffix as written)`` of `key`, or None without a dot.

    The longest known suffix wins; a key with no known suffix splits at its last dot (the
    caller then reports the unknown tensor under its layer).
    """
    for written, canonical in table:
        if key.endswith(written) and len(key) > len(written):
            return key[: -len(written)], canonical, written
    if "." not in key:
        return None
    layer, suffix = key.rsplit(".", 1)
    return layer, suffix, "." + suffix


def normalise_layer(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A 1-D ``diff`` (+ ``diff_b``) is a norm layer's weight (and bias) delta: ``w_norm``
    (``b_norm``) in lycoris' naming; everything else is kept as it is."""
    out = dict(tensors)
    diff = out.get(_DIFF)
    if diff is not None and diff.dim() == 1 and set(out) <= {_DIFF, BIAS_DIFF}:
        out[_W_NORM] = out.pop(_DIFF)
        if BIAS_DIFF in out:
            out[_B_NORM] = out.pop(BIAS_DIFF)
    return out
