"""The headless runner (lycoris_core.client) against a fake ComfyUI.

The fake server is a real aiohttp application (what ComfyUI runs) on 127.0.0.1 and a free
port, in a thread of its own: /prompt, /history/<id>, /queue, /view, /interrupt and /ws with
``clientId``, sending ComfyUI's message shapes (``send_json`` events, ``send_bytes`` binary
events). It records the client's websocket messages (pongs and close included). Each test
scripts what the socket sends after the prompt is posted.
"""

from __future__ import annotations

import ast
import asyncio
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from aiohttp import WSMsgType, web

from lycoris_core import client
from lycoris_core.client import (
    EXIT_CODES,
    WorkflowError,
    apply_sets,
    events,
    load_workflow,
    main,
    parse_set,
    run_workflow,
)

ROOT = Path(__file__).resolve().parents[2]
PID = "prompt-0001"
ADAPTER = "/models/loras/tiny-lokr.safetensors"

WORKFLOW = {
    "12": {"class_type": "LycorisTrain", "inputs": {"steps": 3, "seed": 0}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["12", 2], "filename_prefix": "lyco"}},
}


# ---------------------------------------------------------------------------------------------
# The fake ComfyUI


def server_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A raw server frame, only to send one message in fragments (aiohttp never does)."""
    head = bytearray([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        head.append(n)
    else:
        head += bytes([126]) + struct.pack(">H", n)
    return bytes(head) + payload


def event(kind: str, data: dict) -> tuple:
    """A ComfyUI JSON event, as ``PromptServer.send_json`` sends it."""
    return ("json", {"type": kind, "data": data})


class FakeComfy:
    """``script(fake)`` returns the socket steps: ("json", message), ("bytes", b),
    ("ping", b), ("raw", frame bytes), ("sleep", s), ("history",) (publish the history
    entry), ("drop",) (end the TCP connection without a close frame) or ("wait_close",).
    ``ws`` is "ok" or "refuse" (HTTP 404 on /ws)."""

    def __init__(self, script=None, history=None, reject=None, ws="ok", history_after_drop=0.3):
        self.script = script or (lambda fake: [])
        self.history_entry = history
        self.reject = reject
        self.ws = ws
        self.history_after_drop = history_after_drop
        self.posted: list[dict] = []
        self.ws_client_ids: list[str] = []
        self.ws_origins: list[str | None] = []
        self.client_frames: list[tuple[int, object]] = []
        self.views: list[dict] = []
        self.controls: list[tuple[str, dict]] = []
        self.submitted = threading.Event()
        self.published = threading.Event()
        self.stop = threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: web.AppRunner | None = None

    def __enter__(self):
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def __exit__(self, *exc):
        self.stop.set()
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(15)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()
        self.sock.close()

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/prompt", self.post_prompt)
        app.router.add_post("/interrupt", self.post_control)
        app.router.add_post("/queue", self.post_control)
        app.router.add_get("/ws", self.websocket)
        app.router.add_get("/history/{prompt_id}", self.get_history)
        app.router.add_get("/queue", self.get_queue)
        app.router.add_get("/view", self.get_view)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self.runner.setup()
        await web.SockSite(self.runner, self.sock).start()

    def publish_later(self, delay: float) -> None:
        self.loop.call_soon_threadsafe(self.loop.call_later, delay, self.published.set)

    async def wait_for(self, done, timeout: float) -> bool:
        """Wait until ``done()``; False when the time is up or the server is stopping."""
        end = time.monotonic() + timeout
        while not done() and not self.stop.is_set() and time.monotonic() < end:
            await asyncio.sleep(0.01)
        return done()

    # -- HTTP --

    async def post_prompt(self, request: web.Request) -> web.Response:
        self.posted.append(await request.json())
        if self.reject is not None:
            return web.json_response(self.reject, status=400)
        self.submitted.set()
        return web.json_response({"prompt_id": PID, "number": 7, "node_errors": {}})

    async def post_control(self, request: web.Request) -> web.Response:
        self.controls.append((request.path, await request.json()))
        return web.json_response({})

    async def get_history(self, request: web.Request) -> web.Response:
        pid = request.match_info["prompt_id"]
        done = pid == PID and self.published.is_set() and self.history_entry is not None
        return web.json_response({PID: self.history_entry} if done else {})

    async def get_queue(self, request: web.Request) -> web.Response:
        running = self.submitted.is_set() and self.history_entry is not None
        item = [[7, PID, {}, {}, []]] if running and not self.published.is_set() else []
        return web.json_response({"queue_running": item, "queue_pending": []})

    async def get_view(self, request: web.Request) -> web.Response:
        query = dict(request.query)
        self.views.append(query)
        return web.Response(body=f"IMG:{query['filename']}".encode(), content_type="image/png")

    # -- websocket --

    async def read_client(self, ws: web.WebSocketResponse) -> None:
        """Record the client's messages (pongs too: autoping is off) until it closes."""
        while True:
            msg = await ws.receive()
            self.client_frames.append((int(msg.type), msg.data))
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return
            if msg.type == WSMsgType.ERROR:
                return

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        if self.ws != "ok":
            return web.Response(status=404, text="no websocket here")
        ws = web.WebSocketResponse(autoping=False)
        await ws.prepare(request)
        sid = request.query.get("clientId", "")
        self.ws_client_ids.append(sid)
        self.ws_origins.append(request.headers.get("Origin"))
        status = {"status": {"exec_info": {"queue_remaining": 0}}, "sid": sid}
        await ws.send_json({"type": "status", "data": status})
        reader = asyncio.ensure_future(self.read_client(ws))
        await self.wait_for(lambda: self.submitted.is_set() or reader.done(), 5)
        if self.submitted.is_set() and not reader.done():
            await self.play(ws, request)
        if not await self.wait_for(reader.done, 10):
            reader.cancel()
        return ws

    async def play(self, ws: web.WebSocketResponse, request: web.Request) -> None:
        for step in self.script(self):
            if self.stop.is_set() or ws.closed:
                break
            if step[0] == "json":
                await ws.send_json(step[1])
            elif step[0] == "bytes":
                await ws.send_bytes(step[1])
            elif step[0] == "ping":
                await ws.ping(step[1])
            elif step[0] == "raw":
                request.transport.write(step[1])
            elif step[0] == "sleep":
                await asyncio.sleep(step[1])
            elif step[0] == "history":
                self.published.set()
            elif step[0] == "drop":  # no close frame: the TCP connection just ends
                self.publish_later(self.history_after_drop)
                request.transport.close()
                break


def history_entry(status="success", messages=(), outputs=None):
    return {
        "prompt": [7, PID, WORKFLOW, {}, ["9"]],
        "outputs": outputs or {},
        "status": {
            "status_str": status,
            "completed": status == "success",
            "messages": [list(m) for m in messages],
        },
    }


SUCCESS_OUTPUTS = {
    "9": {
        "images": [
            {"filename": "lyco_00001_.png", "subfolder": "", "type": "output"},
            {"filename": "lyco_00001_.png", "subfolder": "previews", "type": "temp"},
        ]
    },
    "12": {
        "text": [json.dumps({"adapter_path": ADAPTER, "final_loss": 0.25, "steps": 3})],
        "adapter_path": [ADAPTER],
        "final_loss": [0.25],
    },
}


def success_script(fake):
    progress1 = json.dumps(
        {"type": "progress", "data": {"value": 1, "max": 3, "prompt_id": PID, "node": "12"}}
    ).encode()
    text = struct.pack(">I", 3) + struct.pack(">I", 2) + b"12" + b"step 3/3 " + b"." * 200
    big = {"images": [SUCCESS_OUTPUTS["9"]["images"][0]], "text": ["x" * 70000]}
    return [
        # before our prompt starts: a broadcast from someone else's run and another prompt's end
        event("lycoris.train", {"step": 1, "total": 9, "loss": 9.9999, "node": "77"}),
        event("execution_success", {"prompt_id": "someone-else"}),
        event("execution_start", {"prompt_id": PID}),
        event("execution_cached", {"nodes": [], "prompt_id": PID}),
        event("executing", {"node": "12", "display_node": "12", "prompt_id": PID}),
        # one message in three fragments with a ping between them
        ("raw", server_frame(0x1, progress1[:10], fin=False)),
        ("raw", server_frame(0x0, progress1[10:30], fin=False)),
        ("ping", b"are-you-there"),
        ("raw", server_frame(0x0, progress1[30:], fin=True)),
        event("lycoris.train", {"step": 1, "total": 3, "loss": 0.5, "lr": 1e-4, "node": "12"}),
        event("progress", {"value": 2, "max": 3, "prompt_id": PID, "node": "12"}),
        event("progress", {"value": 3, "max": 3, "prompt_id": PID, "node": "12"}),
        event("lycoris.train", {"step": 3, "total": 3, "loss": 0.25, "lr": 1e-4, "node": "12"}),
        event("lycoris.train", {"status": "done", "adapter_path": ADAPTER, "node": "12"}),
        ("bytes", text),  # node text (PromptServer.send_progress_text), 16-bit length
        event("executing", {"node": "9", "display_node": "9", "prompt_id": PID}),
        event("executed", {"node": "9", "output": big, "prompt_id": PID}),  # 64-bit length
        ("history",),
        event("execution_success", {"prompt_id": PID}),
        event("executing", {"node": None, "prompt_id": PID}),
        ("wait_close",),
    ]


@pytest.fixture
def wf_file(tmp_path):
    path = tmp_path / "wf_api.json"
    path.write_text(json.dumps(WORKFLOW))
    return path


def run_cli(capsys, *argv):
    code = main(["run", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


# ---------------------------------------------------------------------------------------------
# End to end against the fake server


def test_success_progress_outputs_and_result_json(tmp_path, wf_file, capsys):
    out = tmp_path / "out"
    with FakeComfy(success_script, history_entry("success", outputs=SUCCESS_OUTPUTS)) as fake:
        code, stdout, stderr = run_cli(capsys, wf_file, "--server", fake.url, "--out", out)

    assert code == 0, stderr
    assert "progress node 12 (LycorisTrain): 1/3" in stdout
    assert "progress node 12 (LycorisTrain): 3/3" in stdout
    assert "train node 12 (LycorisTrain): step 1/3  loss 0.5000" in stdout
    assert "train node 12 (LycorisTrain): step 3/3  loss 0.2500" in stdout
    assert f"done, adapter {ADAPTER}" in stdout
    assert "executing node 9 (SaveImage)" in stdout
    assert "executed node 9 (SaveImage): images[1], text[1]" in stdout
    assert "9.9999" not in stdout  # someone else's broadcast, before our prompt started
    assert "success: prompt prompt-0001" in stdout
    assert f"adapter: {ADAPTER}" in stdout

    # the POST carried our client id, the same one the socket used; the workflow as written
    assert fake.posted[0]["prompt"] == WORKFLOW
    assert fake.posted[0]["client_id"] == fake.ws_client_ids[0]
    # the client answered the ping with a pong of the same payload, then closed the socket
    assert (0xA, b"are-you-there") in fake.client_frames
    assert fake.client_frames[-1][0] == 0x8

    result = json.loads((out / "result.json").read_text())
    assert result["prompt_id"] == PID
    assert result["status"] == "success"
    assert result["error"] is None
    assert result["outputs"] == SUCCESS_OUTPUTS
    assert result["adapter_paths"] == [ADAPTER]
    assert result["final_loss"] == 0.25
    assert result["final_losses"] == {"12": 0.25}
    assert result["transport"] == "websocket"
    files = result["files"]
    assert [Path(f["path"]).name for f in files] == ["lyco_00001_.png", "9-lyco_00001_.png"]
    assert (out / "lyco_00001_.png").read_bytes() == b"IMG:lyco_00001_.png"
    assert (out / "9-lyco_00001_.png").read_bytes() == b"IMG:lyco_00001_.png"
    assert {(v["subfolder"], v["type"]) for v in fake.views} == {
        ("", "output"),
        ("previews", "temp"),
    }


def test_validation_error_400_prints_node_errors(tmp_path, wf_file, capsys):
    reject = {
        "error": {
            "type": "prompt_outputs_failed_validation",
            "message": "Prompt outputs failed validation",
            "details": "Value -1 smaller than min of 0: seed",
            "extra_info": {},
        },
        "node_errors": {
            "12": {
                "errors": [
                    {
                        "type": "value_smaller_than_min",
                        "message": "Value -1 smaller than min of 0",
                        "details": "seed",
                        "extra_info": {"input_name": "seed"},
                    }
                ],
                "dependent_outputs": ["9"],
                "class_type": "LycorisTrain",
            }
        },
    }
    out = tmp_path / "out"
    with FakeComfy(reject=reject) as fake:
        code, _, stderr = run_cli(capsys, wf_file, "--server", fake.url, "--out", out)
    assert code == EXIT_CODES["rejected"] == 5
    assert "Prompt outputs failed validation" in stderr
    assert "node 12 (LycorisTrain) input 'seed': Value -1 smaller than min of 0: seed" in stderr
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "rejected"
    assert result["node_errors"]["12"]["class_type"] == "LycorisTrain"


def test_execution_error(tmp_path, wf_file, capsys):
    err = {
        "prompt_id": PID,
        "node_id": "12",
        "node_type": "LycorisTrain",
        "executed": [],
        "exception_type": "lycoris_core.errors.ConfigError",
        "exception_message": "lycoris_config.json: 'linear_alpha' is required",
        "traceback": ["  File ...\n"],
        "current_inputs": {},
        "current_outputs": [],
    }

    def script(fake):
        return [
            event("execution_start", {"prompt_id": PID}),
            event("executing", {"node": "12", "prompt_id": PID}),
            event("execution_error", err),
            ("history",),
            event("executing", {"node": None, "prompt_id": PID}),
            ("wait_close",),
        ]

    entry = history_entry("error", [("execution_start", {}), ("execution_error", err)])
    out = tmp_path / "out"
    with FakeComfy(script, entry) as fake:
        code, stdout, stderr = run_cli(capsys, wf_file, "--server", fake.url, "--out", out)
    assert code == EXIT_CODES["error"] == 1
    line = "node 12 (LycorisTrain): lycoris_core.errors.ConfigError: lycoris_config.json:"
    assert "error in " + line in stdout
    assert line in stderr
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "error"
    assert result["error"]["node_id"] == "12"
    assert result["error"]["node_type"] == "LycorisTrain"
    assert result["error"]["exception_message"].endswith("'linear_alpha' is required")
    assert result["files"] == []


def test_execution_interrupted(tmp_path, wf_file, capsys):
    data = {"prompt_id": PID, "node_id": "12", "node_type": "LycorisTrain", "executed": []}

    def script(fake):
        return [
            event("execution_start", {"prompt_id": PID}),
            event("execution_interrupted", data),
            ("history",),
            event("executing", {"node": None, "prompt_id": PID}),
            ("wait_close",),
        ]

    entry = history_entry("error", [("execution_interrupted", data)])
    out = tmp_path / "out"
    with FakeComfy(script, entry) as fake:
        code, stdout, stderr = run_cli(capsys, wf_file, "--server", fake.url, "--out", out)
    assert code == EXIT_CODES["interrupted"] == 3
    assert "interrupted at node 12 (LycorisTrain)" in stdout
    assert "interrupted: prompt prompt-0001" in stderr
    assert json.loads((out / "result.json").read_text())["status"] == "interrupted"


@pytest.mark.parametrize("ws", ["drop", "refuse"])
def test_websocket_lost_falls_back_to_polling_history(tmp_path, wf_file, capsys, ws):
    def script(fake):
        return [
            event("execution_start", {"prompt_id": PID}),
            event("progress", {"value": 1, "max": 3, "prompt_id": PID, "node": "12"}),
            ("drop",),
        ]

    out = tmp_path / "out"
    entry = history_entry("success", outputs=SUCCESS_OUTPUTS)
    with FakeComfy(script, entry, ws="ok" if ws == "drop" else "refuse") as fake:
        if ws == "refuse":
            fake.publish_later(0.5)
        start = time.monotonic()
        code, stdout, stderr = run_cli(
            capsys, wf_file, "--server", fake.url, "--out", out, "--poll-interval", "0.1"
        )
        assert time.monotonic() - start < 5
    assert code == 0, stderr
    if ws == "drop":
        assert "progress node 12 (LycorisTrain): 1/3" in stdout
        assert "websocket lost" in stdout and "falling back to polling /history" in stdout
    else:
        assert "websocket unavailable" in stdout and "HTTP/1.1 404" in stdout
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "success"
    assert result["transport"] == ("websocket+polling" if ws == "drop" else "polling")
    assert (out / "lyco_00001_.png").read_bytes() == b"IMG:lyco_00001_.png"
    assert result["final_loss"] == 0.25


def test_prompt_that_vanishes_from_queue_is_an_error(tmp_path, wf_file):
    # no websocket, the history never gets the prompt and the queue does not list it
    with FakeComfy(history=None, ws="refuse") as fake:
        result = run_workflow(fake.url, WORKFLOW, tmp_path, timeout=10, poll_interval=0.05)
    assert result["status"] == "error"
    assert "neither queued nor in the history" in result["error"]["message"]


def test_timeout_with_cancel(tmp_path, wf_file, capsys):
    def script(fake):
        return [event("execution_start", {"prompt_id": PID}), ("wait_close",)]

    out = tmp_path / "out"
    with FakeComfy(script, history_entry("success")) as fake:
        start = time.monotonic()
        code, _, stderr = run_cli(
            capsys,
            wf_file,
            *("--server", fake.url, "--out", out, "--timeout", "0.5", "--cancel-on-timeout"),
        )
        assert time.monotonic() - start < 3
    assert code == EXIT_CODES["timeout"] == 4
    assert "timeout: prompt prompt-0001" in stderr
    assert "cancelled it on the server" in stderr
    assert ("/interrupt", {"prompt_id": PID}) in fake.controls
    assert ("/queue", {"delete": [PID]}) in fake.controls
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "timeout" and result["cancelled"] is True


def test_server_unreachable_is_a_clear_one_liner(tmp_path, wf_file, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    code, stdout, stderr = run_cli(capsys, wf_file, "--server", url, "--out", tmp_path / "o")
    assert code == EXIT_CODES["unreachable"] == 6
    assert stdout == ""
    assert stderr.count("\n") == 1
    assert stderr.startswith(f"error: cannot reach ComfyUI at {url} (")
    assert "python main.py --listen" in stderr


def test_set_overrides_are_posted_and_wrapper_file_is_accepted(tmp_path, capsys):
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"prompt": WORKFLOW, "client_id": "ignored"}))
    with FakeComfy(success_script, history_entry("success", outputs=SUCCESS_OUTPUTS)) as fake:
        code, _, stderr = run_cli(
            capsys,
            wrapped,
            *("--server", fake.url, "--out", tmp_path / "o", "-q", "--client-id", "me-1"),
            *("--set", "12.seed=5", "--set", "9.filename_prefix=run1"),
            *("--set", '12.opts={"a": [1, 2]}', "--set", '12.name="5"'),
        )
    assert code == 0, stderr
    posted = fake.posted[0]
    assert posted["client_id"] == "me-1" and fake.ws_client_ids == ["me-1"]
    assert posted["prompt"]["12"]["inputs"] == {
        "steps": 3,
        "seed": 5,
        "opts": {"a": [1, 2]},
        "name": "5",
    }
    assert posted["prompt"]["9"]["inputs"]["filename_prefix"] == "run1"
    assert WORKFLOW["12"]["inputs"] == {"steps": 3, "seed": 0}  # the original is untouched


def test_set_unknown_node_lists_the_ids(wf_file, tmp_path, capsys):
    code, stdout, stderr = run_cli(
        capsys, wf_file, "--server", "http://127.0.0.1:9", "--out", tmp_path, "--set", "99.seed=1"
    )
    assert code == EXIT_CODES["usage"] == 2
    assert stdout == ""
    ids = "ids: 12 (LycorisTrain), 9 (SaveImage)"
    assert stderr == f"error: --set 99.seed: no node '99' in the workflow; {ids}\n"


def test_module_entry_point_runs(tmp_path, wf_file):
    """``python -m lycoris_core.client run ...`` in a fresh process."""
    out = tmp_path / "out"
    with FakeComfy(success_script, history_entry("success", outputs=SUCCESS_OUTPUTS)) as fake:
        cmd = [sys.executable, "-m", "lycoris_core.client", "run", str(wf_file)]
        proc = subprocess.run(
            [*cmd, "--server", fake.url, "--out", str(out)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    assert proc.returncode == 0, proc.stderr
    assert "success: prompt prompt-0001" in proc.stdout
    assert json.loads((out / "result.json").read_text())["status"] == "success"


# Runs through the websocket-client package; polls without it; runs without torch.

BLOCKER = """
import runpy, sys

class Blocker:
    def __init__(self, names):
        self.names, self.tried = names, []

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.names:
            self.tried.append(name)
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None

blocker = Blocker(sys.argv[1].split(","))
sys.meta_path.insert(0, blocker)
sys.argv = ["lycoris_core.client", *sys.argv[2:]]
try:
    runpy.run_module("lycoris_core.client", run_name="__main__", alter_sys=True)
finally:
    print("TRIED:" + ",".join(sorted(set(blocker.tried))), file=sys.stderr)
"""


def run_blocked(blocked: list[str], *argv: str) -> subprocess.CompletedProcess:
    """``python -m lycoris_core.client ARGV`` in a fresh process where importing any of
    ``blocked`` (top-level names) fails; stderr ends with the names that were tried."""
    return subprocess.run(
        [sys.executable, "-c", BLOCKER, ",".join(blocked), *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def tried(proc: subprocess.CompletedProcess) -> list[str]:
    line = [x for x in proc.stderr.splitlines() if x.startswith("TRIED:")][-1]
    return [name for name in line[len("TRIED:") :].split(",") if name]


@pytest.mark.parametrize("websocket_client", ["installed", "blocked"])
def test_runner_works_without_torch(tmp_path, wf_file, websocket_client):
    blocked = ["torch"] + (["websocket"] if websocket_client == "blocked" else [])
    help_proc = run_blocked(blocked, "--help")
    assert help_proc.returncode == 0, help_proc.stderr
    assert "Run ComfyUI workflows headless" in help_proc.stdout
    assert tried(help_proc) == []

    out = tmp_path / "out"
    entry = history_entry("success", outputs=SUCCESS_OUTPUTS)
    with FakeComfy(success_script, entry) as fake:
        if websocket_client == "blocked":
            fake.publish_later(0.5)  # no socket: the script does not run
        args = ["run", str(wf_file), "--server", fake.url, "--out", str(out)]
        proc = run_blocked(blocked, *args, "--poll-interval", "0.1")
    assert proc.returncode == 0, proc.stderr
    assert "success: prompt prompt-0001" in proc.stdout
    assert tried(proc) == (["websocket"] if websocket_client == "blocked" else [])
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "success"
    assert result["final_loss"] == 0.25
    assert result["transport"] == ("polling" if websocket_client == "blocked" else "websocket")
    assert (out / "lyco_00001_.png").read_bytes() == b"IMG:lyco_00001_.png"


def test_importing_the_core_does_not_import_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import lycoris_core\n"
        "from lycoris_core import LycorisError, ConfigError\n"  # LycorisConfig reads lycoris
        "import lycoris_core.client\n"
        "try:\n"
        "    lycoris_core.patched\n"
        "except ImportError as exc:\n"
        "    print('lazy:', exc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    # the torch-using name is only imported when touched, and then needs torch
    assert proc.stdout.startswith("lazy:") and "torch" in proc.stdout


def test_public_names_of_the_core_resolve():
    import lycoris_core

    for name in lycoris_core.__all__:
        assert getattr(lycoris_core, name).__name__ == name
    assert set(lycoris_core.__all__) <= set(dir(lycoris_core))
    from lycoris_core import LycorisConfig, load_adapter, patched  # noqa: F401

    with pytest.raises(AttributeError, match="has no attribute 'nothing_here'"):
        lycoris_core.nothing_here  # noqa: B018


def test_websocket_client_is_used_when_installed(tmp_path, monkeypatch):
    import websocket

    calls = []
    real = websocket.create_connection

    def spy(url, **options):
        calls.append(url)
        return real(url, **options)

    monkeypatch.setattr(websocket, "create_connection", spy)
    seen = []
    entry = history_entry("success", outputs=SUCCESS_OUTPUTS)
    with FakeComfy(success_script, entry) as fake:
        result = run_workflow(
            fake.url, WORKFLOW, tmp_path, client_id="c-7", on_event=lambda e, d: seen.append(e)
        )
    assert calls == [f"ws://{fake.url.split('://')[1]}/ws?clientId=c-7"]
    assert fake.ws_client_ids == ["c-7"]
    assert fake.ws_origins == [None]  # ComfyUI's origin check lets a client without one in
    assert result["status"] == "success" and result["transport"] == "websocket"
    assert "lycoris.train" in seen and "progress_text" in seen


def test_without_websocket_client_polls_with_a_one_line_note(
    tmp_path, wf_file, capsys, caplog, monkeypatch
):
    monkeypatch.setitem(sys.modules, "websocket", None)  # import websocket -> ImportError
    monkeypatch.setattr(events, "_noted", False)
    caplog.set_level(logging.INFO, logger="lycoris_core.client")
    entry = history_entry("success", outputs=SUCCESS_OUTPUTS)
    out = tmp_path / "out"
    with FakeComfy(success_script, entry) as fake:
        fake.publish_later(0.3)
        code, stdout, stderr = run_cli(
            capsys, wf_file, "--server", fake.url, "--out", out, "--poll-interval", "0.1"
        )
        again = run_workflow(fake.url, WORKFLOW, tmp_path / "again", poll_interval=0.1)
    assert code == 0, stderr
    notes = [line for line in stdout.splitlines() if "websocket-client" in line]
    assert notes == [
        "websocket unavailable (websocket-client is not installed; `pip install "
        "websocket-client` to follow progress live); polling /history"
    ]
    assert "websocket-client" not in stderr
    logged = [r for r in caplog.records if "websocket-client is not installed" in r.getMessage()]
    assert len(logged) == 1  # once per process, not once per run
    assert fake.ws_client_ids == []
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "success" and result["transport"] == "polling"
    assert result["adapter_paths"] == [ADAPTER]
    assert again["status"] == "success" and again["transport"] == "polling"


# ---------------------------------------------------------------------------------------------
# Pieces


def test_parse_set_values():
    assert parse_set("12.seed=5") == ("12", "seed", 5)
    assert parse_set("12.cfg=7.5") == ("12", "cfg", 7.5)
    assert parse_set("3.text=a cat, photo") == ("3", "text", "a cat, photo")
    assert parse_set('3.text="5"') == ("3", "text", "5")
    assert parse_set("3.flag=true") == ("3", "flag", True)
    assert parse_set("3.model=['4', 0]") == ("3", "model", "['4', 0]")  # not JSON: a string
    assert parse_set('3.model=["4", 0]') == ("3", "model", ["4", 0])
    assert parse_set("3.text=a=b") == ("3", "text", "a=b")
    for bad in ("12seed=5", "12.seed", ".seed=1", "12.=1"):
        with pytest.raises(WorkflowError, match=r"expected NODE\.INPUT=VALUE"):
            parse_set(bad)


def test_apply_sets_matches_node_ids_with_dots():
    workflow = {"1": {"class_type": "A", "inputs": {}}, "1.5": {"class_type": "B", "inputs": {}}}
    out = apply_sets(workflow, ["1.5.seed=2", "1.seed=3"])
    assert out["1.5"]["inputs"] == {"seed": 2}
    assert out["1"]["inputs"] == {"seed": 3}
    assert apply_sets(workflow, {"1.x": [1]})["1"]["inputs"] == {"x": [1]}
    assert apply_sets(workflow, [("1", "y", None)])["1"]["inputs"] == {"y": None}
    with pytest.raises(
        WorkflowError, match=r"no node '7' in the workflow; ids: 1 \(A\), 1.5 \(B\)"
    ):
        apply_sets(workflow, ["7.seed=1"])


def test_load_workflow_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "1": {"class_type": "A",\n  "inputs": {}\n}\n')
    with pytest.raises(WorkflowError, match=r"bad\.json: invalid JSON at line 5, column 1: "):
        load_workflow(bad)
    with pytest.raises(WorkflowError, match="no such workflow file"):
        load_workflow(tmp_path / "missing.json")
    ui = tmp_path / "ui.json"
    ui.write_text(json.dumps({"nodes": [], "links": [], "version": 0.4}))
    with pytest.raises(WorkflowError, match=r"UI-format workflow .* Export \(API\)"):
        load_workflow(ui)
    noclass = tmp_path / "noclass.json"
    noclass.write_text(json.dumps({"3": {"inputs": {}}}))
    with pytest.raises(WorkflowError, match="node '3' has no \"class_type\""):
        load_workflow(noclass)
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"prompt": WORKFLOW}))
    assert load_workflow(wrapped) == WORKFLOW


def test_client_needs_only_the_standard_library_and_websocket_client():
    """The runner's modules import the standard library, each other, lycoris_core.errors and
    lycoris_core.schema (torch-free) and, inside a function, websocket-client: nothing else
    of the core."""
    stdlib = set(sys.stdlib_module_names)
    for path in sorted((ROOT / "lycoris_core" / "client").glob("*.py")):
        tree = ast.parse(path.read_text())
        top_level = set(tree.body)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    name = alias.name.split(".")[0]
                    assert name in stdlib or name == "websocket", (path.name, name)
                    if name == "websocket":  # lazily: a missing package is not an error
                        assert node not in top_level, path.name
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0:
                    assert node.module.split(".")[0] in stdlib, (path.name, node.module)
                else:
                    core = node.module or ",".join(a.name for a in node.names)
                    assert node.level == 1 or core in ("errors", "schema"), (path.name, core)
    assert client.__name__ == "lycoris_core.client"
