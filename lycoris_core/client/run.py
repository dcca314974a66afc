"""One workflow run: submit, follow (websocket, else polling), download, write result.json."""

from __future__ import annotations

import copy
import os
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import events
from .api import ComfyApi
from .errors import ClientError
from .events import EventCallback, Follower
from .results import download, status_from_history, training_results, write_result
from .workflow import Sets, apply_sets, load_workflow, validate_workflow


class _Run:
    def __init__(
        self,
        api: ComfyApi,
        prompt: dict[str, Any],
        out_dir: Path,
        timeout: float | None,
        on_event: EventCallback | None,
        client_id: str | None,
        cancel_on_timeout: bool,
        follower: Follower,
    ):
        self.api = api
        self.prompt = prompt
        self.out_dir = out_dir
        self.timeout = timeout
        self.on_event = on_event
        self.client_id = client_id or uuid.uuid4().hex
        self.cancel_on_timeout = cancel_on_timeout
        self.follower = follower

    def emit(self, event: str, data: dict[str, Any]) -> None:
        if self.on_event is not None:
            self.on_event(event, data)

    def submit(self) -> dict[str, Any]:
        answer = self.api.submit(self.prompt, self.client_id)
        self.follower.prompt_id = str(answer["prompt_id"])
        self.emit(
            "runner.submitted",
            {
                "prompt_id": self.follower.prompt_id,
                "number": answer.get("number"),
                "server": self.api.base,
            },
        )
        if answer.get("node_errors"):
            self.emit("runner.node_errors", {"node_errors": answer["node_errors"]})
        return answer

    def follow(self) -> tuple[dict[str, Any], dict[str, Any] | str | None]:
        """Submit and follow until the end: ``(answer, history entry | "missing" | None)``."""
        ws, reason = events.connect(self.api, self.client_id)  # first: no event is missed
        try:
            answer = self.submit()
            deadline = None if not self.timeout else time.monotonic() + self.timeout
            ended = False
            if ws is not None:
                self.emit("runner.ws", {"connected": True})
                ended = self.follower.follow_ws(ws, deadline)
            else:
                self.emit("runner.ws", {"connected": False, "reason": reason})
        finally:
            if ws is not None:
                events.close(ws)
        return answer, self.follower.poll(deadline, fast=ended)

    def cancel(self) -> bool:
        try:
            self.api.cancel(self.follower.prompt_id)
        except ClientError as exc:
            self.emit("runner.cancel_failed", {"reason": str(exc)})
            return False
        self.emit("runner.cancelled", {"prompt_id": self.follower.prompt_id})
        return True

    def finish(self, result: dict[str, Any], entry: dict[str, Any] | str | None) -> None:
        """Fill status, error, outputs, files and training results from the end state."""
        ws_error = self.follower.ws_error
        if entry is None:
            result["status"] = "timeout"
            result["error"] = {"message": f"no result within {self.timeout:g} s"}
            result["cancelled"] = self.cancel_on_timeout and self.cancel()
        elif entry == "missing":
            result["status"] = "error"
            result["error"] = ws_error or {
                "message": f"prompt {self.follower.prompt_id} is neither queued nor in the "
                "history (the queue was cleared or the server restarted)"
            }
        elif isinstance(entry, dict):
            result["status"], result["error"] = status_from_history(entry)
            if result["error"] is None and ws_error is not None:
                interrupted = ws_error["event"] == "execution_interrupted"
                result["status"] = "interrupted" if interrupted else "error"
                result["error"] = ws_error
            outputs = entry.get("outputs") or {}
            result["outputs"] = outputs
            result["files"] = download(self.api, outputs, self.out_dir, self.emit)
            paths, losses = training_results(outputs)
            result["adapter_paths"] = paths
            result["final_losses"] = losses
            result["final_loss"] = list(losses.values())[-1] if losses else None

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        answer, entry = self.follow()
        result: dict[str, Any] = {
            "prompt_id": self.follower.prompt_id,
            "client_id": self.client_id,
            "server": self.api.base,
            "status": None,
            "error": None,
            "outputs": {},
            "files": [],
            "adapter_paths": [],
            "final_loss": None,
            "final_losses": {},
            "node_errors": answer.get("node_errors") or {},
            "transport": "+".join(dict.fromkeys(self.follower.transports)),
        }
        self.finish(result, entry)
        result["seconds"] = round(time.monotonic() - started, 3)
        write_result(self.out_dir, result)
        return result


def run_workflow(
    server: str,
    workflow: Mapping[str, Any] | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    timeout: float | None = None,
    sets: Sets | None = None,
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
    Events come from the websocket when the ``websocket-client`` package is installed and
    the socket connects, else from polling ``/history`` (``result["transport"]`` says which).

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
    api = ComfyApi(server, http_timeout)

    def emit(event: str, data: dict[str, Any]) -> None:
        if on_event is not None:
            on_event(event, data)

    follower = Follower(api, emit, poll_interval, idle_check)
    run = _Run(
        api, prompt, Path(out_dir), timeout, on_event, client_id, cancel_on_timeout, follower
    )
    return run.run()
