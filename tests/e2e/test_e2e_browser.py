"""The web extension in the real ComfyUI frontend, in headless Chromium driven over the Chrome
DevTools Protocol: the Train node's live view follows a training submitted through the HTTP
API, its DOM widget stays out of saved workflows and prompts, and the UI-format example
workflows load into the same prompts as their API-format twins."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time

import pytest
from e2e_support import PACK_NAME, ROOT, Browser, train_prompt

from lycoris_core.client import run_workflow

EXTENSION = "comfyui-lycoris.train"
WIDGET = "lycoris_live"
TEXT_PREVIEW = "$$node-text-preview"
STEPS = 30


def _chromium() -> str | None:
    for candidate in (
        os.environ.get("CHROMIUM"),
        "/usr/bin/chromium",
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
        shutil.which("google-chrome"),
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(scope="module")
def page(comfy, tmp_path_factory):
    binary = _chromium()
    if binary is None:
        pytest.skip("no Chromium found (set CHROMIUM to its path)")
    folder = tmp_path_factory.mktemp("chromium")
    browser = Browser(binary, comfy.url + "/", folder / "profile", folder / "chromium.log")
    try:
        browser.connect()
        browser.wait_for(
            "!!(window.app?.graph && window.LiteGraph && "
            f"app.extensions?.some(e => e.name === {json.dumps(EXTENSION)}))",
            timeout=90,
        )
        # A start-up workflow (the default graph, or none for a new user) may still be
        # loading: wait until the node count has held still for 2 s before editing the graph.
        count, since, deadline = None, time.monotonic(), time.monotonic() + 20
        while time.monotonic() < deadline and time.monotonic() - since < 2:
            now = browser.evaluate("(app.graph.nodes ?? app.graph._nodes).length")
            if now != count:
                count, since = now, time.monotonic()
            time.sleep(0.25)
        yield browser
    finally:
        browser.close()


def test_extension_files_are_served(comfy):
    status, extensions = comfy.get("/extensions")
    assert status == 200
    for name in ("lycoris.js", "lycoris_chart.js"):
        assert f"/extensions/{PACK_NAME}/{name}" in extensions


def test_train_node_shows_live_training(comfy, page, tmp_path):
    node = page.evaluate(
        f"""(() => {{
        const node = LiteGraph.createNode("LycorisTrain");
        app.graph.add(node);
        const widget = node.widgets.find(w => w.name === {json.dumps(WIDGET)});
        const status = widget.element.querySelector(".lycoris-status");
        window.__lycorisSeen = [];
        new MutationObserver(() => window.__lycorisSeen.push(status.textContent))
            .observe(status, {{childList: true, characterData: true, subtree: true}});
        window.__lycorisNode = node;
        window.__lycorisView = widget.element;
        return {{id: node.id, widgets: node.widgets.map(w => w.name),
                 inDocument: document.contains(widget.element)}};
    }})()"""
    )
    node_id = str(node["id"])
    assert node["widgets"][-1] == WIDGET
    others = [str(9001 + i) for i in range(4) if str(9001 + i) != node_id][:3]
    prompt = train_prompt(
        output_name="browser_run",
        steps=STEPS,
        validation_prompt="a photo of a disc",
        validation_every=STEPS // 2,
        ids=(*others, node_id),
    )

    outcome = {}
    runner = threading.Thread(
        target=lambda: outcome.update(
            result=run_workflow(comfy.url, prompt, tmp_path, timeout=240)
        ),
        daemon=True,
    )
    runner.start()
    view = "window.__lycorisView"
    points = f"Number({view}.querySelector('canvas.lycoris-chart').dataset.lycorisPoints)"
    # live: the chart has points and the status line showed a step while training ran
    page.wait_for(
        f"{points} > 0 && window.__lycorisSeen.some(t => /^step \\d+\\/{STEPS}\\b/.test(t))",
        timeout=180,
    )
    runner.join(240)
    assert not runner.is_alive(), "the training prompt did not finish"
    assert outcome["result"]["status"] == "success", outcome["result"]["error"]
    page.wait_for(f"{view}.dataset.lycorisStatus === 'done'", timeout=30)

    state = page.evaluate(
        f"""(() => {{
        const canvas = {view}.querySelector("canvas.lycoris-chart");
        let inked = null;
        if (canvas.width && canvas.height) {{
            const context = canvas.getContext("2d");
            const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
            inked = 0;
            for (let i = 3; i < data.length; i += 4) if (data[i]) inked++;
        }}
        return {{
            points: {points},
            status: {view}.querySelector(".lycoris-status").textContent,
            thumbs: [...{view}.querySelectorAll(".lycoris-thumbs img")]
                .map(i => i.getAttribute("src")),
            inked,
            inDocument: document.contains({view}),
            seen: window.__lycorisSeen.length,
        }};
    }})()"""
    )
    assert state["points"] == STEPS, state
    assert state["status"] == "done: browser_run.safetensors", state
    assert len(state["thumbs"]) == 2 and all("/view?filename=" in s for s in state["thumbs"])
    if state["inDocument"]:  # drawn only while shown on the canvas
        assert state["inked"], f"the loss chart canvas is blank: {state}"
    print(f"\nlive view: {state['seen']} status updates, final {state}")
    assert not page.problems("lycoris"), page.problems("lycoris")


_SAVED = """(async (node) => {
    const entry = app.graph.serialize().nodes.find(n => n.id === node.id);
    const prompt = (await app.graphToPrompt()).output[String(node.id)];
    return {
        widgets: node.widgets.map(w => w.name),
        values: entry.widgets_values,
        promptInputs: prompt ? Object.keys(prompt.inputs) : null,
    };
})"""


def _check_saved(saved: dict) -> None:
    # One saved value per widget the frontend made for the declared inputs, none for our
    # view nor for the frontend's status-text widget (added by send_progress_text).
    widgets = [w for w in saved["widgets"] if w not in (WIDGET, TEXT_PREVIEW)]
    assert len(saved["values"]) == len(widgets), json.dumps(saved)
    assert None not in saved["values"], json.dumps(saved)
    assert WIDGET not in (saved["promptInputs"] or []), json.dumps(saved)


def test_dom_widget_stays_out_of_saved_workflows(page):
    saved = page.evaluate(
        f"""(async () => {{
        const node = LiteGraph.createNode("LycorisTrain");
        app.graph.add(node);
        return await {_SAVED}(node);
    }})()"""
    )
    assert saved["widgets"][-1] == WIDGET
    _check_saved(saved)


def test_saved_workflow_after_training_has_only_widget_values(page):
    if not page.evaluate("!!window.__lycorisNode"):
        pytest.skip("needs test_train_node_shows_live_training")
    saved = page.evaluate(f"{_SAVED}(window.__lycorisNode)")
    _check_saved(saved)


@pytest.mark.parametrize("value", [2.5e-5, 1e-6])
def test_learning_rate_widget_keeps_small_values(page, value):
    queued = page.evaluate(
        f"""(async () => {{
        const node = LiteGraph.createNode("LycorisTrain");
        app.graph.add(node);
        const widget = node.widgets.find(w => w.name === "learning_rate");
        widget.setValue({value!r}, {{node, canvas: app.canvas}});  // as typed into the widget
        const queued = (await app.graphToPrompt()).output[String(node.id)].inputs.learning_rate;
        app.graph.remove(node);
        return queued;
    }})()"""
    )
    assert queued == pytest.approx(value, rel=1e-9), f"typed {value}, queued {queued}"


UI_EXAMPLES = [p.stem for p in sorted((ROOT / "example_workflows").glob("*.json"))]


@pytest.mark.parametrize("name", UI_EXAMPLES)
def test_ui_example_loads_into_its_api_twin(page, name):
    ui = json.loads((ROOT / "example_workflows" / f"{name}.json").read_text())
    api = json.loads((ROOT / "example_workflows" / "api" / f"{name}.json").read_text())
    loaded = page.evaluate(
        f"""(async () => {{
        await app.loadGraphData({json.dumps(ui)});
        const nodes = app.graph.nodes ?? app.graph._nodes;
        const widgets = Object.fromEntries(nodes.map(n => [String(n.id),
            (n.widgets ?? []).filter(w => w.name !== {json.dumps(WIDGET)})
                             .map(w => [w.name, w.value])]));
        return {{output: (await app.graphToPrompt()).output, widgets}};
    }})()"""
    )
    problems = []
    for node in ui["nodes"]:
        values = node.get("widgets_values") or []
        made = loaded["widgets"][str(node["id"])]
        if len(values) != len(made):
            problems.append(
                f"node {node['id']} ({node['type']}): {len(values)} saved widget values for "
                f"{len(made)} widgets {[w for w, _ in made]} -> loaded as {made}"
            )
    output = {
        k: {"class_type": v["class_type"], "inputs": v["inputs"]}
        for k, v in loaded["output"].items()
    }
    for node_id, node in api.items():
        got = output.get(node_id)
        if got != node:
            problems.append(f"node {node_id}: API twin {node} but the UI file queues {got}")
    assert not problems, "\n".join(problems)
