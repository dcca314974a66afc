// ComfyUI frontend extension: a live view on every "LycorisTrain" node: a loss chart
// (raw loss light, smoothed loss dark), a status line and the latest validation thumbnails.
// It listens to the "lycoris.train" server events sent by the Train node. Browser only;
// the logic it uses lives in lycoris_chart.js (tested with Node).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import {
  chartGeometry,
  emptyRun,
  reduceRun,
  savedWidgetValues,
  statusLine,
  viewPath,
} from "./lycoris_chart.js";
import { TRAIN_EVENT, TRAIN_NODE } from "./lycoris_schema.js";

const WIDGET_NAME = "lycoris_live";
const TEXT_PREVIEW = "$$node-text-preview"; // the frontend's status-text widget
const CHART_HEIGHT = 140;
const CHART_PAD = { top: 8, right: 8, bottom: 16, left: 46 }; // left: room for y labels
const COLORS = { raw: "rgba(255, 170, 60, 0.35)", smooth: "rgb(255, 130, 0)", text: "#999" };

const runs = new Map(); // node id (string, as sent by the server) -> run state
const views = new WeakMap(); // node -> its view (DOM elements); gone with the node

/** The DOM of one node's view. */
function createView() {
  const root = document.createElement("div");
  root.className = "lycoris-train-view";
  root.style.cssText =
    "display:flex;flex-direction:column;gap:4px;width:100%;height:100%;box-sizing:border-box;" +
    "font:11px sans-serif;color:var(--input-text, #ddd);overflow:hidden;";

  const canvas = document.createElement("canvas");
  canvas.className = "lycoris-chart";
  canvas.style.cssText = `width:100%;height:${CHART_HEIGHT}px;flex:none;`;
  canvas.dataset.lycorisPoints = "0";

  const status = document.createElement("div");
  status.className = "lycoris-status";
  status.style.cssText = "white-space:nowrap;overflow:hidden;text-overflow:ellipsis;flex:none;";

  const thumbs = document.createElement("div");
  thumbs.className = "lycoris-thumbs";
  thumbs.style.cssText = "display:flex;gap:4px;overflow-x:auto;flex:none;min-height:0;";

  root.append(canvas, status, thumbs);
  const view = { root, canvas, status, thumbs, state: emptyRun(), thumbKey: "" };
  if (typeof ResizeObserver !== "undefined") {
    new ResizeObserver(() => drawChart(view)).observe(canvas);
  }
  return view;
}

/** Draw the loss chart of `view.state` at the canvas's current CSS size. */
function drawChart(view) {
  const { canvas, state } = view;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  if (!width || !height) return; // hidden (collapsed node, zoomed out): draw when shown
  const ratio = window.devicePixelRatio || 1;
  if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  const ctx = canvas.getContext("2d");
  if (!ctx) return;
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);

  const g = chartGeometry(state.points, width, height, CHART_PAD);
  ctx.font = "10px sans-serif";
  ctx.fillStyle = COLORS.text;
  ctx.strokeStyle = "rgba(128, 128, 128, 0.25)";
  ctx.lineWidth = 1;
  if (g.yMin === null) {
    ctx.textAlign = "center";
    ctx.textBaseline = "middle";
    ctx.fillText("no loss values yet", width / 2, height / 2);
    return;
  }

  // Three grid lines with their loss values: top (max), middle, bottom (min).
  const top = CHART_PAD.top;
  const bottom = height - CHART_PAD.bottom;
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (let i = 0; i <= 2; i++) {
    const y = top + ((bottom - top) * i) / 2;
    const value = g.yMax - ((g.yMax - g.yMin) * i) / 2;
    ctx.beginPath();
    ctx.moveTo(CHART_PAD.left, y);
    ctx.lineTo(width - CHART_PAD.right, y);
    ctx.stroke();
    ctx.fillText(formatAxis(value), CHART_PAD.left - 4, y);
  }
  const steps = state.points;
  if (steps.length) {
    ctx.textAlign = "right";
    ctx.textBaseline = "bottom";
    ctx.fillText(`step ${steps[0].step}–${steps[steps.length - 1].step}`, width - 2, height);
  }

  strokeSeries(ctx, g.raw, COLORS.raw, 1);
  strokeSeries(ctx, g.smooth, COLORS.smooth, 2);
}

function formatAxis(value) {
  const a = Math.abs(value);
  return a !== 0 && (a < 1e-3 || a >= 1e4) ? value.toExponential(1) : value.toPrecision(3);
}

function strokeSeries(ctx, series, color, lineWidth) {
  if (!series.length) return;
  ctx.strokeStyle = color;
  ctx.fillStyle = color;
  if (series.length === 1) {
    ctx.beginPath();
    ctx.arc(series[0][0], series[0][1], 2.5, 0, Math.PI * 2);
    ctx.fill();
    return;
  }
  ctx.lineWidth = lineWidth;
  ctx.lineJoin = "round";
  ctx.beginPath();
  series.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
  ctx.stroke();
}

function drawThumbs(view) {
  const { images } = view.state;
  const key = images.map((r) => `${r.type}/${r.subfolder}/${r.filename}`).join("|");
  if (key === view.thumbKey) return; // unchanged: keep the loaded <img>s
  view.thumbKey = key;
  view.thumbs.replaceChildren(
    ...images.map((ref) => {
      const url = api.apiURL(viewPath(ref));
      const img = document.createElement("img");
      img.src = url;
      img.alt = img.title = ref.step !== null ? `step ${ref.step}` : ref.filename;
      img.style.cssText = "height:64px;width:auto;flex:none;border-radius:3px;cursor:pointer;";
      img.addEventListener("click", () => window.open(url, "_blank"));
      return img;
    }),
  );
}

/** Show `state` in `view`. */
function render(view, state) {
  view.state = state;
  view.canvas.dataset.lycorisPoints = String(state.count);
  view.root.dataset.lycorisStatus = state.status;
  const text = statusLine(state);
  view.status.textContent = text;
  view.status.title = text;
  drawChart(view);
  drawThumbs(view);
}

/**
 * The graph node an event is about, or null. Ids are strings from the server: "5" for a
 * node of the root graph; "12:5" (subgraph path) for a node inside a subgraph, which we can
 * only find while that subgraph is the one open in the canvas.
 */
function findNode(id) {
  const root = app.graph;
  const open = app.canvas?.graph;
  const candidates = [[root, id]];
  if (open && open !== root) {
    candidates.push([open, id]);
    if (id.includes(":")) candidates.push([open, id.split(":").pop()]);
  }
  for (const [graph, key] of candidates) {
    const node = graph?.getNodeById?.(key) ?? graph?.getNodeById?.(Number(key));
    if (node && views.has(node)) return node;
  }
  return null;
}

/** Fold an event into the run of node `id` and redraw that node's view if it is shown. */
function update(id, event) {
  const state = reduceRun(runs.get(id), event);
  runs.set(id, state);
  const node = findNode(id);
  if (node) render(views.get(node), state);
}

function isTrainNode(node) {
  return node?.comfyClass === TRAIN_NODE || node?.constructor?.comfyClass === TRAIN_NODE;
}

app.registerExtension({
  name: "comfyui-lycoris.train",

  nodeCreated(node) {
    if (!isTrainNode(node) || typeof node.addDOMWidget !== "function") return;
    try {
      const view = createView();
      const widget = node.addDOMWidget(WIDGET_NAME, "lycoris-live", view.root, {
        serialize: false, // not an input: keep it out of the prompt
        getMinHeight: () => CHART_HEIGHT + 90,
      });
      if (widget) widget.serialize = false; // and out of the saved widgets_values
      // ...without leaving a hole there, nor saving the status text (see savedWidgetValues)
      const previous = node.onSerialize;
      node.onSerialize = function (data) {
        previous?.apply(this, arguments);
        if (Array.isArray(data?.widgets_values)) {
          data.widgets_values = savedWidgetValues(this.widgets, data.widgets_values, [
            WIDGET_NAME,
            TEXT_PREVIEW,
          ]);
        }
      };
      views.set(node, view);
      render(view, emptyRun());
      // The node gets its id when it is added to a graph, after this hook: show the run
      // already known for that id (a workflow tab re-opened during training).
      setTimeout(() => {
        const state = node.id != null ? runs.get(String(node.id)) : undefined;
        if (state) render(view, state);
      }, 0);
    } catch (error) {
      console.warn("[comfyui-lycoris] could not add the training view", error);
    }
  },

  setup() {
    api.addEventListener(TRAIN_EVENT, (e) => {
      try {
        const detail = e?.detail;
        if (detail && detail.node != null) update(String(detail.node), detail);
      } catch (error) {
        console.warn("[comfyui-lycoris] bad training event", e?.detail, error);
      }
    });
    // A training that fails (NaN abort, out of memory) sends no end event of its own.
    api.addEventListener("execution_error", (e) => {
      try {
        const id = e?.detail?.node_id;
        if (id == null || runs.get(String(id))?.status !== "running") return;
        const message = String(e.detail.exception_message ?? "").split("\n")[0];
        update(String(id), { status: "error", message });
      } catch (error) {
        console.warn("[comfyui-lycoris] bad execution_error event", error);
      }
    });
  },
});
