"""The web extension (web/*.js) under Node.js: its unit tests and a syntax check.

The JS tests live in tests/web/ and use Node's built-in test runner (no npm packages).
Node.js >= 18 is required to run the suite; a missing Node is a failure, not a skip, so the
frontend is never silently untested.
"""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WEB = ROOT / "web"
JS_TESTS = ROOT / "tests" / "web"
MIN_NODE = 18


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail(
            f"Node.js >= {MIN_NODE} is needed to test the web extension (web/*.js) and "
            "`node` is not on PATH; install it (https://nodejs.org or your package manager)."
        )
    out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30)
    match = re.match(r"v(\d+)\.", out.stdout.strip())
    if not match or int(match.group(1)) < MIN_NODE:
        pytest.fail(f"Node.js >= {MIN_NODE} is needed; `node --version` says {out.stdout!r}")
    return node


def _web_js_files() -> list[Path]:
    files = sorted(WEB.glob("*.js"))
    assert files, f"no .js files in {WEB}"
    return files


def test_js_unit_tests_pass():
    node = _node()
    # Files listed explicitly: how `node --test <dir>` treats a directory changed in Node 21.
    tests = sorted(str(p.relative_to(ROOT)) for p in JS_TESTS.glob("*.test.mjs"))
    assert tests, f"no *.test.mjs files in {JS_TESTS}"
    proc = subprocess.run(
        [node, "--test", *tests], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"node --test failed:\n{proc.stdout}\n{proc.stderr}"
    # Guard against a runner that finds nothing and exits 0 (TAP "# pass N" or spec "ℹ pass N").
    passed = re.search(r"^\S+ pass (\d+)$", proc.stdout, re.MULTILINE)
    assert passed and int(passed.group(1)) > 0, f"no JS test ran:\n{proc.stdout}"


@pytest.mark.parametrize("path", _web_js_files(), ids=lambda p: p.name)
def test_web_file_parses_as_es_module(path: Path):
    """Every file ComfyUI will import as an ES module parses as one (imports not resolved)."""
    node = _node()
    proc = subprocess.run(
        [node, "--input-type=module", "--check"],
        input=path.read_text(encoding="utf-8"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, f"{path.name} is not a valid ES module:\n{proc.stderr}"


def test_web_folder_is_an_es_module_package():
    """web/package.json makes Node read web/*.js as ES modules (the JS tests import them)."""
    assert json.loads((WEB / "package.json").read_text())["type"] == "module"
