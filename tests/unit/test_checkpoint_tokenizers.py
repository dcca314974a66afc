"""Tokenizers of single files from the local Hugging Face cache, and the hub only on request.

A fake hub cache in huggingface_hub's layout (``models--org--name/refs/main`` +
``snapshots/<hash>/``) holds the tiny SD3 pipeline's tokenizers under the standard repo ids;
sockets are blocked and every connection attempt is recorded.
"""

from __future__ import annotations

import socket
from pathlib import Path

import checkpoint_files as cf
import pytest

from lycoris_core import tiny
from lycoris_core.checkpoints import build_pipeline, inspect_files
from lycoris_core.errors import LycorisError, ModelLoadError

REPOS = {  # sd3 pipeline tokenizer attribute -> the standard repo of its slot
    "tokenizer": "openai/clip-vit-large-patch14",
    "tokenizer_2": "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k",
    "tokenizer_3": "google/t5-v1_1-xxl",
}


@pytest.fixture
def attempts(monkeypatch: pytest.MonkeyPatch) -> list:
    """Block the network; the list gets one entry per attempted connection or look-up."""
    seen: list = []

    def refuse(*args: object, **kwargs: object) -> None:
        seen.append(args)
        raise ConnectionRefusedError(f"network blocked by the test: {args[1:]!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)  # read at import: the hub path must be open
    return seen


@pytest.fixture(scope="module")
def sd3() -> object:
    return tiny.build_pipeline("sd3")


@pytest.fixture
def checkpoint(sd3, tmp_path: Path) -> Path:
    base, _, _ = cf.write_set("sd3", sd3, "fp32", tmp_path)
    return base


def hub_cache(root: Path, pipe: object, names: tuple[str, ...]) -> Path:
    """The pipeline's tokenizers as huggingface_hub caches the standard repos."""
    for name in names:
        repo = root / ("models--" + REPOS[name].replace("/", "--"))
        commit = "0123456789abcdef0123456789abcdef01234567"
        getattr(pipe, name).save_pretrained(str(repo / "snapshots" / commit))
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
    return root


def test_single_file_loads_with_tokenizers_from_the_hf_cache(
    sd3, checkpoint, attempts, tmp_path, monkeypatch
) -> None:
    cache = hub_cache(tmp_path / "hub", sd3, tuple(REPOS))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    pipe = build_pipeline(inspect_files(checkpoint), [])
    for name in REPOS:
        tok, ref = getattr(pipe, name), getattr(sd3, name)
        assert tok("a red cat").input_ids == ref("a red cat").input_ids
        assert str(cache) in str(tok.name_or_path)
    assert pipe.tokenizer_2.pad_token == "!"  # a shared CLIP folder gets G's pad token
    assert attempts == []


def test_hf_home_is_honoured_when_hf_hub_cache_is_unset(
    sd3, checkpoint, attempts, tmp_path, monkeypatch
) -> None:
    hub_cache(tmp_path / "home" / "hub", sd3, tuple(REPOS))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    pipe = build_pipeline(inspect_files(checkpoint), [])
    assert pipe.tokenizer_3("a cat").input_ids == sd3.tokenizer_3("a cat").input_ids
    assert attempts == []


def test_missing_tokenizer_names_slot_places_and_fixes(
    sd3, checkpoint, attempts, tmp_path, monkeypatch
) -> None:
    empty = tmp_path / "empty-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(empty))
    given = tmp_path / "not-a-tokenizer-folder"
    given.mkdir()
    with pytest.raises(ModelLoadError) as err:
        build_pipeline(inspect_files(checkpoint), [given])
    msg = str(err.value)
    for part in ("clip_l", str(given), str(empty), REPOS["tokenizer"]):
        assert part in msg
    assert "--tokenizers" in msg and "--allow-download" in msg and "HF_HUB_CACHE" in msg
    # the CLIP tokenizers cached, T5 not: the message names the T5 slot and its repo
    hub_cache(empty, sd3, ("tokenizer", "tokenizer_2"))
    with pytest.raises(ModelLoadError, match=r"t5xxl .*google/t5-v1_1-xxl"):
        build_pipeline(inspect_files(checkpoint), [given])
    assert attempts == []  # nothing contacted the network


def test_allow_download_goes_to_the_hub_and_reports_its_failure(
    checkpoint, attempts, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
    with pytest.raises(ModelLoadError) as err:
        build_pipeline(inspect_files(checkpoint), [], allow_download=True)
    msg = str(err.value)
    assert "cannot download the clip_l tokenizer" in msg and REPOS["tokenizer"] in msg
    assert attempts, "the hub was not contacted"
    chain, exc = [], err.value.__cause__
    while exc is not None:
        chain.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    assert any("network blocked by the test" in c for c in chain), chain


def test_cli_allow_download_flag(checkpoint, attempts, tmp_path, monkeypatch, capsys) -> None:
    from lycoris_core.__main__ import main

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    rest = ["--prompt", "a cat", "--steps", "1", "--width", "32", "--height", "32"]
    rest += ["--out", str(tmp_path / "out.png"), "--device", "cpu"]
    assert main(["sample", "--base", str(checkpoint), *rest]) == 2
    assert "--allow-download" in capsys.readouterr().err and attempts == []
    assert main(["sample", "--base", str(checkpoint), "--allow-download", *rest]) == 2
    assert "cannot download the clip_l tokenizer" in capsys.readouterr().err and attempts
    assert not (tmp_path / "out.png").exists()
    assert issubclass(ModelLoadError, LycorisError)
