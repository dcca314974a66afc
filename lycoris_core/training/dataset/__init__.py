"""Training data: image folders or in-memory images, captions, aspect buckets, feature caches.

A :class:`DatasetSpec` (``spec``) says where the images come from and how to prepare them;
:class:`TrainingData` (``training_data``) loads it once (checks every image, reads every
caption, chooses every bucket) and then serves deterministic epochs of same-bucket batches,
pixels and captions. :class:`FeatureCache` (``cache``) keeps encoded features (VAE latents,
text embeddings) in memory and, optionally, on disk. ``sources`` reads folders (kohya layout)
and in-memory images, ``images`` decodes and crops, ``buckets`` chooses training sizes.

All modules log to the ``lycoris_core.training.dataset`` logger.
"""

from .buckets import bucket_candidates, choose_bucket, crop_box
from .cache import FeatureCache
from .sources import CAPTION_EXTENSION, IMAGE_EXTENSIONS
from .spec import DatasetError, DatasetSpec
from .training_data import KEEP_DECODED_BYTES, DataItem, TrainingData

__all__ = [
    "CAPTION_EXTENSION",
    "IMAGE_EXTENSIONS",
    "KEEP_DECODED_BYTES",
    "DataItem",
    "DatasetError",
    "DatasetSpec",
    "FeatureCache",
    "TrainingData",
    "bucket_candidates",
    "choose_bucket",
    "crop_box",
]
