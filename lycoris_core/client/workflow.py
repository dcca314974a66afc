"""API-format workflows: reading, checking the shape, and ``--set NODE.INPUT=VALUE`` overrides."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .errors import WorkflowError

Sets = Iterable[str | tuple[str, str, Any]] | Mapping[str, Any]


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


def apply_sets(workflow: Mapping[str, Any], sets: Sets) -> dict[str, Any]:
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
