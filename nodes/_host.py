"""The only module that touches ComfyUI: model folders, progress/cancel, events, memory.

Inside ComfyUI it uses ``folder_paths``, ``comfy.utils.ProgressBar`` (whose update raises
ComfyUI's interrupt on Cancel), ``comfy.model_management`` and ``server.PromptServer``.
Outside ComfyUI (node tests, scripts) it falls back to plain folders under
``$LYCORIS_HOST_ROOT`` (default ``./comfy-host``), records events in memory and has a Cancel
flag of its own (:data:`PLAIN_INTERRUPT`, raising :class:`Interrupted`), so every node runs
anywhere.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CONFIG_FOLDER = "lycoris_configs"
CONFIG_EXTENSIONS = {".json"}
SAFETENSORS = {".safetensors"}

try:  # pragma: no cover - exercised in the e2e tests, inside ComfyUI
    import folder_paths  # type: ignore[import-not-found]

    IN_COMFY = True
except ImportError:
    folder_paths = None
    IN_COMFY = False

# events sent while no ComfyUI server exists (node tests read them)
EVENTS: list[tuple[str, dict]] = []
# Outside ComfyUI: the Cancel button (tests set it; cleared when the interrupt is raised)
PLAIN_INTERRUPT = False


class Interrupted(Exception):
    """Outside ComfyUI: what ComfyUI's ``InterruptProcessingException`` is inside it."""


def _fallback_root() -> Path:
    return Path(os.environ.get("LYCORIS_HOST_ROOT", "comfy-host")).resolve()


def register_folders() -> None:
    """Register our ``lycoris_configs`` model folder with ComfyUI (models/lycoris_configs)."""
    if not IN_COMFY:
        return
    if CONFIG_FOLDER not in folder_paths.folder_names_and_paths:  # pragma: no cover
        path = os.path.join(folder_paths.models_dir, CONFIG_FOLDER)
        folder_paths.add_model_folder_path(CONFIG_FOLDER, path)
        folder_paths.folder_names_and_paths[CONFIG_FOLDER] = (
            folder_paths.folder_names_and_paths[CONFIG_FOLDER][0],
            CONFIG_EXTENSIONS,
        )


def folders(kind: str) -> list[Path]:
    """The folders of a model kind: ``diffusers``, ``loras``, ``checkpoints``, ..."""
    if IN_COMFY:  # pragma: no cover
        try:
            return [Path(p) for p in folder_paths.get_folder_paths(kind)]
        except KeyError:
            return [Path(folder_paths.models_dir) / kind]
    return [_fallback_root() / "models" / kind]


def output_dir() -> Path:
    if IN_COMFY:  # pragma: no cover
        return Path(folder_paths.get_output_directory())
    return _fallback_root() / "output"


def temp_dir() -> Path:
    """ComfyUI's temp folder (served by /view?type=temp)."""
    if IN_COMFY:  # pragma: no cover
        return Path(folder_paths.get_temp_directory())
    return _fallback_root() / "temp"


def list_files(kind: str, extensions: set[str]) -> list[str]:
    """Relative file names of a kind (sub-folders included), sorted."""
    if IN_COMFY:  # its cached listing (refreshed by the editor's "Refresh")
        try:
            listed = folder_paths.get_filename_list(kind)
        except KeyError:  # a kind this ComfyUI does not know
            listed = []
        return sorted(n for n in listed if Path(n).suffix.lower() in extensions)
    names: set[str] = set()
    for root in folders(kind):
        if not root.is_dir():
            continue
        for path in root.rglob("*"):
            if path.is_file() and path.suffix.lower() in extensions:
                names.add(path.relative_to(root).as_posix())
    return sorted(names)


def list_diffusers_folders() -> list[str]:
    """Pipeline folders (holding model_index.json) under the diffusers model folders."""
    names: set[str] = set()
    for root in folders("diffusers"):
        if not root.is_dir():
            continue
        for index in root.rglob("model_index.json"):
            names.add(index.parent.relative_to(root).as_posix())
    return sorted(names)


def resolve(kind: str, name: str) -> Path | None:
    """The full path of a relative name (a file or a folder) in a model kind, or None."""
    if not isinstance(name, str):  # e.g. a linked input that has no value yet
        return None
    if IN_COMFY:
        found = folder_paths.get_full_path(kind, name)  # files only
        if found:
            return Path(found)
    from ..lycoris_core.errors import PathError
    from ..lycoris_core.paths import inside

    for root in folders(kind):
        try:  # lexically inside the folder; links in it are followed (as ComfyUI does)
            candidate = inside(root, name, f"{kind} name")
        except PathError:
            return None
        if candidate.exists():
            return candidate
    return None


def primary_folder(kind: str) -> Path:
    return folders(kind)[0]


class Progress:
    """Step progress: ComfyUI's ProgressBar (its update raises the interrupt on Cancel)."""

    def __init__(self, total: int, node_id: str | None = None):
        self.node_id = node_id
        self.bar = None
        if IN_COMFY:  # pragma: no cover
            import comfy.utils

            self.bar = comfy.utils.ProgressBar(total)

    def update(self, step: int, total: int, preview: Any = None) -> None:
        """`preview`: ComfyUI's ``("JPEG", PIL image, max_size)`` tuple, or None."""
        if self.bar is not None:  # pragma: no cover
            self.bar.update_absolute(step, total, preview)
        elif not IN_COMFY:
            raise_if_interrupted()  # as ComfyUI's progress hook does
            EVENTS.append(
                (
                    "progress",
                    {"node": self.node_id, "step": step, "total": total, "preview": preview},
                )
            )


# Outside ComfyUI: the largest side of step previews, or None for no previews (tests set it).
PLAIN_PREVIEW_SIZE: int | None = None


def preview_size() -> int | None:
    """The largest side of step previews, or None when previews are off: ComfyUI's
    ``--preview-method`` (default none) and ``--preview-size`` decide, as for its samplers."""
    if not IN_COMFY:
        return PLAIN_PREVIEW_SIZE
    from comfy.cli_args import LatentPreviewMethod, args  # pragma: no cover

    if args.preview_method == LatentPreviewMethod.NoPreviews:  # pragma: no cover
        return None
    return int(args.preview_size)  # pragma: no cover


def interrupted() -> bool:
    """Whether the user pressed Cancel (checked between steps)."""
    if not IN_COMFY:
        return PLAIN_INTERRUPT
    import comfy.model_management as mm  # pragma: no cover

    return bool(mm.processing_interrupted())  # pragma: no cover


def raise_if_interrupted() -> None:
    """Raise the host's interrupt when Cancel was pressed: ComfyUI shows "interrupted" (not an
    error) and clears the flag."""
    global PLAIN_INTERRUPT
    if IN_COMFY:  # pragma: no cover
        import comfy.model_management as mm

        mm.throw_exception_if_processing_interrupted()
    elif PLAIN_INTERRUPT:
        PLAIN_INTERRUPT = False
        raise Interrupted("processing interrupted")


def interrupt_exception() -> type[BaseException]:
    """The exception type of the host's interrupt."""
    if IN_COMFY:  # pragma: no cover
        import comfy.model_management as mm

        return mm.InterruptProcessingException
    return Interrupted


def _finite(value: Any) -> Any:
    """JSON has no NaN/Infinity: the browser's JSON.parse would drop the whole event."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def send_event(event: str, data: dict, node_id: str | None = None) -> None:
    """A named server event for the web extension (``api.addEventListener(event, ...)``)."""
    payload = {**{k: _finite(v) for k, v in data.items()}, "node": node_id}
    if IN_COMFY:  # pragma: no cover
        from server import PromptServer

        PromptServer.instance.send_sync(event, payload)
    else:
        EVENTS.append((event, payload))


def send_text(node_id: str | None, text: str) -> None:
    """The node's status line (ComfyUI shows it under the node)."""
    if IN_COMFY and node_id is not None:  # pragma: no cover
        from server import PromptServer

        sender = getattr(PromptServer.instance, "send_progress_text", None)
        if sender is not None:
            sender(text, node_id)
    else:
        EVENTS.append(("text", {"node": node_id, "text": text}))


# Outside ComfyUI: the free device memory the memory preflight compares with (tests set it;
# None: measured on the device)
PLAIN_FREE_MEMORY: int | None = None


def free_memory_override() -> int | None:
    """A free-memory figure for the memory preflight instead of the device's, or None."""
    return None if IN_COMFY else PLAIN_FREE_MEMORY


def free_host_memory() -> Callable[[], None] | None:
    """A function that asks ComfyUI to unload its models and empty its caches."""
    if not IN_COMFY:
        return None

    def free() -> None:  # pragma: no cover
        import comfy.model_management as mm

        mm.unload_all_models()
        mm.soft_empty_cache()

    return free


def tokenizer_folders(choice: str | None = None) -> list[Path]:
    """Where single-file models find tokenizers: `choice` (a sub-folder of the
    ``tokenizers`` model folders, e.g. a diffusers folder's ``tokenizer*/`` set) first, then
    ComfyUI's own ``comfy/`` folder (it ships ``sd1_tokenizer`` and
    ``text_encoders/t5_tokenizer``), then the ``tokenizers`` folders themselves."""
    found: list[Path] = []
    if choice:
        found += [p / choice for p in folders("tokenizers") if (p / choice).is_dir()]
    if IN_COMFY:  # pragma: no cover
        import comfy

        # `comfy` is a namespace package (no __init__.py): __file__ is None, __path__ is not
        found += [Path(p) for p in comfy.__path__]
    return found + [p for p in folders("tokenizers") if p.is_dir()]


def list_tokenizer_sets() -> list[str]:
    """Sub-folders of the ``tokenizers`` model folders (one tokenizer set each)."""
    names: set[str] = set()
    for root in folders("tokenizers"):
        if root.is_dir():
            names.update(p.name for p in root.iterdir() if p.is_dir())
    return sorted(names)


# --------------------------------------------------------------------------- ComfyUI's MODEL/CLIP


def state_shapes(patcher: Any) -> dict[str, tuple[int, ...]]:
    """State-dict key -> shape of a ComfyUI ``MODEL`` (a ``ModelPatcher``) or ``CLIP``."""
    patcher = getattr(patcher, "patcher", patcher)  # a CLIP holds its ModelPatcher
    return {k: tuple(v.shape) for k, v in patcher.model_state_dict().items()}


def _weight_adapter_base() -> type:
    try:  # pragma: no cover - inside ComfyUI
        from comfy.weight_adapter import WeightAdapterBase

        return WeightAdapterBase
    except ImportError:
        return object


class LazyPatch(_weight_adapter_base()):  # type: ignore[misc]
    """A ComfyUI weight patch whose change is computed when ComfyUI patches the weight.

    ComfyUI's ``comfy.lora.calculate_weight`` calls ``calculate_weight`` of every
    ``WeightAdapterBase`` patch with the (float32) weight, or, for a ``(key, offset)`` patch,
    a view of its row slice whose result it discards, so the change is added in place.
    `patch` computes the change: anything with ``delta(tensor, strength) -> tensor``.
    """

    name = "lycoris"

    def __init__(self, patch: Any) -> None:
        self.patch = patch
        self.loaded_keys: set[str] = set()
        self.weights: list = []

    def calculate_weight(
        self,
        weight: Any,
        key: str,
        strength: float,
        strength_model: float,
        offset: Any,
        function: Callable | None,
        intermediate_dtype: Any = None,
        original_weight: Any = None,
    ) -> Any:
        change = self.patch.delta(weight, strength)
        if function is not None:
            change = function(change)
        weight += change.to(device=weight.device, dtype=weight.dtype)
        return weight


def patched_clone(patcher: Any, patches: dict, strength: float) -> tuple[Any, set]:
    """A clone of a ComfyUI ``MODEL`` (or ``CLIP``) carrying `patches` (ComfyUI key or
    ``(key, offset)`` -> an object with ``delta``) at `strength`; also the keys it took."""
    clone = patcher.clone()
    taken = clone.add_patches({k: LazyPatch(p) for k, p in patches.items()}, strength)
    return clone, set(taken)
