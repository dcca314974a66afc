"""Tests of lycoris_core.config: the seed's lycoris_config.json, normalised and validated.

One table (`ROWS`) of valid and invalid configs, each row with its exact outcome; then the
file loading, round trip and overrides; then proof that the normalised keywords reach the
modules lycoris builds (the spellings lycoris silently ignores are the point of the module).
"""

from __future__ import annotations

import copy
import inspect
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lycoris_core import config as config_mod
from lycoris_core.config import LycorisConfig
from lycoris_core.errors import ConfigError

# The seed document's lycoris_config.json, verbatim.
SEED_JSON = """\
{
    "algo": "lokr",
    "multiplier": 1.0,
    "linear_dim": 10000,
    "linear_alpha": 1,
    "factor": 10,
    "apply_preset": {
        "target_module": [
            "Attention",
            "FeedForward"
        ],
        "module_algo_map": {
            "Attention": {
                "factor": 10
            },
            "FeedForward": {
                "factor": 4
            }
        }
    }
}
"""
SEED: dict[str, Any] = json.loads(SEED_JSON)
BASE: dict[str, Any] = {"multiplier": 1.0, "linear_dim": 4, "linear_alpha": 1.0}
SOURCE = "configs/my_lycoris_config.json"


def cfg(**extra: Any) -> dict[str, Any]:
    """BASE plus top-level keys; a key given as None is removed."""
    d = dict(BASE)
    for k, v in extra.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    return d


def with_preset(preset: Any, **extra: Any) -> dict[str, Any]:
    return {**cfg(**extra), "apply_preset": preset}


def mam(**entries: Any) -> dict[str, Any]:
    """A config whose apply_preset holds only module_algo_map={entries}."""
    return with_preset({"module_algo_map": entries})


def typed(x: Any) -> Any:
    """`x` with every leaf paired with its type: 1 == 1.0 but typed(1) != typed(1.0)."""
    if isinstance(x, dict):
        return {k: typed(v) for k, v in x.items()}
    if isinstance(x, list):
        return [typed(v) for v in x]
    return (type(x).__name__, x)


@dataclass
class Row:
    data: Any
    # valid rows: the exact to_dict() and a subset of network_kwargs() (types checked too)
    to_dict: dict[str, Any] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    # invalid rows: fragments the ConfigError message must contain
    error: tuple[str, ...] = ()
    source: str | None = None


SEED_DICT = {
    "algo": "lokr",
    "multiplier": 1.0,
    "linear_dim": 10000,
    "linear_alpha": 1.0,
    "factor": 10,
    "apply_preset": {
        "target_module": ["Attention", "FeedForward"],
        "module_algo_map": {"Attention": {"factor": 10}, "FeedForward": {"factor": 4}},
    },
}
BASE_DICT = {"algo": "lora", "multiplier": 1.0, "linear_dim": 4, "linear_alpha": 1.0}


def out(**extra: Any) -> dict[str, Any]:
    """The expected to_dict() of cfg(**extra) when nothing is renamed."""
    return {**BASE_DICT, **extra}


def out_map(**entries: Any) -> dict[str, Any]:
    return {**BASE_DICT, "apply_preset": {"module_algo_map": entries}}


FF_PATH = "'apply_preset.module_algo_map.FeedForward."

ROWS: dict[str, Row] = {
    # ------------------------------------------------------------------ valid
    "seed config verbatim": Row(
        SEED,
        SEED_DICT,
        {"lora_dim": 10000, "alpha": 1.0, "factor": 10, "network_module": "lokr"},
    ),
    "algo omitted defaults to lora": Row(
        cfg(), BASE_DICT, {"network_module": "lora", "lora_dim": 4, "conv_lora_dim": 4}
    ),
    "floats stay floats (0.5 is not cast to 0)": Row(
        cfg(multiplier=0.5, linear_alpha=0.5),
        out(multiplier=0.5, linear_alpha=0.5),
        {"multiplier": 0.5, "alpha": 0.5, "conv_alpha": 0.5},
    ),
    "integer multiplier and alpha become floats": Row(
        cfg(multiplier=1, linear_alpha=8),
        out(multiplier=1.0, linear_alpha=8.0),
        {"multiplier": 1.0, "alpha": 8.0},
    ),
    "integral float linear_dim 4.0 becomes int 4": Row(
        cfg(linear_dim=4.0), BASE_DICT, {"lora_dim": 4}
    ),
    "full_matrix without linear_dim": Row(
        cfg(algo="lokr", linear_dim=None, full_matrix=True),
        {"algo": "lokr", "multiplier": 1.0, "linear_alpha": 1.0, "full_matrix": True},
        {"full_matrix": True, "lora_dim": 4},
    ),
    "algo is case-insensitive": Row(cfg(algo="LoKr"), out(algo="lokr"), {"network_module": "lokr"}),
    "top-level weight_decompose -> dora_wd": Row(
        cfg(weight_decompose=True), out(dora_wd=True), {"weight_decompose": True}
    ),
    "top-level wd_on_out -> wd_on_output": Row(
        cfg(dora_wd=True, wd_on_out=False),
        out(dora_wd=True, wd_on_output=False),
        {"weight_decompose": True, "wd_on_out": False},
    ),
    "top-level dim/alpha -> linear_dim/linear_alpha": Row(
        {"multiplier": 1.0, "dim": 8, "alpha": 4}, out(linear_dim=8, linear_alpha=4.0)
    ),
    "top-level rs_lora reaches the module keywords": Row(
        cfg(rs_lora=True), out(rs_lora=True), {"rs_lora": True}
    ),
    "top-level unbalanced_factorization": Row(
        cfg(algo="lokr", unbalanced_factorization=True),
        out(algo="lokr", unbalanced_factorization=True),
        {"unbalanced_factorization": True},
    ),
    "deprecated use_cp / constrain spellings": Row(
        cfg(use_cp=True, constrain=0.5),
        out(use_tucker=True, constraint=0.5),
        {"use_tucker": True, "constraint": 0.5},
    ),
    "deprecated disable_conv_cp false -> use_tucker true": Row(
        cfg(disable_conv_cp=False), out(use_tucker=True), {"use_tucker": True}
    ),
    "conv_dim and conv_alpha": Row(
        cfg(conv_dim=8, conv_alpha=2),
        out(conv_dim=8, conv_alpha=2.0),
        {"conv_lora_dim": 8, "conv_alpha": 2.0},
    ),
    "conv_alpha 0 means linear_alpha, as in create_lycoris": Row(
        cfg(linear_alpha=3, conv_alpha=0),
        out(linear_alpha=3.0, conv_alpha=0.0),
        {"conv_alpha": 3.0},
    ),
    "dropouts in [0, 1]": Row(
        cfg(dropout=0.1, rank_dropout=0, module_dropout=1),
        out(dropout=0.1, rank_dropout=0.0, module_dropout=1.0),
        {"dropout": 0.1, "rank_dropout": 0.0, "module_dropout": 1.0},
    ),
    "factor -1 (most balanced)": Row(cfg(factor=-1), out(factor=-1), {"factor": -1}),
    "bypass_mode null": Row({**BASE, "bypass_mode": None}, out(bypass_mode=None)),
    "named preset, not passed to LycorisNetwork": Row(
        cfg(preset="attn-mlp"), out(preset="attn-mlp")
    ),
    "map entry linear_dim/linear_alpha -> dim/alpha": Row(
        mam(Attention={"linear_dim": 2, "linear_alpha": 0.5}),
        out_map(Attention={"dim": 2, "alpha": 0.5}),
    ),
    "map entry dora_wd/wd_on_output -> weight_decompose/wd_on_out": Row(
        mam(FeedForward={"dora_wd": True, "wd_on_output": False}),
        out_map(FeedForward={"weight_decompose": True, "wd_on_out": False}),
    ),
    "map entry own spellings, algo, rs_lora kept": Row(
        mam(FeedForward={"algo": "LoHa", "dim": 4, "alpha": 2, "rs_lora": True}),
        out_map(FeedForward={"algo": "loha", "dim": 4, "alpha": 2.0, "rs_lora": True}),
    ),
    "name_algo_map with a regex, target_name, exclude_name": Row(
        with_preset(
            {
                "target_name": [r"blocks\.\d+\.attn"],
                "exclude_name": ["blocks.0.attn.to_out"],
                "name_algo_map": {r"blocks\.1\..*": {"factor": 4}},
            }
        ),
        {
            **BASE_DICT,
            "apply_preset": {
                "target_name": [r"blocks\.\d+\.attn"],
                "exclude_name": ["blocks.0.attn.to_out"],
                "name_algo_map": {r"blocks\.1\..*": {"factor": 4}},
            },
        },
    ),
    "fnmatch patterns are not checked as regexes": Row(
        with_preset({"use_fnmatch": True, "target_name": ["blocks.*[attn"]}),
        out(apply_preset={"use_fnmatch": True, "target_name": ["blocks.*[attn"]}),
    ),
    "empty text_encoder_target_module is allowed": Row(
        with_preset(
            {"text_encoder_target_module": [], "enable_conv": False, "lora_prefix": "lyco"}
        ),
        out(
            apply_preset={
                "text_encoder_target_module": [],
                "enable_conv": False,
                "lora_prefix": "lyco",
            }
        ),
    ),
    "apply_preset null is no preset": Row(with_preset(None), BASE_DICT),
    # ------------------------------------------------------------------ invalid: shape
    "root is a list": Row([SEED], error=("the top level must be a JSON object, got array",)),
    "missing multiplier": Row(
        cfg(multiplier=None), error=("'multiplier' is required", "a finite number")
    ),
    "missing linear_dim": Row(
        cfg(linear_dim=None),
        error=("'linear_dim' is required", "an integer >= 1", "unless full_matrix is true"),
    ),
    "missing linear_dim, full_matrix false": Row(
        cfg(linear_dim=None, full_matrix=False), error=("'linear_dim' is required",)
    ),
    "missing linear_alpha": Row(
        cfg(linear_alpha=None), error=("'linear_alpha' is required", "a number >= 0")
    ),
    "apply_preset is a list": Row(
        with_preset(["Attention"]),
        error=("'apply_preset' must be a JSON object", '["Attention"] (array)'),
    ),
    "map entry is a number": Row(
        mam(FeedForward=4),
        error=("'apply_preset.module_algo_map.FeedForward' must be a JSON object", "4 (number)"),
    ),
    "target_module is a string": Row(
        with_preset({"target_module": "Attention"}),
        error=("'apply_preset.target_module' must be an array of non-empty strings", '"Attention"'),
    ),
    # ------------------------------------------------------------------ invalid: types/ranges
    "string factor in a map": Row(
        mam(FeedForward={"factor": "4"}),
        error=(
            FF_PATH + "factor'",
            "must be -1 (most balanced) or an integer >= 1",
            'got "4" (string)',
        ),
    ),
    "bool multiplier": Row(
        cfg(multiplier=True), error=("'multiplier' must be a finite number", "got true (boolean)")
    ),
    "NaN multiplier": Row(
        cfg(multiplier=math.nan), error=("'multiplier' must be a finite number", "NaN")
    ),
    "float linear_dim 4.5": Row(
        cfg(linear_dim=4.5), error=("'linear_dim' must be an integer >= 1", "got 4.5 (number)")
    ),
    "list linear_alpha": Row(
        cfg(linear_alpha=[1]), error=("'linear_alpha' must be a number >= 0", "[1] (array)")
    ),
    "negative linear_alpha": Row(
        cfg(linear_alpha=-1), error=("'linear_alpha' must be a number >= 0", "got -1 (number)")
    ),
    "negative alpha in a map": Row(
        mam(FeedForward={"alpha": -0.5}),
        error=(FF_PATH + "alpha' must be a number >= 0", "got -0.5"),
    ),
    "dropout 1.5": Row(cfg(dropout=1.5), error=("'dropout' must be a number in [0, 1]", "1.5")),
    "factor 0": Row(
        cfg(algo="lokr", factor=0),
        error=("'factor' must be -1 (most balanced) or an integer >= 1", "got 0"),
    ),
    "string bool": Row(cfg(rs_lora="true"), error=("'rs_lora' must be true or false",)),
    "conv_dim 0": Row(
        cfg(conv_dim=0), error=("'conv_dim' is 0", "same as linear_dim", "enable_conv to false")
    ),
    "unknown algo lokrr": Row(
        cfg(algo="lokrr"), error=("'algo' must be one of", "'tlora'", "Did you mean 'lokr'?")
    ),
    "unknown algo in a map": Row(
        mam(FeedForward={"algo": "loah"}),
        error=(FF_PATH + "algo' must be one of", "Did you mean 'loha'?"),
    ),
    "unknown preset name": Row(
        cfg(preset="atn-mlp"), error=("'preset' must be one of", "Did you mean 'attn-mlp'?")
    ),
    "bad sig_type": Row(
        cfg(algo="tlora", sig_type="principle"),
        error=("'sig_type' must be one of 'principal'", "Did you mean 'principal'?"),
    ),
    "bad lora_prefix": Row(
        with_preset({"lora_prefix": "my-prefix"}),
        error=("'apply_preset.lora_prefix' must be a non-empty string of [A-Za-z0-9_]",),
    ),
    # ------------------------------------------------------------------ invalid: unknown keys
    "unknown top-level key unbalanced_factor": Row(
        cfg(algo="lokr", unbalanced_factor=True),
        error=(
            "'unbalanced_factor' is not a lycoris keyword",
            "silently ignore",
            "Did you mean 'unbalanced_factorization'?",
        ),
    ),
    "unknown preset key target_modules": Row(
        with_preset({"target_modules": ["Attention"]}),
        error=(
            "'apply_preset.target_modules' is not a preset key",
            "Did you mean 'target_module'?",
        ),
    ),
    "unknown map key": Row(
        mam(FeedForward={"factr": 4}),
        error=(FF_PATH + "factr' is not a lycoris keyword", "Did you mean 'factor'?"),
    ),
    "dropout inside module_algo_map": Row(
        mam(FeedForward={"dropout": 0.1}),
        error=(FF_PATH + "dropout' is not allowed in a map entry", "set it at the top level"),
    ),
    "conv_dim inside a map": Row(
        mam(FeedForward={"conv_dim": 8}),
        error=(FF_PATH + "conv_dim' is not allowed in a map entry", "write 'dim'"),
    ),
    # ------------------------------------------------------------------ invalid: conflicts
    "dora_wd and weight_decompose at the top": Row(
        cfg(dora_wd=True, weight_decompose=False),
        error=("'weight_decompose' conflicts with 'dora_wd'", "keep one"),
    ),
    "dim and linear_dim in one map entry": Row(
        mam(FeedForward={"dim": 4, "linear_dim": 8}),
        error=(FF_PATH + "linear_dim' conflicts with " + FF_PATH + "dim'", "keep one"),
    ),
    # ------------------------------------------------------------------ invalid: targets
    "invalid regex in target_name": Row(
        with_preset({"target_name": ["blocks.(attn"]}),
        error=("'apply_preset.target_name[0]' is not a valid regular expression", "use_fnmatch"),
    ),
    "invalid regex as a name_algo_map key": Row(
        with_preset({"name_algo_map": {"blocks[0": {"factor": 4}}}),
        error=("'apply_preset.name_algo_map.blocks[0' is not a valid regular expression",),
    ),
    "text_encoder_target_module non-empty": Row(
        with_preset({"text_encoder_target_module": ["CLIPAttention"]}),
        error=("'apply_preset.text_encoder_target_module' targets text encoders", "frozen"),
    ),
    # ------------------------------------------------------------------ the source is named
    "errors name the source": Row(
        cfg(linear_dim="4"),
        error=(f"{SOURCE}: 'linear_dim' must be an integer >= 1",),
        source=SOURCE,
    ),
    "dict errors without a source say 'lycoris config'": Row(
        cfg(linear_dim="4"), error=("lycoris config: 'linear_dim'",)
    ),
}

VALID = {k: r for k, r in ROWS.items() if not r.error}


def test_table_size() -> None:
    assert len(ROWS) >= 30
    assert len(VALID) >= 10 and len(ROWS) - len(VALID) >= 20


@pytest.mark.parametrize("row", ROWS.values(), ids=list(ROWS))
def test_config_table(row: Row) -> None:
    original = copy.deepcopy(row.data)
    if row.error:
        with pytest.raises(ConfigError) as info:
            LycorisConfig.from_dict(row.data, source=row.source)
        assert type(info.value) is ConfigError
        message = str(info.value)
        for fragment in row.error:
            assert fragment in message, f"{fragment!r} not in {message!r}"
        return
    c = LycorisConfig.from_dict(row.data, source=row.source)
    assert typed(c.to_dict()) == typed(row.to_dict)
    kwargs = c.network_kwargs()
    for key, value in row.kwargs.items():
        assert key in kwargs, f"{key} not in network_kwargs"
        assert typed(kwargs[key]) == typed(value), key
    # the spellings lycoris does not read never reach LycorisNetwork
    assert not {"linear_dim", "linear_alpha", "dora_wd", "wd_on_output", "preset"} & set(kwargs)
    assert row.data == original  # the input is not mutated


@pytest.mark.parametrize("row", VALID.values(), ids=list(VALID))
def test_round_trip(row: Row) -> None:
    c = LycorisConfig.from_dict(row.data)
    again = LycorisConfig.from_dict(c.to_dict())
    assert again == c
    assert typed(again.to_dict()) == typed(c.to_dict())
    assert LycorisConfig.from_dict(json.loads(c.to_json())) == c


def test_public_fields() -> None:
    c = LycorisConfig.from_dict(SEED, source=SOURCE)
    assert c.multiplier == 1.0 and type(c.multiplier) is float
    assert c.linear_alpha == 1.0 and type(c.linear_alpha) is float
    assert c.linear_dim == 10000 and c.algo == "lokr"
    assert c.keywords == {"factor": 10}
    assert c.apply_preset == SEED_DICT["apply_preset"]
    assert c.source == SOURCE and not c.full_matrix
    assert LycorisConfig.from_dict(cfg(full_matrix=True)).full_matrix
    # the source does not take part in equality
    assert c == LycorisConfig.from_dict(SEED)


# --------------------------------------------------------------------------- files


def test_from_file_seed(tmp_path: Path) -> None:
    path = tmp_path / "lycoris_config.json"
    path.write_text(SEED_JSON, encoding="utf-8")
    c = LycorisConfig.from_file(path)
    assert c == LycorisConfig.from_dict(SEED)
    assert c.source == str(path)
    assert typed(c.to_dict()) == typed(SEED_DICT)


def test_from_file_with_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + SEED_JSON.encode())
    assert LycorisConfig.from_file(path) == LycorisConfig.from_dict(SEED)


def test_from_file_invalid_json(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{\n  "multiplier": 1.0,\n  "linear_dim": 4,\n}\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        LycorisConfig.from_file(path)
    message = str(info.value)
    assert message.startswith(f"{path}: not valid JSON at line 4 column 1")
    assert "trailing commas" in message


def test_from_file_empty(tmp_path: Path) -> None:
    path = tmp_path / "empty.json"
    path.write_text("  \n", encoding="utf-8")
    with pytest.raises(ConfigError, match="the file is empty") as info:
        LycorisConfig.from_file(path)
    assert str(info.value).startswith(f"{path}: ")


def test_from_file_missing(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "lycoris_config.json"
    with pytest.raises(ConfigError, match="file not found") as info:
        LycorisConfig.from_file(path)
    assert str(path) in str(info.value)


def test_from_file_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the file") as info:
        LycorisConfig.from_file(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_from_file_error_names_file_and_json_path(tmp_path: Path) -> None:
    bad = json.loads(SEED_JSON)
    bad["apply_preset"]["module_algo_map"]["FeedForward"]["factor"] = "4"
    path = tmp_path / "lycoris_config.json"
    path.write_text(json.dumps(bad), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        LycorisConfig.from_file(path)
    assert str(info.value).startswith(
        f"{path}: 'apply_preset.module_algo_map.FeedForward.factor' must be -1 (most balanced) "
        'or an integer >= 1 (at most 1000000), got "4" (string)'
    )


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ('{"multiplier": 1, "linear_dim": 4, "linear_alpha": 1, "linear_dim": 8}', "'linear_dim'"),
        (
            '{"multiplier": 1, "linear_dim": 4, "linear_alpha": 1, "apply_preset": '
            '{"module_algo_map": {"FeedForward": {"factor": 4, "factor": 8}}}}',
            "'apply_preset.module_algo_map.FeedForward.factor'",
        ),
        (
            '{"multiplier": 1, "linear_dim": 4, "linear_alpha": 1, "apply_preset": '
            '{"target_module": ["A"], "target_module": ["B"]}}',
            "'apply_preset.target_module'",
        ),
    ],
    ids=["top", "map entry", "preset"],
)
def test_from_file_duplicate_key(tmp_path: Path, text: str, path: str) -> None:
    file = tmp_path / "dup.json"
    file.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        LycorisConfig.from_file(file)
    assert str(info.value).startswith(f"{file}: {path} is written twice")


# --------------------------------------------------------------------------- overrides


def test_with_overrides() -> None:
    c = LycorisConfig.from_dict(SEED, source=SOURCE)
    weaker = c.with_overrides(multiplier=0.5)
    assert weaker.multiplier == 0.5 and type(weaker.multiplier) is float
    assert weaker.apply_preset == c.apply_preset and weaker.source == SOURCE
    assert c.multiplier == 1.0  # unchanged
    assert "factor" not in c.with_overrides(factor=None).keywords
    # either spelling replaces the stored one
    d = c.with_overrides(dora_wd=True).with_overrides(weight_decompose=False)
    assert d.keywords == {"factor": 10, "dora_wd": False}
    assert c.with_overrides(dim=8).linear_dim == 8
    full = c.with_overrides(linear_dim=None, full_matrix=True)
    assert full.linear_dim is None and full.full_matrix
    with pytest.raises(ConfigError) as info:
        c.with_overrides(factor=0)
    assert str(info.value).startswith(f"{SOURCE}: 'factor' must be")
    with pytest.raises(ConfigError, match="'linear_dim' is required"):
        c.with_overrides(linear_dim=None)


# --------------------------------------------------------------------------- vs lycoris


def test_vocabularies_match_lycoris() -> None:
    """Algorithms, preset names and preset keys are exactly what lycoris offers."""
    from lycoris.config import PRESET
    from lycoris.config_sdk import VALID_PRESET_KEYS
    from lycoris.wrapper import network_module_dict

    assert set(config_mod.ALGOS) == set(network_module_dict)
    assert set(config_mod.PRESET_NAMES) == set(PRESET)
    assert set(config_mod.PRESET_KEYS) == set(VALID_PRESET_KEYS)


def _module_params() -> set[str]:
    from lycoris.wrapper import network_module_dict

    params: set[str] = set()
    for cls in network_module_dict.values():
        params |= set(inspect.signature(cls.__init__).parameters)
    return params - {"self", "kwargs", "lora_name", "org_module"}


def test_every_keyword_is_read_by_lycoris() -> None:
    """No spelling the config passes on is one that lycoris would silently ignore."""
    import lycoris

    network = set(inspect.signature(lycoris.LycorisNetwork.__init__).parameters)
    modules = _module_params()
    everything = {
        **BASE,
        "algo": "lokr",
        "conv_dim": 8,
        "conv_alpha": 2,
        "dropout": 0.1,
        "rank_dropout": 0.1,
        "module_dropout": 0.1,
        "train_norm": False,
        "dora_wd": True,
        "wd_on_output": False,
        "use_tucker": True,
        "use_scalar": True,
        "factor": 4,
        "decompose_both": True,
        "block_size": 4,
        "constraint": 0.1,
        "rescaled": True,
        "full_matrix": True,
        "bypass_mode": False,
        "unbalanced_factorization": True,
        "rs_lora": True,
        "rank_dropout_scale": True,
        "train_on_input": True,
        "sig_type": "last",
        "use_data_init": False,
    }
    assert set(everything) == set(config_mod.TOP_LEVEL_FIELDS) - {"preset"}
    kwargs = LycorisConfig.from_dict(everything).network_kwargs()
    assert set(kwargs) <= network | modules
    # map entries: create_single_module reads dim, alpha (and algo); the rest go to modules
    assert set(config_mod.MAP_ENTRY_FIELDS) <= modules | {"dim", "alpha", "algo"}


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.to_q = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_q(x)


class FeedForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = Attention()
        self.ff = FeedForward()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ff(self.attn(x))


def _layers(data: dict[str, Any]) -> dict[str, Any]:
    from lycoris_core.targeting import create_network

    torch.manual_seed(0)
    block = Block()
    net = create_network(block, LycorisConfig.from_dict(data))
    layers = {lora.lora_name.removeprefix("lycoris_"): lora for lora in net.loras}
    assert set(layers) == {"attn_to_q", "ff_fc1", "ff_fc2"}
    return layers


def test_lycoris_reads_top_level_dora_alias() -> None:
    plain = _layers(cfg())
    dora = _layers(cfg(weight_decompose=True))
    assert all(m.wd is False for m in plain.values())
    assert all(m.wd is True for m in dora.values())
    assert dora["ff_fc1"].dora_scale.shape == (64, 1)  # wd_on_out default: on the output


def test_lycoris_reads_top_level_wd_on_out_alias() -> None:
    layers = _layers(cfg(dora_wd=True, wd_on_out=False))
    assert all(m.wd_on_out is False for m in layers.values())
    assert layers["ff_fc1"].dora_scale.shape == (1, 32)


def test_lycoris_reads_top_level_rs_lora() -> None:
    plain = _layers(cfg(linear_alpha=2))
    rs = _layers(cfg(linear_alpha=2, rs_lora=True))
    assert all(m.rs_lora is False and m.scale == 0.5 for m in plain.values())  # 2 / 4
    assert all(m.rs_lora is True and m.scale == 1.0 for m in rs.values())  # 2 / sqrt(4)


def test_lycoris_reads_unbalanced_factorization() -> None:
    base = cfg(algo="lokr", factor=4, full_matrix=True)
    balanced = _layers(base)
    unbalanced = _layers({**base, "unbalanced_factorization": True})
    # out 32 = 4 x 8: w1 takes the smaller part unless unbalanced
    assert balanced["attn_to_q"].lokr_w1.shape == (4, 4)
    assert unbalanced["attn_to_q"].lokr_w1.shape == (8, 4)


def test_lycoris_reads_map_entry_aliases() -> None:
    layers = _layers(
        with_preset(
            {
                "target_module": ["Attention", "FeedForward"],
                "module_algo_map": {
                    "Attention": {"linear_dim": 2, "linear_alpha": 1},
                    "FeedForward": {"dora_wd": True, "wd_on_output": False, "rs_lora": True},
                },
            },
            linear_alpha=2,
        )
    )
    attn, ff = layers["attn_to_q"], layers["ff_fc1"]
    assert attn.lora_down.weight.shape == (2, 32) and attn.scale == 0.5  # dim 2, alpha 1
    assert attn.wd is False and attn.rs_lora is False
    assert ff.lora_down.weight.shape == (4, 32) and ff.rs_lora is True and ff.scale == 1.0
    assert ff.wd is True and ff.wd_on_out is False


def test_lycoris_reads_seed_config() -> None:
    layers = _layers(SEED)
    assert all(type(m).__name__ == "LokrModule" for m in layers.values())
    assert all(m.scale == 1.0 for m in layers.values())  # full matrix: alpha ignored
    # the map's factor 4 wins over the top-level 10 on FeedForward: lycoris splits 64 into
    # 4 x 16 with factor 4 (8 x 8 with 10) and 32 into 4 x 8; Attention keeps factor 10
    assert layers["ff_fc1"].lokr_w1.shape == (4, 4)
    assert layers["ff_fc1"].lokr_w2.shape == (16, 8)
    assert layers["attn_to_q"].lokr_w2.shape == (8, 8)
    without_map = copy.deepcopy(SEED)
    del without_map["apply_preset"]["module_algo_map"]["FeedForward"]
    assert _layers(without_map)["ff_fc1"].lokr_w2.shape == (8, 8)
