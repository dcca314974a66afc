"""The headless runner (lycoris_core.client) against a fake ComfyUI.

The fake server is a standard-library ThreadingHTTPServer on 127.0.0.1 that implements
/prompt, /history/<id>, /queue, /view, /interrupt and a /ws upgrade speaking real WebSocket
frames (unmasked server frames; it reads and records the client's masked frames). Each test
scripts what the socket sends after the prompt is posted.
"""

from __future__ import annotations

import ast
import base64
import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lycoris_core import client
from lycoris_core.client import (
    EXIT_CODES,
    WorkflowError,
    apply_sets,
    decode_frame,
    encode_frame,
    load_workflow,
    main,
    parse_set,
    run_workflow,
)

ROOT = Path(__file__).resolve().parents[2]
GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
PID = "prompt-0001"
ADAPTER = "/models/loras/tiny-lokr.safetensors"

WORKFLOW = {
    "12": {"class_type": "LycorisTrain", "inputs": {"steps": 3, "seed": 0}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["12", 2], "filename_prefix": "lyco"}},
}


# ---------------------------------------------------------------------------------------------
# The fake ComfyUI


def server_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    head = bytearray([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        head.append(n)
    elif n < 1 << 16:
        head += bytes([126]) + struct.pack(">H", n)
    else:
        head += bytes([127]) + struct.pack(">Q", n)
    return bytes(head) + payload


def event(kind: str, data: dict) -> tuple:
    return ("send", server_frame(0x1, json.dumps({"type": kind, "data": data}).encode()))


def read_client_frames(sock: socket.socket, record: list, stop_after: float) -> None:
    """Parse the client's frames until it closes (or time runs out); record each one."""
    buf = bytearray()
    end = time.monotonic() + stop_after
    sock.settimeout(0.2)
    while time.monotonic() < end:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return
        if not chunk:
            return
        buf += chunk
        while len(buf) >= 2:
            masked, n, i = buf[1] & 0x80, buf[1] & 0x7F, 2
            if n == 126:
                n, i = struct.unpack(">H", bytes(buf[2:4]))[0], 4
            elif n == 127:
                n, i = struct.unpack(">Q", bytes(buf[2:10]))[0], 10
            if len(buf) < i + (4 if masked else 0) + n:
                break
            key = bytes(buf[i : i + 4]) if masked else b"\0\0\0\0"
            i += 4 if masked else 0
            payload = bytes(b ^ key[k % 4] for k, b in enumerate(buf[i : i + n]))
            record.append((buf[0] & 0x0F, payload, bool(masked)))
            opcode = buf[0] & 0x0F
            del buf[: i + n]
            if opcode == 0x8:
                return


class FakeComfy:
    """``script(fake)`` returns the socket steps: ("send", bytes), ("sleep", s), ("history",),
    ("drop",) or ("wait_close",). ``ws`` is "ok" or "refuse" (HTTP 404 on /ws)."""

    def __init__(self, script=None, history=None, reject=None, ws="ok", history_after_drop=0.3):
        self.script = script or (lambda fake: [])
        self.history_entry = history
        self.reject = reject
        self.ws = ws
        self.history_after_drop = history_after_drop
        self.posted: list[dict] = []
        self.ws_client_ids: list[str] = []
        self.client_frames: list[tuple[int, bytes, bool]] = []
        self.views: list[dict] = []
        self.controls: list[tuple[str, dict]] = []
        self.submitted = threading.Event()
        self.published = threading.Event()
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)
        for t in self.threads:
            t.join(5)

    def publish_later(self, delay: float) -> None:
        timer = threading.Timer(delay, self.published.set)
        timer.daemon = True
        timer.start()
        self.threads.append(timer)

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def reply(self, status: int, body, content_type="application/json"):
                raw = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def body(self):
                n = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(n) or b"null")

            def do_POST(self):
                if self.path == "/prompt":
                    body = self.body()
                    fake.posted.append(body)
                    if fake.reject is not None:
                        return self.reply(400, fake.reject)
                    fake.submitted.set()
                    return self.reply(200, {"prompt_id": PID, "number": 7, "node_errors": {}})
                fake.controls.append((self.path, self.body()))
                return self.reply(200, {})

            def do_GET(self):
                url = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
                if url.path == "/ws":
                    return self.websocket(query)
                if url.path == f"/history/{PID}":
                    done = fake.published.is_set() and fake.history_entry is not None
                    return self.reply(200, {PID: fake.history_entry} if done else {})
                if url.path == "/queue":
                    running = fake.submitted.is_set() and fake.history_entry is not None
                    item = [[7, PID, {}, {}, []]] if running and not fake.published.is_set() else []
                    return self.reply(200, {"queue_running": item, "queue_pending": []})
                if url.path == "/view":
                    fake.views.append(query)
                    return self.reply(200, f"IMG:{query['filename']}".encode(), "image/png")
                return self.reply(404, {"error": "not found"})

            def websocket(self, query):
                if fake.ws != "ok":
                    return self.reply(404, b"no websocket here", "text/plain")
                assert self.headers["Upgrade"].lower() == "websocket"
                assert self.headers["Sec-WebSocket-Version"] == "13"
                key = self.headers["Sec-WebSocket-Key"]
                assert len(base64.b64decode(key)) == 16
                accept = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
                fake.ws_client_ids.append(query.get("clientId"))
                self.send_response(101, "Switching Protocols")
                self.send_header("Upgrade", "websocket")
                self.send_header("Connection", "Upgrade")
                self.send_header("Sec-WebSocket-Accept", accept)
                self.end_headers()
                self.close_connection = True
                sock = self.connection
                sock.sendall(
                    server_frame(0x1, json.dumps({"type": "status", "data": {"sid": "x"}}).encode())
                )
                reader = threading.Thread(
                    target=read_client_frames, args=(sock, fake.client_frames, 10), daemon=True
                )
                reader.start()
                if not fake.submitted.wait(5):
                    return
                for step in fake.script(fake):
                    if fake.stop.is_set():
                        break
                    if step[0] == "send":
                        sock.sendall(step[1])
                    elif step[0] == "sleep":
                        time.sleep(step[1])
                    elif step[0] == "history":
                        fake.published.set()
                    elif step[0] == "drop":  # no close frame: the TCP connection just ends
                        fake.publish_later(fake.history_after_drop)
                        sock.shutdown(socket.SHUT_RDWR)
                        break
                reader.join(5)

        return Handler


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
        ("send", server_frame(0x1, progress1[:10], fin=False)),
        ("send", server_frame(0x0, progress1[10:30], fin=False)),
        ("send", server_frame(0x9, b"are-you-there")),
        ("send", server_frame(0x0, progress1[30:], fin=True)),
        event("lycoris.train", {"step": 1, "total": 3, "loss": 0.5, "lr": 1e-4, "node": "12"}),
        event("progress", {"value": 2, "max": 3, "prompt_id": PID, "node": "12"}),
        event("progress", {"value": 3, "max": 3, "prompt_id": PID, "node": "12"}),
        event("lycoris.train", {"step": 3, "total": 3, "loss": 0.25, "lr": 1e-4, "node": "12"}),
        event("lycoris.train", {"status": "done", "adapter_path": ADAPTER, "node": "12"}),
        ("send", server_frame(0x2, text)),  # node text, 16-bit length
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
    # the client answered the ping with a masked pong of the same payload, then closed masked
    assert (0xA, b"are-you-there", True) in fake.client_frames
    assert fake.client_frames[-1][0] == 0x8 and fake.client_frames[-1][2]

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


def test_file_runs_as_a_plain_script(tmp_path, wf_file):
    """client.py needs nothing but the standard library, also outside the package."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = ROOT / "lycoris_core" / "client.py"
    args = ["run", str(wf_file), "--server", f"127.0.0.1:{port}", "--out", str(tmp_path)]
    proc = subprocess.run(
        [sys.executable, "-S", str(script), *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert proc.returncode == EXIT_CODES["unreachable"], proc.stderr
    assert proc.stderr.startswith(f"error: cannot reach ComfyUI at http://127.0.0.1:{port} (")


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


@pytest.mark.parametrize("n", [0, 5, 125, 126, 65535, 65536, 70001])
def test_frame_round_trip(n):
    payload = os.urandom(n)
    masked = encode_frame(0x2, payload, mask=True)
    assert masked[1] & 0x80
    assert decode_frame(masked) == (True, 0x2, payload, len(masked))
    assert decode_frame(masked[:-1] if n else masked[:1]) is None  # incomplete
    plain = encode_frame(0x1, payload, mask=False, fin=False)
    assert decode_frame(plain + b"\x81\x00") == (False, 0x1, payload, len(plain))


def test_client_is_standard_library_only():
    tree = ast.parse((ROOT / "lycoris_core" / "client.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    assert names - set(sys.stdlib_module_names) == set()
    assert client.__name__ == "lycoris_core.client"
