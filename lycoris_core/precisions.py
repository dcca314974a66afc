"""The names of the base precisions (no torch here: the CLI parser and the nodes list them).

See :mod:`lycoris_core.quantization` for what each one stores and how.
"""

from __future__ import annotations

from .errors import ConfigError

PLAIN_NAMES = ("fp32", "bf16", "fp16")
QUANTISED = ("fp8", "int8", "nf4")
PRECISIONS = ("auto", *PLAIN_NAMES, *QUANTISED)


def check_precision(value: object, field: str = "base_precision") -> str:
    """`value` if it is one of :data:`PRECISIONS`, else a :class:`ConfigError` naming `field`."""
    if value not in PRECISIONS:
        raise ConfigError(f"{field} must be one of {', '.join(PRECISIONS)}, got {value!r}")
    return str(value)
