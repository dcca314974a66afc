"""Load the pack the way ComfyUI does (a package under a path-derived name), with a fake host:
plain folders under a temporary LYCORIS_HOST_ROOT instead of ComfyUI's models folders."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACK = "comfyui_lycoris_under_test"


@pytest.fixture(scope="session")
def host_root(tmp_path_factory):
    return tmp_path_factory.mktemp("comfy-host")


@pytest.fixture(scope="session")
def pack(host_root):
    mp = pytest.MonkeyPatch()
    mp.setenv("LYCORIS_HOST_ROOT", str(host_root))
    spec = importlib.util.spec_from_file_location(
        PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = module
    spec.loader.exec_module(module)
    yield module
    mp.undo()
    for key in [k for k in sys.modules if k == PACK or k.startswith(PACK + ".")]:
        del sys.modules[key]


@pytest.fixture(scope="session")
def nodes(pack):
    return pack.NODE_CLASS_MAPPINGS
