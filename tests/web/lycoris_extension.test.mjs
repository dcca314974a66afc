// Smoke tests of the browser extension web/lycoris.js against a fake ComfyUI and a minimal
// fake DOM (no browser, no dependencies). They check our own wiring: the hooks, the widget
// options, the event handling and the guards. Whether the real ComfyUI frontend behaves like
// the fakes is for the e2e test in a real browser.
//
// The extension imports "../../scripts/app.js" as ComfyUI serves it; we copy web/ into
// <tmp>/extensions/comfyui-lycoris/ next to fake <tmp>/scripts/{app,api}.js so those relative
// imports resolve as they do in the browser.
import assert from "node:assert/strict";
import { copyFileSync, mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { after, before, beforeEach, describe, test } from "node:test";
import { fileURLToPath, pathToFileURL } from "node:url";

const WEB = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "web");

// ---- fake DOM: only what lycoris.js touches ------------------------------------------
class FakeContext {
  constructor() {
    this.calls = [];
    return new Proxy(this, {
      get: (target, prop) =>
        prop in target ? target[prop] : (...args) => target.calls.push([prop, ...args]),
      set: () => true, // fillStyle, font, ... are ignored
    });
  }
}

class FakeElement {
  constructor(tag) {
    this.tagName = tag.toUpperCase();
    this.style = {};
    this.dataset = {};
    this.children = [];
    this.listeners = {};
    this.className = "";
    this.textContent = "";
    this.title = "";
    this.clientWidth = 300;
    this.clientHeight = 140;
    this.ctx = tag === "canvas" ? new FakeContext() : null;
  }
  append(...nodes) {
    this.children.push(...nodes);
  }
  replaceChildren(...nodes) {
    this.children = nodes;
  }
  addEventListener(type, fn) {
    this.listeners[type] = fn;
  }
  getContext() {
    return this.ctx;
  }
}

// ---- fake ComfyUI --------------------------------------------------------------------
class FakeApi {
  constructor() {
    this.listeners = {};
  }
  addEventListener(type, fn) {
    (this.listeners[type] ??= []).push(fn);
  }
  apiURL(route) {
    return `/api${route}`;
  }
  emit(type, detail) {
    for (const fn of this.listeners[type] ?? []) fn({ type, detail });
  }
}

class FakeGraph {
  constructor() {
    this.nodes = {};
  }
  add(node, id) {
    node.id = id;
    this.nodes[id] = node;
  }
  getNodeById(id) {
    return this.nodes[id] ?? null;
  }
}

function fakeNode(comfyClass) {
  return {
    comfyClass,
    id: -1,
    widgets: [],
    addDOMWidget(name, type, element, options) {
      const widget = { name, type, element, options };
      this.widgets.push(widget);
      return widget;
    },
  };
}

const fake = { extensions: [], api: new FakeApi(), app: null };
fake.app = {
  graph: new FakeGraph(),
  canvas: null,
  registerExtension(ext) {
    fake.extensions.push(ext);
  },
};

let root;
let ext;
const warnings = [];
const realWarn = console.warn;

before(async () => {
  globalThis.document = { createElement: (tag) => new FakeElement(tag) };
  globalThis.window = { devicePixelRatio: 1, open() {} };
  globalThis.__lycorisFake = fake;
  console.warn = (...args) => warnings.push(args);

  root = mkdtempSync(join(tmpdir(), "lycoris-web-"));
  const pack = join(root, "extensions", "comfyui-lycoris");
  mkdirSync(pack, { recursive: true });
  mkdirSync(join(root, "scripts"));
  for (const name of readdirSync(WEB)) {
    if (name.endsWith(".js") || name === "package.json") copyFileSync(join(WEB, name), join(pack, name));
  }
  writeFileSync(join(root, "package.json"), '{"type": "module"}');
  writeFileSync(join(root, "scripts", "app.js"), "export const app = globalThis.__lycorisFake.app;");
  writeFileSync(join(root, "scripts", "api.js"), "export const api = globalThis.__lycorisFake.api;");

  await import(pathToFileURL(join(pack, "lycoris.js")).href);
  assert.equal(fake.extensions.length, 1);
  ext = fake.extensions[0];
  ext.setup();
});

after(() => {
  console.warn = realWarn;
  if (root) rmSync(root, { recursive: true, force: true });
});

beforeEach(() => {
  fake.app.graph = new FakeGraph();
  fake.app.canvas = { graph: fake.app.graph };
  warnings.length = 0;
});

/** A Train node created by the frontend and then added to the graph under `id`. */
function addTrainNode(id) {
  const node = fakeNode("LycorisTrain");
  ext.nodeCreated(node);
  fake.app.graph.add(node, id);
  const widget = node.widgets[0];
  const [canvas, status, thumbs] = widget.element.children;
  return { node, widget, canvas, status, thumbs };
}

const tick = () => new Promise((resolve) => setTimeout(resolve, 5));

function step(node, n, extra = {}) {
  fake.api.emit("lycoris.train", {
    node,
    step: n,
    total: 10,
    loss: 1 / n,
    smoothed_loss: 1 / n,
    lr: 1e-4,
    it_per_s: 2,
    eta: 5,
    ...extra,
  });
}

describe("lycoris.js with a fake ComfyUI", () => {
  test("registers one extension with the nodeCreated and setup hooks", () => {
    assert.equal(ext.name, "comfyui-lycoris.train");
    assert.equal(typeof ext.nodeCreated, "function");
    assert.equal(typeof ext.setup, "function");
    assert.ok(fake.api.listeners["lycoris.train"]?.length === 1);
  });

  test("other node classes get no widget", () => {
    const node = fakeNode("KSampler");
    ext.nodeCreated(node);
    assert.equal(node.widgets.length, 0);
    ext.nodeCreated({ comfyClass: "LycorisTrain" }); // no addDOMWidget: ignored, no throw
    assert.equal(warnings.length, 0);
  });

  test("the Train node gets one DOM widget kept out of the prompt and the saved values", () => {
    const { node, widget, canvas, status, thumbs } = addTrainNode(3);
    assert.equal(node.widgets.length, 1);
    assert.equal(widget.options.serialize, false);
    assert.equal(widget.serialize, false);
    assert.ok(widget.options.getMinHeight() > 140);
    assert.equal(canvas.tagName, "CANVAS");
    assert.equal(canvas.dataset.lycorisPoints, "0");
    assert.equal(status.textContent, "waiting for training...");
    assert.equal(thumbs.children.length, 0);
  });

  test("step, validation and done events update that node's view", () => {
    const { canvas, status, thumbs, widget } = addTrainNode(4);
    const other = addTrainNode(5);
    step("4", 1);
    step("4", 2);
    assert.equal(canvas.dataset.lycorisPoints, "2");
    assert.match(status.textContent, /^step 2\/10 · loss 0\.5000/);
    assert.equal(widget.element.dataset.lycorisStatus, "running");
    const strokes = canvas.ctx.calls.filter(([name]) => name === "stroke").length;
    assert.ok(strokes >= 5, `grid lines and both series are stroked (${strokes})`);
    assert.equal(other.canvas.dataset.lycorisPoints, "0"); // another node's view untouched

    fake.api.emit("lycoris.train", {
      node: "4",
      step: 2,
      validation: [{ filename: "v 1.png", subfolder: "lycoris", type: "temp" }],
    });
    assert.equal(thumbs.children.length, 1);
    assert.equal(thumbs.children[0].tagName, "IMG");
    assert.equal(thumbs.children[0].src, "/api/view?filename=v+1.png&subfolder=lycoris&type=temp");

    fake.api.emit("lycoris.train", { node: "4", status: "done", adapter_path: "/l/a.safetensors" });
    assert.equal(status.textContent, "done: a.safetensors");
    assert.equal(canvas.dataset.lycorisPoints, "2");
    assert.equal(warnings.length, 0);
  });

  test("events for missing nodes, no graph, or junk do not throw", () => {
    step("99", 1); // no such node
    fake.app.graph = null; // graph not loaded / switched away
    fake.app.canvas = null;
    step("99", 2);
    step("12:7", 1); // a node inside a subgraph that is not open
    fake.api.emit("lycoris.train", null);
    fake.api.emit("lycoris.train", { step: 1 }); // no node id
    fake.api.emit("execution_error", null);
    fake.api.emit("execution_error", { node_id: "42", exception_message: "x" });
    assert.equal(warnings.length, 0);
  });

  test("a node created later shows the run already received for its id", async () => {
    step("21", 1);
    step("21", 2);
    step("21", 3);
    const { canvas, status } = addTrainNode(21);
    assert.equal(canvas.dataset.lycorisPoints, "0"); // the id is only known after the hook
    await tick();
    assert.equal(canvas.dataset.lycorisPoints, "3");
    assert.match(status.textContent, /^step 3\/10/);
  });

  test("a node inside the open subgraph is found by the last part of its path id", () => {
    const sub = new FakeGraph();
    const node = fakeNode("LycorisTrain");
    ext.nodeCreated(node);
    sub.add(node, 7);
    fake.app.canvas = { graph: sub };
    step("12:7", 1);
    assert.equal(node.widgets[0].element.children[0].dataset.lycorisPoints, "1");
  });

  test("an execution error during a run shows its first line", () => {
    const { status } = addTrainNode(8);
    step("8", 1);
    fake.api.emit("execution_error", {
      node_id: "8",
      exception_message: "loss is NaN at step 2\nmore detail",
    });
    assert.equal(status.textContent, "error: loss is NaN at step 2");
  });

  test("a view that is not laid out (0 size) is not drawn, and no error", () => {
    const { canvas } = addTrainNode(9);
    canvas.clientWidth = 0;
    canvas.ctx.calls.length = 0;
    step("9", 1);
    assert.equal(canvas.ctx.calls.length, 0);
    assert.equal(canvas.dataset.lycorisPoints, "1");
  });
});
