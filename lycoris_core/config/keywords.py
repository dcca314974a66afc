"""The keywords lycoris reads, as this tool checks them: types, spellings, preset keys.

lycoris spells some keywords differently at the top level (``create_lycoris``) and inside
``module_algo_map``/``name_algo_map`` entries (module constructors). The tables here say, per
level, which keys are valid, what each must be, and which other spellings are rewritten to the
level's own. Algorithm and preset names come from lycoris' own SDK.
"""

from __future__ import annotations

import typing
from typing import Any

from lycoris.config import list_builtin_presets
from lycoris.config_sdk import ALGO_REGISTRY, VALID_PRESET_KEYS, PresetConfig

from .validation import (
    BOOL,
    FACTOR,
    FLOAT,
    NONNEG,
    NONNEG_INT,
    POS_INT,
    PROB,
    _bool_or_null,
    _choice,
    _Field,
)

# The algorithms lycoris-lora 4.x `create_lycoris(algo=...)` accepts, as its SDK lists them.
ALGOS: tuple[str, ...] = tuple(ALGO_REGISTRY)
DEFAULT_ALGO = "lora"  # what create_lycoris uses when `algo` is not given

# lycoris' built-in preset names for the top-level `preset` keyword. In the general wrapper
# only their `enable_conv` (and ia3's name_algo_map) take effect.
PRESET_NAMES: tuple[str, ...] = tuple(list_builtin_presets())


def algo_supports(algo: str, keyword: str) -> bool:
    """Whether lycoris' SDK lists `keyword` among the arguments algorithm `algo` reads."""
    spec = ALGO_REGISTRY.get(algo)
    return spec is not None and spec.supports(keyword)


SIG_TYPES = ("principal", "last", "middle")

# Keywords read by module constructors: valid at both levels, same spelling.
_SHARED: dict[str, _Field] = {
    "algo": _choice(ALGOS),
    "use_tucker": BOOL,
    "use_scalar": BOOL,
    "factor": FACTOR,
    "decompose_both": BOOL,
    "block_size": POS_INT,
    "constraint": NONNEG,
    "rescaled": BOOL,
    "full_matrix": BOOL,
    "bypass_mode": _Field("true, false or null", _bool_or_null),
    "unbalanced_factorization": BOOL,
    "rs_lora": BOOL,
    "rank_dropout_scale": BOOL,
    "train_on_input": BOOL,
    "sig_type": _choice(SIG_TYPES),
    "use_data_init": BOOL,
}

# Top level: the spelling `create_lycoris` reads (plus the shared keywords).
TOP_LEVEL_FIELDS: dict[str, _Field] = {
    "multiplier": FLOAT,
    "linear_dim": POS_INT,
    "linear_alpha": NONNEG,
    "conv_dim": NONNEG_INT,
    "conv_alpha": NONNEG,
    "dropout": PROB,
    "rank_dropout": PROB,
    "module_dropout": PROB,
    "train_norm": BOOL,
    "dora_wd": BOOL,
    "wd_on_output": BOOL,
    "preset": _choice(PRESET_NAMES),
    **_SHARED,
}

# Inside module_algo_map / name_algo_map entries: the spelling module constructors read.
MAP_ENTRY_FIELDS: dict[str, _Field] = {
    "dim": POS_INT,
    "alpha": NONNEG,
    "weight_decompose": BOOL,
    "wd_on_out": BOOL,
    **_SHARED,
}

# Other spellings accepted on input, rewritten to the level's own spelling.
TOP_LEVEL_ALIASES: dict[str, str] = {
    "dim": "linear_dim",
    "alpha": "linear_alpha",
    "weight_decompose": "dora_wd",
    "wd_on_out": "wd_on_output",
    "constrain": "constraint",
    "use_cp": "use_tucker",
    "use_conv_cp": "use_tucker",
}
MAP_ENTRY_ALIASES: dict[str, str] = {
    "linear_dim": "dim",
    "linear_alpha": "alpha",
    "dora_wd": "weight_decompose",
    "wd_on_output": "wd_on_out",
    "constrain": "constraint",
    "use_cp": "use_tucker",
    "use_conv_cp": "use_tucker",
}

# Keys lycoris' `LycorisNetwork.apply_preset` accepts, and those among them that hold lists.
PRESET_KEYS: tuple[str, ...] = VALID_PRESET_KEYS


def _holds_list(hint: Any) -> bool:
    return typing.get_origin(hint) is list or any(_holds_list(a) for a in typing.get_args(hint))


PRESET_LIST_KEYS: tuple[str, ...] = tuple(
    key
    for key, hint in typing.get_type_hints(PresetConfig).items()
    if key in PRESET_KEYS and _holds_list(hint)
)

# Keys that lycoris reads at the top level but that make no sense in a map entry, with the
# reason given when they appear there.
_TOP_ONLY_REASON = {
    "multiplier": "the strength applies to the whole network; set it at the top level",
    "dropout": "lycoris passes dropout positionally, so a per-module value raises a "
    "TypeError; set it at the top level",
    "rank_dropout": "lycoris passes rank_dropout positionally, so a per-module value raises a "
    "TypeError; set it at the top level",
    "module_dropout": "lycoris passes module_dropout positionally, so a per-module value "
    "raises a TypeError; set it at the top level",
    "conv_dim": "map entries use 'dim' for convolutions too; write 'dim'",
    "conv_alpha": "map entries use 'alpha' for convolutions too; write 'alpha'",
    "train_norm": "it is a network-wide switch; set it at the top level",
    "preset": "presets apply to the whole network; set it at the top level",
}

# Top-level spelling -> LycorisNetwork / module constructor keyword.
_NETWORK_ARG = {
    "linear_dim": "lora_dim",
    "linear_alpha": "alpha",
    "conv_dim": "conv_lora_dim",
    "algo": "network_module",
    "dora_wd": "weight_decompose",
    "wd_on_output": "wd_on_out",
}
