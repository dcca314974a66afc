"""The pack inside a real ComfyUI: it imports, /object_info shows every node as the snapshot
pins it, and bad inputs in API prompts are refused with a message that says what to fix,
while the server keeps serving."""

from __future__ import annotations

import ast
import json

import pytest
from e2e_support import PACK_NAME, ROOT, train_prompt

from lycoris_core.client import run_workflow

SNAPSHOT = ROOT / "tests" / "nodes" / "interface.json"


def _registered_nodes() -> dict[str, str]:
    """Node id -> display name, read from nodes/__init__.py's NODES (without importing it)."""
    tree = ast.parse((ROOT / "nodes" / "__init__.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "NODES" for t in node.targets
        ):
            return {
                key.value: value.elts[1].value
                for key, value in zip(node.value.keys, node.value.values, strict=True)
            }
    raise AssertionError("nodes/__init__.py has no NODES mapping")


def _kind(spec) -> str:
    return spec[0] if isinstance(spec[0], str) else "COMBO"


def test_pack_imported(comfy):
    assert comfy.import_problem() is None
    status, extensions = comfy.get("/extensions")
    assert status == 200
    ours = sorted(e for e in extensions if e.startswith(f"/extensions/{PACK_NAME}/"))
    assert ours == [
        f"/extensions/{PACK_NAME}/lycoris.js",
        f"/extensions/{PACK_NAME}/lycoris_chart.js",
        f"/extensions/{PACK_NAME}/lycoris_schema.js",
    ]


def test_object_info_lists_every_node(comfy):
    registered = _registered_nodes()
    snapshot = json.loads(SNAPSHOT.read_text())
    assert set(registered) == set(snapshot) and len(registered) == 15
    status, info = comfy.get("/object_info", timeout=60)
    assert status == 200
    missing = sorted(set(registered) - set(info))
    assert not missing, f"not in /object_info: {missing}"
    for node_id, display in registered.items():
        node = info[node_id]
        pinned = snapshot[node_id]
        assert node["category"] == "LyCORIS", node_id
        assert isinstance(node["description"], str) and len(node["description"]) > 30, node_id
        assert node["display_name"] == display, node_id
        assert node["python_module"] == f"custom_nodes.{PACK_NAME}", node_id
        assert node["output_node"] == pinned["output_node"], node_id
        outputs = [list(pair) for pair in zip(node["output_name"], node["output"], strict=True)]
        assert outputs == pinned["outputs"], node_id
        assert len(node["output_tooltips"]) == len(outputs), node_id
        for section in ("required", "optional"):
            got = {name: _kind(spec) for name, spec in node["input"].get(section, {}).items()}
            assert got == pinned["inputs"].get(section, {}), (node_id, section)
            for name, spec in node["input"].get(section, {}).items():
                assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert set(node["input"].get("hidden", {})) == set(pinned["inputs"].get("hidden", {}))


# --------------------------------------------------------------------------------------------
# Bad inputs


def _inspect_prompt(lycoris_name: str) -> dict:
    return {
        "1": {"class_type": "LycorisLoad", "inputs": {"lycoris_name": lycoris_name}},
        "2": {"class_type": "LycorisInspect", "inputs": {"adapter": ["1", 0]}},
    }


def _strength_prompt(lycoris_name: str, strength: float) -> dict:
    return {
        "1": {
            "class_type": "LycorisLoadDiffusersModel",
            "inputs": {
                "model": "demo: tiny-sd15",
                "dtype": "auto",
                "device": "cpu",
                "offload": "none",
            },
        },
        "2": {"class_type": "LycorisLoad", "inputs": {"lycoris_name": lycoris_name}},
        "3": {
            "class_type": "LycorisApply",
            "inputs": {
                "model": ["1", 0],
                "adapter": ["2", 0],
                "strength": strength,
                "mode": "merge",
            },
        },
        "4": {"class_type": "LycorisInspect", "inputs": {"adapter": ["2", 0], "model": ["3", 0]}},
    }


def _with(prompt: dict, node: str, **inputs) -> dict:
    prompt[node]["inputs"].update(inputs)
    return prompt


# case id -> (prompt factory(adapter name, tmp_path), node id, input name, text of the fix)
BAD_INPUTS = {
    "unknown adapter file": (
        lambda adapter, tmp: _inspect_prompt("lycoris/no_such_file.safetensors"),
        "1",
        "lycoris_name",
        "not in the loras folder",
    ),
    "strength out of range": (
        lambda adapter, tmp: _strength_prompt(adapter, 11.0),
        "3",
        "strength",
        "bigger than max of 10",
    ),
    "config typo key": (
        lambda adapter, tmp: train_prompt(
            output_name="e2e_typo", extra='{"unbalanced_factor": true}'
        ),
        "2",
        "extra",
        "did you mean 'unbalanced_factorization'",
    ),
    "dataset folder missing": (
        lambda adapter, tmp: train_prompt(output_name="e2e_nofolder", folder=str(tmp / "nope")),
        "3",
        "folder",
        "does not exist",
    ),
    "output name with ../": (
        lambda adapter, tmp: train_prompt(output_name="../e2e_escape"),
        "4",
        "output_name",
        "must be a plain name",
    ),
    "training steps 0": (
        lambda adapter, tmp: train_prompt(output_name="e2e_steps0", steps=0),
        "4",
        "steps",
        "smaller than min of 1",
    ),
    "unknown model": (
        lambda adapter, tmp: train_prompt(output_name="e2e_nomodel", model="no-such-model"),
        "1",
        "model",
        "refresh the node list",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_with_the_fix(comfy, demo_adapter, tmp_path, case):
    factory, node_id, input_name, fix = BAD_INPUTS[case]
    prompt = factory(demo_adapter, tmp_path)
    status, answer = comfy.submit(prompt)
    assert status == 400, (status, answer)
    assert answer["error"]["type"] == "prompt_outputs_failed_validation"
    assert set(answer["node_errors"]) == {node_id}, answer["node_errors"]
    errors = answer["node_errors"][node_id]["errors"]
    named = [e for e in errors if e["extra_info"].get("input_name") == input_name]
    assert named, f"no error names {input_name!r}: {errors}"
    text = " ".join(f"{e['message']} {e['details']}" for e in named)
    assert fix.lower() in text.lower(), text
    assert comfy.alive()
    for node in prompt.values():  # nothing ran: no file of a refused Train node anywhere
        if node["class_type"] == "LycorisTrain":
            name = node["inputs"]["output_name"].rsplit("/", 1)[-1]
            assert not list(comfy.root.rglob(f"{name}*")), f"a refused prompt wrote {name}"


def test_execution_error_names_the_fix_and_the_server_goes_on(comfy, tmp_path):
    empty = tmp_path / "no_images"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    prompt = train_prompt(output_name="e2e_empty_dataset", folder=str(empty), steps=2)
    result = run_workflow(comfy.url, prompt, tmp_path / "out", timeout=120)
    assert result["status"] == "error", result
    error = result["error"]
    assert error["node_id"] == "4" and error["node_type"] == "LycorisTrain", error
    message = error["exception_message"]
    assert str(empty) in message and "image" in message.lower(), message
    print(f"\nempty dataset -> {error['exception_type'].rsplit('.', 1)[-1]}: {message.strip()}")

    # the next prompt runs normally
    ok = run_workflow(
        comfy.url, train_prompt(output_name="e2e_after_errors", steps=2), tmp_path / "ok", 120
    )
    assert ok["status"] == "success", ok["error"]
    assert (comfy.lycoris_dir / "e2e_after_errors.safetensors").is_file()
