"""ComfyUI nodes of comfyui-lycoris (V1 dialect): thin glue over lycoris_core.

Only nodes/_host.py imports ComfyUI modules. Node ids are public API (saved in workflows).
"""

from . import _host
from .adapter_nodes import (
    InspectLycoris,
    LoadLycoris,
    LoadLycorisConfig,
    LycorisConfigNode,
    SaveLycoris,
)
from .checkpoint_nodes import LoadCheckpointLycoris
from .dataset_nodes import DatasetFromFolder, DatasetFromImages
from .host_nodes import ApplyLycorisComfy
from .model_nodes import ApplyLycoris, LoadDiffusersModel, SampleLycoris, SaveMergedModel
from .train_nodes import LossPlot, TrainLycoris

_host.register_folders()

NODES = {
    "LycorisLoadDiffusersModel": (LoadDiffusersModel, "Load Diffusers Model (LyCORIS)"),
    "LycorisLoadCheckpoint": (LoadCheckpointLycoris, "Load Checkpoint (LyCORIS)"),
    "LycorisConfig": (LycorisConfigNode, "LyCORIS Config"),
    "LycorisLoadConfig": (LoadLycorisConfig, "Load LyCORIS Config"),
    "LycorisLoad": (LoadLycoris, "Load LyCORIS"),
    "LycorisApply": (ApplyLycoris, "Apply LyCORIS"),
    "LycorisApplyComfy": (ApplyLycorisComfy, "Apply LyCORIS (MODEL, CLIP)"),
    "LycorisSample": (SampleLycoris, "Sample (LyCORIS)"),
    "LycorisDatasetFromFolder": (DatasetFromFolder, "Dataset from Folder (LyCORIS)"),
    "LycorisDatasetFromImages": (DatasetFromImages, "Dataset from Images (LyCORIS)"),
    "LycorisTrain": (TrainLycoris, "Train LyCORIS"),
    "LycorisSave": (SaveLycoris, "Save LyCORIS"),
    "LycorisSaveMergedModel": (SaveMergedModel, "Save Merged Model (LyCORIS)"),
    "LycorisLossPlot": (LossPlot, "LyCORIS Loss Plot"),
    "LycorisInspect": (InspectLycoris, "Inspect LyCORIS"),
}

NODE_CLASS_MAPPINGS = {key: cls for key, (cls, _) in NODES.items()}
NODE_DISPLAY_NAME_MAPPINGS = {key: name for key, (_, name) in NODES.items()}
