"""Training: datasets (folders, captions, buckets, feature caches) and the training engine."""

from .dataset import (
    DataItem,
    DatasetError,
    DatasetSpec,
    FeatureCache,
    TrainingData,
)

__all__ = [
    "DataItem",
    "DatasetError",
    "DatasetSpec",
    "FeatureCache",
    "TrainingData",
]
