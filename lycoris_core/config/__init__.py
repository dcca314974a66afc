"""The seed's ``lycoris_config.json``: parse, normalise, validate.

The format (see the seed document) is a flat JSON object::

    {"algo": "lokr", "multiplier": 1.0, "linear_dim": 10000, "linear_alpha": 1, "factor": 10,
     "apply_preset": {"target_module": ["Attention", "FeedForward"],
                      "module_algo_map": {"Attention": {"factor": 10},
                                          "FeedForward": {"factor": 4}}}}

Required: ``multiplier``, ``linear_alpha`` and ``linear_dim`` (unless ``full_matrix: true``).
Optional: ``algo`` (lycoris' default ``lora``), ``apply_preset`` and any algorithm keyword.

lycoris spells some keywords differently at the top level (``create_lycoris``) and inside
``module_algo_map``/``name_algo_map`` entries (module constructors), and silently ignores
what it does not know. Here both spellings are accepted at both levels, each entry is stored
in the spelling its level reads, and an unknown key is a :class:`ConfigError` with a
"did you mean" hint. Floats stay floats.

Modules: ``lycoris_config`` (:class:`LycorisConfig`, the seed example), ``keywords`` (what lycoris
reads at each level, names from lycoris' SDK), ``validation`` (converters, messages, the reader).
"""

from .keywords import (
    ALGOS,
    DEFAULT_ALGO,
    MAP_ENTRY_ALIASES,
    MAP_ENTRY_FIELDS,
    PRESET_KEYS,
    PRESET_LIST_KEYS,
    PRESET_NAMES,
    SIG_TYPES,
    TOP_LEVEL_ALIASES,
    TOP_LEVEL_FIELDS,
    algo_supports,
)
from .lycoris_config import SEED_EXAMPLE, LycorisConfig

__all__ = [
    "ALGOS",
    "DEFAULT_ALGO",
    "MAP_ENTRY_ALIASES",
    "MAP_ENTRY_FIELDS",
    "PRESET_KEYS",
    "PRESET_LIST_KEYS",
    "PRESET_NAMES",
    "SEED_EXAMPLE",
    "SIG_TYPES",
    "TOP_LEVEL_ALIASES",
    "TOP_LEVEL_FIELDS",
    "LycorisConfig",
    "algo_supports",
]
