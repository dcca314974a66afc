"""Helpers of the e2e tests: a real ComfyUI server in a temporary folder, HTTP calls, API
prompts of our nodes, and a small Chrome DevTools Protocol client (standard library plus
websocket-client). Nothing here imports ComfyUI."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import websocket

ROOT = Path(__file__).resolve().parents[2]
E2E_DIR = Path(__file__).resolve().parent
PACK_NAME = "comfyui-lycoris"
START_TIMEOUT = 90.0
STOP_TIMEOUT = 20.0
# ComfyUI model kinds redirected into the temporary models/ tree
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

# train_apply_sample, kept short on CPU: 10 training steps (checkpoint and validation images
# at 5 and 10) and 2 sampling steps.
TRAIN_APPLY_SAMPLE_SETS = {
    "4.steps": 10,
    "4.save_every": 5,
    "4.validation_every": 5,
    "6.steps": 2,
}


def env_problem() -> str | None:
    """Why the e2e tests cannot run here, or None."""
    if not os.environ.get("COMFYUI_PATH") or not os.environ.get("COMFYUI_PYTHON"):
        return (
            "e2e tests need a real ComfyUI: set COMFYUI_PATH (a ComfyUI checkout) and "
            "COMFYUI_PYTHON (an interpreter with ComfyUI's requirements and ours)"
        )
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A proxy from the environment must not see requests to 127.0.0.1.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(method: str, url: str, body: Any = None, timeout: float = 30.0) -> tuple[int, Any, bytes]:
    """(status, parsed JSON or None, raw bytes); 4xx/5xx answers are returned, not raised."""
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


def stop_process(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT, group: bool = False) -> int:
    """SIGTERM, then SIGKILL after `timeout` (to its process group when `group`)."""
    if proc.poll() is not None:
        return proc.returncode

    def signal_it(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(proc.pid, sig)  # the session the test started for it
            else:
                proc.send_signal(sig)

    signal_it(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        signal_it(signal.SIGKILL)
        return proc.wait(10)


class ComfyServer:
    """A real ComfyUI started from COMFYUI_PATH with COMFYUI_PYTHON, every folder in `root`."""

    def __init__(self, comfy_path: Path, python: str, root: Path):
        self.comfy_path = comfy_path
        self.python = python
        self.root = root
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
        # ComfyUI's extra_model_paths format (utils/extra_config.py): a named section with
        # base_path (relative entries are joined to it), one "kind: path" line per folder
        # (custom_nodes included), and is_default, which puts these folders first in the
        # search lists, so the files the pack saves (its primary folder) land here.
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
            # step previews on, as users set it: the Sample node then sends preview images
            "--preview-method",
            "latent2rgb",
            # The base directory keeps COMFYUI_PATH's own models/ and custom_nodes/ (which may
            # hold another copy of this pack) out of the search lists.
            "--base-directory",
            str(self.root),
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
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=str(self.comfy_path),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        deadline = started + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"ComfyUI exited with code {self.proc.returncode} during start-up; "
                    f"log tail:\n{self.log_tail()}"
                )
            with contextlib.suppress(OSError):
                if http("GET", self.url + "/system_stats", timeout=2)[0] == 200:
                    break
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"ComfyUI did not answer 200 on /system_stats within {START_TIMEOUT:.0f} s; "
                    f"log tail:\n{self.log_tail()}"
                )
            time.sleep(0.25)
        self.start_seconds = time.monotonic() - started

    def import_problem(self) -> str | None:
        """Why the log says our pack did not load, or None."""
        log = self.log_text()
        ours = [line for line in log.splitlines() if f"custom_nodes/{PACK_NAME}" in line]
        failed = [line for line in ours if "IMPORT FAILED" in line]
        if failed:
            return "ComfyUI could not import the pack: " + failed[0].strip()
        if not any("seconds" in line for line in ours):
            return f"the pack is not in ComfyUI's custom node import times (no '{PACK_NAME}')"
        return None

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        return stop_process(self.proc)

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
        status, parsed, _ = http("POST", self.url + path, {} if body is None else body, timeout)
        return status, parsed

    def submit(self, prompt: dict) -> tuple[int, Any]:
        return self.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})

    def alive(self) -> bool:
        try:
            return self.get("/system_stats", timeout=5)[0] == 200
        except OSError:
            return False

    @property
    def lycoris_dir(self) -> Path:
        return self.models / "loras" / "lycoris"


# --------------------------------------------------------------------------------------------
# API prompts of our nodes


def train_prompt(
    *,
    output_name: str,
    model: str = "demo: tiny-sd15",
    algo: str = "lokr",
    linear_dim: int = 10000,
    linear_alpha: float = 1.0,
    factor: int = 4,
    target_modules: str = "Attention, FeedForward",
    extra: str = "{}",
    folder: str = "demo: discs",
    resolution: int = 32,
    steps: int = 4,
    batch_size: int = 2,
    learning_rate: float = 0.003,
    save_every: int = 0,
    validation_prompt: str = "",
    validation_every: int = 0,
    seed: int = 0,
    ids: tuple[str, str, str, str] = ("1", "2", "3", "4"),
) -> dict[str, Any]:
    """Load Diffusers Model -> LyCORIS Config -> Dataset from Folder -> Train LyCORIS."""
    m, c, d, t = ids
    return {
        m: {
            "class_type": "LycorisLoadDiffusersModel",
            "inputs": {"model": model, "dtype": "auto", "device": "cpu", "offload": "none"},
        },
        c: {
            "class_type": "LycorisConfig",
            "inputs": {
                "algo": algo,
                "multiplier": 1.0,
                "linear_dim": linear_dim,
                "linear_alpha": linear_alpha,
                "factor": factor,
                "target_modules": target_modules,
                "module_algo_map": "{}",
                "extra": extra,
                "model": [m, 0],
            },
        },
        d: {
            "class_type": "LycorisDatasetFromFolder",
            "inputs": {
                "folder": folder,
                "resolution": resolution,
                "center_crop": True,
                "flip": False,
                "caption_dropout": 0.0,
                "trigger_word": "",
                "default_caption": "",
                "skip_bad": False,
            },
        },
        t: {
            "class_type": "LycorisTrain",
            "inputs": {
                "model": [m, 0],
                "config": [c, 0],
                "dataset": [d, 0],
                "output_name": output_name,
                "steps": steps,
                "learning_rate": learning_rate,
                "batch_size": batch_size,
                "optimizer": "adamw",
                "scheduler": "constant",
                "precision": "no",
                "gradient_checkpointing": False,
                "save_every": save_every,
                "validation_prompt": validation_prompt,
                "validation_every": validation_every,
                "validation_lycoris_strength": 1.0,
                "seed": seed,
                "resume": False,
            },
        },
    }


# --------------------------------------------------------------------------------------------
# Headless Chromium driven over the Chrome DevTools Protocol


class Browser:
    """Headless Chromium on a page, with ``evaluate`` (Runtime.evaluate, awaitPromise)."""

    def __init__(self, binary: str, url: str, profile: Path, log_path: Path):
        self.port = free_port()
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.ws: websocket.WebSocket | None = None
        self.events: list[dict[str, Any]] = []
        self._ids = itertools.count(1)
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--window-size=1600,1000",
                    f"--user-data-dir={profile}",
                    f"--remote-debugging-port={self.port}",
                    url,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def connect(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        page = None
        while page is None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Chromium exited with code {self.proc.returncode}")
            with contextlib.suppress(OSError):
                _, targets, _ = http("GET", f"http://127.0.0.1:{self.port}/json", timeout=2)
                pages = [t for t in targets or [] if t.get("type") == "page"]
                page = pages[0] if pages else None
            if page is None:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no page target from Chromium within {timeout:.0f} s")
                time.sleep(0.2)
        # no Origin header: Chromium refuses DevTools sockets from origins it was not told of
        self.ws = websocket.create_connection(
            page["webSocketDebuggerUrl"],
            timeout=10,
            suppress_origin=True,
            http_no_proxy=["127.0.0.1"],
        )
        self.call("Runtime.enable")

    def call(self, method: str, timeout: float = 30.0, **params: Any) -> dict[str, Any]:
        message_id = next(self._ids)
        self.ws.send(json.dumps({"id": message_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no answer to {method} within {timeout:.0f} s")
            self.ws.settimeout(remaining)
            try:
                message = self.ws.recv()
            except websocket.WebSocketTimeoutException:
                raise TimeoutError(f"no answer to {method} within {timeout:.0f} s") from None
            data = json.loads(message)
            if data.get("id") == message_id:
                if "error" in data:
                    raise RuntimeError(f"{method}: {data['error']}")
                return data["result"]
            if "method" in data:
                self.events.append(data)

    def evaluate(self, expression: str, timeout: float = 30.0) -> Any:
        result = self.call(
            "Runtime.evaluate",
            timeout=timeout,
            expression=expression,
            awaitPromise=True,
            returnByValue=True,
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise RuntimeError(f"page exception: {text}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float, interval: float = 0.2) -> Any:
        """Evaluate until the value is truthy; the last value on timeout is in the error."""
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(interval)
        raise AssertionError(f"{expression!r} still {value!r} after {timeout:.0f} s")

    def problems(self, needle: str) -> list[str]:
        """Exceptions and console errors/warnings of the page that mention `needle`."""
        found = []
        for event in self.events:
            params = event.get("params", {})
            if event.get("method") == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                text = json.dumps(details)
            elif event.get("method") == "Runtime.consoleAPICalled" and params.get("type") in (
                "error",
                "warning",
            ):
                text = json.dumps(params.get("args", []))
            else:
                continue
            if needle in text:
                found.append(text[:500])
        return found

    def close(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(OSError, websocket.WebSocketException):
                self.ws.close(timeout=1.0)
        if self.proc is not None:
            stop_process(self.proc, timeout=10, group=True)
