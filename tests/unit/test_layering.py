"""Layering: the core never imports ComfyUI nor the nodes; node modules do not import each other.

AST checks, and the import-linter contracts of pyproject.toml run as `make lint` runs them.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
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


# --------------------------------------------------------------------------- import-linter
# The same rules as contracts in pyproject.toml ([tool.importlinter]), checked on the import
# graph (grimp): imports inside functions count too. Relative imports above `lycoris_core` or
# `nodes` (`from ..lycoris_core import x` in nodes/) resolve outside the two root packages, so
# the graph does not hold them; the AST checks below cover that part.


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    """`lint-imports` in `cwd` (import-linter is in the dev dependency group)."""
    code = (
        "import sys; from importlinter.cli import lint_imports; "
        "sys.exit(lint_imports(no_cache=True, no_logo=True))"
    )
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_import_contracts_are_kept():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def _write(path: Path, text: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def test_import_contracts_catch_a_violation(tmp_path):
    """The repository's own contracts, run on a small tree that breaks each of them."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    _write(tmp_path / "lycoris_core" / "__init__.py")
    _write(tmp_path / "lycoris_core" / "ok.py", "import json\n")
    _write(tmp_path / "nodes" / "__init__.py", "from . import a_nodes, b_nodes\n")
    _write(tmp_path / "nodes" / "handles.py", "from . import _host\n")
    _write(tmp_path / "nodes" / "_host.py")
    _write(tmp_path / "nodes" / "a_nodes.py", "from . import _host, handles\n")
    _write(tmp_path / "nodes" / "b_nodes.py", "from .handles import x\n")
    kept = _lint_imports(tmp_path)
    assert kept.returncode == 0, kept.stdout + kept.stderr  # handles/_host are allowed

    _write(tmp_path / "lycoris_core" / "bad.py", "def f():\n    import folder_paths\n")
    _write(tmp_path / "nodes" / "b_nodes.py", "from .handles import x\nfrom .a_nodes import y\n")
    broken = _lint_imports(tmp_path)
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert "0 kept, 2 broken" in broken.stdout
    assert "lycoris_core.bad -> folder_paths" in broken.stdout
    assert "nodes.b_nodes -> nodes.a_nodes" in broken.stdout


def _imports_above(path: Path, root: Path) -> list[tuple[int, str]]:
    """Relative imports in `path` that climb above its top package, as (line, target)."""
    depth = len(path.parent.relative_to(root).parts)  # the package a module's imports start in
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level > depth:
            names = [node.module] if node.module else [a.name for a in node.names]
            found += [(node.lineno, name) for name in names]
    return found


def test_no_relative_import_climbs_out_of_the_core_and_nodes_reach_only_the_core():
    """The part of the layering the import graph cannot see (see above)."""
    core = [
        f"{f.relative_to(ROOT)}:{line} imports ..{target}"
        for f in sorted((ROOT / "lycoris_core").rglob("*.py"))
        for line, target in _imports_above(f, ROOT)
    ]
    assert core == []
    node_files = sorted((ROOT / "nodes").rglob("*.py"))
    outside = [(f, line, t) for f in node_files for line, t in _imports_above(f, ROOT)]
    assert outside, "nodes reach the core by `from ..lycoris_core...`; the check saw none"
    assert [
        f"{f.relative_to(ROOT)}:{line} imports ..{target}"
        for f, line, target in outside
        if target.split(".")[0] != "lycoris_core"
    ] == []


def test_climbing_relative_imports_are_detected(tmp_path):
    bad = tmp_path / "lycoris_core" / "training" / "bad.py"
    _write(bad, "from ..io import x\nfrom ...nodes import handles\nfrom ... import nodes\n")
    assert _imports_above(bad, tmp_path) == [(2, "nodes"), (3, "nodes")]
