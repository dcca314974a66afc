"""GPU tests: skipped, with the reason, on machines without CUDA.

Run on a GPU machine with ``.venv/bin/python -m pytest -q tests/gpu`` (or `make gpu-check`,
which also writes figures to $OUT or bench/results/gpu.json).
"""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "tests/gpu" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)
