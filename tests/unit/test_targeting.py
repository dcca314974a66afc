"""Targeting: preset isolation, class aliases, coverage and incompatible-model errors."""

from __future__ import annotations

import pytest
import torch
from reference import denoiser

from lycoris_core import IncompatibleModelError, LycorisConfig, coverage, create_network
from lycoris_core.config import SEED_EXAMPLE
from lycoris_core.targeting import CLASS_ALIASES, preset_applied

SEED = SEED_EXAMPLE
PRESET_ATTRS = (
    "ENABLE_CONV",
    "TARGET_REPLACE_MODULE",
    "TARGET_REPLACE_NAME",
    "LORA_PREFIX",
    "MODULE_ALGO_MAP",
    "NAME_ALGO_MAP",
    "USE_FNMATCH",
    "TARGET_EXCLUDE_NAME",
)


def _class_state():
    from lycoris import LycorisNetwork

    return {a: getattr(LycorisNetwork, a) for a in PRESET_ATTRS}


def _layers(model, cfg):
    net = create_network(model, cfg)
    names = sorted(lora.lora_name for lora in net.loras)
    kinds = sorted({type(lora).__name__ for lora in net.loras})
    net.restore()
    return names, kinds


@pytest.fixture(scope="module")
def flux():
    return denoiser("flux")


@pytest.fixture(scope="module")
def unet():
    return denoiser("sd15")


def test_seed_config_wraps_attention_and_feed_forward_on_flux(flux):
    cfg = LycorisConfig.from_dict(SEED)
    cov = coverage(flux, cfg)
    assert cov.resolved["Attention"] == ["FluxAttention"]
    assert "Attention" in cov.aliases
    attn = [p for p in cov.layers if ".attn." in p]
    ff = [p for p in cov.layers if ".ff." in p or ".ff_context." in p]
    n_double, n_single = len(flux.transformer_blocks), len(flux.single_transformer_blocks)
    # double blocks: 8 attention projections + 2 x 2 feed-forward Linears; single: to_q/k/v
    assert len(attn) == 8 * n_double + 3 * n_single
    assert len(ff) == 4 * n_double
    assert len(cov.layers) == len(attn) + len(ff)
    assert set(cov.layers.values()) == {"kron"}
    # what lycoris' exact class matching gives for the same preset: feed-forward only
    from lycoris import LycorisNetwork

    raw = {
        "TARGET_REPLACE_MODULE": ["Attention", "FeedForward"],
        "MODULE_ALGO_MAP": SEED["apply_preset"]["module_algo_map"],
        "TARGET_REPLACE_NAME": [],
    }
    with preset_applied(raw):
        plain = LycorisNetwork(flux, warn_on_unmatched=False, **cfg.network_kwargs())
    assert len(plain.loras) == len(ff)
    summary = cov.summary()
    assert f"{len(cov.layers)} layers wrapped" in summary and "as FluxAttention" in summary


def test_seed_config_on_sd15_uses_plain_class_names(unet):
    cov = coverage(unet, LycorisConfig.from_dict(SEED))
    assert cov.resolved == {"Attention": ["Attention"], "FeedForward": ["FeedForward"]}
    assert cov.aliases == {}
    assert len(cov.targets["Attention"]) > 0 and len(cov.layers) > 0


def test_module_algo_map_follows_the_alias(flux):
    cfg = LycorisConfig.from_dict(
        {
            "algo": "lora",
            "multiplier": 1.0,
            "linear_dim": 4,
            "linear_alpha": 4,
            "apply_preset": {
                "target_module": ["Attention", "FeedForward"],
                "module_algo_map": {"Attention": {"algo": "loha", "dim": 2}},
            },
        }
    )
    net = create_network(flux, cfg)
    try:
        by_kind = {}
        for lora in net.loras:
            by_kind.setdefault(type(lora).__name__, []).append(lora.lora_name)
        assert all("_attn_" in n for n in by_kind["LohaModule"])
        assert all("_ff" in n for n in by_kind["LoConModule"])
        assert {lora.lora_dim for lora in net.loras if type(lora).__name__ == "LohaModule"} == {2}
    finally:
        net.restore()


def test_presets_are_isolated_between_configs(flux):
    cfg_a = LycorisConfig.from_dict(SEED)
    cfg_b = LycorisConfig.from_dict(
        {"algo": "lora", "multiplier": 1.0, "linear_dim": 4, "linear_alpha": 1}
    )
    from lycoris import LycorisNetwork

    LycorisNetwork.apply_preset({"target_name": ["time_text_embed.*"]})  # someone else's state
    outside = _class_state()
    try:
        b_alone = _layers(flux, cfg_b)
        _layers(flux, cfg_a)
        assert _class_state() == outside
        assert _layers(flux, cfg_b) == b_alone
        assert b_alone[1] == ["LoConModule"] and len(b_alone[0]) > len(coverage(flux, cfg_a).layers)
    finally:
        LycorisNetwork.apply_preset({"target_name": []})


def test_target_name_only_means_only_those_names(flux):
    cfg = LycorisConfig.from_dict(
        {
            "algo": "lora",
            "multiplier": 1.0,
            "linear_dim": 4,
            "linear_alpha": 1,
            "apply_preset": {"target_name": [r"transformer_blocks\.0\.attn\.to_q$"]},
        }
    )
    cov = coverage(flux, cfg)
    assert list(cov.layers) == ["transformer_blocks.0.attn.to_q"]


def test_exclude_name_and_enable_conv(unet):
    base = {"algo": "lora", "multiplier": 1.0, "linear_dim": 4, "linear_alpha": 1}
    all_layers = coverage(unet, LycorisConfig.from_dict(base)).layers
    no_conv = coverage(
        unet, LycorisConfig.from_dict({**base, "apply_preset": {"enable_conv": False}})
    ).layers
    big_convs = [p for p in all_layers if unet.get_submodule(p).__class__.__name__ == "Conv2d"]
    big_convs = [p for p in big_convs if unet.get_submodule(p).kernel_size != (1, 1)]
    assert big_convs and not any(p in no_conv for p in big_convs)
    excluded = coverage(
        unet,
        LycorisConfig.from_dict({**base, "apply_preset": {"exclude_name": ["down_blocks.*"]}}),
    ).layers
    assert excluded and not any(p.startswith("down_blocks") for p in excluded)


def test_target_matching_nothing_is_an_error_listing_the_model_classes(flux):
    cfg = LycorisConfig.from_dict(
        {**SEED, "apply_preset": {"target_module": ["CrossAttention", "FeedForward"]}}
    )
    with pytest.raises(IncompatibleModelError) as err:
        coverage(flux, cfg)
    msg = str(err.value)
    assert "'CrossAttention' match no module" in msg
    assert "FluxAttention" in msg and "FeedForward" in msg and "target_module" in msg
    with pytest.raises(IncompatibleModelError, match="'nothing_here'"):
        create_network(
            flux,
            LycorisConfig.from_dict({**SEED, "apply_preset": {"target_name": ["nothing_here"]}}),
        )


def test_config_that_wraps_zero_layers_is_an_error(flux):
    # FluxAttention's norm_q/norm_k are RMSNorms: a target that exists but holds no
    # Linear/Conv layer wraps nothing.
    cfg = LycorisConfig.from_dict(
        {
            "algo": "lora",
            "multiplier": 1.0,
            "linear_dim": 4,
            "linear_alpha": 1,
            "apply_preset": {"target_module": ["RMSNorm"]},
        }
    )
    with pytest.raises(IncompatibleModelError, match="wraps 0 layers"):
        create_network(flux, cfg)


def test_alias_table_is_small_and_explained():
    assert set(CLASS_ALIASES) == {"Attention", "Linear"}
    assert "FluxAttention" in CLASS_ALIASES["Attention"].reason
    assert "bitsandbytes" in CLASS_ALIASES["Linear"].reason


@pytest.mark.parametrize("algo", ["lokr", "lora", "loha"])
def test_network_is_created_on_the_models_device(algo):
    # lycoris builds its parameters on the CPU; on a CUDA model training then failed with
    # "found at least two devices" (seen on an H100). The meta device stands in for CUDA here.
    model = denoiser("flux").to("meta")
    cfg = LycorisConfig.from_dict({**SEED, "algo": algo, "linear_dim": 4})
    net = create_network(model, cfg)
    try:
        devices = {p.device.type for p in net.parameters()}
        dtypes = {p.dtype for p in net.parameters()}
    finally:
        net.restore()
    assert devices == {"meta"}
    assert dtypes == {torch.float32}
