"""Headless runner: submit an API-format workflow to a running ComfyUI and collect its results.

Usage::

    python -m lycoris_core.client run WORKFLOW_API.json --server http://127.0.0.1:8188 \\
        --out DIR [--set NODE.INPUT=VALUE ...] [--timeout SECONDS] [--client-id ID]

It posts the workflow to ``POST /prompt``, follows the prompt on ``GET /ws`` (a small
standard-library WebSocket client), falls back to polling ``GET /history/<id>`` when the socket
cannot connect or drops (long jobs lose websockets), then downloads every output file through
``GET /view`` and writes ``DIR/result.json``.

Only the standard library is used, so this file also runs on its own
(``python client.py run ...``) with any Python >= 3.10, without torch.

Exit codes: 0 success, 1 execution error, 2 bad workflow or arguments, 3 interrupted,
4 timeout, 5 rejected by the server's validation (HTTP 400), 6 server unreachable or an
unexpected HTTP answer, 130 stopped with Ctrl-C (the prompt keeps running on the server).

Importable API: :func:`load_workflow`, :func:`apply_sets`, :func:`run_workflow`.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import copy
import hashlib
import ipaddress
import json
import os
import socket
import ssl
import struct
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

try:  # inside the package: errors share the library's base class
    from .errors import LycorisError as _Base
except ImportError:  # run as a plain script

    class _Base(Exception):  # type: ignore[no-redef]
        pass


__all__ = [
    "EXIT_CODES",
    "ClientError",
    "PromptRejected",
    "ServerUnreachable",
    "WebSocket",
    "WorkflowError",
    "apply_sets",
    "load_workflow",
    "main",
    "parse_set",
    "run_workflow",
]

DEFAULT_SERVER = "http://127.0.0.1:8188"
START_HINT = (
    "start ComfyUI with `python main.py --listen 127.0.0.1 --port 8188` in its folder, "
    "or pass --server URL"
)

EXIT_CODES = {
    "success": 0,
    "error": 1,
    "usage": 2,
    "interrupted": 3,
    "timeout": 4,
    "rejected": 5,
    "unreachable": 6,
}

EventCallback = Callable[[str, dict[str, Any]], None]


# --------------------------------------------------------------------------------------------
# Errors


class ClientError(_Base, RuntimeError):
    """Base of the runner's errors; ``exit_code`` is what the CLI exits with."""

    exit_code = EXIT_CODES["unreachable"]


class WorkflowError(ClientError, ValueError):
    """The workflow file or a --set is wrong."""

    exit_code = EXIT_CODES["usage"]


class ServerUnreachable(ClientError):
    """No ComfyUI answers at the URL, or it answered something unexpected."""

    exit_code = EXIT_CODES["unreachable"]


class PromptRejected(ClientError):
    """``POST /prompt`` answered 400: the workflow failed ComfyUI's validation."""

    exit_code = EXIT_CODES["rejected"]

    def __init__(self, message: str, response: dict[str, Any]):
        super().__init__(message)
        self.response = response
        self.error = response.get("error") if isinstance(response, dict) else None
        self.node_errors = (response.get("node_errors") or {}) if isinstance(response, dict) else {}


class WebSocketError(OSError):
    """Handshake refused or a protocol violation on the socket."""


class WebSocketClosed(WebSocketError):
    """The server closed the socket (with or without a close frame)."""


# --------------------------------------------------------------------------------------------
# Workflows


def load_workflow(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read an API-format workflow (``{id: {"class_type", "inputs"}}``), also when it is
    wrapped as ``{"prompt": {...}}``. Raises :class:`WorkflowError` with the file (and line)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise WorkflowError(f"{path}: no such workflow file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkflowError(f"{path}: cannot read the workflow ({exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise WorkflowError(
            f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    return validate_workflow(data, str(path))


def validate_workflow(data: Any, where: str = "workflow") -> dict[str, Any]:
    """Unwrap ``{"prompt": ...}`` and check the API-format shape; return the node dict."""
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict):
        data = data["prompt"]
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise WorkflowError(
            f"{where}: this is a UI-format workflow (nodes/links); the runner needs the API "
            "format: in ComfyUI use Workflow > Export (API)"
        )
    if not isinstance(data, dict) or not data:
        raise WorkflowError(
            f"{where}: expected an API-format workflow, a JSON object "
            '{"<node id>": {"class_type": ..., "inputs": {...}}}'
        )
    for node_id, node in data.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            raise WorkflowError(f'{where}: node {node_id!r} has no "class_type" string')
        inputs = node.get("inputs", {})
        if not isinstance(inputs, dict):
            raise WorkflowError(f'{where}: node {node_id!r}: "inputs" must be an object')
    return data


def parse_set(text: str) -> tuple[str, str, Any]:
    """``"12.seed=5"`` -> ``("12", "seed", 5)``. The value is JSON when it parses, else the
    string itself (write ``'12.text="5"'`` for the string "5"). Node ids are matched later by
    :func:`apply_sets`; here the id is everything before the first dot."""
    key, sep, raw = text.partition("=")
    node, dot, name = key.partition(".")
    if not sep or not dot or not node.strip() or not name.strip():
        raise WorkflowError(f"--set {text!r}: expected NODE.INPUT=VALUE, e.g. 12.seed=5")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return node.strip(), name.strip(), value


def apply_sets(
    workflow: Mapping[str, Any], sets: Iterable[str | tuple[str, str, Any]] | Mapping[str, Any]
) -> dict[str, Any]:
    """A copy of ``workflow`` with inputs overridden.

    ``sets`` holds ``"NODE.INPUT=VALUE"`` strings, ``(node, input, value)`` tuples, or is a
    mapping ``{"NODE.INPUT": value}``. Node ids may contain dots: the longest id that prefixes
    the key wins. An unknown node id is a :class:`WorkflowError` listing the ids."""
    prompt = copy.deepcopy(dict(workflow))
    items: list[tuple[str, Any]] = []
    if isinstance(sets, Mapping):
        items = [(str(k), v) for k, v in sets.items()]
    else:
        for item in sets:
            if isinstance(item, str):
                key, sep, _raw = item.partition("=")
                if not sep:
                    raise WorkflowError(
                        f"--set {item!r}: expected NODE.INPUT=VALUE, e.g. 12.seed=5"
                    )
                items.append((key, parse_set(item)[2]))
            else:
                node, name, value = item
                items.append((f"{node}.{name}", value))
    for key, value in items:
        matches = [nid for nid in prompt if key.startswith(f"{nid}.") and len(key) > len(nid) + 1]
        if not matches:
            node = key.partition(".")[0]
            if "." not in key or not node:
                raise WorkflowError(f"--set {key!r}: expected NODE.INPUT=VALUE, e.g. 12.seed=5")
            listing = ", ".join(f"{nid} ({prompt[nid].get('class_type')})" for nid in prompt)
            raise WorkflowError(f"--set {key}: no node {node!r} in the workflow; ids: {listing}")
        node = max(matches, key=len)
        name = key[len(node) + 1 :].strip()
        prompt[node].setdefault("inputs", {})[name] = value
    return prompt


# --------------------------------------------------------------------------------------------
# WebSocket (RFC 6455), client side


_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
MAX_MESSAGE = 256 * 1024 * 1024


def ws_accept_key(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` value for a ``Sec-WebSocket-Key``."""
    digest = hashlib.sha1((key + _WS_GUID).encode("ascii")).digest()
    return base64.b64encode(digest).decode("ascii")


def _xor_mask(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    if n == 0:
        return b""
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


def encode_frame(opcode: int, payload: bytes, *, mask: bool = True, fin: bool = True) -> bytes:
    """One frame; client frames are masked (RFC 6455 5.3), server frames are not."""
    head = bytearray([(0x80 if fin else 0) | opcode])
    n = len(payload)
    bit = 0x80 if mask else 0
    if n < 126:
        head.append(bit | n)
    elif n < 1 << 16:
        head.append(bit | 126)
        head += struct.pack(">H", n)
    else:
        head.append(bit | 127)
        head += struct.pack(">Q", n)
    if not mask:
        return bytes(head) + payload
    key = os.urandom(4)
    return bytes(head) + key + _xor_mask(payload, key)


def decode_frame(buf: bytes | bytearray) -> tuple[bool, int, bytes, int] | None:
    """``(fin, opcode, payload, bytes used)`` for the first complete frame in ``buf``, or None
    while it is incomplete. Masked frames are unmasked."""
    if len(buf) < 2:
        return None
    b0, b1 = buf[0], buf[1]
    if b0 & 0x70:
        raise WebSocketError("websocket frame with reserved bits set (no extension was agreed)")
    n = b1 & 0x7F
    i = 2
    if n == 126:
        if len(buf) < 4:
            return None
        n = struct.unpack(">H", bytes(buf[2:4]))[0]
        i = 4
    elif n == 127:
        if len(buf) < 10:
            return None
        n = struct.unpack(">Q", bytes(buf[2:10]))[0]
        i = 10
    if n > MAX_MESSAGE:
        raise WebSocketError(f"websocket frame of {n} bytes is over the {MAX_MESSAGE} limit")
    key = b""
    if b1 & 0x80:
        if len(buf) < i + 4:
            return None
        key = bytes(buf[i : i + 4])
        i += 4
    if len(buf) < i + n:
        return None
    payload = bytes(buf[i : i + n])
    if key:
        payload = _xor_mask(payload, key)
    return bool(b0 & 0x80), b0 & 0x0F, payload, i + n


class WebSocket:
    """A minimal blocking WebSocket client: text/binary messages, fragmentation, ping/pong,
    close. :meth:`recv` returns ``(opcode, payload)`` of whole messages."""

    def __init__(self, sock: socket.socket, leftover: bytes = b""):
        self.sock = sock
        self._buf = bytearray(leftover)
        self._frag_op: int | None = None
        self._frag = bytearray()
        self._close_sent = False
        self.closed = False

    @classmethod
    def connect(
        cls, url: str, timeout: float = 10.0, headers: Mapping[str, str] | None = None
    ) -> WebSocket:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("ws", "wss"):
            raise WebSocketError(f"{url}: websocket URLs start with ws:// or wss://")
        host = parts.hostname or "127.0.0.1"
        port = parts.port or (443 if parts.scheme == "wss" else 80)
        sock = socket.create_connection((host, port), timeout=timeout)
        try:
            if parts.scheme == "wss":
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
            key = base64.b64encode(os.urandom(16)).decode("ascii")
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            host_header = parts.netloc.rsplit("@", 1)[-1]
            lines = [
                f"GET {target} HTTP/1.1",
                f"Host: {host_header}",
                "Upgrade: websocket",
                "Connection: Upgrade",
                f"Sec-WebSocket-Key: {key}",
                "Sec-WebSocket-Version: 13",
                *(f"{k}: {v}" for k, v in (headers or {}).items()),
            ]
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            data = bytearray()
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    raise WebSocketError(f"{url}: connection closed during the websocket handshake")
                data += chunk
                if len(data) > 65536:
                    raise WebSocketError(f"{url}: handshake answer too long")
            head, _, rest = bytes(data).partition(b"\r\n\r\n")
            status_line, *header_lines = head.decode("latin-1").split("\r\n")
            fields = status_line.split(" ", 2)
            if len(fields) < 2 or fields[1] != "101":
                raise WebSocketError(f"{url}: websocket handshake refused ({status_line.strip()})")
            got = {}
            for line in header_lines:
                name, _, value = line.partition(":")
                got[name.strip().lower()] = value.strip()
            if got.get("upgrade", "").lower() != "websocket":
                raise WebSocketError(f"{url}: handshake answer lacks 'Upgrade: websocket'")
            if got.get("sec-websocket-accept") != ws_accept_key(key):
                raise WebSocketError(f"{url}: wrong Sec-WebSocket-Accept in the handshake")
        except BaseException:
            sock.close()
            raise
        return cls(sock, rest)

    def send(self, opcode: int, payload: bytes = b"") -> None:
        self.sock.sendall(encode_frame(opcode, payload, mask=True))

    def send_text(self, text: str) -> None:
        self.send(OP_TEXT, text.encode("utf-8"))

    def ping(self, payload: bytes = b"") -> None:
        self.send(OP_PING, payload)

    def recv(self, timeout: float) -> tuple[int, bytes] | None:
        """The next whole text/binary message, or None when ``timeout`` passes first.
        Answers pings; raises :class:`WebSocketClosed` when the server closes or drops."""
        if self.closed:
            raise WebSocketClosed("websocket already closed")
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            frame = decode_frame(self._buf)
            if frame is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self.sock.settimeout(remaining)
                try:
                    chunk = self.sock.recv(65536)
                except TimeoutError:
                    return None
                except OSError as exc:
                    self._drop()
                    raise WebSocketClosed(f"websocket connection lost ({exc})") from None
                if not chunk:
                    self._drop()
                    raise WebSocketClosed("websocket connection closed by the server")
                self._buf += chunk
                continue
            fin, opcode, payload, used = frame
            del self._buf[:used]
            message = self._on_frame(fin, opcode, payload)
            if message is not None:
                return message

    def _on_frame(self, fin: bool, opcode: int, payload: bytes) -> tuple[int, bytes] | None:
        if opcode >= 0x8:  # control frames: never fragmented, may interleave fragments
            if not fin or len(payload) > 125:
                raise WebSocketError("websocket control frame fragmented or over 125 bytes")
            if opcode == OP_PING:
                try:
                    self.send(OP_PONG, payload)
                except OSError as exc:
                    self._drop()
                    raise WebSocketClosed(f"websocket connection lost ({exc})") from None
            elif opcode == OP_CLOSE:
                code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else 1005
                reason = payload[2:].decode("utf-8", "replace")
                self.close(code if code not in (1005, 1006) else 1000)
                raise WebSocketClosed(f"websocket closed by the server (code {code} {reason})")
            elif opcode != OP_PONG:
                raise WebSocketError(f"unknown websocket control opcode {opcode:#x}")
            return None
        if opcode == OP_CONT:
            if self._frag_op is None:
                raise WebSocketError("websocket continuation frame without a first fragment")
            self._frag += payload
            if len(self._frag) > MAX_MESSAGE:
                raise WebSocketError("websocket message over the size limit")
            if not fin:
                return None
            message = (self._frag_op, bytes(self._frag))
            self._frag_op, self._frag = None, bytearray()
            return message
        if opcode not in (OP_TEXT, OP_BINARY):
            raise WebSocketError(f"unknown websocket opcode {opcode:#x}")
        if self._frag_op is not None:
            raise WebSocketError("new websocket message before the previous one was complete")
        if fin:
            return opcode, payload
        self._frag_op, self._frag = opcode, bytearray(payload)
        return None

    def close(self, code: int = 1000, reason: str = "") -> None:
        if self.closed:
            return
        if not self._close_sent:
            self._close_sent = True
            try:
                self.sock.settimeout(1.0)
                self.send(OP_CLOSE, struct.pack(">H", code) + reason.encode("utf-8")[:120])
            except OSError:
                pass
        self._drop()

    def _drop(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.close()


# --------------------------------------------------------------------------------------------
# HTTP


def normalize_server(server: str) -> str:
    """``"127.0.0.1:8188"`` -> ``"http://127.0.0.1:8188"``; no trailing slash."""
    server = server.strip()
    if "://" not in server:
        server = "http://" + server
    parts = urllib.parse.urlsplit(server)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WorkflowError(f"--server {server!r}: expected a URL like {DEFAULT_SERVER}")
    return server.rstrip("/")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Http:
    def __init__(self, base: str, timeout: float = 30.0):
        self.base = base
        self.timeout = timeout
        host = urllib.parse.urlsplit(base).hostname or ""
        # A proxy from the environment must not swallow requests to this machine.
        handlers = [urllib.request.ProxyHandler({})] if _is_loopback(host) else []
        self.opener = urllib.request.build_opener(*handlers)

    def url(self, path: str, query: Mapping[str, str] | None = None) -> str:
        return self.base + path + (f"?{urllib.parse.urlencode(query)}" if query else "")

    def open(
        self, method: str, path: str, body: Any = None, query: Mapping[str, str] | None = None
    ) -> tuple[int, Any]:
        """``(status, response)`` (the response object stays open); 4xx/5xx are returned,
        connection failures raise :class:`ServerUnreachable`."""
        data = None
        headers = {}
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(
            self.url(path, query), data=data, headers=headers, method=method
        )
        try:
            response = self.opener.open(request, timeout=self.timeout)
            return response.status, response
        except urllib.error.HTTPError as exc:
            return exc.code, exc
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ServerUnreachable(
                f"cannot reach ComfyUI at {self.base} ({reason}); {START_HINT}"
            ) from None

    def json(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        status, response = self.open(method, path, body)
        with response:
            raw = response.read()
        try:
            return status, json.loads(raw.decode("utf-8")) if raw else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            if status >= 400:
                return status, {"error": {"message": raw[:500].decode("utf-8", "replace")}}
            raise ServerUnreachable(
                f"{self.base}{path} answered HTTP {status} with non-JSON content; is this ComfyUI?"
            ) from None


# --------------------------------------------------------------------------------------------
# Results


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _file_refs(outputs: Mapping[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(node, key, {filename, subfolder, type}) for every file an output lists."""
    refs = []
    for node_id, out in outputs.items():
        if not isinstance(out, dict):
            continue
        for key, value in out.items():
            for item in _as_list(value):
                if isinstance(item, dict) and isinstance(item.get("filename"), str):
                    refs.append((str(node_id), str(key), item))
    return refs


def _training_results(outputs: Mapping[str, Any]) -> tuple[list[str], dict[str, float]]:
    """Adapter paths and final losses that nodes reported in their UI output, directly
    (``adapter_path``/``adapter_paths``/``final_loss``) or inside JSON ``text`` entries."""
    paths: list[str] = []
    losses: dict[str, float] = {}
    for node_id, out in outputs.items():
        if not isinstance(out, dict):
            continue
        sources = [out]
        for text in _as_list(out.get("text", [])):
            if isinstance(text, str) and text.lstrip().startswith("{"):
                try:
                    parsed = json.loads(text)
                except json.JSONDecodeError:
                    continue
                if isinstance(parsed, dict):
                    sources.append(parsed)
        for source in sources:
            for key in ("adapter_path", "adapter_paths"):
                for path in _as_list(source.get(key)):
                    if isinstance(path, str) and path and path not in paths:
                        paths.append(path)
            for loss in _as_list(source.get("final_loss")):
                if isinstance(loss, (int, float)) and not isinstance(loss, bool):
                    losses[str(node_id)] = float(loss)
    return paths, losses


def _status_from_history(entry: Mapping[str, Any]) -> tuple[str, dict[str, Any] | None]:
    status = entry.get("status") or {}
    error = None
    result = None
    for message in status.get("messages") or []:
        if not isinstance(message, (list, tuple)) or len(message) < 2:
            continue
        event, data = message[0], message[1] if isinstance(message[1], dict) else {}
        if event == "execution_interrupted":
            result, error = "interrupted", _error_details(event, data)
        elif event == "execution_error":
            result, error = "error", _error_details(event, data)
    if result is None:
        ok = status.get("status_str") == "success" and status.get("completed", True)
        result = "success" if ok else "error"
        if result == "error":
            error = {"message": f"ComfyUI reports status {status.get('status_str')!r}"}
    return result, error


def _error_details(event: str, data: Mapping[str, Any]) -> dict[str, Any]:
    details = {
        "event": event,
        "node_id": data.get("node_id"),
        "node_type": data.get("node_type"),
    }
    if event == "execution_error":
        details["exception_type"] = data.get("exception_type")
        details["exception_message"] = data.get("exception_message")
        details["traceback"] = data.get("traceback")
    return details


def _safe_name(name: str) -> str:
    name = os.path.basename(name.replace("\\", "/")).strip()
    return name if name not in ("", ".", "..") else "output"


# --------------------------------------------------------------------------------------------
# Running a workflow


class _Run:
    def __init__(
        self,
        server: str,
        prompt: dict[str, Any],
        out_dir: Path,
        timeout: float | None,
        on_event: EventCallback | None,
        client_id: str | None,
        poll_interval: float,
        idle_check: float,
        http_timeout: float,
        cancel_on_timeout: bool,
    ):
        self.base = normalize_server(server)
        self.http = _Http(self.base, http_timeout)
        self.prompt = prompt
        self.out_dir = out_dir
        self.timeout = timeout
        self.on_event = on_event
        self.client_id = client_id or uuid.uuid4().hex
        self.poll_interval = max(poll_interval, 0.01)
        self.idle_check = idle_check
        self.cancel_on_timeout = cancel_on_timeout
        self.prompt_id: str | None = None
        self.running = False
        self.ws_error: dict[str, Any] | None = None
        self.ws_failure: str | None = None
        self.transports: list[str] = []

    def emit(self, event: str, data: dict[str, Any]) -> None:
        if self.on_event is not None:
            self.on_event(event, data)

    # -- steps --

    def ws_url(self) -> str:
        parts = urllib.parse.urlsplit(self.base)
        scheme = "wss" if parts.scheme == "https" else "ws"
        query = urllib.parse.urlencode({"clientId": self.client_id})
        return f"{scheme}://{parts.netloc}{parts.path}/ws?{query}"

    def connect_ws(self) -> WebSocket | None:
        try:
            return WebSocket.connect(self.ws_url(), timeout=min(10.0, self.http.timeout))
        except OSError as exc:
            self.ws_failure = str(exc)
            return None

    def submit(self) -> dict[str, Any]:
        body = {"prompt": self.prompt, "client_id": self.client_id}
        status, answer = self.http.json("POST", "/prompt", body)
        if status == 400:
            raise PromptRejected(_rejection_summary(answer, self.prompt), answer or {})
        if status != 200 or not isinstance(answer, dict) or "prompt_id" not in answer:
            raise ServerUnreachable(
                f"{self.base}/prompt answered HTTP {status}: {str(answer)[:300]}"
            )
        self.prompt_id = str(answer["prompt_id"])
        self.emit(
            "runner.submitted",
            {"prompt_id": self.prompt_id, "number": answer.get("number"), "server": self.base},
        )
        if answer.get("node_errors"):
            self.emit("runner.node_errors", {"node_errors": answer["node_errors"]})
        return answer

    def history(self) -> dict[str, Any] | None:
        status, answer = self.http.json("GET", f"/history/{urllib.parse.quote(self.prompt_id)}")
        if status != 200 or not isinstance(answer, dict):
            return None
        entry = answer.get(self.prompt_id)
        if isinstance(entry, dict) and entry.get("status") is not None:
            return entry
        return None

    def queued(self) -> bool:
        status, answer = self.http.json("GET", "/queue")
        if status != 200 or not isinstance(answer, dict):
            return True  # cannot tell: assume it is still there
        for key in ("queue_running", "queue_pending"):
            for item in answer.get(key) or []:
                if isinstance(item, list) and len(item) > 1 and str(item[1]) == self.prompt_id:
                    return True
        return False

    def check(self) -> dict[str, Any] | str | None:
        """The history entry when done, "missing" when the prompt is nowhere, else None."""
        entry = self.history()
        if entry is not None:
            return entry
        if self.queued():
            return None
        return self.history() or "missing"

    # -- following --

    def follow_ws(self, ws: WebSocket, deadline: float | None) -> bool:
        """Read events until our prompt ends (True) or the socket is lost (False)."""
        self.transports.append("websocket")
        last_data = time.monotonic()
        last_check = last_data
        while True:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return True
            wait = 1.0 if deadline is None else min(1.0, deadline - now)
            try:
                message = ws.recv(wait)
            except OSError as exc:
                self.emit("runner.ws_lost", {"reason": str(exc)})
                return False
            now = time.monotonic()
            if message is None:
                if now - last_data >= self.idle_check and now - last_check >= self.idle_check:
                    # A quiet socket: the prompt may have ended unseen, or vanished.
                    last_check = now
                    try:
                        if self.check() is not None:
                            return True
                    except ClientError:
                        pass
                    try:  # keeps idle proxies/NAT from dropping the socket
                        ws.ping(b"lycoris")
                    except OSError as exc:
                        self.emit("runner.ws_lost", {"reason": str(exc)})
                        return False
                continue
            last_data = now
            if self.handle_message(*message):
                return True

    def handle_message(self, opcode: int, payload: bytes) -> bool:
        """Emit one websocket message; True when it ends our prompt."""
        if opcode == OP_BINARY:
            self.handle_binary(payload)
            return False
        try:
            message = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return False
        if not isinstance(message, dict):
            return False
        event = str(message.get("type"))
        data = message.get("data")
        data = data if isinstance(data, dict) else {"value": data}
        pid = data.get("prompt_id")
        if pid is not None and str(pid) != self.prompt_id:
            return False  # another prompt's event
        if pid is not None:
            self.running = True
        elif not self.running and event != "status":
            return False  # a broadcast from someone else's run
        self.emit(event, data)
        if event in ("execution_error", "execution_interrupted"):
            self.ws_error = _error_details(event, data)
            return True
        if event == "execution_success":
            return True
        return event == "executing" and data.get("node") is None and self.running

    def handle_binary(self, payload: bytes) -> None:
        if len(payload) < 4 or not self.running:
            return
        kind = struct.unpack(">I", payload[:4])[0]
        if kind == 3 and len(payload) >= 8:  # node text: len(node id), node id, text
            n = struct.unpack(">I", payload[4:8])[0]
            node = payload[8 : 8 + n].decode("utf-8", "replace")
            text = payload[8 + n :].decode("utf-8", "replace")
            self.emit("progress_text", {"node": node, "text": text})
        else:
            self.emit("preview", {"kind": kind, "bytes": len(payload) - 4})

    def poll(self, deadline: float | None, fast: bool) -> dict[str, Any] | str | None:
        """Poll /history until the prompt has a status; "missing" when it vanished, None on
        timeout. ``fast`` starts with short intervals (the prompt has just ended)."""
        if not fast:
            self.transports.append("polling")
        delay = 0.05 if fast else self.poll_interval
        missing = 0
        last_queue_check = time.monotonic()
        unreachable_said = False
        while True:
            try:
                entry = self.history()
                if entry is not None:
                    return entry
                now = time.monotonic()
                if now - last_queue_check >= 10 * self.poll_interval:
                    last_queue_check = now
                    state = self.check()
                    if isinstance(state, dict):
                        return state
                    missing = missing + 1 if state == "missing" else 0
                    if missing >= 2:
                        return "missing"
            except ServerUnreachable as exc:  # a restarting server: keep trying
                if not unreachable_said:
                    unreachable_said = True
                    self.emit("runner.unreachable", {"reason": str(exc)})
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return None
            pause = delay if deadline is None else min(delay, max(deadline - now, 0.0))
            time.sleep(pause)
            delay = min(delay * 2, self.poll_interval)

    def cancel(self) -> bool:
        """Interrupt the prompt if it runs and drop it from the queue if it waits."""
        try:
            self.http.json("POST", "/interrupt", {"prompt_id": self.prompt_id})
            self.http.json("POST", "/queue", {"delete": [self.prompt_id]})
        except ClientError as exc:
            self.emit("runner.cancel_failed", {"reason": str(exc)})
            return False
        self.emit("runner.cancelled", {"prompt_id": self.prompt_id})
        return True

    def download(self, outputs: Mapping[str, Any]) -> list[dict[str, Any]]:
        files = []
        used: set[str] = set()
        for node_id, key, ref in _file_refs(outputs):
            name = _safe_name(ref["filename"])
            if name in used:
                stem = f"{node_id}-{name}"
                name, k = stem, 1
                while name in used:
                    k += 1
                    name = f"{k}-{stem}"
            used.add(name)
            query = {
                "filename": ref["filename"],
                "subfolder": str(ref.get("subfolder") or ""),
                "type": str(ref.get("type") or "output"),
            }
            record = {"node": node_id, "key": key, **query, "path": None}
            target = self.out_dir / name
            try:
                status, response = self.http.open("GET", "/view", query=query)
                with response:
                    if status != 200:
                        record["error"] = f"HTTP {status}"
                    else:
                        part = target.with_name(target.name + ".part")
                        with part.open("wb") as fh:
                            while chunk := response.read(1 << 20):
                                fh.write(chunk)
                        part.replace(target)
                        record["path"] = str(target)
            except (ClientError, OSError) as exc:
                record["error"] = str(exc)
            files.append(record)
            self.emit("runner.file", record)
        return files

    # -- the whole run --

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        ws = self.connect_ws()  # before submitting, so no event is missed
        try:
            answer = self.submit()
            deadline = None if not self.timeout else time.monotonic() + self.timeout
            ended = False
            if ws is not None:
                self.emit("runner.ws", {"connected": True})
                ended = self.follow_ws(ws, deadline)
            else:
                self.emit("runner.ws", {"connected": False, "reason": self.ws_failure})
        finally:
            if ws is not None:
                ws.close()
        entry = self.poll(deadline, fast=ended)
        result: dict[str, Any] = {
            "prompt_id": self.prompt_id,
            "client_id": self.client_id,
            "server": self.base,
            "status": None,
            "error": None,
            "outputs": {},
            "files": [],
            "adapter_paths": [],
            "final_loss": None,
            "final_losses": {},
            "node_errors": answer.get("node_errors") or {},
            "transport": "+".join(dict.fromkeys(self.transports)),
        }
        if entry is None:
            result["status"] = "timeout"
            result["error"] = {"message": f"no result within {self.timeout:g} s"}
            result["cancelled"] = self.cancel_on_timeout and self.cancel()
        elif entry == "missing":
            result["status"] = "error"
            result["error"] = self.ws_error or {
                "message": f"prompt {self.prompt_id} is neither queued nor in the history "
                "(the queue was cleared or the server restarted)"
            }
        elif isinstance(entry, dict):
            result["status"], result["error"] = _status_from_history(entry)
            if result["error"] is None and self.ws_error is not None:
                result["status"] = (
                    "interrupted" if self.ws_error["event"] == "execution_interrupted" else "error"
                )
                result["error"] = self.ws_error
            outputs = entry.get("outputs") or {}
            result["outputs"] = outputs
            result["files"] = self.download(outputs)
            paths, losses = _training_results(outputs)
            result["adapter_paths"] = paths
            result["final_losses"] = losses
            result["final_loss"] = list(losses.values())[-1] if losses else None
        result["seconds"] = round(time.monotonic() - started, 3)
        write_result(self.out_dir, result)
        return result


def write_result(out_dir: str | os.PathLike[str], result: Mapping[str, Any]) -> Path:
    """Write ``result.json`` atomically into ``out_dir``."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    path = Path(out_dir) / "result.json"
    part = path.with_name("result.json.part")
    part.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    part.replace(path)
    return path


def _rejection_summary(answer: Any, prompt: Mapping[str, Any]) -> str:
    if not isinstance(answer, dict):
        return f"ComfyUI rejected the workflow: {str(answer)[:300]}"
    error = answer.get("error") or {}
    head = error.get("message") if isinstance(error, dict) else str(error)
    details = error.get("details") if isinstance(error, dict) else None
    lines = [f"ComfyUI rejected the workflow: {head or 'validation failed'}"]
    node_errors = answer.get("node_errors") or {}
    for node_id, info in node_errors.items():
        info = info if isinstance(info, dict) else {}
        klass = info.get("class_type") or prompt.get(node_id, {}).get("class_type", "?")
        for err in info.get("errors") or []:
            err = err if isinstance(err, dict) else {"message": str(err)}
            extra = err.get("extra_info") or {}
            name = extra.get("input_name") if isinstance(extra, dict) else None
            where = f"node {node_id} ({klass})" + (f" input {name!r}" if name else "")
            text = err.get("message") or err.get("type") or "error"
            if err.get("details"):
                text += f": {err['details']}"
            lines.append(f"  {where}: {text}")
    if not node_errors and details:
        lines.append(f"  {details}")
    return "\n".join(lines)


def run_workflow(
    server: str,
    workflow: Mapping[str, Any] | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    timeout: float | None = None,
    sets: Iterable[str | tuple[str, str, Any]] | Mapping[str, Any] | None = None,
    on_event: EventCallback | None = None,
    *,
    client_id: str | None = None,
    poll_interval: float = 1.0,
    idle_check: float = 30.0,
    http_timeout: float = 30.0,
    cancel_on_timeout: bool = False,
) -> dict[str, Any]:
    """Run one API-format workflow on the ComfyUI at ``server`` and return the result dict
    (also written to ``out_dir/result.json``).

    ``workflow`` is the node dict (or a path to it); ``sets`` overrides inputs (see
    :func:`apply_sets`); ``on_event(event, data)`` receives the server's websocket events for
    this prompt (``progress``, ``executing``, ``executed``, ``lycoris.train``, ...) and the
    runner's own ``runner.*`` events. ``timeout`` (seconds from submission, None = no limit)
    ends with status "timeout"; the prompt keeps running unless ``cancel_on_timeout``.

    Raises :class:`WorkflowError` (bad workflow/--set), :class:`PromptRejected` (HTTP 400,
    with ``node_errors``) and :class:`ServerUnreachable`. Once the prompt is accepted the
    result's ``status`` is "success", "error", "interrupted" or "timeout".
    """
    if isinstance(workflow, (str, os.PathLike)):
        prompt = load_workflow(workflow)
    else:
        prompt = validate_workflow(copy.deepcopy(dict(workflow)))
    if sets:
        prompt = apply_sets(prompt, sets)
    run = _Run(
        server,
        prompt,
        Path(out_dir),
        timeout,
        on_event,
        client_id,
        poll_interval,
        idle_check,
        http_timeout,
        cancel_on_timeout,
    )
    return run.run()


# --------------------------------------------------------------------------------------------
# CLI


class _Printer:
    """Formats events as one line each; step events at most once per ``every`` seconds."""

    def __init__(self, prompt: Mapping[str, Any], out=None, every: float = 1.0, verbose=False):
        self.prompt = prompt
        self.out = out if out is not None else sys.stdout
        self.every = every
        self.verbose = verbose
        self.last: dict[tuple[str, str], float] = {}
        self.prompt_id: str | None = None

    def node(self, node_id: Any) -> str:
        klass = self.prompt.get(str(node_id), {}).get("class_type") if node_id is not None else None
        return f"node {node_id}" + (f" ({klass})" if klass else "")

    def throttled(self, event: str, node: Any, final: bool) -> bool:
        key = (event, str(node))
        now = time.monotonic()
        if final or now - self.last.get(key, -1e9) >= self.every:
            self.last[key] = now
            return False
        return True

    def __call__(self, event: str, data: dict[str, Any]) -> None:
        line = self.format(event, data)
        if line:
            print(line, file=self.out, flush=True)

    def format(self, event: str, data: dict[str, Any]) -> str | None:
        if event == "runner.submitted":
            self.prompt_id = data.get("prompt_id")
            return f"submitted prompt {data.get('prompt_id')} to {data.get('server')}"
        if event == "runner.ws":
            if data.get("connected"):
                return None
            return f"websocket unavailable ({data.get('reason')}); polling /history"
        if event == "runner.ws_lost":
            return f"websocket lost ({data.get('reason')}); falling back to polling /history"
        if event == "runner.unreachable":
            return f"server unreachable while polling, retrying: {data.get('reason')}"
        if event == "runner.node_errors":
            return "warning: some outputs failed validation and will not run: " + ", ".join(
                self.node(n) for n in data.get("node_errors", {})
            )
        if event == "runner.file":
            if data.get("path"):
                return f"saved {data['path']}"
            return f"could not download {data.get('filename')}: {data.get('error')}"
        if event == "runner.cancelled":
            return f"cancelled prompt {data.get('prompt_id')} on the server"
        if event == "execution_start":
            return f"started prompt {data.get('prompt_id')}"
        if event == "execution_cached" and data.get("nodes"):
            return "cached: " + ", ".join(str(n) for n in data["nodes"])
        if event == "executing" and data.get("node") is not None:
            return f"executing {self.node(data['node'])}"
        if event == "progress":
            value, most = data.get("value"), data.get("max")
            if self.throttled(event, data.get("node"), value == most):
                return None
            return f"progress {self.node(data.get('node'))}: {value}/{most}"
        if event == "lycoris.train":
            return self.format_train(data)
        if event == "executed":
            output = data.get("output") or {}
            keys = ", ".join(
                f"{k}[{len(v)}]" if isinstance(v, list) else str(k) for k, v in output.items()
            )
            return f"executed {self.node(data.get('node'))}" + (f": {keys}" if keys else "")
        if event == "execution_error":
            message = str(data.get("exception_message") or "").strip()
            where = self.node(data.get("node_id"))
            return f"error in {where}: {data.get('exception_type')}: {message}"
        if event == "execution_interrupted":
            return f"interrupted at {self.node(data.get('node_id'))}"
        if event == "progress_text" and self.verbose:
            return f"{self.node(data.get('node'))}: {data.get('text')}"
        return None

    def format_train(self, data: dict[str, Any]) -> str | None:
        who = f"train {self.node(data.get('node'))}"
        if data.get("status") == "done":
            return f"{who}: done, adapter {data.get('adapter_path')}"
        if data.get("status") == "cancelled":
            return f"{who}: cancelled, checkpoint {data.get('checkpoint')}"
        if data.get("validation") is not None:
            names = [v.get("filename") for v in data["validation"] if isinstance(v, dict)]
            return f"{who}: validation images at step {data.get('step')}: {', '.join(names)}"
        if "step" in data:
            step, total = data.get("step"), data.get("total")
            if self.throttled("lycoris.train", data.get("node"), step == total):
                return None
            parts = [f"step {step}/{total}" if total else f"step {step}"]
            for key, fmt in (
                ("loss", "loss {:.4f}"),
                ("smoothed_loss", "avg {:.4f}"),
                ("lr", "lr {:.3g}"),
                ("it_per_s", "{:.2f} it/s"),
                ("eta", "eta {:.0f} s"),
            ):
                if isinstance(data.get(key), (int, float)):
                    parts.append(fmt.format(data[key]))
            return f"{who}: " + "  ".join(parts)
        return f"{who}: {json.dumps(data, default=str)[:200]}"


def _summary(result: Mapping[str, Any], out_dir: str) -> str:
    status = result["status"]
    lines = [f"{status}: prompt {result['prompt_id']} in {result.get('seconds', 0):.1f} s"]
    error = result.get("error") or {}
    if status == "error" and error:
        where = f"node {error.get('node_id')} ({error.get('node_type')})"
        if error.get("exception_type") or error.get("exception_message"):
            message = str(error.get("exception_message") or "").strip()
            lines.append(f"  {where}: {error.get('exception_type')}: {message}")
        else:
            lines.append(f"  {error.get('message') or where}")
    elif status == "interrupted":
        lines.append(f"  at node {error.get('node_id')} ({error.get('node_type')})")
    elif status == "timeout":
        if result.get("cancelled"):
            lines.append(f"  {error.get('message')}; cancelled it on the server")
        else:
            lines.append(f"  {error.get('message')}; the prompt may still be running on the server")
    saved = [f for f in result.get("files", []) if f.get("path")]
    if saved:
        lines.append(f"  {len(saved)} file(s) in {out_dir}")
    for path in result.get("adapter_paths") or []:
        lines.append(f"  adapter: {path}")
    if result.get("final_loss") is not None:
        lines.append(f"  final loss: {result['final_loss']:.6g}")
    lines.append(f"  result: {Path(out_dir) / 'result.json'}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lycoris_core.client",
        description="Run ComfyUI workflows headless through the HTTP API.",
        epilog="Exit codes: 0 success, 1 execution error, 2 bad workflow/arguments, "
        "3 interrupted, 4 timeout, 5 rejected by validation, 6 server unreachable.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="submit an API-format workflow, follow it, download its outputs",
        description="Submit an API-format workflow (Workflow > Export (API) in ComfyUI), follow "
        "it on the websocket (or by polling /history), download its output files into --out "
        "and write --out/result.json.",
    )
    run.add_argument("workflow", help="API-format workflow JSON (or {'prompt': {...}})")
    run.add_argument(
        "--server",
        default=os.environ.get("COMFYUI_URL", DEFAULT_SERVER),
        help=f"ComfyUI URL (default: $COMFYUI_URL or {DEFAULT_SERVER})",
    )
    run.add_argument("--out", required=True, help="folder for downloaded files and result.json")
    run.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="NODE.INPUT=VALUE",
        help="override an input, e.g. 12.seed=5; VALUE is JSON when it parses, else a string "
        "(quote for a string: 12.text='\"5\"'); repeatable",
    )
    run.add_argument(
        "--timeout", type=float, default=None, help="give up after SECONDS (default: no limit)"
    )
    run.add_argument("--client-id", default=None, help="websocket client id (default: a uuid)")
    run.add_argument(
        "--poll-interval", type=float, default=1.0, help="seconds between /history polls"
    )
    run.add_argument(
        "--cancel-on-timeout",
        action="store_true",
        help="on timeout, interrupt the prompt and remove it from the queue",
    )
    run.add_argument("-q", "--quiet", action="store_true", help="print only the summary")
    run.add_argument("-v", "--verbose", action="store_true", help="also print node status text")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    printer: _Printer | None = None
    try:
        prompt = load_workflow(args.workflow)
        if args.sets:
            prompt = apply_sets(prompt, args.sets)
        printer = _Printer(prompt, verbose=args.verbose)
        result = run_workflow(
            args.server,
            prompt,
            args.out,
            timeout=args.timeout,
            on_event=None if args.quiet else printer,
            client_id=args.client_id,
            poll_interval=args.poll_interval,
            cancel_on_timeout=args.cancel_on_timeout,
        )
    except PromptRejected as exc:
        print(f"error: {exc}", file=sys.stderr)
        with contextlib.suppress(OSError):
            write_result(
                args.out,
                {
                    "prompt_id": None,
                    "status": "rejected",
                    "error": exc.error,
                    "node_errors": exc.node_errors,
                },
            )
        return exc.exit_code
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        pid = printer.prompt_id if printer is not None else None
        if pid:
            print(
                f"stopped waiting; prompt {pid} keeps running on the server "
                "(cancel it in ComfyUI or with POST /interrupt)",
                file=sys.stderr,
            )
        return 130
    print(
        _summary(result, args.out), file=sys.stdout if result["status"] == "success" else sys.stderr
    )
    return EXIT_CODES.get(result["status"], 1)


if __name__ == "__main__":
    sys.exit(main())
