"""The command line: ``python -m lycoris_core.client run WORKFLOW --out DIR ...``: progress
lines while the prompt runs, a summary at the end, the exit code of the outcome."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from . import keys
from .api import DEFAULT_SERVER
from .errors import EXIT_CODES, ClientError, PromptRejected
from .results import write_result
from .run import run_workflow
from .workflow import apply_sets, load_workflow

# (payload field, format) of the step line of a ``lycoris.train`` event, in print order
_TRAIN_FIELDS = (
    (keys.EV_LOSS, "loss {:.4f}"),
    (keys.EV_SMOOTHED_LOSS, "avg {:.4f}"),
    (keys.EV_LR, "lr {:.3g}"),
    (keys.EV_IT_PER_S, "{:.2f} it/s"),
    (keys.EV_ETA, "eta {:.0f} s"),
)


class Printer:
    """Formats events as one line each; step events at most once per ``every`` seconds."""

    def __init__(
        self,
        prompt: Mapping[str, Any],
        out: TextIO | None = None,
        every: float = 1.0,
        verbose: bool = False,
    ):
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
        if event.startswith("runner."):
            return self.format_runner(event, data)
        if event == keys.TRAIN_EVENT:
            return self.format_train(data)
        return self.format_server(event, data)

    def format_runner(self, event: str, data: dict[str, Any]) -> str | None:
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
        return None

    def format_server(self, event: str, data: dict[str, Any]) -> str | None:
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
        if event == "executed":
            output = data.get("output") or {}
            names = ", ".join(
                f"{k}[{len(v)}]" if isinstance(v, list) else str(k) for k, v in output.items()
            )
            return f"executed {self.node(data.get('node'))}" + (f": {names}" if names else "")
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
        node = data.get(keys.EV_NODE)
        who = f"train {self.node(node)}"
        if data.get(keys.EV_STATUS) == keys.STATUS_DONE:
            return f"{who}: done, adapter {data.get(keys.EV_ADAPTER_PATH)}"
        if data.get(keys.EV_STATUS) == keys.STATUS_CANCELLED:
            return f"{who}: cancelled, checkpoint {data.get(keys.EV_CHECKPOINT)}"
        step = data.get(keys.EV_STEP)
        if data.get(keys.EV_VALIDATION) is not None:
            names = [v.get("filename") for v in data[keys.EV_VALIDATION] if isinstance(v, dict)]
            return f"{who}: validation images at step {step}: {', '.join(names)}"
        if keys.EV_STEP in data:
            total = data.get(keys.EV_TOTAL)
            if self.throttled(keys.TRAIN_EVENT, node, step == total):
                return None
            parts = [f"step {step}/{total}" if total else f"step {step}"]
            for key, fmt in _TRAIN_FIELDS:
                if isinstance(data.get(key), (int, float)):
                    parts.append(fmt.format(data[key]))
            return f"{who}: " + "  ".join(parts)
        return f"{who}: {json.dumps(data, default=str)[:200]}"


def _error_lines(result: Mapping[str, Any]) -> list[str]:
    status = result["status"]
    error = result.get("error") or {}
    if status == "error" and error:
        where = f"node {error.get('node_id')} ({error.get('node_type')})"
        if error.get("exception_type") or error.get("exception_message"):
            message = str(error.get("exception_message") or "").strip()
            return [f"  {where}: {error.get('exception_type')}: {message}"]
        return [f"  {error.get('message') or where}"]
    if status == "interrupted":
        return [f"  at node {error.get('node_id')} ({error.get('node_type')})"]
    if status == "timeout":
        if result.get("cancelled"):
            return [f"  {error.get('message')}; cancelled it on the server"]
        return [f"  {error.get('message')}; the prompt may still be running on the server"]
    return []


def summary(result: Mapping[str, Any], out_dir: str) -> str:
    """The lines printed at the end of a run."""
    status = result["status"]
    lines = [f"{status}: prompt {result['prompt_id']} in {result.get('seconds', 0):.1f} s"]
    lines += _error_lines(result)
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


def _rejected(exc: PromptRejected, out_dir: str) -> int:
    print(f"error: {exc}", file=sys.stderr)
    with contextlib.suppress(OSError):
        write_result(
            out_dir,
            {
                "prompt_id": None,
                "status": "rejected",
                "error": exc.error,
                "node_errors": exc.node_errors,
            },
        )
    return exc.exit_code


def main(argv: list[str] | None = None) -> int:
    """The CLI; returns the exit code (see ``EXIT_CODES``; 130 after Ctrl-C)."""
    args = build_parser().parse_args(argv)
    printer: Printer | None = None
    try:
        prompt = load_workflow(args.workflow)
        if args.sets:
            prompt = apply_sets(prompt, args.sets)
        printer = Printer(prompt, verbose=args.verbose)
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
        return _rejected(exc, args.out)
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
    out = sys.stdout if result["status"] == "success" else sys.stderr
    print(summary(result, args.out), file=out)
    return EXIT_CODES.get(result["status"], 1)
