"""What a finished prompt leaves: its status from ``/history``, the output files (downloaded
through ``/view``), the Train node's adapter paths and losses, and ``result.json``."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from . import keys
from .api import ComfyApi
from .errors import ClientError

EventCallback = Callable[[str, dict[str, Any]], None]


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def file_refs(outputs: Mapping[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
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


def _json_texts(out: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The JSON objects among an output's ``text`` entries."""
    found = []
    for text in _as_list(out.get(keys.OUT_TEXT, [])):
        if isinstance(text, str) and text.lstrip().startswith("{"):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(parsed, dict):
                found.append(parsed)
    return found


def training_results(outputs: Mapping[str, Any]) -> tuple[list[str], dict[str, float]]:
    """Adapter paths and final losses that nodes reported in their UI output, directly
    (``adapter_path``/``adapter_paths``/``final_loss``) or inside JSON ``text`` entries."""
    paths: list[str] = []
    losses: dict[str, float] = {}
    for node_id, out in outputs.items():
        if not isinstance(out, dict):
            continue
        for source in [out, *_json_texts(out)]:
            for key in keys.ADAPTER_PATH_KEYS:
                for path in _as_list(source.get(key)):
                    if isinstance(path, str) and path and path not in paths:
                        paths.append(path)
            for loss in _as_list(source.get(keys.OUT_FINAL_LOSS)):
                if isinstance(loss, (int, float)) and not isinstance(loss, bool):
                    losses[str(node_id)] = float(loss)
    return paths, losses


def error_details(event: str, data: Mapping[str, Any]) -> dict[str, Any]:
    """The ``error`` of result.json from an ``execution_error``/``execution_interrupted``."""
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


def status_from_history(entry: Mapping[str, Any]) -> tuple[str, dict[str, Any] | None]:
    """("success" | "error" | "interrupted", error details or None) of a history entry."""
    status = entry.get("status") or {}
    error = None
    result = None
    for message in status.get("messages") or []:
        if not isinstance(message, (list, tuple)) or len(message) < 2:
            continue
        event, data = message[0], message[1] if isinstance(message[1], dict) else {}
        if event == "execution_interrupted":
            result, error = "interrupted", error_details(event, data)
        elif event == "execution_error":
            result, error = "error", error_details(event, data)
    if result is None:
        ok = status.get("status_str") == "success" and status.get("completed", True)
        result = "success" if ok else "error"
        if result == "error":
            error = {"message": f"ComfyUI reports status {status.get('status_str')!r}"}
    return result, error


def safe_name(name: str) -> str:
    """A server file name reduced to a plain local name (no folders, never empty)."""
    name = os.path.basename(name.replace("\\", "/")).strip()
    return name if name not in ("", ".", "..") else "output"


def _unique(name: str, node_id: str, used: set[str]) -> str:
    if name in used:
        stem = f"{node_id}-{name}"
        name, k = stem, 1
        while name in used:
            k += 1
            name = f"{k}-{stem}"
    used.add(name)
    return name


def _fetch(api: ComfyApi, query: Mapping[str, str], target: Path) -> str | None:
    """Stream one ``/view`` answer into ``target`` (atomically); the error text or None."""
    status, response = api.view(query)
    with response:
        if status != 200:
            return f"HTTP {status}"
        part = target.with_name(target.name + ".part")
        with part.open("wb") as fh:
            while chunk := response.read(1 << 20):
                fh.write(chunk)
        part.replace(target)
    return None


def download(
    api: ComfyApi, outputs: Mapping[str, Any], out_dir: Path, emit: EventCallback
) -> list[dict[str, Any]]:
    """Download every file the outputs list into ``out_dir``; one record per file (``path``
    None and ``error`` set when it failed). Same names from two nodes get a node prefix."""
    files = []
    used: set[str] = set()
    for node_id, key, ref in file_refs(outputs):
        name = _unique(safe_name(ref["filename"]), node_id, used)
        query = {
            "filename": ref["filename"],
            "subfolder": str(ref.get("subfolder") or ""),
            "type": str(ref.get("type") or "output"),
        }
        record: dict[str, Any] = {"node": node_id, "key": key, **query, "path": None}
        target = out_dir / name
        try:
            error = _fetch(api, query, target)
        except (ClientError, OSError) as exc:
            error = str(exc)
        if error is None:
            record["path"] = str(target)
        else:
            record["error"] = error
        files.append(record)
        emit("runner.file", record)
    return files


def write_result(out_dir: str | os.PathLike[str], result: Mapping[str, Any]) -> Path:
    """Write ``result.json`` atomically into ``out_dir``."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    path = Path(out_dir) / "result.json"
    part = path.with_name("result.json.part")
    part.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    part.replace(path)
    return path
