"""The pack loads the way ComfyUI loads custom nodes: as a package under a path-derived name."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_pack_imports_as_a_package_under_any_name():
    name = "custom_nodes_comfyui_lycoris_test"
    spec = importlib.util.spec_from_file_location(
        name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        assert module.WEB_DIRECTORY == "./web"
        assert isinstance(module.NODE_CLASS_MAPPINGS, dict)
        assert set(module.NODE_CLASS_MAPPINGS) == set(module.NODE_DISPLAY_NAME_MAPPINGS)
        assert f"{name}.nodes" in sys.modules  # nodes/ was imported relative to the pack
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]
    assert (ROOT / "web").is_dir()
