"""Training: datasets (folders, captions, buckets, feature caches) and the training engine.

from lycoris_core.training import DatasetSpec, TrainSpec, train, TrainingAborted
"""

from .checkpoint import CheckpointError
from .dataset import (
    DataItem,
    DatasetError,
    DatasetSpec,
    FeatureCache,
    TrainingData,
)
from .job import TrainJob
from .loop import TrainingAborted, TrainResult, TrainSpec, TrainStepInfo, train
from .objectives import ObjectiveOptions

__all__ = [
    "CheckpointError",
    "DataItem",
    "DatasetError",
    "DatasetSpec",
    "FeatureCache",
    "ObjectiveOptions",
    "TrainJob",
    "TrainResult",
    "TrainSpec",
    "TrainStepInfo",
    "TrainingAborted",
    "TrainingData",
    "train",
]
