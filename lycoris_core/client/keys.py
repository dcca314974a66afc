"""The names the runner reads from our Train node: its UI output keys (in ``/history``
outputs and ``executed`` events) and the ``lycoris.train`` event payload.

They are defined once in ``lycoris_core/schema.py`` (written by the nodes, read by ``web/``
and here); this module gives the runner its short names for them.
"""

from __future__ import annotations

from .. import schema  # standard library only: the runner still needs no torch

# Server event the Train node sends with PromptServer.send_sync.
TRAIN_EVENT = schema.TRAIN_EVENT

# Train node UI output (``outputs[node_id]``): lists of one value each; ``text`` entries may
# be JSON objects holding the same keys.
OUT_ADAPTER_PATH = schema.UI_ADAPTER_PATH
OUT_ADAPTER_PATHS = "adapter_paths"  # other nodes' outputs (a list of files)
OUT_FINAL_LOSS = schema.UI_FINAL_LOSS
OUT_TEXT = schema.UI_TEXT
ADAPTER_PATH_KEYS = (OUT_ADAPTER_PATH, OUT_ADAPTER_PATHS)

# ``lycoris.train`` payload fields.
EV_NODE = schema.EVENT_NODE  # the Train node's id
EV_STATUS = schema.EVENT_STATUS  # "done" or "cancelled" on the last event, absent on steps
STATUS_DONE = schema.STATUS_DONE
STATUS_CANCELLED = schema.STATUS_CANCELLED
EV_ADAPTER_PATH = schema.EVENT_ADAPTER_PATH  # with status "done"
EV_CHECKPOINT = schema.EVENT_CHECKPOINT  # with status "cancelled"
EV_VALIDATION = schema.EVENT_VALIDATION  # list of {"filename", ...}: validation images
EV_STEP, EV_TOTAL, EV_LOSS, EV_SMOOTHED_LOSS, EV_LR, EV_IT_PER_S, EV_ETA = schema.STEP_FIELDS
