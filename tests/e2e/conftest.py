"""End-to-end tests against a real ComfyUI server (and a real browser for the web extension).

They need a ComfyUI checkout and an interpreter that runs it (ComfyUI's requirements plus
ours), given by two environment variables; without them every test here is skipped:

    COMFYUI_PATH=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/venv/bin/python \\
        .venv/bin/python -m pytest -q tests/e2e

The session starts one server on 127.0.0.1 (a free port) whose every folder lives in a
temporary directory: base, models (through an extra_model_paths yaml, marked default so our
files are written there), custom_nodes (a symlink ``comfyui-lycoris`` to this repository),
input, output, temp and user. Nothing is written into COMFYUI_PATH. The server log goes to a
file; a failing test shows its tail.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
E2E_DIR = Path(__file__).resolve().parent
PACK_NAME = "comfyui-lycoris"
START_TIMEOUT = 90.0
STOP_TIMEOUT = 20.0
MODEL_KINDS = (
    "checkpoints",
    "diffusers",
    "diffusion_models",
    "unet",
    "loras",
    "lycoris_configs",
    "vae",
    "text_encoders",
    "clip",
    "configs",
    "embeddings",
)


def _env_problem() -> str | None:
    path = os.environ.get("COMFYUI_PATH")
    python = os.environ.get("COMFYUI_PYTHON")
    if not path or not python:
        return (
            "e2e tests need a real ComfyUI: set COMFYUI_PATH (a ComfyUI checkout) and "
            "COMFYUI_PYTHON (an interpreter with ComfyUI's requirements and ours)"
        )
    return None


def pytest_collection_modifyitems(config, items):
    reason = _env_problem()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if Path(str(item.fspath)).resolve().parent == E2E_DIR:
            item.add_marker(skip)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _no_proxy_opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


_OPENER = _no_proxy_opener()


def http(method: str, url: str, body: Any = None, timeout: float = 30.0) -> tuple[int, Any, bytes]:
    """(status, parsed JSON or None, raw bytes); 4xx/5xx are returned, not raised."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if body is not None else {}
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        parsed = json.loads(raw.decode()) if raw else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        parsed = None
    return status, parsed, raw


class ComfyServer:
    """A real ComfyUI started from COMFYUI_PATH with COMFYUI_PYTHON, all folders in `root`."""

    def __init__(self, comfy_path: Path, python: str, root: Path):
        self.comfy_path = comfy_path
        self.python = python
        self.root = root
        self.base = root  # --base-directory: its models/ and custom_nodes/ are ours too
        self.models = root / "models"
        self.custom_nodes = root / "custom_nodes"
        self.output = root / "output"
        self.temp = root / "temp"
        self.input = root / "input"
        self.user = root / "user"
        self.log_path = root / "server.log"
        self.yaml_path = root / "extra_model_paths.yaml"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.start_seconds: float | None = None

    # -- set-up --

    def prepare(self) -> None:
        for folder in (self.custom_nodes, self.output, self.temp, self.input, self.user):
            folder.mkdir(parents=True, exist_ok=True)
        for kind in MODEL_KINDS:
            (self.models / kind).mkdir(parents=True, exist_ok=True)
        (self.custom_nodes / PACK_NAME).symlink_to(ROOT, target_is_directory=True)
        # ComfyUI's extra_model_paths format: a named section with base_path, then one
        # "kind: relative/path" per model folder; is_default puts them first in the search
        # list, so files the pack saves (primary folder) land here.
        lines = ["lycoris_e2e:", f"    base_path: {self.root}", "    is_default: true"]
        lines += [f"    {kind}: models/{kind}" for kind in MODEL_KINDS]
        lines.append("    custom_nodes: custom_nodes")
        self.yaml_path.write_text("\n".join(lines) + "\n")

    def command(self) -> list[str]:
        return [
            self.python,
            str(self.comfy_path / "main.py"),
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--disable-api-nodes",
            # base-directory keeps COMFYUI_PATH's own models/ and custom_nodes/ (which may hold
            # another copy of this pack) out of the search lists
            "--base-directory",
            str(self.base),
            "--extra-model-paths-config",
            str(self.yaml_path),
            "--output-directory",
            str(self.output),
            "--temp-directory",
            str(self.temp),
            "--input-directory",
            str(self.input),
            "--user-directory",
            str(self.user),
        ]

    def start(self) -> None:
        self.prepare()
        env = dict(os.environ)
        env.update(
            PYTHONUNBUFFERED="1",
            HF_HUB_OFFLINE="1",
            DIFFUSERS_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            NO_PROXY="127.0.0.1,localhost",
        )
        env.pop("LYCORIS_HOST_ROOT", None)
        started = time.monotonic()
        log = self.log_path.open("wb")
        try:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=str(self.comfy_path),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        finally:
            log.close()
        deadline = started + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"ComfyUI exited with code {self.proc.returncode} during start-up; "
                    f"log tail:\n{self.log_tail()}"
                )
            try:
                status, _, _ = http("GET", self.url + "/system_stats", timeout=2)
                if status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"ComfyUI did not answer 200 on /system_stats within {START_TIMEOUT:.0f} s; "
                    f"log tail:\n{self.log_tail()}"
                )
            time.sleep(0.25)
        self.start_seconds = time.monotonic() - started

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    # -- helpers --

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def get(self, path: str, timeout: float = 30.0) -> tuple[int, Any]:
        status, parsed, _ = http("GET", self.url + path, timeout=timeout)
        return status, parsed

    def post(self, path: str, body: Any = None, timeout: float = 30.0) -> tuple[int, Any]:
        status, parsed, _ = http("POST", self.url + path, body if body is not None else {}, timeout)
        return status, parsed

    def submit(self, prompt: dict, client_id: str | None = None) -> tuple[int, Any]:
        body = {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex}
        return self.post("/prompt", body)

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Wait until nothing runs or waits in the queue."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, queue = self.get("/queue")
            if status == 200 and not queue.get("queue_running") and not queue.get("queue_pending"):
                return
            time.sleep(0.25)
        raise AssertionError(f"the queue did not empty within {timeout:.0f} s")

    @property
    def lycoris_dir(self) -> Path:
        return self.models / "loras" / "lycoris"


@pytest.fixture(scope="session")
def comfy_env() -> tuple[Path, str]:
    reason = _env_problem()
    if reason is not None:
        pytest.skip(reason)
    path = Path(os.environ["COMFYUI_PATH"]).expanduser().resolve()
    python = os.environ["COMFYUI_PYTHON"]
    if not (path / "main.py").is_file():
        pytest.fail(f"COMFYUI_PATH={path} holds no main.py; point it at a ComfyUI checkout")
    if shutil.which(python) is None and not os.access(python, os.X_OK):
        pytest.fail(f"COMFYUI_PYTHON={python} is not an executable interpreter")
    return path, python


_SERVERS: list[ComfyServer] = []


@pytest.fixture(scope="session")
def comfy(comfy_env, tmp_path_factory) -> ComfyServer:
    path, python = comfy_env
    server = ComfyServer(path, python, tmp_path_factory.mktemp("comfyui"))
    _SERVERS.append(server)
    try:
        server.start()
        print(f"\nComfyUI up on {server.url} in {server.start_seconds:.1f} s ({server.root})")
        yield server
    finally:
        code = server.stop()
        with contextlib.suppress(ValueError):
            _SERVERS.remove(server)
        print(f"\nComfyUI stopped (exit code {code})")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and _SERVERS and Path(str(item.fspath)).resolve().parent == E2E_DIR:
        report.sections.append(("ComfyUI server log (tail)", _SERVERS[-1].log_tail(80)))
