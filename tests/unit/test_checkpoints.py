# ruff: noqa: F811  (pytest fixtures imported from checkpoint_files, used as arguments)
"""Base models from single files and split sets, offline (lycoris_core/checkpoints).

Files are written from the tiny pipelines by tests/unit/checkpoint_files.py (its own renaming
to the original layouts), then loaded with sockets blocked and no diffusers folder.
"""

from __future__ import annotations

import checkpoint_files as cf
import pytest
import torch
from checkpoint_files import offline, source, tokenizers, write_set  # noqa: F401 (fixtures)

from lycoris_core import tiny
from lycoris_core.checkpoints import build_pipeline, inspect_files, read_header

UNET_PREFIX = "model.diffusion_model."
STORAGES = ("fp32", "fp16", "bf16", "fp8", "scaled_fp8")
DTYPE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FP32_IMAGE_ATOL = 1e-5  # as in test_tiny: two fp32 runs on bitwise-equal weights
FP8_REL = 2.0**-4  # e4m3: 3 mantissa bits, round to nearest
BF16_REL = 2.0**-8
VARIANT = {"sd15": "sd1", "sdxl": "sdxl-base", "sd3": "sd3-medium", "flux": "flux-dev"}


def _load(family, pipe, storage, folder, tokenizers, dtype=torch.float32, fp8="keep"):
    base, encoders, vae = write_set(family, pipe, storage, folder)
    found = inspect_files(base, encoders, vae)
    return found, build_pipeline(found, [tokenizers[family]], dtype=dtype, fp8=fp8)


def _denoiser_name(family: str) -> str:
    return "unet" if family in ("sd15", "sdxl") else "transformer"


def _check_weights(family: str, src: object, got: object, storage: str) -> None:
    den = _denoiser_name(family)
    for name, comp in src.components.items():
        if not isinstance(comp, torch.nn.Module):
            continue
        a = comp.state_dict()
        b = getattr(got, name).state_dict()
        assert set(a) <= set(b), (name, sorted(set(a) - set(b))[:3])
        for key, ref in a.items():
            w = b[key]
            if storage in DTYPE:  # the same tensors, read back: bitwise
                assert torch.equal(w, ref.to(DTYPE[storage])), (name, key)
                continue
            if name != den:  # fp8 is the denoiser's; the rest is bf16 (or fp32 cast to it)
                assert torch.equal(w, ref.to(torch.bfloat16)), (name, key)
                continue
            rf = ref.float()
            scale = rf.abs().max().item() / 448.0
            tol = FP8_REL * rf.abs() + (scale * 2.0**-6 if storage == "scaled_fp8" else 2.0**-9)
            assert ((w.float() - rf).abs() <= tol + 1e-12).all(), (name, key)
            if storage == "fp8" and w.dtype == cf.FP8 and key.endswith("weight"):
                assert torch.equal(w, ref.to(cf.FP8)), (name, key)  # stored as is, still fp8


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_weights_equal_the_source(family, storage, source, tokenizers, tmp_path) -> None:
    dtype = DTYPE.get(storage, torch.bfloat16)
    found, pipe = _load(family, source[family], storage, tmp_path, tokenizers, dtype=dtype)
    assert (found.family, found.variant, found.profile.name) == (family, VARIANT[family], "tiny")
    want = {"fp8": "fp8_e4m3fn", "scaled_fp8": "fp8_e4m3fn (scaled)"}.get(storage, storage)
    assert found.storage == want
    assert type(pipe) is type(source[family])
    _check_weights(family, source[family], pipe, storage)


def _sample(pipe: object, family: str) -> torch.Tensor:
    size = tiny.DEFAULT_SIZE[family]
    return pipe(
        prompt="a cat",
        num_inference_steps=2,
        height=size,
        width=size,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_sample_equals_the_source_pipeline(family, source, tokenizers, tmp_path) -> None:
    _, pipe = _load(family, source[family], "fp32", tmp_path, tokenizers)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config == source[family].scheduler.config or all(
        pipe.scheduler.config[k] == v
        for k, v in source[family].scheduler.config.items()
        if not k.startswith("_")
    )
    image = _sample(pipe, family)
    assert image.std() > 0
    torch.testing.assert_close(image, _sample(source[family], family), rtol=0, atol=FP32_IMAGE_ATOL)


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_fp8_stays_fp8_and_samples(family, source, tokenizers, tmp_path) -> None:
    """fp8 kept: Linear weights stored fp8, computing in bf16; the sample is close to the
    source's (fp8 rounding of the denoiser only)."""
    _, pipe = _load(family, source[family], "fp8", tmp_path, tokenizers, dtype=torch.bfloat16)
    den = getattr(pipe, _denoiser_name(family))
    dtypes = {m.weight.dtype for m in den.modules() if isinstance(m, torch.nn.Linear)}
    assert cf.FP8 in dtypes
    fp8_bytes = sum(p.numel() * p.element_size() for p in den.parameters())
    src_den = getattr(source[family], _denoiser_name(family))
    assert fp8_bytes < 0.75 * sum(p.numel() * 2 for p in src_den.parameters())
    pipe.set_progress_bar_config(disable=True)
    image = _sample(pipe, family).float()
    ref = _sample(source[family], family).float()
    assert torch.isfinite(image).all()
    assert (image - ref).abs().mean() < 0.05


def test_fp8_upcast_gives_plain_weights(source, tokenizers, tmp_path) -> None:
    _, pipe = _load("flux", source["flux"], "fp8", tmp_path, tokenizers, fp8="upcast")
    dtypes = {p.dtype for p in pipe.transformer.parameters()}
    assert dtypes == {torch.float32}
    ref = source["flux"].transformer.x_embedder.weight
    assert torch.equal(pipe.transformer.x_embedder.weight, ref.to(cf.FP8).float())


def test_headers_are_enough_to_detect(source, tmp_path) -> None:
    base, _, _ = write_set("sdxl", source["sdxl"], "fp16", tmp_path)
    header = read_header(base)
    assert header.storage_dtype(UNET_PREFIX) == "fp16"
    found = inspect_files(base)
    assert set(found.parts) == {"denoiser", "vae", "clip_l", "clip_g"}
    assert found.parts["clip_g"].layout == "open_clip"
    assert "sdxl (sdxl-base" in found.describe()


def test_sd35_variants(tokenizers, tmp_path) -> None:
    """qk-norm = SD3.5; a second attention in some blocks = 3.5 medium, else large."""
    from diffusers import SD3Transformer2DModel

    pipe = tiny.build_pipeline("sd3")
    for dual, variant in (((), "sd3.5-large"), ((0,), "sd3.5-medium")):
        torch.manual_seed(0)
        pipe.transformer = SD3Transformer2DModel(
            **{**pipe.transformer.config, "qk_norm": "rms_norm", "dual_attention_layers": dual}
        )
        sai = {UNET_PREFIX + k: v for k, v in _sai_with_extras(pipe.transformer).items()}
        tensors = cf.checkpoint_tensors("sd3", _without_transformer(pipe)) | sai
        f = cf.write(tmp_path / f"{variant}.safetensors", tensors)
        found = inspect_files(f)
        assert found.variant == variant
        got = build_pipeline(found, [tokenizers["sd3"]])
        for k, v in pipe.transformer.state_dict().items():
            assert torch.equal(got.transformer.state_dict()[k], v), k


def _without_transformer(pipe):
    class View:
        def __init__(self, p):
            self.__dict__.update(
                {
                    n: getattr(p, n)
                    for n in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")
                }
            )
            self.transformer = tiny.build_pipeline("sd3").transformer

    return View(pipe)


def _sai_with_extras(model) -> dict:
    """SAI names for qk-norm (``ln_q``/``ln_k``) and MMDiT-X second attention (``attn2``)."""
    out = cf.sd3_to_sai(model)
    sd = model.state_dict()
    for i in range(model.config.num_layers):
        s, x, c = (
            f"transformer_blocks.{i}.",
            f"joint_blocks.{i}.x_block.",
            f"joint_blocks.{i}.context_block.",
        )
        for a, b in (("norm_q", "ln_q"), ("norm_k", "ln_k")):
            out[f"{x}attn.{b}.weight"] = sd[f"{s}attn.{a}.weight"]
            if f"{s}attn.norm_added_{a[-1]}.weight" in sd:
                out[f"{c}attn.{b}.weight"] = sd[f"{s}attn.norm_added_{a[-1]}.weight"]
        if f"{s}attn2.to_q.weight" in sd:
            for leaf in ("weight", "bias"):
                out[f"{x}attn2.qkv.{leaf}"] = torch.cat(
                    [sd[f"{s}attn2.to_{p}.{leaf}"] for p in "qkv"]
                )
                out[f"{x}attn2.proj.{leaf}"] = sd[f"{s}attn2.to_out.0.{leaf}"]
            out[f"{x}attn2.ln_q.weight"] = sd[f"{s}attn2.norm_q.weight"]
            out[f"{x}attn2.ln_k.weight"] = sd[f"{s}attn2.norm_k.weight"]
    return out


def test_sd2_is_told_by_its_openclip_and_v_prediction_is_overridable(
    source, tokenizers, tmp_path
) -> None:
    src = source["sd15"]
    tensors = cf.checkpoint_tensors("sd15", src)
    tensors = {k: v for k, v in tensors.items() if not k.startswith("cond_stage_model.")}
    from transformers import CLIPTextModelWithProjection

    g = CLIPTextModelWithProjection(src.text_encoder.config)
    g.text_model.load_state_dict(src.text_encoder.state_dict())
    tensors |= {
        "cond_stage_model.model." + k: v
        for k, v in cf.open_clip(g).items()
        if k != "text_projection"
    }
    f = cf.write(tmp_path / "sd2.safetensors", tensors)
    found = inspect_files(f)
    assert (found.variant, found.prediction_type) == ("sd2", "v_prediction")
    pipe = build_pipeline(found, [tokenizers["sd15"]])
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    for k, v in src.text_encoder.state_dict().items():
        assert torch.equal(pipe.text_encoder.state_dict()[k], v), k
    assert inspect_files(f, prediction_type="epsilon").prediction_type == "epsilon"


def test_cli_samples_a_split_flux_set(source, tokenizers, tmp_path, capsys) -> None:
    import json

    from lycoris_core.__main__ import main

    base, encoders, vae = write_set("flux", source["flux"], "fp8", tmp_path)
    files = ["--base", str(base), "--vae", str(vae), "--tokenizers", str(tokenizers["flux"])]
    rest = ["--prompt", "a cat", "--steps", "2", "--width", "32", "--height", "32"]
    rest += ["--out", str(tmp_path / "out.png"), "--device", "cpu", "--dtype", "bf16", "--json"]
    encoder_args = [a for f in encoders for a in ("--text-encoder", str(f))]
    assert main(["sample", *files, *encoder_args, *rest]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["family"] == "flux" and result["base"] == "flux (flux-dev), stored fp8_e4m3fn"
    assert (tmp_path / "out.png").is_file()
    assert main(["sample", *files, *rest]) == 2  # no text encoders given
    assert "has no CLIP-L component" in capsys.readouterr().err


def test_load_model_keeps_fp8_storage(source, tokenizers, tmp_path) -> None:
    """The LoadedModel handle (what nodes and the CLI use) does not upcast fp8 weights."""
    from lycoris_core.models import load_model

    base, encoders, vae = write_set("flux", source["flux"], "fp8", tmp_path)
    model = load_model(
        base,
        text_encoders=encoders,
        vae=vae,
        tokenizer_dirs=[tokenizers["flux"]],
        dtype="bf16",
        device="cpu",
    )
    assert model.storage == "fp8_e4m3fn" and model.dtype == torch.bfloat16
    linear = model.denoiser.transformer_blocks[0].attn.to_q
    assert linear.weight.dtype == cf.FP8
    ref = source["flux"].transformer.transformer_blocks[0].attn.to_q.weight
    assert torch.equal(linear.weight, ref.to(cf.FP8))


def test_comfyui_tokenizer_layout(source, tmp_path) -> None:
    """ComfyUI's tree: comfy/sd1_tokenizer (CLIP) and comfy/text_encoders/t5_tokenizer (T5)."""
    comfy = tmp_path / "comfy"
    source["flux"].tokenizer.save_pretrained(str(comfy / "sd1_tokenizer"))
    source["flux"].tokenizer_2.save_pretrained(str(comfy / "text_encoders" / "t5_tokenizer"))
    base, encoders, vae = write_set("flux", source["flux"], "fp32", tmp_path)
    pipe = build_pipeline(inspect_files(base, encoders, vae), [comfy])
    ids = pipe.tokenizer_2("a cat").input_ids
    assert ids == source["flux"].tokenizer_2("a cat").input_ids
    assert type(pipe.tokenizer_2).__name__ == type(source["flux"].tokenizer_2).__name__


def test_sd3_split_set(source, tokenizers, tmp_path) -> None:
    """An SAI MMDiT diffusion model + clip_l, clip_g, t5xxl + VAE files (CLIP-L before G when
    their widths do not tell them apart, as in DualCLIPLoader/TripleCLIPLoader)."""
    src = source["sd3"]
    files = {
        "sd3.safetensors": cf.sd3_to_sai(src.transformer),
        "clip_l.safetensors": cf.hf_clip(src.text_encoder),
        "clip_g.safetensors": cf.hf_clip(src.text_encoder_2),
        "t5xxl.safetensors": cf.t5_file(src.text_encoder_3),
        "vae.safetensors": cf.vae_to_ldm(src.vae),
    }
    paths = {n: cf.write(tmp_path / n, cf.to_storage(t, "fp16")) for n, t in files.items()}
    found = inspect_files(
        paths["sd3.safetensors"],
        [paths["clip_l.safetensors"], paths["clip_g.safetensors"], paths["t5xxl.safetensors"]],
        paths["vae.safetensors"],
    )
    assert (found.family, found.variant, found.storage) == ("sd3", "sd3-medium", "fp16")
    assert found.parts["clip_g"].name == "clip_g.safetensors"
    pipe = build_pipeline(found, [tokenizers["sd3"]], dtype=torch.float16)
    _check_weights("sd3", src, pipe, "fp16")


def test_flux_checkpoint_and_extra_tensors_of_real_files(source, tokenizers, tmp_path) -> None:
    """A Flux checkpoint as ComfyUI saves one (all parts in one file, scaled fp8 denoiser),
    plus the extra tensors real files carry: position ids, DDPM buffers, logit_scale."""
    src = source["flux"]
    split = cf.flux_split(src)
    tensors = {UNET_PREFIX + k: v for k, v in split["flux.safetensors"].items()}
    tensors = cf.to_storage(tensors, "scaled_fp8", UNET_PREFIX)
    tensors |= {"first_stage_model." + k: v for k, v in split["ae.safetensors"].items()}
    tensors |= {
        "text_encoders.clip_l.transformer." + k: v for k, v in split["clip_l.safetensors"].items()
    }
    tensors |= {
        "text_encoders.t5xxl.transformer." + k: v for k, v in split["t5xxl.safetensors"].items()
    }
    tensors["text_encoders.clip_l.transformer.text_model.embeddings.position_ids"] = torch.arange(
        77
    )[None]
    tensors["text_encoders.clip_l.transformer.logit_scale"] = torch.tensor(4.6)
    tensors["alphas_cumprod"] = torch.rand(1000)
    found = inspect_files(cf.write(tmp_path / "flux-ckpt.safetensors", tensors))
    assert found.describe() == "flux (flux-dev), stored fp8_e4m3fn (scaled)"
    pipe = build_pipeline(found, [tokenizers["flux"]], dtype=torch.bfloat16)
    _check_weights("flux", src, pipe, "scaled_fp8")


def test_gguf_flux_stays_quantised_and_samples(source, tokenizers, tmp_path) -> None:
    """A Q8_0 GGUF Flux diffusion model (needs the optional gguf package) + split files."""
    pytest.importorskip("gguf", reason="the optional gguf package writes the GGUF file")
    src = source["flux"]
    split = cf.flux_split(src)
    base = cf.write_gguf(tmp_path / "flux-Q8_0.gguf", split["flux.safetensors"])
    others = {n: cf.write(tmp_path / n, split[n]) for n in split if n != "flux.safetensors"}
    found = inspect_files(
        base, [others["clip_l.safetensors"], others["t5xxl.safetensors"]], others["ae.safetensors"]
    )
    assert found.describe() == "flux (flux-dev), stored gguf_q8_0"
    pipe = build_pipeline(found, [tokenizers["flux"]])
    q = pipe.transformer.transformer_blocks[0].attn.to_q
    assert type(q).__name__ == "GGUFLinear" and hasattr(q.weight, "quant_type")
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    ref = src.transformer.transformer_blocks[0].attn.to_q.weight
    got = dequantize_gguf_tensor(q.weight).float()
    assert ((got - ref).abs() <= ref.abs().amax(dim=1, keepdim=True) / 127).all()  # Q8_0 step
    pipe.set_progress_bar_config(disable=True)
    image = _sample(pipe, "flux")
    assert (image - _sample(src, "flux")).abs().mean() < 0.02
