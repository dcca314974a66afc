"""Where the images come from: a kohya-style folder scan with captions, or in-memory images.

Folder layout (kohya-style)::

    dataset/
        a.png  a.txt          # root images repeat once per epoch
        10_mychar/            # `N_name` sub-folders repeat their images N times per epoch
            b.jpg  b.txt
        notes/                # any other sub-folder is ignored (logged)
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .images import _memory_images
from .spec import DatasetError, DatasetSpec

logger = logging.getLogger(__package__)  # one logger for the dataset package

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_EXTENSION = ".txt"
KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")
_MAX_LISTED_PROBLEMS = 10


@dataclass
class _Candidate:
    source: str
    caption: str
    repeats: int
    path: Path | None = None
    image: Image.Image | None = None


class _Problems:
    """Bad items: raised at once, or collected for one summarised warning (skip_bad)."""

    def __init__(self, skip: bool):
        self.skip = skip
        self.messages: list[str] = []
        self.seen = 0  # images looked at

    def report(self, message: str) -> None:
        if not self.skip:
            raise DatasetError(message)
        self.messages.append(message)

    def warn(self) -> None:
        if not self.messages:
            return
        shown = self.messages[:_MAX_LISTED_PROBLEMS]
        more = len(self.messages) - len(shown)
        logger.warning(
            "dataset: skipped %d of %d images (skip_bad=True):\n  %s%s",
            len(self.messages),
            self.seen,
            "\n  ".join(shown),
            f"\n  ... and {more} more" if more else "",
        )


def _read_caption(image_path: Path, default: str) -> str:
    caption_path = image_path.with_suffix(CAPTION_EXTENSION)
    if not caption_path.is_file():
        return default
    try:
        return caption_path.read_text(encoding="utf-8-sig").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(
            f"{caption_path}: unreadable caption file ({exc}); save it as UTF-8 text, or "
            "delete it to use default_caption"
        ) from None


def _folder_images(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _warn_unpaired(folders: list[Path], default: str) -> None:
    """One summarised warning for caption files without an image (a renamed or deleted image)
    and images without a caption file (they train with `default`)."""
    orphans: list[Path] = []
    uncaptioned: list[Path] = []
    for folder in folders:
        images = _folder_images(folder)
        stems = {p.stem for p in images}
        captions = sorted(
            p
            for p in folder.iterdir()
            if p.suffix.lower() == CAPTION_EXTENSION and not p.name.startswith(".")
        )
        orphans += [p for p in captions if p.stem not in stems]
        uncaptioned += [p for p in images if not p.with_suffix(CAPTION_EXTENSION).is_file()]
    parts = []
    if orphans:
        parts.append(f"{len(orphans)} caption file(s) without an image (first: {orphans[0]})")
    if uncaptioned:
        parts.append(
            f"{len(uncaptioned)} image(s) without a caption file, trained with default_caption "
            f"{default!r} (first: {uncaptioned[0]})"
        )
    if parts:
        logger.warning("dataset: %s", "; ".join(parts))


def _scan_folder(spec: DatasetSpec, problems: _Problems) -> list[_Candidate]:
    root = Path(spec.folder or "")
    if not root.exists():
        raise DatasetError(
            f"{root}: dataset folder not found; check the path (it must be a folder of images "
            "with same-name .txt captions)"
        )
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder; give the folder that holds the images")
    sources: list[tuple[Path, int]] = [(root, 1)]
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        match = KOHYA_FOLDER.match(sub.name)
        if match is None:
            count = len(_folder_images(sub))
            log = logger.warning if count else logger.info
            log(
                "dataset: ignoring sub-folder %s (%d images): only kohya-style 'N_name' "
                "sub-folders (e.g. 10_%s) are read",
                sub,
                count,
                sub.name,
            )
            continue
        repeats = int(match.group(1))
        if repeats == 0:
            logger.info("dataset: ignoring sub-folder %s: 0 repeats", sub)
            continue
        sources.append((sub, repeats))
    found: list[_Candidate] = []
    for folder, repeats in sources:
        for path in _folder_images(folder):
            problems.seen += 1
            try:
                caption = _read_caption(path, spec.default_caption)
            except DatasetError as exc:
                problems.report(str(exc))
                continue
            found.append(_Candidate(str(path), caption, repeats, path=path))
    _warn_unpaired([folder for folder, _ in sources], spec.default_caption)
    if not found and not problems.messages:
        raise DatasetError(
            f"{root}: no images found; accepted extensions are "
            f"{', '.join(IMAGE_EXTENSIONS)} (any case), in the folder itself or in kohya-style "
            "'N_name' sub-folders (e.g. 10_mychar, whose images repeat 10 times per epoch)"
        )
    return found


def _memory_candidates(spec: DatasetSpec) -> list[_Candidate]:
    images = _memory_images(spec.images)
    captions = list(spec.captions) if spec.captions is not None else [spec.default_caption]
    if len(captions) == 1:
        captions = captions * len(images)
    return [
        _Candidate(f"image[{i}]", caption.strip(), 1, image=img)
        for i, (img, caption) in enumerate(zip(images, captions, strict=True))
    ]
