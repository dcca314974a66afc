"""The Train node's summary keys and the lycoris.train event: defined once in
lycoris_core/schema.py, the same values in web/lycoris_schema.js, and unchanged (the web
extension, the headless runner and users' scripts read them)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lycoris_core import schema

ROOT = Path(__file__).resolve().parents[2]
JS = ROOT / "web" / "lycoris_schema.js"


def test_the_js_file_is_the_generated_one():
    assert JS.read_text(encoding="utf-8") == schema.render_js(), (
        "web/lycoris_schema.js differs from lycoris_core/schema.py; regenerate it with "
        "`python -m lycoris_core.schema > web/lycoris_schema.js`"
    )


def test_the_js_constants_equal_the_python_ones():
    node = shutil.which("node")
    if node is None:
        pytest.fail("Node.js is needed to read web/lycoris_schema.js (see test_web_logic.py)")
    script = (
        f"import * as s from {json.dumps(JS.as_uri())};process.stdout.write(JSON.stringify(s));"
    )
    out = subprocess.run(
        [node, "--input-type=module", "-e", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(out.stdout) == schema.js_constants()


def test_the_values_are_the_published_ones():
    assert (schema.TRAIN_NODE, schema.TRAIN_EVENT) == ("LycorisTrain", "lycoris.train")
    assert schema.SUMMARY_KEYS == (
        "adapter_path",
        "steps",
        "completed",
        "stopped",
        "final_loss",
        "losses",
        "checkpoints",
        "seconds",
        "layers",
    )
    assert schema.REUSED == "reused"
    assert schema.STEP_FIELDS == ("step", "total", "loss", "smoothed_loss", "lr", "it_per_s", "eta")
    assert schema.cancelled_event("c") == {"status": "cancelled", "checkpoint": "c"}
    assert schema.done_event("a.safetensors") == {"status": "done", "adapter_path": "a.safetensors"}
    assert schema.validation_event(3, []) == {"step": 3, "validation": []}
    assert schema.train_ui("{}", "a", 0.5) == {
        "text": ["{}"],
        "adapter_path": ["a"],
        "final_loss": [0.5],
    }


def test_step_event_reads_the_step_info_fields():
    from lycoris_core.training import TrainStepInfo

    info = TrainStepInfo(2, 10, 0.5, 0.6, 1e-4, 3.0, 2.7, 0)
    assert schema.step_event(info) == {
        "step": 2,
        "total": 10,
        "loss": 0.5,
        "smoothed_loss": 0.6,
        "lr": 1e-4,
        "it_per_s": 3.0,
        "eta": 2.7,
    }


def test_schema_imports_only_the_standard_library():
    """The headless runner uses it on machines without torch."""
    code = (
        "import sys; sys.path.insert(0, 'lycoris_core'); import schema; "
        "print(sorted({'torch', 'numpy', 'PIL'} & set(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.stdout.strip() == "[]", out.stderr
