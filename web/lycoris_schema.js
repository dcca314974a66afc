// The names the Train node shares with this extension: generated from
// lycoris_core/schema.py by `python -m lycoris_core.schema > web/lycoris_schema.js`;
// do not edit (tests/unit/test_schema.py fails when the two differ).
export const TRAIN_NODE = "LycorisTrain";
export const TRAIN_EVENT = "lycoris.train";
export const STEP_FIELDS = Object.freeze(["step", "total", "loss", "smoothed_loss", "lr", "it_per_s", "eta"]);
export const EVENT_KEYS = Object.freeze({"node": "node", "step": "step", "validation": "validation", "status": "status", "checkpoint": "checkpoint", "adapterPath": "adapter_path"});
export const STATUS = Object.freeze({"done": "done", "cancelled": "cancelled"});
export const IMAGE_REF_KEYS = Object.freeze(["filename", "subfolder", "type"]);
export const SUMMARY_KEYS = Object.freeze(["adapter_path", "steps", "completed", "stopped", "final_loss", "losses", "checkpoints", "seconds", "layers"]);
export const REUSED = "reused";
export const UI_KEYS = Object.freeze({"text": "text", "adapterPath": "adapter_path", "finalLoss": "final_loss"});
