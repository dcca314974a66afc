"""Hostile prompts to a real ComfyUI: names with '..', absolute paths, names and values that
come from linked Primitive nodes (ComfyUI's VALIDATE_INPUTS sees None for those, so the node
checks them when it runs), out-of-range strengths and steps, hostile JSON.

Each prompt is either refused at validation (HTTP 400 naming the node and the fix) or fails
when it runs with our typed error naming the input; nothing is written inside or outside
ComfyUI's folders (every bad name carries a marker that must appear nowhere on disk), and the
server serves the next prompt. A linked good name is the control: it saves where it should.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from e2e_support import train_prompt

from lycoris_core.client import run_workflow

MODEL = {
    "class_type": "LycorisLoadDiffusersModel",
    "inputs": {"model": "demo: tiny-sd15", "dtype": "auto", "device": "cpu", "offload": "none"},
}


def _load(adapter: str) -> dict:
    return {"class_type": "LycorisLoad", "inputs": {"lycoris_name": adapter}}


def _primitive(kind: str, value) -> dict:
    """ComfyUI's own Primitive nodes (comfy_extras/nodes_primitive.py): String, Float."""
    return {"class_type": f"Primitive{kind}", "inputs": {"value": value}}


def save(adapter: str, file_name) -> dict:
    return {
        "1": _load(adapter),
        "2": {"class_type": "LycorisSave", "inputs": {"adapter": ["1", 0], "file_name": file_name}},
    }


def save_linked(adapter: str, file_name: str) -> dict:
    prompt = save(adapter, ["9", 0])
    prompt["9"] = _primitive("String", file_name)
    return prompt


def merged(adapter: str, folder_name) -> dict:
    return {
        "1": MODEL,
        "2": _load(adapter),
        "3": {
            "class_type": "LycorisApply",
            "inputs": {"model": ["1", 0], "adapter": ["2", 0], "strength": 1.0, "mode": "merge"},
        },
        "4": {
            "class_type": "LycorisSaveMergedModel",
            "inputs": {"model": ["3", 0], "folder_name": folder_name},
        },
    }


def sample(adapter: str, strength=1.0, **overrides) -> dict:
    prompt = merged(adapter, "unused")
    del prompt["4"]
    prompt["3"]["inputs"]["strength"] = strength
    inputs = {
        "model": ["3", 0],
        "prompt": "a disc",
        "negative_prompt": "",
        "width": 32,
        "height": 32,
        "steps": 1,
        "guidance": 1.0,
        "seed": 0,
        "batch_size": 1,
        **overrides,
    }
    prompt["5"] = {"class_type": "LycorisSample", "inputs": inputs}
    prompt["6"] = {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}}
    return prompt


def train_linked(input_name: str, kind: str, value, **kw) -> dict:
    """The train prompt with one input of the Train (4) or Dataset (3) node linked."""
    prompt = train_prompt(output_name=kw.pop("output_name", "e2e_linked_train"), steps=2, **kw)
    node = "3" if input_name == "folder" else "4"
    prompt["9"] = _primitive(kind, value)
    prompt[node]["inputs"][input_name] = ["9", 0]
    return prompt


# case -> (prompt(adapter, tmp, marker), expectation)
#   ("refused", node id, text) : HTTP 400, that node's errors contain the text
#   ("error", node id, exception class name, text) : accepted, then fails in that node
CASES = {
    "save ../ name": (lambda a, t, m: save(a, f"../../../../{m}"), ("refused", "2", "plain name")),
    "save absolute name": (lambda a, t, m: save(a, str(t / m)), ("refused", "2", "plain name")),
    "save sub/folder name": (lambda a, t, m: save(a, f"x/{m}"), ("refused", "2", "plain name")),
    "save empty name": (lambda a, t, m: save(a, ""), ("refused", "2", "plain name")),
    "merged ../ name": (lambda a, t, m: merged(a, f"../{m}"), ("refused", "4", "plain name")),
    "merged absolute name": (lambda a, t, m: merged(a, str(t / m)), ("refused", "4", "plain name")),
    "train absolute name": (
        lambda a, t, m: train_prompt(output_name=str(t / m)),
        ("refused", "4", "plain name"),
    ),
    "train .. name": (
        lambda a, t, m: train_prompt(output_name=".."),
        ("refused", "4", "plain name"),
    ),
    "load ../ adapter": (
        lambda a, t, m: {"1": _load(f"../../../{m}.safetensors"), "2": save(a, m)["2"]},
        ("refused", "1", "not in the loras folder"),
    ),
    "model ../ folder": (
        lambda a, t, m: train_prompt(output_name=m, model=f"../../{m}"),
        ("refused", "1", "not in ComfyUI's model folders"),
    ),
    "dataset folder missing": (
        lambda a, t, m: train_prompt(output_name=m, folder=str(t / m)),
        ("refused", "3", "does not exist"),
    ),
    "dataset folder is a file": (
        lambda a, t, m: train_prompt(output_name=m, folder=str(Path(__file__))),
        ("refused", "3", "is a file"),
    ),
    "strength 1e9": (lambda a, t, m: sample(a, 1e9), ("refused", "3", "bigger than max of 10")),
    "strength -11": (lambda a, t, m: sample(a, -11.0), ("refused", "3", "smaller than min")),
    "sample steps 10**7": (
        lambda a, t, m: sample(a, steps=10**7),
        ("refused", "5", "bigger than max of 1000"),
    ),
    "config JSON nested 100k deep": (
        lambda a, t, m: train_prompt(output_name=m, extra="[" * 100_000 + "]" * 100_000),
        ("refused", "2", "cannot be read"),
    ),
    "config linear_dim 1e300": (
        lambda a, t, m: train_prompt(output_name=m, extra='{"linear_dim": 1e300}'),
        ("refused", "2", "linear_dim"),
    ),
    "linked save ../ name": (
        lambda a, t, m: save_linked(a, f"../../../../{m}"),
        ("error", "2", "PathError", "file_name"),
    ),
    "linked save absolute name": (
        lambda a, t, m: save_linked(a, str(t / m)),
        ("error", "2", "PathError", "file_name"),
    ),
    "linked merged ../ name": (
        lambda a, t, m: merged(a, ["9", 0]) | {"9": _primitive("String", f"../{m}")},
        ("error", "4", "PathError", "folder_name"),
    ),
    "linked train absolute name": (
        lambda a, t, m: train_linked("output_name", "String", str(t / m)),
        ("error", "4", "PathError", "output_name"),
    ),
    "linked train ../ name": (
        lambda a, t, m: train_linked("output_name", "String", f"../../{m}"),
        ("error", "4", "PathError", "output_name"),
    ),
    "linked dataset folder missing": (
        lambda a, t, m: train_linked("folder", "String", str(t / m), output_name=m),
        ("error", "3", "PathError", "dataset folder"),
    ),
    "linked strength 1e9": (
        lambda a, t, m: sample(a, ["9", 0]) | {"9": _primitive("Float", 1e9)},
        ("error", "3", "LycorisError", "strength must be"),
    ),
}


def _marked(root: Path, marker: str) -> list[Path]:
    return list(root.rglob(f"*{marker}*"))


@pytest.mark.parametrize("case", list(CASES))
def test_bad_prompt_is_refused_or_fails_cleanly(comfy, demo_adapter, tmp_path, case):
    build, expect = CASES[case]
    marker = f"e2e_escape_{uuid.uuid4().hex[:8]}"
    prompt = build(demo_adapter, tmp_path, marker)
    if expect[0] == "refused":
        status, answer = comfy.submit(prompt)
        assert status == 400, (status, answer)
        assert answer["error"]["type"] == "prompt_outputs_failed_validation", answer
        assert expect[1] in answer["node_errors"], answer["node_errors"]
        errors = answer["node_errors"][expect[1]]["errors"]
        text = " ".join(f"{e['message']} {e['details']}" for e in errors)
        assert expect[2].lower() in text.lower(), text
    else:
        result = run_workflow(comfy.url, prompt, tmp_path / "run", timeout=180)
        assert result["status"] == "error", result
        error = result["error"]
        assert error["node_id"] == expect[1], error
        assert error["exception_type"].rsplit(".", 1)[-1] == expect[2], error
        assert expect[3] in error["exception_message"], error["exception_message"]
    # nothing written: not in ComfyUI's folders, not beside them, not at the absolute path
    assert not _marked(comfy.root.parent, marker), _marked(comfy.root.parent, marker)
    assert not _marked(tmp_path, marker)
    assert comfy.alive()


def test_the_case_list_covers_what_the_issue_asks():
    linked = [c for c in CASES if c.startswith("linked")]
    assert len(CASES) >= 20 and len(linked) >= 5
    assert any(".." in c for c in CASES) and any("absolute" in c for c in CASES)


def test_a_linked_good_name_saves_where_it_should(comfy, demo_adapter, tmp_path):
    name = f"e2e_linked_ok_{uuid.uuid4().hex[:6]}"
    result = run_workflow(comfy.url, save_linked(demo_adapter, name), tmp_path / "ok", 120)
    assert result["status"] == "success", result["error"]
    saved = comfy.lycoris_dir / f"{name}.safetensors"
    assert saved.is_file() and [p for p in comfy.root.rglob(f"{name}*")] == [saved]
    umask = os.umask(0o022)  # the server inherited this process's umask
    os.umask(umask)
    assert saved.stat().st_mode & 0o777 == 0o666 & ~umask  # not the temp file's 0600
