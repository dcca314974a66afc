"""The documented bounds of inputs, defined once and shared by the core, the CLI and the nodes.

* Strength: ``-MAX_STRENGTH <= s <= MAX_STRENGTH`` (the node widgets use the same bound). An
  adapter at strength 10 already changes a layer ten times as much as it was trained to; much
  larger values overflow float16/bfloat16 weights (1e30 gives NaN images, 1e300 overflows
  float32), so they are refused instead of giving black or NaN pictures.
* Sampling steps: at most :data:`MAX_SAMPLING_STEPS` (the node's bound; flow-matching
  schedulers accept any count, so ``steps=10**7`` would otherwise run for days).
* Config dimensions (ranks, factors, block sizes): at most :data:`MAX_CONFIG_DIM`; the seed's
  ``linear_dim: 10000`` ("full matrix" for LoKr) stays valid, ``1e300`` is refused.
"""

from __future__ import annotations

import math

from .errors import LycorisError

MAX_STRENGTH = 10.0
MAX_SAMPLING_STEPS = 1000
MAX_CONFIG_DIM = 1_000_000


def check_strength(value: object, what: str = "strength") -> float:
    """`value` as a float within ``[-MAX_STRENGTH, MAX_STRENGTH]``; else :class:`LycorisError`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LycorisError(f"{what} must be a number, got {value!r}")
    try:
        s = float(value)
    except OverflowError:  # an int too large for a float
        s = math.inf
    if not math.isfinite(s) or abs(s) > MAX_STRENGTH:
        raise LycorisError(
            f"{what} must be a finite number between {-MAX_STRENGTH:g} and {MAX_STRENGTH:g}, "
            f"got {value!r}"
        )
    return s
