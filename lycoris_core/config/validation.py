"""Validation helpers for JSON configs: value converters, messages, typo hints, the reader.

A :class:`_Field` says what a value must be and converts it (or returns ``_INVALID``);
:class:`_Reader` walks one JSON object, checks every key against a table of fields and aliases
and raises a :class:`ConfigError` that names the source and the JSON path. Bounds on what a
config may hold (sizes, nesting) belong here.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..limits import MAX_CONFIG_DIM

logger = logging.getLogger(__package__)


def _is_number(v: Any) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an integer too large for a float: not a usable number
        return False


_INVALID: Any = object()  # what a converter returns for a value it rejects


def _json_type(v: Any) -> str:
    """The JSON name of a parsed value's type, for messages."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, Mapping):
        return "object"
    if isinstance(v, (list, tuple)):
        return "array"
    return type(v).__name__


def _describe(v: Any) -> str:
    """A value as the user wrote it in JSON, with its type: ``"10" (string)``."""
    try:
        text = json.dumps(v, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(v)
    if len(text) > 60:
        text = text[:57] + "..."
    kind = _json_type(v)
    return text if kind == "null" else f"{text} ({kind})"


def _as_float(v: Any) -> Any:
    return float(v) if _is_number(v) else _INVALID


def _as_int(v: Any) -> Any:
    if _is_number(v) and float(v).is_integer():
        return int(v)
    return _INVALID


@dataclass(frozen=True)
class _Field:
    expected: str  # human description of the type/range, used in messages
    convert: Callable[[Any], Any]  # returns the normalised value or _INVALID
    options: tuple[str, ...] = ()  # for choices: the valid values, used for "did you mean"


def _float_field(lo: float | None = None, hi: float | None = None) -> _Field:
    def conv(v: Any) -> Any:
        f = _as_float(v)
        if f is _INVALID or (lo is not None and f < lo) or (hi is not None and f > hi):
            return _INVALID
        return f

    if lo is None:
        desc = "a finite number"
    elif hi is None:
        desc = f"a number >= {lo:g}"
    else:
        desc = f"a number in [{lo:g}, {hi:g}]"
    return _Field(desc, conv)


def _int_field(lo: int, hi: int = MAX_CONFIG_DIM) -> _Field:
    def conv(v: Any) -> Any:
        i = _as_int(v)
        return i if i is not _INVALID and lo <= i <= hi else _INVALID

    return _Field(f"an integer >= {lo} (at most {hi})", conv)


def _factor(v: Any) -> Any:
    i = _as_int(v)
    return i if i is not _INVALID and (i == -1 or 1 <= i <= MAX_CONFIG_DIM) else _INVALID


def _bool(v: Any) -> Any:
    return v if isinstance(v, bool) else _INVALID


def _bool_or_null(v: Any) -> Any:
    return v if isinstance(v, bool) or v is None else _INVALID


def _choice(options: tuple[str, ...]) -> _Field:
    def conv(v: Any) -> Any:
        if isinstance(v, str) and v.lower() in options:
            return v.lower()
        return _INVALID

    return _Field("one of " + ", ".join(repr(o) for o in options), conv, options)


FLOAT = _float_field()
NONNEG = _float_field(0.0)
PROB = _float_field(0.0, 1.0)
POS_INT = _int_field(1)
NONNEG_INT = _int_field(0)
BOOL = _Field("true or false", _bool)
FACTOR = _Field(f"-1 (most balanced) or an integer >= 1 (at most {MAX_CONFIG_DIM})", _factor)


def _edit_distance(a: str, b: str) -> int:
    """Optimal string alignment distance: insertions, deletions, substitutions, swaps."""
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            d = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb))
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                d = min(d, prev2[j - 2] + 1)
            cur.append(d)
        prev2, prev = prev, cur
    return prev[-1]


def _did_you_mean(key: str, options: list[str]) -> str:
    # a typo (one or two edits, e.g. "loah" -> "loha") first, then the closest by similarity
    dist = {o: _edit_distance(key, o) for o in options}
    best = min(dist.values(), default=99)
    close = [o for o in options if dist[o] == best] if best <= min(2, len(key) // 2) else []
    if len(close) > 1:
        close = difflib.get_close_matches(key, close, n=1, cutoff=0.0)
    if not close:
        close = difflib.get_close_matches(key, options, n=1, cutoff=0.6)
    if not close:
        # prefix/substring heuristics catch e.g. "unbalanced_factor"
        close = [o for o in options if o.startswith(key) or key.startswith(o)][:1]
    return f" Did you mean '{close[0]}'?" if close else ""


class _JsonObject(dict):
    """A parsed JSON object that remembers keys written twice (json keeps the last silently)."""

    duplicates: tuple[str, ...] = ()


def _json_object(pairs: list[tuple[str, Any]]) -> _JsonObject:
    obj = _JsonObject(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        dups: list[str] = []
        for key, _ in pairs:
            if key in seen:
                dups.append(key)
            seen.add(key)
        obj.duplicates = tuple(dups)
    return obj


class _Reader:
    """Validates one config dict and produces errors that name the source and JSON path."""

    def __init__(self, source: str | None) -> None:
        self.source = source or "lycoris config"

    def fail(self, path: str, message: str) -> ConfigError:
        where = f"'{path}'" if path else "the top level"
        return ConfigError(f"{self.source}: {where} {message}")

    def unique(self, prefix: str, obj: Mapping[str, Any]) -> None:
        """Refuse a key written twice in one JSON object (only files are parsed that way)."""
        dups = getattr(obj, "duplicates", ())
        if dups:
            raise self.fail(
                f"{prefix}{dups[0]}",
                "is written twice in the same JSON object; JSON keeps only the last one, "
                "so remove the other",
            )

    def value(self, path: str, spec: _Field, raw: Any) -> Any:
        out = spec.convert(raw)
        if out is _INVALID:
            hint = ""
            if spec.options and isinstance(raw, str):
                hint = _did_you_mean(raw.lower(), list(spec.options))
            raise self.fail(path, f"must be {spec.expected}, got {_describe(raw)}.{hint}")
        return out

    def keywords(
        self,
        data: Mapping[str, Any],
        prefix: str,
        fields: dict[str, _Field],
        aliases: dict[str, str],
        skip: tuple[str, ...] = (),
        top_only: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Normalise the keyword entries of one level; `skip` keys are handled by the caller."""
        self.unique(prefix, data)
        out: dict[str, Any] = {}
        spelled: dict[str, str] = {}
        for key, raw in data.items():
            path = f"{prefix}{key}"
            if not isinstance(key, str):
                raise self.fail(path, "keys must be strings")
            if key in skip:
                continue
            if key == "disable_conv_cp":  # deprecated, inverted meaning
                canon, raw = "use_tucker", (not raw if isinstance(raw, bool) else raw)
                logger.warning("%s: '%s' is deprecated; use 'use_tucker'", self.source, path)
            elif key in fields:
                canon = key
            elif key in aliases:
                canon = aliases[key]
            elif top_only and key in top_only:
                raise self.fail(path, f"is not allowed in a map entry: {top_only[key]}")
            else:
                valid = sorted(set(fields) | set(skip))
                hint = _did_you_mean(key, valid + sorted(aliases))
                raise self.fail(
                    path,
                    f"is not a lycoris keyword (lycoris would silently ignore it).{hint} "
                    f"Valid keys here: {', '.join(valid)}",
                )
            if canon in spelled:
                raise self.fail(
                    path,
                    f"conflicts with '{prefix}{spelled[canon]}': both set '{canon}'; keep one",
                )
            spelled[canon] = key
            out[canon] = self.value(path, fields[canon], raw)
        return out
