"""Following one prompt: ComfyUI's ``/ws`` events through the ``websocket-client`` package,
and polling ``/history`` when the socket cannot connect, drops, or the package is missing."""

from __future__ import annotations

import contextlib
import json
import logging
import struct
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

from .api import ComfyApi, is_loopback
from .errors import ClientError, ServerUnreachable
from .results import error_details

logger = logging.getLogger(__name__)

EventCallback = Callable[[str, dict[str, Any]], None]

NOT_INSTALLED = (
    "websocket-client is not installed; `pip install websocket-client` to follow progress live"
)
_noted = False


def websocket_module() -> ModuleType | None:
    """The ``websocket`` module of websocket-client, or None (noted once per process)."""
    global _noted
    try:
        import websocket
    except ImportError:
        if not _noted:
            _noted = True
            logger.info("%s; following prompts by polling /history", NOT_INSTALLED)
        return None
    return websocket


def connect(api: ComfyApi, client_id: str) -> tuple[Any, str | None]:
    """``(socket, None)`` on ``/ws?clientId=``, or ``(None, reason)`` when it cannot connect."""
    websocket = websocket_module()
    if websocket is None:
        return None, NOT_INSTALLED
    url = api.ws_url(client_id)
    # No Origin header (as ComfyUI's non-browser clients): its origin check then lets it in.
    # Text is decoded here (bad UTF-8 skips a message); the library's per-byte check is slow.
    options: dict[str, Any] = {
        "timeout": min(10.0, api.timeout),
        "suppress_origin": True,
        "skip_utf8_validation": True,
    }
    if is_loopback(api.host):  # as for HTTP: no proxy from the environment for this machine
        options["http_no_proxy"] = [api.host]
    try:
        return websocket.create_connection(url, **options), None
    except websocket.WebSocketBadStatusException as exc:
        reason = getattr(exc, "status_message", None) or ""
        status = f"HTTP/1.1 {exc.status_code} {reason}".strip()
        return None, f"{url}: websocket handshake refused ({status})"
    except (OSError, websocket.WebSocketException) as exc:
        return None, f"{url}: {exc}"


def close(ws: Any) -> None:
    """Close the socket politely (a close frame, a short wait for the answer)."""
    with contextlib.suppress(Exception):
        ws.close(timeout=1.0)


class Follower:
    """The events of one prompt: websocket messages filtered to ``prompt_id`` and passed to
    ``emit``, and the ``/history`` polling fallback. ``ws_error`` holds the error/interrupt
    seen on the socket; ``transports`` lists "websocket"/"polling" as they were used."""

    def __init__(self, api: ComfyApi, emit: EventCallback, poll_interval: float, idle_check: float):
        self.api = api
        self.emit = emit
        self.poll_interval = max(poll_interval, 0.01)
        self.idle_check = idle_check
        self.prompt_id: str = ""
        self.running = False
        self.ws_error: dict[str, Any] | None = None
        self.transports: list[str] = []

    # -- websocket --

    def receive(self, ws: Any, wait: float) -> str | bytes | None:
        """The next text (str) or binary (bytes) message, None after ``wait`` seconds.
        Pings are answered by websocket-client; a close or a drop raises ConnectionError."""
        websocket = websocket_module()
        ws.settimeout(wait)
        try:
            opcode, data = ws.recv_data()
        except (websocket.WebSocketTimeoutException, TimeoutError):
            return None
        except (OSError, websocket.WebSocketException) as exc:
            raise ConnectionError(str(exc) or type(exc).__name__) from None
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            ws.shutdown()
            raise ConnectionError("websocket closed by the server")
        if opcode == websocket.ABNF.OPCODE_BINARY:
            return bytes(data)
        try:
            return data.decode("utf-8") if isinstance(data, bytes) else str(data)
        except UnicodeDecodeError:
            return ""

    def follow_ws(self, ws: Any, deadline: float | None) -> bool:
        """Read events until our prompt ends (True) or the socket is lost (False)."""
        self.transports.append("websocket")
        last_data = last_check = time.monotonic()
        while True:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return True
            try:
                message = self.receive(ws, 1.0 if deadline is None else min(1.0, deadline - now))
                now = time.monotonic()
                if message is not None:
                    last_data = now
                    if self.handle_message(message):
                        return True
                elif now - last_data >= self.idle_check and now - last_check >= self.idle_check:
                    last_check = now
                    if self.ended_unseen():
                        return True
                    self.ping(ws)
            except OSError as exc:  # ConnectionError included
                self.emit("runner.ws_lost", {"reason": str(exc)})
                return False

    def ping(self, ws: Any) -> None:
        """A ping on a quiet socket: keeps idle proxies/NAT from dropping it."""
        websocket = websocket_module()
        try:
            ws.ping(b"lycoris")
        except (OSError, websocket.WebSocketException) as exc:
            raise ConnectionError(str(exc) or type(exc).__name__) from None

    def ended_unseen(self) -> bool:
        """On a quiet socket: has the prompt ended (or vanished) without our seeing it?"""
        try:
            return self.api.check(self.prompt_id) is not None
        except ClientError:
            return False

    def handle_message(self, payload: str | bytes) -> bool:
        """Emit one websocket message (text: JSON event, bytes: binary event); True when it
        ends our prompt."""
        if isinstance(payload, bytes):
            self.handle_binary(payload)
            return False
        try:
            message = json.loads(payload)
        except json.JSONDecodeError:
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
            self.ws_error = error_details(event, data)
            return True
        if event == "execution_success":
            return True
        return event == "executing" and data.get("node") is None and self.running

    def handle_binary(self, payload: bytes) -> None:
        """ComfyUI's binary events: a big-endian u32 type, then its data. Type 3 is node text
        (u32 length of the node id, the id, the text); others (previews) are only counted."""
        if len(payload) < 4 or not self.running:
            return
        kind = struct.unpack(">I", payload[:4])[0]
        if kind == 3 and len(payload) >= 8:
            n = struct.unpack(">I", payload[4:8])[0]
            node = payload[8 : 8 + n].decode("utf-8", "replace")
            text = payload[8 + n :].decode("utf-8", "replace")
            self.emit("progress_text", {"node": node, "text": text})
        else:
            self.emit("preview", {"kind": kind, "bytes": len(payload) - 4})

    # -- polling --

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
                entry = self.api.history(self.prompt_id)
                if entry is not None:
                    return entry
                now = time.monotonic()
                if now - last_queue_check >= 10 * self.poll_interval:
                    last_queue_check = now
                    state = self.api.check(self.prompt_id)
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
            time.sleep(delay if deadline is None else min(delay, max(deadline - now, 0.0)))
            delay = min(delay * 2, self.poll_interval)
