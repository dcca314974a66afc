"""The standard tokenizer repo of each text-encoder slot, in the local HF cache or the hub.

The repos are the ones diffusers' single-file loader falls back to for the same text
encoders (``diffusers/loaders/single_file_utils.py``, ``_legacy_load_clip_tokenizer`` and
``create_diffusers_clip_model_from_ldm``): CLIP-L ``openai/clip-vit-large-patch14``, CLIP-G
``laion/CLIP-ViT-bigG-14-laion2B-39B-b160k``, SD2's OpenCLIP-H ``stabilityai/stable-diffusion-2``
(subfolder ``tokenizer``); T5-XXL ``google/t5-v1_1-xxl``, the T5 named in diffusers' pipeline
docstrings (e.g. ``pipelines/ltx/pipeline_ltx.py``) and on the SD3/Flux model cards.

The cache is read with ``local_files_only=True`` (no network). Only :func:`download`, called
when the user passes ``allow_download``, contacts the hub, and then only for tokenizer files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelLoadError

# the files a CLIP or T5 tokenizer folder may hold (nothing else is fetched)
TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "spiece.model",
)


@dataclass(frozen=True)
class TokenizerRepo:
    repo_id: str
    subfolder: str = ""
    own: bool = False  # the slot's own tokenizer (keeps its pad token) or a shared CLIP one

    @property
    def label(self) -> str:
        return f"{self.repo_id}/{self.subfolder}" if self.subfolder else self.repo_id

    def patterns(self) -> list[str]:
        pre = f"{self.subfolder}/" if self.subfolder else ""
        return [pre + f for f in TOKENIZER_FILES]


_CLIP_L = TokenizerRepo("openai/clip-vit-large-patch14")
_CLIP_G = TokenizerRepo("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k")
_SD2 = TokenizerRepo("stabilityai/stable-diffusion-2", "tokenizer", own=True)
_T5 = TokenizerRepo("google/t5-v1_1-xxl", own=True)


def repo_for(family: str, slot: str) -> TokenizerRepo:
    """The standard tokenizer repo of `slot` (the sd15 family's clip_g slot is SD2's H)."""
    if slot == "t5xxl":
        return _T5
    if slot == "clip_l":
        return _CLIP_L
    return _SD2 if family == "sd15" else _CLIP_G


def cache_dir() -> Path:
    """The hub cache as the environment says now: HF_HUB_CACHE, else HF_HOME/hub, else
    huggingface_hub's default (its constants are read at import, the environment is not)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _folder(root: str, repo: TokenizerRepo) -> Path:
    return Path(root) / repo.subfolder if repo.subfolder else Path(root)


def from_cache(repo: TokenizerRepo) -> Path | None:
    """The cached tokenizer folder of `repo`, or None; never touches the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        root = snapshot_download(
            repo.repo_id,
            allow_patterns=repo.patterns(),
            cache_dir=cache_dir(),
            local_files_only=True,
        )
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    folder = _folder(root, repo)
    return folder if folder.is_dir() else None


def download(repo: TokenizerRepo, slot: str) -> Path:
    """Fetch only the tokenizer files of `repo` into the cache (the user allowed it)."""
    from huggingface_hub import snapshot_download

    try:
        root = snapshot_download(
            repo.repo_id, allow_patterns=repo.patterns(), cache_dir=cache_dir()
        )
    except Exception as exc:  # any hub or connection failure is reported
        raise ModelLoadError(
            f"cannot download the {slot} tokenizer from the hub ({repo.label} into "
            f"{cache_dir()}): {type(exc).__name__}: {exc}. Check the connection (and "
            "HF_HUB_OFFLINE), or pass a local folder with --tokenizers DIR"
        ) from exc
    return _folder(root, repo)
