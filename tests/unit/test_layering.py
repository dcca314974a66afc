"""The core never imports ComfyUI; nodes import the core only through relative imports."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMFY_MODULES = {
    "comfy",
    "comfy_api",
    "comfy_extras",
    "comfy_execution",
    "folder_paths",
    "server",
    "nodes",
    "node_helpers",
    "execution",
    "latent_preview",
}


def _imported_roots(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", "") == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            found.append((node.lineno, str(node.args[0].value).split(".")[0]))
    return found


def test_core_never_imports_comfyui():
    files = sorted((ROOT / "lycoris_core").rglob("*.py"))
    assert len(files) >= 8
    offenders = [
        f"{f.relative_to(ROOT)}:{line} imports {mod}"
        for f in files
        for line, mod in _imported_roots(f)
        if mod in COMFY_MODULES
    ]
    assert offenders == []


def test_layering_check_detects_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom comfy.utils import ProgressBar\nimport folder_paths\n")
    assert [m for _, m in _imported_roots(bad) if m in COMFY_MODULES] == ["comfy", "folder_paths"]
