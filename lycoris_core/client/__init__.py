"""Headless runner: submit an API-format workflow to a running ComfyUI and collect its results.

Usage::

    python -m lycoris_core.client run WORKFLOW_API.json --server http://127.0.0.1:8188 \\
        --out DIR [--set NODE.INPUT=VALUE ...] [--timeout SECONDS] [--client-id ID]

It posts the workflow to ``POST /prompt``, follows the prompt on ``GET /ws`` (with the
``websocket-client`` package, as ComfyUI's own script examples do), falls back to polling
``GET /history/<id>`` when the socket cannot connect or drops (long jobs lose websockets), or
when websocket-client is not installed (a one-line note says so), then downloads every output
file through ``GET /view`` and writes ``DIR/result.json``. It needs neither torch nor ComfyUI.

Exit codes: 0 success, 1 execution error, 2 bad workflow or arguments, 3 interrupted,
4 timeout, 5 rejected by the server's validation (HTTP 400), 6 server unreachable or an
unexpected HTTP answer, 130 stopped with Ctrl-C (the prompt keeps running on the server).

Modules: ``workflow`` (loading, --set), ``api`` (HTTP calls), ``events`` (websocket and
/history following), ``results`` (downloads, result.json), ``run`` (one run), ``cli``,
``keys`` (the Train node's output keys and ``lycoris.train`` fields the runner reads).
"""

from __future__ import annotations

from .cli import build_parser, main
from .errors import EXIT_CODES, ClientError, PromptRejected, ServerUnreachable, WorkflowError
from .results import write_result
from .run import run_workflow
from .workflow import apply_sets, load_workflow, parse_set, validate_workflow

__all__ = [
    "EXIT_CODES",
    "ClientError",
    "PromptRejected",
    "ServerUnreachable",
    "WorkflowError",
    "apply_sets",
    "build_parser",
    "load_workflow",
    "main",
    "parse_set",
    "run_workflow",
    "validate_workflow",
    "write_result",
]
