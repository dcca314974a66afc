"""Every file layout of the reference, on the tiny sd15/sdxl/sd3/flux denoisers.

Each case writes a non-zero file itself: its own layer names (written down here from the
published layouts, not from the core's maps), its own tensor spellings, and computes each
target module's expected change from those tensors (up @ down * alpha / rank * strength,
row-sliced for fused layers, halves swapped for adaLN; DoRA on the reassembled fused weight).
Then, merged and dynamic, at strengths 0.7 and -1, every target module's output must equal
the module with the expected weights, no other parameter may change, and the base comes back
bitwise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from reference import denoiser, same_state, state
from safetensors.torch import save_file
from torch import nn

from lycoris_core import AdapterFormatError, load_adapter, patched
from lycoris_core.report import describe, format_report

STRENGTHS = (0.7, -1.0)
TOL = 2e-5

# ------------------------------------------------------------------------------ the names
# (diffusers modules it stands for, the foreign (ldm / BFL / SAI) name). A fused foreign
# layer lists several modules, in row order; "swap" marks the adaLN halves.
Spec = tuple[tuple[str, ...], str, bool]

SPECS: dict[str, list[Spec]] = {
    "sd15": [
        (
            ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",),
            "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
            False,
        ),
        (
            ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0",),
            "input_blocks.1.1.transformer_blocks.0.attn2.to_out.0",
            False,
        ),
        (("down_blocks.0.resnets.0.conv1",), "input_blocks.1.0.in_layers.2", False),
        (("down_blocks.1.resnets.0.conv_shortcut",), "input_blocks.3.0.skip_connection", False),
        (("mid_block.attentions.0.proj_in",), "middle_block.1.proj_in", False),
        (
            ("up_blocks.1.attentions.1.transformer_blocks.0.ff.net.2",),
            "output_blocks.3.1.transformer_blocks.0.ff.net.2",
            False,
        ),
        (
            ("up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",),
            "output_blocks.2.1.transformer_blocks.0.attn2.to_k",
            False,
        ),
        (("up_blocks.0.upsamplers.0.conv",), "output_blocks.1.1.conv", False),
        (("time_embedding.linear_1",), "time_embed.0", False),
        (("conv_out",), "out.2", False),
    ],
    "sdxl": [
        (
            ("down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_k",),
            "input_blocks.3.1.transformer_blocks.1.attn1.to_k",
            False,
        ),
        (
            ("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v",),
            "input_blocks.3.1.transformer_blocks.0.attn2.to_v",
            False,
        ),
        (("down_blocks.0.downsamplers.0.conv",), "input_blocks.2.0.op", False),
        (
            ("mid_block.attentions.0.transformer_blocks.1.ff.net.0.proj",),
            "middle_block.1.transformer_blocks.1.ff.net.0.proj",
            False,
        ),
        (("up_blocks.0.attentions.1.proj_out",), "output_blocks.1.1.proj_out", False),
        (
            ("up_blocks.0.attentions.0.transformer_blocks.1.attn1.to_out.0",),
            "output_blocks.0.1.transformer_blocks.1.attn1.to_out.0",
            False,
        ),
        (("up_blocks.0.upsamplers.0.conv",), "output_blocks.1.2.conv", False),
        (("up_blocks.1.resnets.1.time_emb_proj",), "output_blocks.3.0.emb_layers.1", False),
        (("add_embedding.linear_2",), "label_emb.0.2", False),
        (("conv_in",), "input_blocks.0.0", False),
    ],
    "sd3": [
        (
            tuple(f"transformer_blocks.0.attn.to_{c}" for c in "qkv"),
            "joint_blocks.0.x_block.attn.qkv",
            False,
        ),
        (
            tuple(f"transformer_blocks.1.attn.add_{c}_proj" for c in "qkv"),
            "joint_blocks.1.context_block.attn.qkv",
            False,
        ),
        (
            ("transformer_blocks.1.norm1_context.linear",),
            "joint_blocks.1.context_block.adaLN_modulation.1",
            True,
        ),
        (
            ("transformer_blocks.0.norm1_context.linear",),
            "joint_blocks.0.context_block.adaLN_modulation.1",
            False,
        ),
        (("norm_out.linear",), "final_layer.adaLN_modulation.1", True),
        (("pos_embed.proj",), "x_embedder.proj", False),
        (("transformer_blocks.0.ff_context.net.2",), "joint_blocks.0.context_block.mlp.fc2", False),
        (("transformer_blocks.1.attn.to_out.0",), "joint_blocks.1.x_block.attn.proj", False),
        (("time_text_embed.timestep_embedder.linear_1",), "t_embedder.mlp.0", False),
    ],
    "flux": [
        (
            tuple(f"transformer_blocks.0.attn.to_{c}" for c in "qkv"),
            "double_blocks.0.img_attn.qkv",
            False,
        ),
        (
            tuple(f"transformer_blocks.1.attn.add_{c}_proj" for c in "qkv"),
            "double_blocks.1.txt_attn.qkv",
            False,
        ),
        (
            (
                *(f"single_transformer_blocks.0.attn.to_{c}" for c in "qkv"),
                "single_transformer_blocks.0.proj_mlp",
            ),
            "single_blocks.0.linear1",
            False,
        ),
        (("single_transformer_blocks.1.proj_out",), "single_blocks.1.linear2", False),
        (("transformer_blocks.0.norm1.linear",), "double_blocks.0.img_mod.lin", False),
        (("norm_out.linear",), "final_layer.adaLN_modulation.1", True),
        (("x_embedder",), "img_in", False),
        (("time_text_embed.timestep_embedder.linear_1",), "time_in.in_layer", False),
        (("transformer_blocks.1.ff_context.net.2",), "double_blocks.1.txt_mlp.2", False),
    ],
}
NORM_SPECS: dict[str, list[Spec]] = {
    "sd15": [
        (("down_blocks.0.resnets.0.norm1",), "input_blocks.1.0.in_layers.0", False),
        (
            ("mid_block.attentions.0.transformer_blocks.0.norm2",),
            "middle_block.1.transformer_blocks.0.norm2",
            False,
        ),
    ],
}

LORA_SPELLINGS = {  # down, up, whether the layout writes alpha
    "kohya": (".lora_down.weight", ".lora_up.weight", True),
    "peft": (".lora_A.weight", ".lora_B.weight", False),
    "peft_default": (".lora_A.default.weight", ".lora_B.default.weight", False),
    "dot": (".lora.down.weight", ".lora.up.weight", False),
    "processor": ("_lora.down.weight", "_lora.up.weight", False),
    "linear_layer": (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight", False),
}


@dataclass(frozen=True)
class Layout:
    name: str
    prefix: str
    foreign: bool  # the family's own names (ldm / BFL / SAI) instead of diffusers'
    flat: bool  # '.' -> '_'
    spelling: str = "kohya"
    processor: bool = False  # old diffusers attention processors (attention layers only)
    comfy: bool = False  # ComfyUI trainer: 2-D conv LoRA factors, diff_b, .diff on norms


LAYOUTS = {
    "lycoris": Layout("lycoris", "lycoris_", False, True),
    "kohya_diffusers_unet": Layout("kohya_diffusers_unet", "lora_unet_", False, True),
    "kohya_diffusers_transformer": Layout(
        "kohya_diffusers_transformer", "lora_transformer_", False, True
    ),
    "peft_unet": Layout("peft_unet", "unet.", False, False, "peft"),
    "peft_transformer": Layout("peft_transformer", "transformer.", False, False, "peft"),
    "peft_base_model": Layout("peft_base_model", "base_model.model.", False, False, "peft"),
    "peft_default": Layout("peft_default", "unet.", False, False, "peft_default"),
    "dot_no_prefix": Layout("dot_no_prefix", "", False, False, "dot"),
    "processor": Layout("processor", "unet.", False, False, "processor", processor=True),
    "linear_layer": Layout("linear_layer", "transformer.", False, False, "linear_layer"),
    "kohya_internal": Layout("kohya_internal", "lora_unet_", True, True),
    "comfy_internal": Layout("comfy_internal", "diffusion_model.", True, False),
    "comfy_trainer": Layout("comfy_trainer", "diffusion_model.", True, False, comfy=True),
}

CASES: list[tuple[str, str, str]] = [
    # family, layout, algorithm
    ("sd15", "lycoris", "lora"),
    ("sd15", "kohya_diffusers_unet", "lora"),
    ("sd15", "peft_unet", "lora"),
    ("sd15", "processor", "lora"),
    ("sd15", "kohya_internal", "lora"),
    ("sd15", "comfy_internal", "lora"),
    ("sd15", "comfy_trainer", "lora"),
    ("sd15", "kohya_internal", "loha"),
    ("sd15", "comfy_internal", "full"),
    ("sd15", "peft_base_model", "dora"),
    ("sdxl", "lycoris", "lora"),
    ("sdxl", "kohya_diffusers_unet", "lora"),
    ("sdxl", "peft_default", "lora"),
    ("sdxl", "kohya_internal", "lora"),
    ("sdxl", "comfy_internal", "lora"),
    ("sdxl", "kohya_internal", "lokr"),
    ("sdxl", "comfy_internal", "ia3"),
    ("sd3", "kohya_diffusers_transformer", "lora"),
    ("sd3", "peft_transformer", "lora"),
    ("sd3", "dot_no_prefix", "lora"),
    ("sd3", "kohya_internal", "lora"),
    ("sd3", "comfy_internal", "lora"),
    ("sd3", "comfy_internal", "loha"),
    ("sd3", "kohya_internal", "dora"),
    ("sd3", "comfy_internal", "lokr"),
    ("flux", "lycoris", "lora"),
    ("flux", "peft_transformer", "lora"),
    ("flux", "kohya_diffusers_transformer", "lora"),
    ("flux", "linear_layer", "lora"),
    ("flux", "peft_base_model", "lora"),
    ("flux", "kohya_internal", "lora"),
    ("flux", "comfy_internal", "lora"),
    ("flux", "comfy_trainer", "lora"),
    ("flux", "kohya_internal", "lokr"),
    ("flux", "comfy_internal", "loha"),
    ("flux", "comfy_internal", "dora"),
    ("flux", "kohya_internal", "dora_columns"),
    ("flux", "kohya_internal", "ia3"),
    ("flux", "comfy_internal", "full"),
    ("flux", "lycoris", "ia3_input"),
    ("flux", "kohya_internal", "tlora"),
    ("sdxl", "lycoris", "tlora"),
]
LINEAR_ONLY = {"loha", "lokr", "ia3", "ia3_input", "dora", "dora_columns", "tlora"}


@pytest.fixture(scope="module")
def models():
    return {f: denoiser(f) for f in ("sd15", "sdxl", "sd3", "flux")}


# ------------------------------------------------------------------------------ writing


def _written_name(layout: Layout, spec: Spec, path: str | None) -> str:
    name = spec[1] if layout.foreign else path
    if layout.processor:
        name = name.replace(".to_out.0", ".to_out")
        for leaf in ("to_q", "to_k", "to_v", "to_out"):
            name = name.replace(f".{leaf}", f".processor.{leaf}")
    if layout.flat:
        name = name.replace(".", "_")
    return layout.prefix + name


class Writer:
    """Makes one file layer's tensors and the expected change of its (fused) weight."""

    def __init__(self, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)

    def rnd(self, *shape: int, std: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=self.g) * std

    def layer(self, algo: str, layout: Layout, w: torch.Tensor, bias: bool):
        """(tensors by written suffix, f(W, b, s) -> (dW, db)) for a foreign weight `w`."""
        shape = w.shape
        out_dim, in_dim, kernel = shape[0], shape[1], tuple(shape[2:])
        flat_in = in_dim * (kernel[0] * kernel[1] if kernel else 1)
        down_s, up_s, has_alpha = LORA_SPELLINGS[layout.spelling]
        r = 4
        if algo in ("lora", "dora", "dora_columns"):
            two_d = layout.comfy or not kernel
            down = self.rnd(r, flat_in) if two_d else self.rnd(r, in_dim, *kernel)
            up = self.rnd(out_dim, r) if two_d else self.rnd(out_dim, r, 1, 1)
            t = {down_s: down, up_s: up}
            scale = 1.0
            if has_alpha:
                t[".alpha"] = torch.tensor(2.0)
                scale = 2.0 / r
            lora = (up.reshape(out_dim, r) @ down.reshape(r, -1)).reshape(shape) * scale
            if algo == "lora":
                db_t = None
                if layout.comfy and bias:
                    db_t = t[".diff_b"] = self.rnd(out_dim, std=0.1)
                return t, lambda w, b, s: (lora * s, None if db_t is None else db_t * s)
            cols = algo == "dora_columns"

            def norms(m: torch.Tensor) -> torch.Tensor:
                return m.norm(dim=0, keepdim=True) if cols else m.norm(dim=1, keepdim=True)

            # magnitudes near the norms of W + dW, so the rescale is visible but moderate
            magnitude = norms(w + lora) * (1 + self.rnd(*norms(w).shape, std=0.1))
            t[".dora_scale"] = magnitude

            def dora(w, b, s):
                merged = w + lora
                return merged * (s * (magnitude / norms(merged) - 1) + 1) - w, None

            return t, dora
        if algo == "loha":
            w1a, w1b = self.rnd(out_dim, r), self.rnd(r, in_dim)
            w2a, w2b = self.rnd(out_dim, r), self.rnd(r, in_dim)
            t = {".hada_w1_a": w1a, ".hada_w1_b": w1b, ".hada_w2_a": w2a, ".hada_w2_b": w2b}
            t[".alpha"] = torch.tensor(2.0)
            d = (w1a @ w1b) * (w2a @ w2b) * (2.0 / r)
            return t, lambda w, b, s: (d * s, None)
        if algo == "lokr":
            w1, w2 = self.rnd(4, 2, std=0.5), self.rnd(out_dim // 4, in_dim // 2, std=0.5)
            d = torch.kron(w1, w2)
            return {".lokr_w1": w1, ".lokr_w2": w2}, lambda w, b, s: (d * s, None)
        if algo in ("ia3", "ia3_input"):
            on_input = algo == "ia3_input"
            v = self.rnd(in_dim if on_input else out_dim, std=0.3)
            t = {".weight": v, ".on_input": torch.tensor(int(on_input))}
            view = (1, -1) if on_input else (-1, 1)
            return t, lambda w, b, s: (w * v.view(view) * s, None)
        if algo == "tlora":
            # dW = (p diag(lam) q - p0 diag(lam0) q0) * alpha / r, (p0, lam0, q0) the top-r SVD
            # of the (fused, foreign-order) base weight
            q, p = self.rnd(r, in_dim, std=0.1), self.rnd(out_dim, r, std=0.1)
            lam = 1 + self.rnd(1, r, std=0.3)
            t = {".q_layer.weight": q, ".p_layer.weight": p, ".lambda_layer": lam}
            t[".alpha"] = torch.tensor(2.0)

            def tlora(w, b, s):
                u, sv, vh = torch.linalg.svd(w, full_matrices=False)
                base = u[:, :r] @ torch.diag(sv[:r]) @ vh[:r]
                return (p @ torch.diag(lam[0]) @ q - base) * (2.0 / r) * s, None

            return t, tlora
        if algo == "full":
            diff = self.rnd(*shape, std=0.05)
            t = {".diff": diff}
            db_t = None
            if bias:
                db_t = t[".diff_b"] = self.rnd(out_dim, std=0.05)
            return t, lambda w, b, s: (diff * s, None if db_t is None else db_t * s)
        raise AssertionError(algo)


def _norm_layer(writer: Writer, shape: torch.Size):
    diff, diff_b = writer.rnd(*shape, std=0.05), writer.rnd(*shape, std=0.05)
    return {".diff": diff, ".diff_b": diff_b}, lambda w, b, s: (diff * s, diff_b * s)


def _swap(t: torch.Tensor) -> torch.Tensor:
    half = t.shape[0] // 2
    return torch.cat([t[half:], t[:half]])


def build_file(model: nn.Module, family: str, layout: Layout, algo: str, path, seed: int = 0):
    """Write the case's file; returns {module path: f(s) -> (dW, db)} of what it should do."""
    writer = Writer(seed)
    tensors: dict[str, torch.Tensor] = {}
    expected = {}
    specs = list(SPECS[family])
    if algo == "full" or layout.comfy:
        specs += NORM_SPECS.get(family, [])
    for spec in specs:
        paths, _, swap = spec
        mods = [model.get_submodule(p) for p in paths]
        is_norm = isinstance(mods[0], (nn.GroupNorm, nn.LayerNorm))
        if algo in LINEAR_ONLY and not isinstance(mods[0], nn.Linear):
            continue
        if layout.processor and ".attn" not in paths[0]:
            continue
        # the file's layers: the fused foreign one, or one per diffusers module
        groups = [paths] if layout.foreign else [(p,) for p in paths]
        for group in groups:
            gmods = [model.get_submodule(p) for p in group]
            ws = [m.weight.detach().float() for m in gmods]
            bs = [None if m.bias is None else m.bias.detach().float() for m in gmods]
            do_swap = swap and layout.foreign
            if do_swap:
                ws, bs = [_swap(w) for w in ws], [None if b is None else _swap(b) for b in bs]
            fused_w = torch.cat(ws)
            fused_b = None if any(b is None for b in bs) else torch.cat(bs)
            if is_norm:
                layer, fn = _norm_layer(writer, fused_w.shape)
            else:
                layer, fn = writer.layer(algo, layout, fused_w, fused_b is not None)
            name = _written_name(layout, spec, group[0] if len(group) == 1 else None)
            for suffix, tensor in layer.items():
                tensors[name + suffix] = tensor.contiguous()
            start = 0
            for p, w in zip(group, ws, strict=True):
                rows = slice(start, start + w.shape[0])
                start += w.shape[0]

                def target_delta(s, fn=fn, fw=fused_w, fb=fused_b, rows=rows, sw=do_swap):
                    dw, db = fn(fw, fb, s)
                    dw = dw[rows]
                    db = None if db is None else db[rows]
                    if sw:
                        dw, db = _swap(dw), None if db is None else _swap(db)
                    return dw, db

                expected[p] = target_delta
    save_file(tensors, str(path))
    return expected


# ------------------------------------------------------------------------------ checking


def _module_input(m: nn.Module, g: torch.Generator) -> torch.Tensor:
    if isinstance(m, nn.Linear):
        return torch.randn(2, 3, m.in_features, generator=g)
    if isinstance(m, nn.Conv2d):
        return torch.randn(1, m.in_channels, 6, 6, generator=g)
    if isinstance(m, nn.GroupNorm):
        return torch.randn(1, m.num_channels, 3, 3, generator=g)
    return torch.randn(2, 3, m.normalized_shape[0], generator=g)


def _reference_forward(m: nn.Module, x, w, b) -> torch.Tensor:
    if isinstance(m, nn.Linear):
        return F.linear(x, w, b)
    if isinstance(m, nn.Conv2d):
        return F.conv2d(x, w, b, m.stride, m.padding, m.dilation, m.groups)
    if isinstance(m, nn.GroupNorm):
        return F.group_norm(x, m.num_groups, w, b, m.eps)
    return F.layer_norm(x, m.normalized_shape, w, b, m.eps)


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def check_case(model: nn.Module, path, expected: dict, strength: float, mode: str) -> None:
    before = state(model)
    adapter = load_adapter(path)
    g = torch.Generator().manual_seed(5)
    inputs = {p: _module_input(model.get_submodule(p), g) for p in expected}
    want = {}
    for p, fn in expected.items():
        m = model.get_submodule(p)
        dw, db = fn(strength)
        assert dw.abs().max() > 1e-4, f"{p}: the case's own change is zero"
        b0 = None if m.bias is None else m.bias.detach().float()
        b = b0 if db is None or b0 is None else b0 + db
        want[p] = _reference_forward(m, inputs[p], m.weight.detach().float() + dw, b)
    with patched(model, [(adapter, strength)], mode=mode) as patch:
        assert set(patch.plan) == set(expected), "targets differ from the file's modules"
        for p in expected:
            got = model.get_submodule(p)(inputs[p])
            err = _err(got, want[p])
            assert err < TOL, f"{mode} s={strength} {p}: relative error {err:.2e}"
        now = model.state_dict()
        changed = {k for k, v in before.items() if not torch.equal(now[k], v)}
        allowed = {f"{p}.{w}" for p in expected for w in ("weight", "bias")}
        assert changed <= allowed, f"stray parameters changed: {sorted(changed - allowed)[:4]}"
        if mode == "dynamic":
            assert not changed
        hooked = {n for n, m in model.named_modules() if m._forward_hooks}
        assert hooked == (set(expected) if mode == "dynamic" else set())
    assert same_state(model, before)
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize(
    ("family", "layout", "algo"), CASES, ids=[f"{f}-{lay}-{a}" for f, lay, a in CASES]
)
def test_layout_applies_exactly(models, tmp_path, family, layout, algo):
    model = models[family]
    path = tmp_path / "adapter.safetensors"
    expected = build_file(model, family, LAYOUTS[layout], algo, path, seed=len(layout) + len(algo))
    assert len(expected) >= 3
    for s in STRENGTHS:
        for mode in ("merge", "dynamic"):
            check_case(model, path, expected, s, mode)


def test_enough_distinct_cases():
    assert len(set(CASES)) == len(CASES) >= 25
    assert {lay for _, lay, a in CASES if a == "lora"} == set(LAYOUTS)


def test_fused_file_merged_equals_dynamic_on_the_whole_denoiser(models, tmp_path):
    """A kohya BFL Flux LoKr: the whole transformer's output, merged and dynamic."""
    from reference import denoiser_inputs, forward, rel_err

    model = models["flux"]
    path = tmp_path / "a.safetensors"
    build_file(model, "flux", LAYOUTS["kohya_internal"], "lokr", path)
    adapter = load_adapter(path)
    inputs = denoiser_inputs(model)
    base = forward(model, inputs)
    with patched(model, [(adapter, 0.7)], mode="merge"):
        merged = forward(model, inputs)
    with patched(model, [(adapter, 0.7)], mode="dynamic"):
        dynamic = forward(model, inputs)
    assert rel_err(merged, base) > 1e-3
    assert rel_err(dynamic, merged) < TOL
    assert torch.equal(forward(model, inputs), base)


# ------------------------------------------------------------------------------ bad input


def test_file_for_another_family_says_which(models, tmp_path):
    path = tmp_path / "flux.safetensors"
    build_file(models["flux"], "flux", LAYOUTS["kohya_internal"], "lora", path)
    adapter = load_adapter(path)
    sdxl = models["sdxl"]
    before = state(sdxl)
    for strict in (True, False):
        with pytest.raises(AdapterFormatError) as err:
            with patched(sdxl, [(adapter, 1.0)], strict=strict):
                pass
        msg = str(err.value)
        n = len(adapter.layers)
        assert f"{n} of {n} layers match no module" in msg
        assert "a BFL-layout Flux file" in msg and "this model is an SDXL UNet" in msg
        assert "matches 0 modules" in msg
    assert same_state(sdxl, before)
    info = describe(adapter, sdxl)
    assert "a BFL-layout Flux file" in info["components"]["denoiser"]["error"]
    assert "a BFL-layout Flux file" in format_report(info)


def test_half_matching_file_error_and_one_warning(models, tmp_path, caplog):
    model = models["sdxl"]
    good = tmp_path / "good.safetensors"
    expected = build_file(model, "sdxl", LAYOUTS["kohya_internal"], "lora", good)
    from safetensors.torch import load_file

    tensors = load_file(str(good))
    bad = {k.replace("lora_unet_", "lora_unet_nonexistent_"): v.clone() for k, v in tensors.items()}
    path = tmp_path / "half.safetensors"
    save_file({**tensors, **bad}, str(path))
    adapter = load_adapter(path)
    n = len(adapter.layers)
    before = state(model)
    with pytest.raises(AdapterFormatError) as err:
        with patched(model, [(adapter, 1.0)]):
            pass
    msg = str(err.value)
    assert f"{n // 2} of {n} layers match no module" in msg
    assert "ldm names" in msg and "lora_unet_" in msg and "strict=False" in msg
    assert same_state(model, before)
    with caplog.at_level(logging.WARNING, logger="lycoris_core"):
        with patched(model, [(adapter, 1.0)], strict=False) as patch:
            assert set(patch.plan) == set(expected)
    warnings = [r for r in caplog.records if "match no module" in r.getMessage()]
    assert len(warnings) == 1


def test_inspect_reports_layout_and_matches(models, tmp_path):
    model = models["flux"]
    path = tmp_path / "bfl.safetensors"
    build_file(model, "flux", LAYOUTS["comfy_internal"], "lora", path)
    adapter = load_adapter(path)
    info = describe(adapter, model)
    den = info["components"]["denoiser"]
    assert den["layout"].startswith("BFL names, dotted, prefix 'diffusion_model.'")
    assert den["matched"] == len(adapter.layers) and den["unmatched"] == []
    targets = info["matched"]["diffusion_model.single_blocks.0.linear1"]
    assert "single_transformer_blocks.0.proj_mlp[192:448]" in targets
    text = format_report(info)
    assert (
        "denoiser: BFL names" in text and "-> single_transformer_blocks.0.attn.to_q[0:64]" in text
    )


def test_keys_with_two_spellings_of_one_tensor_are_refused():
    from lycoris_core import adapter_from_state_dict

    sd = {
        "unet.a.lora_A.weight": torch.zeros(2, 4),
        "unet.a.lora_down.weight": torch.zeros(2, 4),
        "unet.a.lora_B.weight": torch.zeros(4, 2),
    }
    with pytest.raises(AdapterFormatError, match=r"'lora_down.weight' tensor twice"):
        adapter_from_state_dict(sd)


def test_names_of_no_known_layout(models, tmp_path):
    path = tmp_path / "odd.safetensors"
    save_file(
        {
            "my_net_block_3.lora_down.weight": torch.ones(2, 4),
            "my_net_block_3.lora_up.weight": torch.ones(4, 2),
        },
        str(path),
    )
    with pytest.raises(AdapterFormatError) as err:
        with patched(models["sd3"], [(load_adapter(path), 1.0)], strict=False):
            pass
    msg = str(err.value)
    assert "1 of 1 layers match no module" in msg and "follow no layout" in msg
    assert "matches 0 modules" in msg


def test_stacked_fused_and_plain_files_each_relative_to_the_base(models, tmp_path):
    """A BFL DoRA file (weight-dependent, fused) and a diffusers-named LoRA on the same
    modules: each contributes its change computed from the base weights."""
    model = models["flux"]
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    ea = build_file(model, "flux", LAYOUTS["comfy_internal"], "dora", a, seed=1)
    eb = build_file(model, "flux", LAYOUTS["peft_transformer"], "lora", b, seed=2)
    shared = set(ea) & set(eb)
    assert len(shared) >= 5
    before = state(model)
    g = torch.Generator().manual_seed(9)
    for mode in ("merge", "dynamic"):
        with patched(model, [(load_adapter(a), 0.7), (load_adapter(b), -1.0)], mode=mode):
            for p in sorted(shared):
                m = model.get_submodule(p)
                x = _module_input(m, g)
                w0 = before[f"{p}.weight"]
                dw = ea[p](0.7)[0] + eb[p](-1.0)[0]
                want = _reference_forward(m, x, w0 + dw, before.get(f"{p}.bias"))
                assert _err(m(x), want) < TOL, f"{mode} {p}"
        assert same_state(model, before)
