"""Tokenizers for checkpoint files: local folders, the local Hugging Face cache, the hub.

Single files carry no tokenizers. They come from the folders the caller gives, searched in
order, per slot, then from the local Hugging Face cache (:mod:`.hub_tokenizers`: the
standard tokenizer repo of the slot, read with ``local_files_only``), and from the hub only
when the caller passes ``allow_download=True``. In a folder:

* a diffusers pipeline layout: ``<dir>/tokenizer``, ``<dir>/tokenizer_2``, ``<dir>/tokenizer_3``
  (the slot's own subfolder, so a saved pipeline of the same model works as is);
* ComfyUI's tree: ``comfy/sd1_tokenizer`` (CLIP BPE: ``vocab.json`` + ``merges.txt``, used by
  ComfyUI for CLIP-L and CLIP-G) and ``comfy/text_encoders/t5_tokenizer`` (T5 ``tokenizer.json``);
  the host passes those folders;
* a folder that itself holds a CLIP (``vocab.json`` + ``merges.txt``, or a BPE
  ``tokenizer.json``) or a T5 tokenizer (``spiece.model`` or a Unigram ``tokenizer.json``).

CLIP-G in SDXL and SD3 pads with ``!`` (id 0) instead of the end token (diffusers' and
ComfyUI's SDXL tokenizers agree): a shared CLIP folder gets that pad token for the G slot.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError
from . import hub_tokenizers

# per family: slot -> the diffusers tokenizer subfolder of that slot
SUBFOLDERS: dict[str, dict[str, str]] = {
    "sd15": {"clip_l": "tokenizer", "clip_g": "tokenizer"},
    "sdxl": {"clip_l": "tokenizer", "clip_g": "tokenizer_2"},
    "sd3": {"clip_l": "tokenizer", "clip_g": "tokenizer_2", "t5xxl": "tokenizer_3"},
    "flux": {"clip_l": "tokenizer", "t5xxl": "tokenizer_2"},
}


def _model_type(d: Path) -> str | None:
    """The ``model.type`` of a ``tokenizer.json`` (BPE for CLIP, Unigram for T5)."""
    f = d / "tokenizer.json"
    if not f.is_file():
        return None
    try:
        return str(json.loads(f.read_text(encoding="utf-8")).get("model", {}).get("type"))
    except (OSError, ValueError):
        return None


def _is_clip(d: Path) -> bool:
    files = (d / "vocab.json").is_file() and (d / "merges.txt").is_file()
    return files or _model_type(d) == "BPE"


def _is_t5(d: Path) -> bool:
    return (d / "spiece.model").is_file() or _model_type(d) == "Unigram"


def find_folder(
    family: str, slot: str, dirs: Sequence[Path], *, allow_download: bool = False
) -> tuple[Path, bool]:
    """(folder, slot-specific) of the tokenizer for `slot`: the given folders, then the local
    HF cache, then (only with `allow_download`) the hub; a typed error when none."""
    check = _is_t5 if slot == "t5xxl" else _is_clip
    shared = "text_encoders/t5_tokenizer" if slot == "t5xxl" else "sd1_tokenizer"
    for d in dirs:
        own = d / SUBFOLDERS[family][slot]
        if own.is_dir() and check(own):
            return own, True
        for cand in (d / shared, d / Path(shared).name, d):
            if cand.is_dir() and check(cand):
                return cand, False
    repo = hub_tokenizers.repo_for(family, slot)
    cached = hub_tokenizers.from_cache(repo)
    if cached is not None and check(cached):
        return cached, repo.own
    if allow_download:
        got = hub_tokenizers.download(repo, slot)
        if check(got):
            return got, repo.own
        raise ModelLoadError(f"{repo.repo_id}: the download holds no {slot} tokenizer in {got}")
    kind = (
        "T5 (tokenizer.json or spiece.model)"
        if slot == "t5xxl"
        else "CLIP (vocab.json + merges.txt)"
    )
    looked = ", ".join(str(d) for d in dirs) or "no folders given"
    raise ModelLoadError(
        f"no {kind} tokenizer for the {slot} text encoder of this {family} file. Looked in: "
        f"{looked}; the Hugging Face cache {hub_tokenizers.cache_dir()} (repo {repo.label}). "
        "Single files carry no tokenizers. Fix: pass a folder holding one (--tokenizers DIR: "
        "a diffusers pipeline folder of the same model, or ComfyUI's comfy/ folder with "
        f"sd1_tokenizer and text_encoders/t5_tokenizer); or put {repo.repo_id} in the "
        "Hugging Face cache (HF_HUB_CACHE / HF_HOME); or pass --allow-download "
        "(allow_download=True) to fetch only its tokenizer files from the hub"
    )


def load(
    family: str, slot: str, dirs: Sequence[Path], vocab_rows: int, *, allow_download: bool = False
) -> Any:
    """The tokenizer of `slot`, checked against the embedding rows of its text encoder."""
    from transformers import CLIPTokenizer, T5Tokenizer

    folder, own = find_folder(family, slot, dirs, allow_download=allow_download)
    cls = T5Tokenizer if slot == "t5xxl" else CLIPTokenizer
    try:
        tok = cls.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{folder}: cannot read the {slot} tokenizer ({exc})") from None
    if slot == "clip_g" and family in ("sdxl", "sd3") and not own and "!" in tok.get_vocab():
        tok.pad_token = "!"
    if len(tok) > vocab_rows:
        raise ModelLoadError(
            f"{folder}: its {slot} tokenizer has {len(tok)} tokens, the text encoder only "
            f"{vocab_rows} embedding rows; the tokenizer belongs to another model"
        )
    return tok


def token_ids(tok: Any) -> dict[str, int]:
    """bos/eos/pad ids for the text encoder config (CLIP pools at the first end token)."""
    ids = {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    return {k: v for k, v in ids.items() if v is not None}
