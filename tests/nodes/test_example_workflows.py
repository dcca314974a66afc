"""The example workflows: UI and API formats agree, and the API prompts run (fake host)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from workflows import CORE_NODES, ui_to_api

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "example_workflows"
NAMES = sorted(p.stem for p in EXAMPLES.glob("*.json"))


def test_there_are_the_three_examples():
    assert NAMES == [
        "checkpoint_apply_ksampler",
        "resume_cancelled_run",
        "three_strengths",
        "train_apply_sample",
    ]


@pytest.mark.parametrize("name", NAMES)
def test_ui_and_api_formats_agree(nodes, name):
    ui = json.loads((EXAMPLES / f"{name}.json").read_text())
    api = json.loads((EXAMPLES / "api" / f"{name}.json").read_text())
    assert ui_to_api(ui, nodes) == api
    assert {n["class_type"] for n in api.values()} <= set(nodes) | set(CORE_NODES)


def execute(api: dict, nodes: dict, host_root: Path, sets: dict | None = None) -> dict:
    """A minimal in-process executor: our node classes plus stand-ins for 2 core nodes."""
    for key, value in (sets or {}).items():
        node_id, name = key.split(".")
        api[node_id]["inputs"][name] = value
    results: dict[str, tuple] = {}

    def value_of(v):
        return results_of(v[0])[v[1]] if isinstance(v, list) else v

    def results_of(node_id: str) -> tuple:
        if node_id not in results:
            node = api[node_id]
            inputs = {k: value_of(v) for k, v in node["inputs"].items()}
            kind = node["class_type"]
            if kind == "SaveImage":
                out = host_root / "output" / f"{inputs['filename_prefix']}.png"
                out.parent.mkdir(parents=True, exist_ok=True)
                row = torch.cat(list(inputs["images"]), dim=1)
                Image.fromarray((row * 255).round().byte().numpy()).save(out)
                results[node_id] = (out,)
            elif kind == "ImageBatch":
                results[node_id] = (torch.cat([inputs["image1"], inputs["image2"]]),)
            else:
                cls = nodes[kind]
                check = getattr(cls, "VALIDATE_INPUTS", None)
                if check is not None:  # like ComfyUI: only the widget inputs it names
                    named = inspect.getfullargspec(check).args
                    verdict = check(
                        **{
                            k: v
                            for k, v in inputs.items()
                            if k in named and not isinstance(node["inputs"][k], list)
                        }
                    )
                    assert verdict is True, verdict
                with torch.inference_mode():  # as ComfyUI runs every node
                    out = getattr(cls(), cls.FUNCTION)(**inputs)
                results[node_id] = out["result"] if isinstance(out, dict) else out
        return results[node_id]

    for node_id in api:
        results_of(node_id)
    return results


def test_api_workflows_run_in_order(nodes, host_root):
    api = json.loads((EXAMPLES / "api" / "train_apply_sample.json").read_text())
    out = execute(
        api, nodes, host_root, {"4.steps": 12, "4.save_every": 6, "4.validation_every": 6}
    )
    adapter, path, *_ = out["4"]
    assert Path(path).name == "demo_discs.safetensors" and len(adapter.layers) == 30
    assert out["6"][0].shape == (4, 32, 32, 3) and Path(out["7"][0]).is_file()
    api = json.loads((EXAMPLES / "api" / "three_strengths.json").read_text())
    out = execute(api, nodes, host_root)
    batch = out["10"][0]
    assert batch.shape == (12, 32, 32, 3)
    assert (batch[:4] - batch[8:]).abs().max() > 1e-4  # strength 0 vs 1 differ
    assert "30 matched, 0 unmatched" in out["12"][0]


def test_resume_workflow_continues_a_stopped_run(nodes, host_root):
    api = json.loads((EXAMPLES / "api" / "resume_cancelled_run.json").read_text())
    from lycoris_core.training import CheckpointError  # noqa: F401 - the error type users see

    with pytest.raises(Exception, match="has no checkpoint; turn resume off"):
        execute(json.loads(json.dumps(api)), nodes, host_root, {"4.steps": 20})
    first = execute(
        json.loads(json.dumps(api)), nodes, host_root, {"4.steps": 20, "4.resume": False}
    )
    assert json.loads(first["4"][4])["steps"] == 20
    more = execute(json.loads(json.dumps(api)), nodes, host_root, {"4.steps": 40})
    summary = json.loads(more["4"][4])
    assert summary["steps"] == 40 and len(summary["losses"]) == 40  # resumed from step 20
