"""Invariants of `patched` over one case table: algorithms x tiny families.

For every case the adapter is non-zero and made by lycoris itself; the reference is the
lycoris module forward with `multiplier = strength`.
"""

from __future__ import annotations

import pytest
import torch
from reference import (
    CASES,
    STRENGTHS,
    case_config,
    denoiser,
    denoiser_inputs,
    forward,
    make_reference,
    rel_err,
    same_state,
    state,
)

from lycoris_core import load_adapter, patched

TOL = 2e-5  # fp32, relative to the output's largest magnitude

PARAMS = [
    pytest.param(case, family, id=f"{case.name.replace(' ', '-')}-{family}")
    for case in CASES
    for family in case.families
]


@pytest.fixture(scope="module")
def models():
    return {"sd15": denoiser("sd15"), "flux": denoiser("flux")}


@pytest.mark.parametrize(("case", "family"), PARAMS)
def test_merged_and_dynamic_equal_lycoris_forward(case, family, models, tmp_path):
    model = models[family]
    inputs = denoiser_inputs(model)
    before = state(model)
    ref = make_reference(model, case_config(case, family), inputs, tmp_path / "a.safetensors")
    assert same_state(model, before)
    assert torch.equal(forward(model, inputs), ref.base)
    adapter = load_adapter(ref.path)
    assert len(adapter.layers) == ref.layers > 0

    for s in STRENGTHS:
        # the adapter really changes the output at this strength (non-trivial case)
        assert rel_err(ref.outputs[s], ref.base) > 1e-3, f"reference at {s} equals the base"
        for mode in ("merge", "dynamic"):
            with patched(model, [(adapter, s)], mode=mode) as patch:
                assert patch.num_layers == ref.layers
                out = forward(model, inputs)
            err = rel_err(out, ref.outputs[s])
            assert err < TOL, f"{mode} at strength {s}: relative error {err:.2e}"
            assert same_state(model, before), f"{mode} at {s} did not restore the weights"

    for mode in ("merge", "dynamic"):  # strength 0 skips the adapter: bitwise base
        with patched(model, [(adapter, 0.0)], mode=mode) as patch:
            assert patch.num_layers == 0
            assert torch.equal(forward(model, inputs), ref.base)
    assert torch.equal(forward(model, inputs), ref.base)
