"""The seed's ``lycoris_config.json`` format: :class:`LycorisConfig` (parse, normalise, views)."""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from .keywords import (
    _NETWORK_ARG,
    _TOP_ONLY_REASON,
    DEFAULT_ALGO,
    MAP_ENTRY_ALIASES,
    MAP_ENTRY_FIELDS,
    PRESET_KEYS,
    PRESET_LIST_KEYS,
    TOP_LEVEL_ALIASES,
    TOP_LEVEL_FIELDS,
)
from .validation import BOOL, _describe, _did_you_mean, _json_object, _json_type, _Reader

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
        except (RecursionError, ValueError) as exc:  # nested too deep; an integer too long
            raise ConfigError(
                f"{p}: cannot be read as a config ({type(exc).__name__}: nesting too deep or "
                "a number too long); a lycoris_config.json is a small, flat JSON object"
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
            out[key] = _read_algo_map(r, path, value)
    use_fnmatch = out.get("use_fnmatch", False)
    for key in ("target_name", "exclude_name", "unet_target_name"):
        for i, pattern in enumerate(out.get(key, [])):
            _check_pattern(r, f"apply_preset.{key}[{i}]", pattern, use_fnmatch)
    for pattern in out.get("name_algo_map", {}):
        _check_pattern(r, f"apply_preset.name_algo_map.{pattern}", pattern, use_fnmatch)
    return out


def _read_algo_map(r: _Reader, path: str, value: Any) -> dict[str, dict[str, Any]]:
    """A ``module_algo_map``/``name_algo_map``: target -> keywords in map-entry spelling."""
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
    return entries


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
