"""A base stored fp8 / int8 / nf4: adapters apply dynamically (exactly what the dequantised
base would give), LyCORIS trains over it in bypass mode, and what it trains applies to the
full-precision base.

The reference for applying is a *dequantised twin*: the full-precision model whose quantised
layers get the weights that bitsandbytes' own functions (or a plain fp8 upcast, or the int8
formula written out here) give back from the quantised layers; the same file merged into the
twin is what the quantised model must produce.
"""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from reference import (
    CASES,
    case_config,
    denoiser,
    denoiser_inputs,
    forward,
    make_reference,
    rel_err,
    same_state,
    state,
)
from safetensors import safe_open

from lycoris_core import LycorisConfig, load_adapter, patched
from lycoris_core.config import SEED_EXAMPLE
from lycoris_core.errors import ConfigError, IncompatibleModelError, LycorisError
from lycoris_core.models import from_pipeline, load_model, save_merged
from lycoris_core.quantization import layer_precision, quantise_module, quantised_layers
from lycoris_core.sampling import sample
from lycoris_core.tiny import build_pipeline, make_tiny
from lycoris_core.training.dataset import DatasetSpec, TrainingData
from lycoris_core.training.evaluate import fixed_loss
from lycoris_core.training.loop import TrainSpec, train
from lycoris_core.training.synthetic import make_demo_dataset

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is in the dev dependencies")

PRECISIONS = ("fp8", "int8", "nf4")
TOL = 1e-4  # relative to the output's largest magnitude (fp32 compute)
ATTN_FF = {"target_module": ["Attention", "FeedForward"]}


def dequantised(layer: torch.nn.Module) -> torch.Tensor:
    """The weight a quantised layer stands for, by the quantiser's own arithmetic."""
    w = layer.weight
    if w.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return w.detach().float()
    if type(layer).__name__ == "Linear4bit":
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    # LLM.int8: each row is int8 values times its absmax / 127 (the absmax moves from the
    # weight to the layer's state at the first forward)
    absmax = w.SCB if w.SCB is not None else layer.state.SCB
    return w.data.float() * (absmax.float().unsqueeze(1) / 127.0)


def twin(full: torch.nn.Module, quantised: torch.nn.Module) -> torch.nn.Module:
    """`full` with each quantised layer's weight replaced by what it stands for."""
    out = copy.deepcopy(full)
    with torch.no_grad():
        for path in quantised_layers(quantised):
            layer, plain = quantised.get_submodule(path), out.get_submodule(path)
            plain.weight.copy_(dequantised(layer))
            if plain.bias is not None:  # fp8 storage keeps the bias in fp8 too
                plain.bias.copy_(layer.bias.detach().float())
    return out


CASE_PARAMS = [
    pytest.param(case, precision, id=f"{case.name.replace(' ', '-')}-{precision}")
    for case in CASES
    if "flux" in case.families
    for precision in PRECISIONS
]


@pytest.fixture(scope="module")
def flux():
    return denoiser("flux")


@pytest.mark.parametrize(("case", "precision"), CASE_PARAMS)
def test_a_file_on_a_quantised_base_gives_the_dequantised_base_plus_the_adapter(
    case, precision, flux, tmp_path, caplog
):
    inputs = denoiser_inputs(flux)
    ref = make_reference(flux, case_config(case, "flux"), inputs, tmp_path / "a.safetensors")
    adapter = load_adapter(ref.path)
    q = copy.deepcopy(flux)
    assert quantise_module(q, precision, torch.float32) > 0
    plain = twin(flux, q)
    before = state(q)
    base_q = forward(q, inputs)
    for s in (0.7, -1.0):
        with patched(plain, [(adapter, s)], mode="merge"):
            expected = forward(plain, inputs)
        assert rel_err(expected, forward(plain, inputs)) > 1e-3  # a real change
        for mode in ("merge", "dynamic"):
            with caplog.at_level(logging.WARNING, logger="lycoris_core"):
                with patched(q, [(adapter, s)], mode=mode) as patch:
                    assert patch.applied_mode == "dynamic"
                    assert same_state(q, before)  # no weight of the quantised base changes
                    if precision == "int8":
                        _check_int8_layers(case, q, plain, patch, adapter, s, inputs)
                    else:
                        err = rel_err(forward(q, inputs), expected)
                        assert err < TOL, f"{mode} at {s}: relative error {err:.2e}"
            assert same_state(q, before)
    assert torch.equal(forward(q, inputs), base_q)
    notes = [r.getMessage() for r in caplog.records if "cannot be exact" in r.getMessage()]
    assert notes and precision in notes[0]


def _check_int8_layers(case, q, plain, patch, adapter, s, inputs) -> None:
    """LLM.int8 also rounds each layer's input, so whole outputs differ from the twin's by
    ~1%; instead each patched layer's change (its output minus its own unpatched forward, on
    the input it saw) must equal the twin layer's change on that input."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def grab(path: str):
        def hook(m, args, out):
            x = args[0]
            seen[path] = (x.detach(), (out - type(m).forward(m, x)).detach())

        return hook

    handles = [q.get_submodule(p).register_forward_hook(grab(p)) for p in patch.plan]
    try:
        forward(q, inputs)
    finally:
        for h in handles:
            h.remove()
    assert seen.keys() == patch.plan.keys()
    # these scale the layer's own (int8-rounded) output, the others add a full-precision
    # term; T-LoRA's base factors come from an SVD of the dequantised weight, which magnifies
    # the last-bit differences of two ways of computing scale x int8
    algo = case.config["algo"]
    tol = 5e-2 if algo in ("ia3", "diag-oft", "boft") else 1e-3 if algo == "tlora" else TOL
    base = {p: (dequantised(q.get_submodule(p)), q.get_submodule(p).bias) for p in seen}
    with patched(plain, [(adapter, s)], mode="merge"):
        for path, (x, change) in seen.items():
            w, b = base[path]
            expected = plain.get_submodule(path)(x) - torch.nn.functional.linear(x, w, b)
            err = rel_err(change, expected)
            assert err < tol, f"{path} at {s}: change off by {err:.2e}"


@pytest.mark.parametrize("precision", ["int8", "nf4"])
def test_lycoris_default_targets_reach_the_quantised_linears(flux, precision):
    """A config without target_module targets lycoris' default classes ("Linear", ...):
    on a bitsandbytes base those are Linear8bitLt / Linear4bit, which the alias covers."""
    from lycoris_core import create_network

    q = copy.deepcopy(flux)
    quantise_module(q, precision, torch.float32)
    cfg = LycorisConfig.from_dict(
        {"algo": "lora", "multiplier": 1.0, **{"linear_dim": 2}, "linear_alpha": 1}
    )
    net = create_network(q, cfg)
    try:
        wrapped = {type(lora.org_module[0]).__name__ for lora in net.loras}
        assert {"Linear4bit" if precision == "nf4" else "Linear8bitLt"} <= wrapped
        assert all(lora.bypass_mode for lora in net.loras)
    finally:
        net.restore()


def test_loading_at_each_precision_stores_the_layers_that_way(tmp_path):
    folder = make_tiny("flux", tmp_path / "flux")
    full = load_model(folder, device="cpu", dtype="fp32")
    sizes = {"fp32": _bytes(full.denoiser)}
    for precision in PRECISIONS:
        model = load_model(folder, device="cpu", dtype="fp32", base_precision=precision)
        kinds = set(quantised_layers(model.denoiser).values())
        assert kinds == {precision} and model.precision == precision and model.quantised
        assert precision in model.storage and "text_encoder_2" in model.storage  # T5 too
        t5 = model.pipe.text_encoder_2
        assert any(layer_precision(m) == precision for m in t5.modules())
        clip = model.pipe.text_encoder
        assert not any(layer_precision(m) for m in clip.modules())  # CLIP stays as loaded
        sizes[precision] = _bytes(model.denoiser)
    assert sizes["nf4"] < sizes["int8"] < sizes["fp32"] and sizes["fp8"] < sizes["fp32"]


def test_fp8_storage_rounds_the_weights_only(flux):
    """fp8 keeps each Linear's weight in e4m3fn and its bias as it was (diffusers' layerwise
    casting would round the bias to fp8 too); the forward computes in the model's dtype."""
    q = copy.deepcopy(flux)
    quantise_module(q, "fp8", torch.float32)
    layers = quantised_layers(q)
    assert layers and set(layers.values()) == {"fp8"}
    for path in layers:
        layer, plain = q.get_submodule(path), flux.get_submodule(path)
        assert layer.weight.dtype == torch.float8_e4m3fn
        assert torch.equal(layer.weight, plain.weight.detach().to(torch.float8_e4m3fn))
        if plain.bias is not None:
            assert layer.bias.dtype == torch.float32 and torch.equal(layer.bias, plain.bias)
    assert q.dtype == torch.float32  # what diffusers casts a model's inputs to


@pytest.mark.parametrize(
    "layer",
    [
        torch.nn.Linear(24, 16),
        torch.nn.Conv2d(4, 8, 3, padding=1),
        torch.nn.Conv2d(4, 8, 3, stride=2, groups=2),
        torch.nn.Conv1d(4, 6, 3, padding=2, dilation=2),
    ],
    ids=["linear", "conv2d", "conv2d-strided-grouped", "conv1d-dilated"],
)
def test_an_fp8_layer_backpropagates_like_its_dequantised_twin(layer):
    """The backward of an fp8-stored layer (which keeps only the fp8 weight) gives the input
    gradient of the same layer with the upcast weight."""
    from lycoris_core.quantization import store_fp8

    torch.manual_seed(0)
    plain = copy.deepcopy(layer).requires_grad_(False)
    q = copy.deepcopy(layer).requires_grad_(False)
    store_fp8(q, torch.float32)
    with torch.no_grad():
        plain.weight.copy_(q.weight.float())
    shape = (
        (2, 3, 24)
        if isinstance(layer, torch.nn.Linear)
        else (2, 4, *([9] * (layer.weight.dim() - 2)))
    )
    x1 = torch.randn(shape, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    g = torch.randn_like(plain(x1))
    plain(x1).backward(g)
    q(x2).backward(g)
    assert torch.allclose(q(x2), plain(x1), atol=1e-5)
    assert torch.allclose(x2.grad, x1.grad, atol=1e-5)
    assert q.weight.dtype == torch.float8_e4m3fn  # still stored fp8 after the backward


def _bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def test_merge_on_a_quantised_base_leaves_its_weights_and_saving_merged_is_refused(tmp_path):
    model = from_pipeline(build_pipeline("flux"), "tiny", device="cpu", base_precision="nf4")
    before = state(model.denoiser)
    cfg = case_config(CASES[0], "flux")
    inputs = denoiser_inputs(model.denoiser)
    ref = make_reference(denoiser("flux"), cfg, inputs, tmp_path / "a.safetensors")
    patch = model.use_adapters([(load_adapter(ref.path), 1.0)], mode="merge")
    assert patch is not None and patch.patches["denoiser"].applied_mode == "dynamic"
    assert same_state(model.denoiser, before)
    with pytest.raises(ConfigError, match="base_precision bf16/fp32"):
        save_merged(model, [(load_adapter(ref.path), 1.0)], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("qtrain")
    data = make_demo_dataset(root / "data", count=4, size=32)
    folders = {f: make_tiny(f, root / f) for f in ("flux", "sdxl")}
    return data, folders


def _spec(base, data, out, **kw) -> TrainSpec:
    step = base.size_multiple if hasattr(base, "size_multiple") else 16
    ds = DatasetSpec(folder=str(data), resolution=32, bucket_step=step)
    config = LycorisConfig.from_dict({"multiplier": 1.0, "apply_preset": ATTN_FF, **SEED_EXAMPLE})
    args = {"config": config, "steps": 20, "lr": 3e-3, **kw}
    return TrainSpec(base=base, dataset=ds, output=str(out), **args)


def _fixed(model, data, adapters=()) -> float:
    td = TrainingData(DatasetSpec(folder=str(data), resolution=32, bucket_step=model.size_multiple))
    return fixed_loss(model, td, adapters)


@pytest.mark.parametrize("family", ["flux", "sdxl"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_each_precision_trains_and_the_adapter_applies_to_the_full_base(
    tiny, family, precision, tmp_path
):
    data, folders = tiny
    model = load_model(folders[family], device="cpu", dtype="fp32", base_precision=precision)
    before = state(model.denoiser)
    out = tmp_path / "a.safetensors"
    result = train(_spec(model, data, out))
    assert result.completed and out.is_file()
    assert same_state(model.denoiser, before)  # frozen: bitwise the stored base
    assert not any(hasattr(m, "_lycoris_wrappers") for m in model.denoiser.modules())
    adapter = load_adapter(out)
    assert _fixed(model, data, [(adapter, 1.0)]) < _fixed(model, data)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["comfyui_lycoris.base_precision"] == precision
    quantiser = "bitsandbytes" if precision in ("int8", "nf4") else "fp8 weight hook"
    assert quantiser in meta["comfyui_lycoris.quantiser"]
    assert json.loads(meta["comfyui_lycoris.training_spec"])["base_precision"] == "auto"
    full = load_model(folders[family], device="cpu", dtype="fp32")
    assert _fixed(full, data, [(adapter, 1.0)]) < _fixed(full, data)
    args = {"prompt": "a disc", "steps": 2, "width": 32, "height": 32, "seed": 3}
    with_adapter = sample(model, [(adapter, 1.0)], **args)
    without = sample(model, [], **args)
    assert torch.isfinite(with_adapter).all() and not torch.equal(with_adapter, without)


def test_a_path_base_is_loaded_at_the_spec_precision(tiny, tmp_path):
    data, folders = tiny
    out = tmp_path / "a.safetensors"
    result = train(_spec(str(folders["flux"]), data, out, steps=3, base_precision="nf4"))
    assert result.completed
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["comfyui_lycoris.base_precision"] == "nf4"


@pytest.mark.parametrize(
    ("extra", "needle"),
    [({"algo": "full"}, "algo 'full'"), ({"dora_wd": True}, "DoRA")],
    ids=["full", "dora"],
)
def test_what_bypass_cannot_train_is_refused_before_loading(tiny, tmp_path, extra, needle):
    data, _ = tiny
    missing = str(tmp_path / "no-such-model")  # the refusal comes before the load
    spec = _spec(missing, data, tmp_path / "a.safetensors", base_precision="int8")
    cfg = {"multiplier": 1.0, "apply_preset": ATTN_FF, "linear_dim": 4, "linear_alpha": 1}
    spec.config = LycorisConfig.from_dict({**cfg, "algo": "lora", **extra})
    with pytest.raises(IncompatibleModelError, match=needle):
        train(spec)
    assert not any(tmp_path.glob("a*"))


def test_precision_errors_name_the_field_and_the_fix(tiny, tmp_path):
    data, folders = tiny
    with pytest.raises(ConfigError, match="base_precision must be one of"):
        load_model(folders["flux"], device="cpu", base_precision="int4")
    with pytest.raises(ConfigError, match="disagree"):
        load_model(folders["flux"], device="cpu", dtype="fp32", base_precision="bf16")
    full = load_model(folders["flux"], device="cpu", dtype="fp32")
    with pytest.raises(LycorisError, match="Load node's base_precision"):
        train(_spec(full, data, tmp_path / "a.safetensors", base_precision="nf4"))
    with pytest.raises(ConfigError, match="offload"):
        from_pipeline(build_pipeline("flux"), "t", device="cpu", base_precision="nf4",
                      offload="model")  # fmt: skip
