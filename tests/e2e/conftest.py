"""End-to-end tests against a real ComfyUI server (and a real browser for the web extension).

They need a ComfyUI checkout and an interpreter that runs it (ComfyUI's requirements plus
ours), named by two environment variables; without them every test here is skipped:

    COMFYUI_PATH=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/venv/bin/python \\
        .venv/bin/python -m pytest -q tests/e2e

The session starts one server on 127.0.0.1 (a free port) whose folders all live in a
temporary directory: models (through an extra_model_paths yaml), custom_nodes (a symlink
``comfyui-lycoris`` to this repository), input, output, temp and user. Nothing is written
into COMFYUI_PATH. The server log goes to a file; a failing test shows its tail.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from e2e_support import E2E_DIR, ROOT, TRAIN_APPLY_SAMPLE_SETS, ComfyServer, env_problem

_SERVERS: list[ComfyServer] = []


def _is_e2e(item) -> bool:
    return Path(str(item.fspath)).resolve().parent == E2E_DIR


def pytest_collection_modifyitems(config, items):
    reason = env_problem()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if _is_e2e(item):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def comfy_env() -> tuple[Path, str]:
    reason = env_problem()
    if reason is not None:
        pytest.skip(reason)
    path = Path(os.environ["COMFYUI_PATH"]).expanduser().resolve()
    python = os.environ["COMFYUI_PYTHON"]
    if not (path / "main.py").is_file():
        pytest.fail(f"COMFYUI_PATH={path} holds no main.py; point it at a ComfyUI checkout")
    if shutil.which(python) is None:
        pytest.fail(f"COMFYUI_PYTHON={python} is not an executable interpreter")
    return path, python


@pytest.fixture(scope="session")
def comfy(comfy_env, tmp_path_factory):
    """The running server (one per session)."""
    path, python = comfy_env
    server = ComfyServer(path, python, tmp_path_factory.mktemp("comfyui"))
    _SERVERS.append(server)
    try:
        server.start()
        problem = server.import_problem()
        if problem:
            pytest.fail(f"{problem}\nlog tail:\n{server.log_tail()}")
        print(f"\nComfyUI up on {server.url} in {server.start_seconds:.1f} s ({server.root})")
        yield server
    finally:
        code = server.stop()
        print(f"\nComfyUI stopped (exit code {code})")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and _SERVERS and _is_e2e(item):
        report.sections.append(("ComfyUI server log (tail)", _SERVERS[-1].log_tail(80)))


@pytest.fixture(scope="session")
def demo_run(comfy, tmp_path_factory):
    """The train_apply_sample example run once through the headless runner: it creates
    loras/lycoris/demo_discs.safetensors, which three_strengths (and other tests) load."""
    from lycoris_core.client import run_workflow

    out = tmp_path_factory.mktemp("train_apply_sample")
    events: list[tuple[str, dict]] = []
    result = run_workflow(
        comfy.url,
        ROOT / "example_workflows" / "api" / "train_apply_sample.json",
        out,
        timeout=300,
        sets=TRAIN_APPLY_SAMPLE_SETS,
        on_event=lambda event, data: events.append((event, data)),
    )
    return SimpleNamespace(result=result, events=events, out=out)


@pytest.fixture
def demo_adapter(demo_run) -> str:
    """The name (in the loras combo) of the adapter train_apply_sample trained."""
    result = demo_run.result
    assert result["status"] == "success", f"train_apply_sample failed: {result['error']}"
    return "lycoris/demo_discs.safetensors"
