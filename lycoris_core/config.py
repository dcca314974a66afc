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
"""

from __future__ import annotations

import copy
import difflib
import json
import logging
import math
import os
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lycoris.config import list_builtin_presets
from lycoris.config_sdk import ALGO_REGISTRY, VALID_PRESET_KEYS, PresetConfig

from .errors import ConfigError

logger = logging.getLogger(__name__)

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

# The seed document's example lycoris_config.json (full-rank LoKr on attention and
# feed-forward classes). Used by the demo, the benchmarks and the tests.
SEED_EXAMPLE: dict[str, Any] = {
    "algo": "lokr",
    "multiplier": 1.0,
    "linear_dim": 10000,
    "linear_alpha": 1,
    "factor": 10,
    "apply_preset": {
        "target_module": ["Attention", "FeedForward"],
        "module_algo_map": {"Attention": {"factor": 10}, "FeedForward": {"factor": 4}},
    },
}

# --------------------------------------------------------------------------- field checks


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


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


def _int_field(lo: int) -> _Field:
    def conv(v: Any) -> Any:
        i = _as_int(v)
        return i if i is not _INVALID and i >= lo else _INVALID

    return _Field(f"an integer >= {lo}", conv)


def _factor(v: Any) -> Any:
    i = _as_int(v)
    return i if i is not _INVALID and (i == -1 or i >= 1) else _INVALID


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
FACTOR = _Field("-1 (most balanced) or an integer >= 1", _factor)

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


@dataclass(frozen=True)
class LycorisConfig:
    """A validated, normalised ``lycoris_config.json``.

    ``keywords`` holds the optional top-level algorithm keywords in the spelling
    ``create_lycoris`` reads; ``apply_preset`` holds the preset with map entries in the
    spelling module constructors read. ``source`` (the file) only feeds messages.
    """

    multiplier: float
    linear_alpha: float
    linear_dim: int | None = None
    algo: str = DEFAULT_ALGO
    apply_preset: dict[str, Any] | None = None
    keywords: dict[str, Any] = field(default_factory=dict)
    source: str | None = field(default=None, compare=False, repr=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> LycorisConfig:
        """Read and validate a ``lycoris_config.json`` file."""
        p = os.fspath(path)
        try:
            # utf-8-sig: Windows editors often save JSON with a byte-order mark
            with open(p, encoding="utf-8-sig") as fh:
                text = fh.read()
        except FileNotFoundError:
            raise ConfigError(
                f"{p}: file not found; pass the path of a lycoris_config.json"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{p}: cannot read the file ({exc})") from None
        if not text.strip():
            raise ConfigError(
                f"{p}: the file is empty; it must hold a JSON object with at least "
                "multiplier, linear_dim and linear_alpha (see the seed format)"
            )
        try:
            data = json.loads(text, object_pairs_hook=_json_object)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"{p}: not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}; "
                "fix the JSON syntax (quoted keys, no trailing commas, no comments)"
            ) from None
        return cls.from_dict(data, source=p)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | None = None) -> LycorisConfig:
        """Validate a config given as a dict (the parsed JSON object)."""
        r = _Reader(source)
        if not isinstance(data, Mapping):
            raise r.fail("", f"must be a JSON object, got {_json_type(data)}; see the seed format")
        kw = r.keywords(
            data,
            "",
            TOP_LEVEL_FIELDS,
            TOP_LEVEL_ALIASES,
            skip=("apply_preset",),
        )
        full_matrix = bool(kw.get("full_matrix", False))
        required = ["multiplier", "linear_alpha"] + ([] if full_matrix else ["linear_dim"])
        for name in required:
            if name not in kw:
                raise r.fail(
                    name,
                    f"is required ({TOP_LEVEL_FIELDS[name].expected}); the seed format needs "
                    "multiplier, linear_dim (unless full_matrix is true) and linear_alpha",
                )
        if kw.get("conv_dim") == 0:
            raise r.fail(
                "conv_dim",
                "is 0, which lycoris treats as 'same as linear_dim', not as 'no convolutions'; "
                "to skip convolutions set apply_preset.enable_conv to false",
            )
        preset = None
        if data.get("apply_preset") is not None:
            preset = _read_preset(r, data["apply_preset"])
        multiplier = kw.pop("multiplier")
        linear_alpha = kw.pop("linear_alpha")
        linear_dim = kw.pop("linear_dim", None)
        algo = kw.pop("algo", DEFAULT_ALGO)
        return cls(
            multiplier=multiplier,
            linear_alpha=linear_alpha,
            linear_dim=linear_dim,
            algo=algo,
            apply_preset=preset,
            keywords=kw,
            source=source,
        )

    # ------------------------------------------------------------------ views
    @property
    def full_matrix(self) -> bool:
        return bool(self.keywords.get("full_matrix", False))

    def to_dict(self) -> dict[str, Any]:
        """The seed-format dict (top level in create_lycoris spelling, maps in map spelling)."""
        out: dict[str, Any] = {"algo": self.algo, "multiplier": self.multiplier}
        if self.linear_dim is not None:
            out["linear_dim"] = self.linear_dim
        out["linear_alpha"] = self.linear_alpha
        out.update(copy.deepcopy(self.keywords))
        if self.apply_preset is not None:
            out["apply_preset"] = copy.deepcopy(self.apply_preset)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def network_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``lycoris.LycorisNetwork(module, **kwargs)``.

        Mirrors the defaults ``create_lycoris`` passes, with every keyword renamed to what
        the network and the module constructors read (so top-level ``rs_lora`` works too).
        """
        linear_dim = self.linear_dim if self.linear_dim is not None else 4
        kw: dict[str, Any] = {
            "multiplier": self.multiplier,
            "lora_dim": linear_dim,
            "alpha": self.linear_alpha,
            "conv_lora_dim": linear_dim,
            "conv_alpha": self.linear_alpha,
            "dropout": 0.0,
            "rank_dropout": 0.0,
            "module_dropout": 0.0,
            "use_tucker": False,
            "network_module": self.algo,
            "train_norm": False,
            "factor": -1,
            "decompose_both": False,
            "block_size": 4,
            "constraint": 0.0,
            "rescaled": False,
            "weight_decompose": False,
            "wd_on_out": True,
            "full_matrix": False,
            "bypass_mode": False,
            "unbalanced_factorization": False,
        }
        for key, value in self.keywords.items():
            if key == "preset":
                continue
            kw[_NETWORK_ARG.get(key, key)] = value
        if not self.keywords.get("conv_alpha"):
            # create_lycoris reads `conv_alpha or linear_alpha`: 0 means "same as linear_alpha"
            kw["conv_alpha"] = self.linear_alpha
        return kw

    def with_overrides(self, **changes: Any) -> LycorisConfig:
        """A new validated config with top-level keys replaced (None removes a key).

        Keys may use either spelling (``weight_decompose`` replaces ``dora_wd``).
        """
        d = self.to_dict()
        for k, v in changes.items():
            canon = TOP_LEVEL_ALIASES.get(k, "use_tucker" if k == "disable_conv_cp" else k)
            d.pop(canon, None)
            if v is not None:
                d[k] = v
        return LycorisConfig.from_dict(d, source=self.source)


def _read_preset(r: _Reader, raw: Any) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise r.fail("apply_preset", f"must be a JSON object, got {_describe(raw)}")
    r.unique("apply_preset.", raw)
    out: dict[str, Any] = {}
    for key, value in raw.items():
        path = f"apply_preset.{key}"
        if key not in PRESET_KEYS:
            hint = _did_you_mean(str(key), list(PRESET_KEYS))
            raise r.fail(
                path,
                f"is not a preset key lycoris accepts.{hint} Valid keys: {', '.join(PRESET_KEYS)}",
            )
        if key in PRESET_LIST_KEYS:
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise r.fail(path, f"must be an array of non-empty strings, got {_describe(value)}")
            if key.startswith("text_encoder_") and value:
                raise r.fail(
                    path,
                    "targets text encoders, which this tool keeps frozen; remove it or leave "
                    "it empty",
                )
            out[key] = list(value)
        elif key in ("enable_conv", "use_fnmatch"):
            out[key] = r.value(path, BOOL, value)
        elif key == "lora_prefix":
            if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_]+", value):
                raise r.fail(
                    path, f"must be a non-empty string of [A-Za-z0-9_], got {_describe(value)}"
                )
            out[key] = value
        else:  # module_algo_map / name_algo_map
            if not isinstance(value, Mapping):
                raise r.fail(path, f"must be a JSON object, got {_describe(value)}")
            r.unique(f"{path}.", value)
            entries = {}
            for target, entry in value.items():
                epath = f"{path}.{target}"
                if not isinstance(entry, Mapping):
                    raise r.fail(epath, f"must be a JSON object, got {_describe(entry)}")
                entries[target] = r.keywords(
                    entry,
                    f"{epath}.",
                    MAP_ENTRY_FIELDS,
                    MAP_ENTRY_ALIASES,
                    top_only=_TOP_ONLY_REASON,
                )
            out[key] = entries
    use_fnmatch = out.get("use_fnmatch", False)
    for key in ("target_name", "exclude_name", "unet_target_name"):
        for i, pattern in enumerate(out.get(key, [])):
            _check_pattern(r, f"apply_preset.{key}[{i}]", pattern, use_fnmatch)
    for pattern in out.get("name_algo_map", {}):
        _check_pattern(r, f"apply_preset.name_algo_map.{pattern}", pattern, use_fnmatch)
    return out


def _check_pattern(r: _Reader, path: str, pattern: str, use_fnmatch: bool) -> None:
    if use_fnmatch:
        return
    try:
        re.compile(pattern)
    except re.error as exc:
        raise r.fail(
            path,
            f"is not a valid regular expression ({exc}); lycoris matches names with re.match "
            "unless apply_preset.use_fnmatch is true",
        ) from None
