"""The algorithm registry: file parsing, binding, patching and the report only loop over it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import torch
from torch import nn

from lycoris_core import AdapterFormatError, adapter_from_state_dict, patched
from lycoris_core.algorithms import REGISTRY, Algorithm, detect
from lycoris_core.algorithms.base import shape_or_none
from lycoris_core.report import describe


class Gain(Algorithm):
    """A toy algorithm: dW = strength * k * W (k one stored number per output channel)."""

    name = "toy-gain"
    suffixes = ("toy_k",)
    required = ("toy_k",)
    targets = (nn.Linear,)

    def detect(self, tensors: Mapping[str, torch.Tensor], config: Any) -> bool:
        return "toy_k" in tensors

    def mismatch(self, layer, weight):
        return shape_or_none((layer.tensors["toy_k"].numel(), weight.shape[1]), weight)

    def delta(self, layer, weight, bias, strength):
        k = layer.tensors["toy_k"].to(weight.device, torch.float32).reshape(-1, 1)
        return weight.float() * k * strength, None

    def describe(self, layer):
        return {"gains": layer.tensors["toy_k"].tolist()}


def test_every_registered_algorithm_is_filed_under_its_name():
    assert REGISTRY and all(name == a.name for name, a in REGISTRY.items())
    assert len({a.name for a in REGISTRY.values()}) == len(REGISTRY)
    for algorithm in REGISTRY.values():
        assert set(algorithm.required) <= set(algorithm.all_suffixes)


def test_a_new_algorithm_needs_only_a_registry_entry(monkeypatch):
    monkeypatch.setitem(REGISTRY, Gain.name, Gain())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2))
    x = torch.randn(5, 4)
    base = model(x)
    gains = torch.tensor([0.5, -0.25])
    adapter = adapter_from_state_dict({"lycoris_2.toy_k": gains})
    assert adapter.layers["lycoris_2"].algo == "toy-gain"
    info = describe(adapter, model)
    assert info["per_layer"]["lycoris_2"]["gains"] == gains.tolist()
    assert info["matched"] == {"lycoris_2": "2"}

    hidden = model[1](model[0](x))
    w, b = model[2].weight, model[2].bias
    expected = hidden @ (w * (1 + 2.0 * gains.view(-1, 1))).T + b
    for mode in ("merge", "dynamic"):
        with patched(model, [(adapter, 2.0)], mode=mode):
            assert torch.allclose(model(x), expected, atol=1e-6), mode
    assert torch.equal(model(x), base)  # the same module, restored: bitwise

    with pytest.raises(AdapterFormatError, match=r"\(toy-gain, \(3, 3\)\) does not fit '2'"):
        adapter_from_state_dict({"lycoris_2.toy_k": torch.ones(3)}).bind(model)
    with pytest.raises(AdapterFormatError, match=r"\(toy-gain\) cannot adapt '1'"):
        adapter_from_state_dict({"lycoris_1.toy_k": torch.ones(3)}).bind(model)


def test_unknown_tensors_match_no_algorithm():
    with pytest.raises(AdapterFormatError, match="match no LyCORIS algorithm"):
        detect("layer", {"toy_k": torch.ones(1)})
