"""The runner's errors and the exit code each one maps to."""

from __future__ import annotations

from typing import Any

from ..errors import LycorisError

EXIT_CODES = {
    "success": 0,
    "error": 1,
    "usage": 2,
    "interrupted": 3,
    "timeout": 4,
    "rejected": 5,
    "unreachable": 6,
}


class ClientError(LycorisError, RuntimeError):
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
