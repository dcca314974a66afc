"""The names the Train node shares with the web extension and the headless runner.

Defined once here: the JSON summary (the Train node's ``summary`` output and the ``text`` of its
UI output), the keys of its UI output, and the ``lycoris.train`` server event with its payload
fields. ``web/lycoris_schema.js`` holds the same values as JS constants; it is generated from this
module (``python -m lycoris_core.schema > web/lycoris_schema.js``) and a test fails when they
differ. Standard library only (the runner imports it on machines without torch).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

TRAIN_NODE = "LycorisTrain"
TRAIN_EVENT = "lycoris.train"


@dataclass(frozen=True)
class TrainSummary:
    """The Train node's JSON summary; its field names are the JSON keys."""

    adapter_path: str | None
    steps: int
    completed: bool
    stopped: str
    final_loss: float | None
    losses: list[float]
    checkpoints: list[str]
    seconds: float
    layers: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SUMMARY_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TrainSummary))
# added to a summary read back from a finished run's stamp instead of training again
REUSED = "reused"

# the Train node's UI output (``{"ui": {...}}``), read by the runner from /history
UI_TEXT = "text"
UI_ADAPTER_PATH = "adapter_path"
UI_FINAL_LOSS = "final_loss"

# the lycoris.train payloads: one per step, one per set of validation images, one at the end
STEP_FIELDS = ("step", "total", "loss", "smoothed_loss", "lr", "it_per_s", "eta")
EVENT_NODE = "node"  # every payload: the id of the node that sent it
EVENT_STEP = "step"
EVENT_VALIDATION = "validation"  # a list of /view references {filename, subfolder, type}
EVENT_STATUS = "status"
EVENT_CHECKPOINT = "checkpoint"  # with status "cancelled": the resumable checkpoint, or null
EVENT_ADAPTER_PATH = "adapter_path"  # with status "done": the file written
STATUS_DONE = "done"
STATUS_CANCELLED = "cancelled"
IMAGE_REF_KEYS = ("filename", "subfolder", "type")


def step_event(info: Any) -> dict[str, Any]:
    """The payload of one training step, from an object with the :data:`STEP_FIELDS`
    attributes (``TrainStepInfo``)."""
    return {name: getattr(info, name) for name in STEP_FIELDS}


def validation_event(step: int, refs: list[dict[str, str]]) -> dict[str, Any]:
    return {EVENT_STEP: step, EVENT_VALIDATION: refs}


def cancelled_event(checkpoint: str | None) -> dict[str, Any]:
    return {EVENT_STATUS: STATUS_CANCELLED, EVENT_CHECKPOINT: checkpoint}


def done_event(adapter_path: str) -> dict[str, Any]:
    return {EVENT_STATUS: STATUS_DONE, EVENT_ADAPTER_PATH: adapter_path}


def train_ui(summary_text: str, adapter_path: str, final_loss: float | None) -> dict[str, list]:
    """The Train node's UI output: ComfyUI stores it in /history (values are lists)."""
    return {UI_TEXT: [summary_text], UI_ADAPTER_PATH: [adapter_path], UI_FINAL_LOSS: [final_loss]}


def js_constants() -> dict[str, Any]:
    """What ``web/lycoris_schema.js`` exports, name -> value."""
    return {
        "TRAIN_NODE": TRAIN_NODE,
        "TRAIN_EVENT": TRAIN_EVENT,
        "STEP_FIELDS": list(STEP_FIELDS),
        "EVENT_KEYS": {
            "node": EVENT_NODE,
            "step": EVENT_STEP,
            "validation": EVENT_VALIDATION,
            "status": EVENT_STATUS,
            "checkpoint": EVENT_CHECKPOINT,
            "adapterPath": EVENT_ADAPTER_PATH,
        },
        "STATUS": {"done": STATUS_DONE, "cancelled": STATUS_CANCELLED},
        "IMAGE_REF_KEYS": list(IMAGE_REF_KEYS),
        "SUMMARY_KEYS": list(SUMMARY_KEYS),
        "REUSED": REUSED,
        "UI_KEYS": {"text": UI_TEXT, "adapterPath": UI_ADAPTER_PATH, "finalLoss": UI_FINAL_LOSS},
    }


def render_js() -> str:
    """The text of ``web/lycoris_schema.js``."""
    lines = [
        "// The names the Train node shares with this extension: generated from",
        "// lycoris_core/schema.py by `python -m lycoris_core.schema > web/lycoris_schema.js`;",
        "// do not edit (tests/unit/test_schema.py fails when the two differ).",
    ]
    for name, value in js_constants().items():
        text = json.dumps(value)
        if isinstance(value, (list, dict)):
            text = f"Object.freeze({text})"
        lines.append(f"export const {name} = {text};")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render_js(), end="")
