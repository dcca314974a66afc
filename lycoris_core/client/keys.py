"""The names the runner reads from our Train node: its UI output keys (in ``/history``
outputs and ``executed`` events) and the ``lycoris.train`` event payload.

They are written by ``nodes/train_nodes.py`` (and read by ``web/``); this module is the one
place in the runner that spells them, so a rename is one edit here.
"""

from __future__ import annotations

# Server event the Train node sends with PromptServer.send_sync.
TRAIN_EVENT = "lycoris.train"

# Train node UI output (``outputs[node_id]``): lists of one value each; ``text`` entries may
# be JSON objects holding the same keys.
OUT_ADAPTER_PATH = "adapter_path"
OUT_ADAPTER_PATHS = "adapter_paths"
OUT_FINAL_LOSS = "final_loss"
OUT_TEXT = "text"
ADAPTER_PATH_KEYS = (OUT_ADAPTER_PATH, OUT_ADAPTER_PATHS)

# ``lycoris.train`` payload fields.
EV_NODE = "node"  # the Train node's id
EV_STATUS = "status"  # "done" or "cancelled" on the last event, absent on step events
STATUS_DONE = "done"
STATUS_CANCELLED = "cancelled"
EV_ADAPTER_PATH = "adapter_path"  # with status "done"
EV_CHECKPOINT = "checkpoint"  # with status "cancelled"
EV_VALIDATION = "validation"  # list of {"filename", ...}: validation images of a step
EV_STEP = "step"
EV_TOTAL = "total"
EV_LOSS = "loss"
EV_SMOOTHED_LOSS = "smoothed_loss"
EV_LR = "lr"
EV_IT_PER_S = "it_per_s"
EV_ETA = "eta"  # seconds
