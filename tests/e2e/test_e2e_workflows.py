"""The API-format example workflows on a real ComfyUI, through the headless runner
(lycoris_core.client.run_workflow): train -> apply -> sample, three strengths side by side,
and a cancelled training resumed from its checkpoint."""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import numpy as np
from e2e_support import ROOT, TRAIN_APPLY_SAMPLE_SETS
from PIL import Image

from lycoris_core import load_adapter
from lycoris_core.client import run_workflow

API = ROOT / "example_workflows" / "api"
COVERED = {"train_apply_sample", "three_strengths", "resume_cancelled_run"}
COVERED |= {"checkpoint_apply_ksampler"}  # in test_e2e_comfy_model.py


def _train_events(events, node="4"):
    return [d for e, d in events if e == "lycoris.train" and str(d.get("node")) == node]


def _files(result, node):
    return sorted((f for f in result["files"] if f["node"] == node), key=lambda f: f["filename"])


def test_every_api_example_has_a_test():
    names = {p.stem for p in API.glob("*.json")}
    assert names == COVERED, (
        f"API-format examples without an e2e test: {sorted(names - COVERED)}; "
        f"tested but missing: {sorted(COVERED - names)}"
    )


def test_train_apply_sample(comfy, demo_run):
    result = demo_run.result
    assert result["status"] == "success", result["error"]
    assert "websocket" in result["transport"]

    # the Train node's adapter path, inside the temporary models/loras/lycoris
    adapter = comfy.lycoris_dir / "demo_discs.safetensors"
    assert result["adapter_paths"] == [str(adapter)]
    assert adapter.is_file()
    assert math.isfinite(result["final_loss"])
    summary = json.loads(result["outputs"]["4"]["text"][0])
    assert summary["steps"] == 10 and summary["completed"] is True
    assert len(summary["losses"]) == 10
    for step in (5, 10):  # adapter + spec beside accelerate's resumable state
        ckpt = comfy.lycoris_dir / "demo_discs-checkpoints" / f"step-{step:06d}"
        assert (ckpt / "adapter.safetensors").is_file() and (ckpt / "spec.json").is_file()
        assert (ckpt / "state").is_dir() and any((ckpt / "state").iterdir())

    # images downloaded: 4 samples (node 7) and the loss curve (node 8)
    samples, curves = _files(result, "7"), _files(result, "8")
    assert len(samples) == 4 and len(curves) == 1
    for record in samples + curves:
        assert record["path"] and Path(record["path"]).is_file(), record
    for record in samples:
        with Image.open(record["path"]) as image:
            assert image.size == (32, 32)

    # the Sample node's step previews (server started with --preview-method latent2rgb):
    # binary frames of type 1 (an encoded image), one per sampling step
    previews = [d for e, d in demo_run.events if e == "preview"]
    assert len(previews) >= TRAIN_APPLY_SAMPLE_SETS["6.steps"], previews
    assert all(d["kind"] == 1 and d["bytes"] > 100 for d in previews), previews

    # live events: every step, validation images at 5 and 10, then done
    events = _train_events(demo_run.events)
    steps = [d["step"] for d in events if "loss" in d]
    assert steps == list(range(1, 11))
    assert [d["step"] for d in events if "validation" in d] == [5, 10]
    assert events[-1] == {"status": "done", "adapter_path": str(adapter), "node": "4"}

    # ComfyUI sees the new file without a restart and reads its metadata
    status, loras = comfy.get("/models/loras")
    assert status == 200 and "lycoris/demo_discs.safetensors" in loras
    status, meta = comfy.get("/view_metadata/loras?filename=lycoris/demo_discs.safetensors")
    assert status == 200 and meta["modelspec.title"] == "demo_discs"
    assert json.loads(meta["lycoris_config"])["algo"] == "lokr"
    assert len(load_adapter(adapter).layers) == summary["layers"] > 0


def test_three_strengths(comfy, demo_adapter, tmp_path):
    sets = {"6.steps": 2, "7.steps": 2, "8.steps": 2}
    workflow = json.loads((API / "three_strengths.json").read_text())
    assert workflow["2"]["inputs"]["lycoris_name"] == demo_adapter
    result = run_workflow(comfy.url, workflow, tmp_path, timeout=180, sets=sets)
    assert result["status"] == "success", result["error"]

    images = _files(result, "11")  # strengths 0, 0.5, 1, a batch of 4 each, in that order
    assert len(images) == 12 and all(f["path"] for f in images)
    pixels = [np.asarray(Image.open(f["path"]).convert("RGB"), dtype=np.int16) for f in images]
    at0, at1 = pixels[:4], pixels[8:]
    assert any(np.abs(a - b).max() > 0 for a, b in zip(at0, at1, strict=True)), (
        "strength 1 gave the same images as strength 0"
    )
    report = result["outputs"]["12"]["text"][0]
    assert "0 unmatched" in report and "demo_discs.safetensors" in report


def test_resume_cancelled_run(comfy, tmp_path):
    steps = 80  # ~0.1 s each on the tiny Flux: long enough to cancel, short to finish
    sets = {"4.steps": steps, "4.save_every": 5}
    workflow = API / "resume_cancelled_run.json"
    assert json.loads(workflow.read_text())["4"]["inputs"]["resume"] is True
    checkpoints = comfy.lycoris_dir / "demo_long-checkpoints"
    final = comfy.lycoris_dir / "demo_long.safetensors"

    events: list[tuple[str, dict]] = []
    interrupted = threading.Event()

    def cancel_after_steps(event, data):
        events.append((event, data))
        if event == "runner.submitted":
            cancel_after_steps.prompt_id = data["prompt_id"]
        step = data.get("step", 0) if "loss" in data else 0
        if event == "lycoris.train" and step >= 2 and not interrupted.is_set():
            interrupted.set()
            comfy.post("/interrupt", {"prompt_id": cancel_after_steps.prompt_id})

    started = time.monotonic()
    first = run_workflow(
        comfy.url,
        workflow,
        tmp_path / "first",
        timeout=180,
        sets={**sets, "4.resume": False},
        on_event=cancel_after_steps,
    )
    assert interrupted.is_set(), "no lycoris.train step event arrived"
    assert first["status"] == "interrupted", first["error"]
    assert first["error"]["node_id"] == "4"
    cancelled = [d for d in _train_events(events) if d.get("status") == "cancelled"]
    assert len(cancelled) == 1 and cancelled[0]["checkpoint"], events[-5:]
    last_step = max(d["step"] for d in _train_events(events) if "loss" in d)
    assert last_step < steps
    saved = sorted(checkpoints.glob("step-*"))
    assert saved and all((c / "state").is_dir() and any((c / "state").iterdir()) for c in saved)
    assert cancelled[0]["checkpoint"] == str(saved[-1])
    resumed_from = int(saved[-1].name.removeprefix("step-"))
    assert not final.exists(), "a cancelled run left a final adapter"
    first_seconds = time.monotonic() - started

    # The same workflow with resume on (as saved). Nodes 1-3 come from ComfyUI's cache; the
    # Train node runs again because its 'resume' input changed.
    events.clear()
    second = run_workflow(
        comfy.url,
        workflow,
        tmp_path / "second",
        timeout=300,
        sets=sets,
        on_event=lambda event, data: events.append((event, data)),
    )
    assert second["status"] == "success", second["error"]
    cached = [set(d.get("nodes", [])) for e, d in events if e == "execution_cached"]
    assert cached and "4" not in cached[0], cached
    steps_seen = [d["step"] for d in _train_events(events) if "loss" in d]
    assert steps_seen[0] == resumed_from + 1 and steps_seen[-1] == steps, steps_seen[:3]
    assert second["adapter_paths"] == [str(final)] and final.is_file()
    summary = json.loads(second["outputs"]["4"]["text"][0])
    assert summary["completed"] is True and summary["steps"] == steps
    assert len(summary["losses"]) == steps  # the resumed run carries the earlier losses
    assert _files(second, "5") and all(f["path"] for f in _files(second, "5"))
    print(
        f"\nresume: cancelled at step {last_step} (checkpoint step {resumed_from}) after "
        f"{first_seconds:.1f} s; resumed run {second['seconds']:.1f} s; cached {sorted(cached[0])}"
    )
