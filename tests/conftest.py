"""Shared test setup.

The tiny models run fastest on one thread, and a second busy core (another job on the
2-core CI machine) slows multi-threaded torch by up to 100x on them.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")

import torch

torch.set_num_threads(1)
