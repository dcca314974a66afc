"""The ComfyUI HTTP endpoints the runner calls: ``/prompt``, ``/history/<id>``, ``/queue``,
``/interrupt`` and ``/view`` (standard library: urllib)."""

from __future__ import annotations

import ipaddress
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

from .errors import PromptRejected, ServerUnreachable, WorkflowError

DEFAULT_SERVER = "http://127.0.0.1:8188"
START_HINT = (
    "start ComfyUI with `python main.py --listen 127.0.0.1 --port 8188` in its folder, "
    "or pass --server URL"
)


def normalize_server(server: str) -> str:
    """``"127.0.0.1:8188"`` -> ``"http://127.0.0.1:8188"``; no trailing slash."""
    server = server.strip()
    if "://" not in server:
        server = "http://" + server
    parts = urllib.parse.urlsplit(server)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WorkflowError(f"--server {server!r}: expected a URL like {DEFAULT_SERVER}")
    return server.rstrip("/")


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (no proxy is used for them)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ComfyApi:
    """HTTP calls to one ComfyUI server. ``timeout`` is per request, in seconds."""

    def __init__(self, server: str, timeout: float = 30.0):
        self.base = normalize_server(server)
        self.timeout = timeout
        self.host = urllib.parse.urlsplit(self.base).hostname or ""
        # A proxy from the environment must not swallow requests to this machine.
        handlers = [urllib.request.ProxyHandler({})] if is_loopback(self.host) else []
        self.opener = urllib.request.build_opener(*handlers)

    def url(self, path: str, query: Mapping[str, str] | None = None) -> str:
        return self.base + path + (f"?{urllib.parse.urlencode(query)}" if query else "")

    def ws_url(self, client_id: str) -> str:
        """The ``/ws?clientId=`` URL of this server (wss for an https server)."""
        parts = urllib.parse.urlsplit(self.base)
        scheme = "wss" if parts.scheme == "https" else "ws"
        query = urllib.parse.urlencode({"clientId": client_id})
        return f"{scheme}://{parts.netloc}{parts.path}/ws?{query}"

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
        """``(status, decoded JSON)``; a 4xx/5xx text body becomes ``{"error": {"message"}}``."""
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

    # -- endpoints --

    def submit(self, prompt: Mapping[str, Any], client_id: str) -> dict[str, Any]:
        """``POST /prompt``: the answer (``prompt_id``, ``number``, ``node_errors``).
        Raises :class:`PromptRejected` on HTTP 400."""
        status, answer = self.json("POST", "/prompt", {"prompt": prompt, "client_id": client_id})
        if status == 400:
            raise PromptRejected(rejection_summary(answer, prompt), answer or {})
        if status != 200 or not isinstance(answer, dict) or "prompt_id" not in answer:
            raise ServerUnreachable(
                f"{self.base}/prompt answered HTTP {status}: {str(answer)[:300]}"
            )
        return answer

    def history(self, prompt_id: str) -> dict[str, Any] | None:
        """The prompt's ``/history`` entry once it has a status, else None."""
        status, answer = self.json("GET", f"/history/{urllib.parse.quote(prompt_id)}")
        if status != 200 or not isinstance(answer, dict):
            return None
        entry = answer.get(prompt_id)
        if isinstance(entry, dict) and entry.get("status") is not None:
            return entry
        return None

    def queued(self, prompt_id: str) -> bool:
        """Whether ``/queue`` lists the prompt as running or pending (True when unsure)."""
        status, answer = self.json("GET", "/queue")
        if status != 200 or not isinstance(answer, dict):
            return True  # cannot tell: assume it is still there
        for key in ("queue_running", "queue_pending"):
            for item in answer.get(key) or []:
                if isinstance(item, list) and len(item) > 1 and str(item[1]) == prompt_id:
                    return True
        return False

    def check(self, prompt_id: str) -> dict[str, Any] | str | None:
        """The history entry when done, "missing" when the prompt is nowhere, else None."""
        entry = self.history(prompt_id)
        if entry is not None:
            return entry
        if self.queued(prompt_id):
            return None
        return self.history(prompt_id) or "missing"

    def cancel(self, prompt_id: str) -> None:
        """Interrupt the prompt if it runs and drop it from the queue if it waits."""
        self.json("POST", "/interrupt", {"prompt_id": prompt_id})
        self.json("POST", "/queue", {"delete": [prompt_id]})

    def view(self, query: Mapping[str, str]) -> tuple[int, Any]:
        """``GET /view?filename=&subfolder=&type=``: ``(status, open response)``."""
        return self.open("GET", "/view", query=query)


def rejection_summary(answer: Any, prompt: Mapping[str, Any]) -> str:
    """The lines the CLI prints for a 400 answer: the message, then one line per node error."""
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
            lines.append(f"  {_node_error_line(node_id, klass, err)}")
    if not node_errors and details:
        lines.append(f"  {details}")
    return "\n".join(lines)


def _node_error_line(node_id: str, klass: str, err: Any) -> str:
    err = err if isinstance(err, dict) else {"message": str(err)}
    extra = err.get("extra_info") or {}
    name = extra.get("input_name") if isinstance(extra, dict) else None
    where = f"node {node_id} ({klass})" + (f" input {name!r}" if name else "")
    text = err.get("message") or err.get("type") or "error"
    if err.get("details"):
        text += f": {err['details']}"
    return f"{where}: {text}"
