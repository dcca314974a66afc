"""Tests of lycoris_core.tiny: tiny random-weight pipelines per model family."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import diffusers
import huggingface_hub.constants
import pytest
import torch
from diffusers import DiffusionPipeline

from lycoris_core import tiny
from lycoris_core.errors import LycorisError

PIPELINE_CLASSES = {
    "sd15": diffusers.StableDiffusionPipeline,
    "sdxl": diffusers.StableDiffusionXLPipeline,
    "sd3": diffusers.StableDiffusion3Pipeline,
    "flux": diffusers.FluxPipeline,
}
DENOISER = {"sd15": "unet", "sdxl": "unet", "sd3": "transformer", "flux": "transformer"}
MAX_BYTES = 10 * 1024 * 1024
# Two separate fp32 computations on bitwise-equal weights (a loaded pipeline and the one it was
# saved from live at other addresses) may differ in the last bits on another CPU or thread
# count: images in 0..1 agree within this, and any wrong weight or setting moves them far more.
FP32_IMAGE_ATOL = 1e-5
SCHEDULER_CHANGE = {  # one setting per family that changes the sampling trajectory
    "sd15": {"beta_end": 0.02},
    "sdxl": {"beta_end": 0.02},
    "sd3": {"shift": 1.0},
    "flux": {"max_shift": 3.0},  # Flux shifts dynamically: mu from base/max shift
}


def _state(pipe: DiffusionPipeline) -> dict[str, torch.Tensor]:
    """Every tensor of every torch component, keyed ``component.param``."""
    return {
        f"{name}.{key}": tensor
        for name, module in pipe.components.items()
        if isinstance(module, torch.nn.Module)
        for key, tensor in module.state_dict().items()
    }


def _assert_same_state(a: DiffusionPipeline, b: DiffusionPipeline) -> None:
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def _settings(scheduler: object) -> dict:
    """A scheduler's settings, without the bookkeeping keys (class, version, defaults used)."""
    return {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}


def _sample(pipe: DiffusionPipeline, family: str) -> torch.Tensor:
    size = tiny.DEFAULT_SIZE[family]
    return pipe(
        prompt="a cat",
        num_inference_steps=2,
        height=size,
        width=size,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The tiny models gain nothing from intra-op threads, and with every core busy (tests
    run beside other jobs) torch's thread pool makes a 50 ms sampling take seconds."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def offline() -> Iterator[None]:
    """Hub offline mode, and any network connection fails loudly."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args!r}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        yield


@pytest.fixture(scope="module")
def built() -> dict[str, DiffusionPipeline]:
    """Each family built once in memory (seed 0)."""
    return {family: tiny.build_pipeline(family) for family in tiny.FAMILIES}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, offline: None) -> dict[str, Path]:
    """Each family saved once with make_tiny (seed 0)."""
    root = tmp_path_factory.mktemp("tiny")
    return {family: tiny.make_tiny(family, root / family) for family in tiny.FAMILIES}


@pytest.fixture(scope="module")
def loaded(saved: dict[str, Path], offline: None) -> dict[str, DiffusionPipeline]:
    """Each saved family loaded back with DiffusionPipeline.from_pretrained, offline."""
    pipes = {}
    for family, path in saved.items():
        pipe = DiffusionPipeline.from_pretrained(path)
        pipe.set_progress_bar_config(disable=True)
        pipes[family] = pipe
    return pipes


def test_families_and_sizes() -> None:
    assert tiny.FAMILIES == ("sd15", "sdxl", "sd3", "flux")
    assert set(tiny.DEFAULT_SIZE) == set(tiny.FAMILIES)


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_pipeline_class(family: str, built: dict, loaded: dict) -> None:
    assert type(built[family]) is PIPELINE_CLASSES[family]
    assert type(loaded[family]) is PIPELINE_CLASSES[family]


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_saved_equals_in_memory(family: str, built: dict, loaded: dict) -> None:
    assert built[family].components.keys() == loaded[family].components.keys()
    for name, component in built[family].components.items():
        assert type(loaded[family].components[name]) is type(component), name
    _assert_same_state(built[family], loaded[family])


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_saved_folder_is_small_safetensors(family: str, saved: dict) -> None:
    files = [f for f in saved[family].rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) < MAX_BYTES
    assert (saved[family] / "model_index.json").is_file()
    assert any(f.suffix == ".safetensors" for f in files)
    assert not any(f.suffix == ".bin" for f in files)
    # no staging folder left next to the result
    assert sorted(p.name for p in saved[family].parent.iterdir()) == sorted(saved)


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_same_seed_is_bitwise_identical(family: str, built: dict) -> None:
    _assert_same_state(built[family], tiny.build_pipeline(family, seed=0))


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_different_seed_changes_every_component(family: str, built: dict) -> None:
    other = tiny.build_pipeline(family, seed=1)
    for name, module in built[family].components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        a = module.state_dict()
        b = other.components[name].state_dict()
        assert a.keys() == b.keys()
        assert any(not torch.equal(a[k], b[k]) for k in a), name


def test_build_leaves_global_rng_untouched() -> None:
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    tiny.build_pipeline("sd15", seed=5)
    assert torch.equal(before, torch.get_rng_state())


def test_build_does_not_depend_on_global_rng(built: dict) -> None:
    torch.manual_seed(99)
    torch.rand(1000)
    _assert_same_state(built["sd15"], tiny.build_pipeline("sd15", seed=0))


def test_dtype() -> None:
    pipe = tiny.build_pipeline("flux", dtype=torch.float16)
    tensors = _state(pipe).values()
    assert {t.dtype for t in tensors if t.is_floating_point()} == {torch.float16}


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_sampling(family: str, built: dict, loaded: dict) -> None:
    size = tiny.DEFAULT_SIZE[family]
    image = _sample(loaded[family], family)
    assert image.shape == (1, 3, size, size)
    assert torch.isfinite(image).all()
    assert image.std() > 0
    # the loaded pipeline is the in-memory one: the same weights (bitwise), components and
    # scheduler settings, hence the same images up to fp32 rounding
    _assert_same_state(built[family], loaded[family])
    assert _settings(loaded[family].scheduler) == _settings(built[family].scheduler)
    torch.testing.assert_close(image, _sample(built[family], family), rtol=0, atol=FP32_IMAGE_ATOL)


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_sampling_tolerance_sees_a_changed_weight_or_scheduler(family: str, loaded: dict) -> None:
    """FP32_IMAGE_ATOL is far below what one wrong weight or scheduler setting changes."""
    pipe = loaded[family]
    image = _sample(pipe, family)
    denoiser = getattr(pipe, DENOISER[family])
    last = "conv_out" if DENOISER[family] == "unet" else "proj_out"
    weight = getattr(denoiser, last).weight
    saved = weight.data.clone()
    try:
        with torch.no_grad():
            weight.mul_(1.01)  # the last layer's weights off by 1%
        assert (_sample(pipe, family) - image).abs().max() > 100 * FP32_IMAGE_ATOL
    finally:
        weight.data.copy_(saved)
    scheduler = pipe.scheduler
    try:
        pipe.scheduler = type(scheduler).from_config(scheduler.config, **SCHEDULER_CHANGE[family])
        assert (_sample(pipe, family) - image).abs().max() > 100 * FP32_IMAGE_ATOL
    finally:
        pipe.scheduler = scheduler


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux"])
def test_prompt_changes_the_image(family: str, built: dict) -> None:
    size = tiny.DEFAULT_SIZE[family]
    images = [
        built[family](
            prompt=prompt,
            num_inference_steps=1,
            height=size,
            width=size,
            output_type="pt",
            generator=torch.Generator().manual_seed(0),
        ).images
        for prompt in ("a cat", "a photo of a red dog")
    ]
    assert not torch.equal(images[0], images[1])


def _names(module: torch.nn.Module) -> set[str]:
    return {type(m).__name__ for m in module.modules()}


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_unet_has_cross_attention_transformers(family: str, built: dict) -> None:
    from diffusers.models.attention import FeedForward
    from diffusers.models.attention_processor import Attention
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    unet = built[family].unet
    assert type(unet).__name__ == "UNet2DConditionModel"
    transformers = [m for m in unet.modules() if isinstance(m, Transformer2DModel)]
    assert transformers
    for block in transformers:
        inner = list(block.modules())
        assert any(type(m) is Attention for m in inner)
        assert any(type(m) is FeedForward for m in inner)
    cross = [m for m in unet.modules() if type(m) is Attention and m.is_cross_attention]
    assert cross
    text_dim = unet.config.cross_attention_dim
    assert all(m.to_k.in_features == text_dim for m in cross)


def test_sdxl_layout(built: dict) -> None:
    pipe = built["sdxl"]
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert pipe.unet.config.cross_attention_dim == (
        pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    )


def test_sd3_layout(built: dict) -> None:
    pipe = built["sd3"]
    assert type(pipe.transformer).__name__ == "SD3Transformer2DModel"
    assert type(pipe.text_encoder_3).__name__ == "T5EncoderModel"
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert len(pipe.transformer.transformer_blocks) >= 1


def test_flux_layout(built: dict) -> None:
    from diffusers.models.transformers.transformer_flux import (
        FluxAttention,
        FluxSingleTransformerBlock,
        FluxTransformerBlock,
    )

    pipe = built["flux"]
    transformer = pipe.transformer
    assert type(transformer).__name__ == "FluxTransformer2DModel"
    assert transformer.config.guidance_embeds is True
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert type(pipe.text_encoder_2).__name__ == "T5EncoderModel"
    assert len(transformer.transformer_blocks) >= 1
    assert len(transformer.single_transformer_blocks) >= 1
    for block in transformer.transformer_blocks:
        assert type(block) is FluxTransformerBlock
        assert type(block.attn) is FluxAttention
    for block in transformer.single_transformer_blocks:
        assert type(block) is FluxSingleTransformerBlock
        assert isinstance(block.proj_mlp, torch.nn.Linear)
        assert isinstance(block.proj_out, torch.nn.Linear)
    assert any(isinstance(m, FluxAttention) for m in transformer.modules())


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_linear_dims_are_factorisable(family: str, built: dict) -> None:
    denoiser = getattr(built[family], DENOISER[family])
    linears = [m for m in denoiser.modules() if isinstance(m, torch.nn.Linear)]
    assert linears
    for m in linears:
        if m.in_features > 16:  # skip e.g. timestep sinusoid projections
            assert m.in_features % 16 == 0, m
        assert m.out_features % 16 == 0, m


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_tokenizers(family: str, loaded: dict) -> None:
    pipe = loaded[family]
    pairs = [
        (name, pipe.components[name], pipe.components[name.replace("tokenizer", "text_encoder")])
        for name in ("tokenizer", "tokenizer_2", "tokenizer_3")
        if pipe.components.get(name) is not None
    ]
    assert pairs
    for name, tokenizer, encoder in pairs:
        assert len(tokenizer) == encoder.config.vocab_size, name
        ids = tokenizer("a photo of a cat", add_special_tokens=False).input_ids
        assert len(ids) == 5, name  # one token per word
        assert tokenizer.unk_token_id not in ids, name
        tokens = tokenizer.convert_ids_to_tokens(ids)
        words = [t.strip("▁").removesuffix("</w>") for t in tokens]
        assert {"photo", "cat"} <= set(words), (name, tokens)
        max_length = 77 if type(tokenizer).__name__ == "CLIPTokenizer" else 256
        padded = tokenizer(
            "a photo of a cat",
            padding="max_length",
            max_length=max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        assert padded.shape == (1, max_length)
        assert int(padded.max()) < encoder.config.vocab_size
        hidden = encoder(padded)[0]
        assert torch.isfinite(hidden).all()


def test_clip_tokenizer_layout(loaded: dict) -> None:
    tokenizer = loaded["sd15"].tokenizer
    assert type(tokenizer).__name__ == "CLIPTokenizer"
    assert tokenizer.model_max_length == 77
    ids = tokenizer("A photo of a cat").input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert ids[-1] == tokenizer.eos_token_id
    assert len(ids) == 7  # bos, 5 whole words (lowercased), eos
    assert loaded["sd15"].text_encoder.config.eos_token_id == tokenizer.eos_token_id
    # any ASCII text encodes without unknown tokens (byte-level alphabet)
    odd = tokenizer("zebra-crossing #42 @ xyzzy!", add_special_tokens=False).input_ids
    assert odd
    assert tokenizer.eos_token_id not in odd


def test_t5_tokenizer_layout(loaded: dict) -> None:
    tokenizer = loaded["flux"].tokenizer_2
    assert type(tokenizer).__name__ == "T5Tokenizer"
    assert tokenizer.model_max_length >= 512  # FluxPipeline pads T5 prompts to 512
    ids = tokenizer("a photo of a cat").input_ids
    assert len(ids) == 6  # 5 whole words, then </s>
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in tokenizer("Zebra-crossing #42!").input_ids


def test_make_tiny_into_existing_empty_folder(tmp_path: Path, offline: None) -> None:
    target = tmp_path / "empty"
    target.mkdir()
    result = tiny.make_tiny("sd15", target, seed=3)
    assert result == target
    assert (target / "model_index.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["empty"]
    pipe = DiffusionPipeline.from_pretrained(str(target))
    _assert_same_state(pipe, tiny.build_pipeline("sd15", seed=3))


def test_make_tiny_refuses_non_empty_folder(tmp_path: Path) -> None:
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(LycorisError, match="busy") as info:
        tiny.make_tiny("sd15", target)
    assert "empty folder" in str(info.value)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["busy"]


def test_make_tiny_refuses_a_file(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(LycorisError):
        tiny.make_tiny("flux", target)


@pytest.mark.parametrize("call", [tiny.build_pipeline, tiny.make_tiny])
def test_unknown_family(call: object, tmp_path: Path) -> None:
    args = ("sd2",) if call is tiny.build_pipeline else ("sd2", tmp_path / "out")
    with pytest.raises(LycorisError, match="sd2") as info:
        call(*args)  # type: ignore[operator]
    for family in tiny.FAMILIES:
        assert family in str(info.value)
    assert not (tmp_path / "out").exists()


def test_flux_transformer_config_overrides() -> None:
    base = tiny.flux_transformer_config()
    assert base["guidance_embeds"] is True
    assert sum(base["axes_dims_rope"]) == base["attention_head_dim"]
    config = tiny.flux_transformer_config(
        num_layers=3,
        num_single_layers=2,
        attention_head_dim=64,
        num_attention_heads=3,
        joint_attention_dim=96,
        pooled_projection_dim=48,
    )
    assert sum(config["axes_dims_rope"]) == 64
    assert tiny.flux_transformer_config() == base  # no shared mutable state
    model = diffusers.FluxTransformer2DModel(**config)
    assert len(model.transformer_blocks) == 3
    assert len(model.single_transformer_blocks) == 2
    tokens, text = 16, 8
    out = model(
        hidden_states=torch.randn(1, tokens, config["in_channels"]),
        encoder_hidden_states=torch.randn(1, text, 96),
        pooled_projections=torch.randn(1, 48),
        timestep=torch.tensor([0.5]),
        guidance=torch.tensor([3.5]),
        img_ids=torch.zeros(tokens, 3),
        txt_ids=torch.zeros(text, 3),
        return_dict=False,
    )[0]
    assert out.shape == (1, tokens, config["in_channels"])


def test_flux_transformer_config_rejects_bad_options() -> None:
    with pytest.raises(LycorisError, match="num_layer"):
        tiny.flux_transformer_config(num_layer=2)
    with pytest.raises(LycorisError, match="axes_dims_rope"):
        tiny.flux_transformer_config(attention_head_dim=32, axes_dims_rope=(8, 8, 8))


def test_every_listed_word_is_one_token(loaded: dict) -> None:
    pipe = loaded["sd3"]  # two CLIP tokenizers and a T5 one
    for tokenizer in (pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3):
        for word in tiny.vocabularies._WORDS:
            ids = tokenizer(word, add_special_tokens=False).input_ids
            assert len(ids) == 1, (type(tokenizer).__name__, word, ids)
