// Pure logic of the Train node's live view: run state, status text, chart geometry.
// No DOM and no ComfyUI imports, so Node's test runner covers it (tests/web/).
// ComfyUI also imports this file as an extension module; it only defines exports.
import { EVENT_KEYS, STATUS } from "./lycoris_schema.js";

/** Most points drawn per series; longer runs are thinned (first and last kept). */
export const MAX_DRAWN = 600;
/** Most validation thumbnails kept per run (latest first). */
export const MAX_IMAGES = 8;
/** Most points stored per run; beyond it the stored series is thinned to half. */
export const MAX_STORED = 10000;

/** The state of one node's run before any event arrived. */
export function emptyRun() {
  return {
    status: "idle", // idle | running | done | cancelled | error
    points: [], // [{step, loss, smoothed}], NaN where a value was missing
    count: 0, // step events received in this run (points may be thinned)
    step: null,
    total: null,
    loss: null,
    smoothed: null,
    lr: null,
    itPerS: null,
    eta: null,
    images: [], // [{filename, subfolder, type, step}], latest first
    adapterPath: null,
    checkpoint: null,
    message: null,
  };
}

const FINISHED = new Set([STATUS.done, STATUS.cancelled, "error"]);

function num(value) {
  return typeof value === "number" ? value : Number.NaN;
}

function finite(value) {
  return typeof value === "number" && Number.isFinite(value);
}

/**
 * Fold one `lycoris.train` event (or an `{status: "error", message}` from the host's
 * execution_error) into a run state. Returns a new state; never mutates `state`.
 * A step event starts a new run when its step is not after the last one seen, or when
 * the previous run had finished (done / cancelled / error).
 */
export function reduceRun(state, event) {
  const prev = state ?? emptyRun();
  if (!event || typeof event !== "object") return prev;

  const status = event[EVENT_KEYS.status];
  if (typeof status === "string" && status) {
    const path = event[EVENT_KEYS.adapterPath];
    return {
      ...prev,
      status,
      adapterPath: typeof path === "string" ? path : prev.adapterPath,
      checkpoint: status === STATUS.cancelled ? (event[EVENT_KEYS.checkpoint] ?? null) : prev.checkpoint,
      message: typeof event.message === "string" ? event.message : prev.message,
    };
  }

  const validation = event[EVENT_KEYS.validation];
  if (Array.isArray(validation)) {
    const step = finite(event.step) ? event.step : prev.step;
    const refs = validation
      .filter((r) => r && typeof r.filename === "string" && r.filename)
      .map((r) => ({
        filename: r.filename,
        subfolder: typeof r.subfolder === "string" ? r.subfolder : "",
        type: typeof r.type === "string" ? r.type : "output",
        step,
      }));
    // One event's images keep their order (one per prompt); newer events go first.
    return { ...prev, images: [...refs, ...prev.images].slice(0, MAX_IMAGES) };
  }

  if (finite(event.step)) {
    const restarted =
      FINISHED.has(prev.status) || (prev.step !== null && event.step <= prev.step);
    const base = restarted ? emptyRun() : prev;
    let points = [
      ...base.points,
      { step: event.step, loss: num(event.loss), smoothed: num(event.smoothed_loss) },
    ];
    if (points.length > MAX_STORED) points = downsample(points, MAX_STORED / 2);
    return {
      ...base,
      status: "running",
      points,
      count: base.count + 1,
      step: event.step,
      total: finite(event.total) ? event.total : base.total,
      loss: num(event.loss),
      smoothed: num(event.smoothed_loss),
      lr: finite(event.lr) ? event.lr : null,
      itPerS: finite(event.it_per_s) ? event.it_per_s : null,
      eta: finite(event.eta) ? event.eta : null,
    };
  }
  return prev;
}

/** "0s", "59s", "1m 01s", "1h 00m": whole seconds; "?" when unknown. */
export function formatEta(seconds) {
  if (!finite(seconds) || seconds < 0) return "?";
  const s = Math.round(seconds);
  if (s < 60) return `${s}s`;
  const pad = (n) => String(n).padStart(2, "0");
  if (s < 3600) return `${Math.floor(s / 60)}m ${pad(s % 60)}s`;
  return `${Math.floor(s / 3600)}h ${pad(Math.floor((s % 3600) / 60))}m`;
}

/** A loss value for display: 4 decimals, or exponent form for tiny/huge values. */
export function formatLoss(value) {
  if (!finite(value)) return "nan";
  const a = Math.abs(value);
  return a !== 0 && (a < 1e-3 || a >= 1e5) ? value.toExponential(2) : value.toFixed(4);
}

function baseName(path) {
  const parts = String(path).split(/[\\/]/).filter(Boolean);
  return parts.length ? parts[parts.length - 1] : String(path);
}

/** The one-line summary shown under the chart. */
export function statusLine(state) {
  const s = state ?? emptyRun();
  if (s.status === "done") return s.adapterPath ? `done: ${baseName(s.adapterPath)}` : "done";
  if (s.status === "cancelled") {
    return s.checkpoint
      ? `cancelled: checkpoint at ${s.checkpoint}`
      : "cancelled: no checkpoint saved";
  }
  if (s.status === "error") return s.message ? `error: ${s.message}` : "error";
  if (s.step === null) return "waiting for training...";
  const parts = [s.total !== null ? `step ${s.step}/${s.total}` : `step ${s.step}`];
  parts.push(`loss ${formatLoss(finite(s.smoothed) ? s.smoothed : s.loss)}`);
  if (s.lr !== null) parts.push(`lr ${s.lr.toExponential(1)}`);
  if (s.itPerS !== null) parts.push(`${s.itPerS.toFixed(2)} it/s`);
  if (s.eta !== null) parts.push(`eta ${formatEta(s.eta)}`);
  return parts.join(" · ");
}

/** The `/view` path of a saved image (wrap it with `api.apiURL` in the browser). */
export function viewPath(ref) {
  const q = new URLSearchParams({
    filename: ref.filename,
    subfolder: ref.subfolder ?? "",
    type: ref.type ?? "output",
  });
  return `/view?${q}`;
}

/**
 * At most `max` items of `items`, evenly spaced by index, always keeping the first and
 * the last. Returns a new array.
 */
export function downsample(items, max = MAX_DRAWN) {
  const n = items.length;
  const m = Math.max(2, Math.floor(max));
  if (n <= m) return items.slice();
  const out = [];
  for (let i = 0; i < m; i++) out.push(items[Math.round((i * (n - 1)) / (m - 1))]);
  return out;
}

function padding(pad) {
  if (typeof pad === "number") return { top: pad, right: pad, bottom: pad, left: pad };
  return { top: 0, right: 0, bottom: 0, left: 0, ...(pad ?? {}) };
}

/**
 * Canvas coordinates of the raw and smoothed loss series inside a `width` x `height` box
 * less `pad` (a number, or {top, right, bottom, left}). x follows the step, y the loss
 * (larger loss is higher up, i.e. a smaller y). Non-finite values are skipped; each series is
 * thinned to `maxPoints`. Equal values sit on the middle line; a single step sits in the middle.
 * Returns {raw: [[x, y]...], smooth: [[x, y]...], yMin, yMax}; yMin/yMax are null without data.
 */
export function chartGeometry(points, width, height, pad = 0, maxPoints = MAX_DRAWN) {
  const p = padding(pad);
  const pick = (key) =>
    downsample(
      (points ?? []).filter((pt) => pt && finite(pt.step) && finite(pt[key])),
      maxPoints,
    ).map((pt) => [pt.step, pt[key]]);
  const raw = pick("loss");
  const smooth = pick("smoothed");
  const all = [...raw, ...smooth];
  if (all.length === 0) return { raw: [], smooth: [], yMin: null, yMax: null };

  let [xMin, xMax, yMin, yMax] = [Infinity, -Infinity, Infinity, -Infinity];
  for (const [x, y] of all) {
    xMin = Math.min(xMin, x);
    xMax = Math.max(xMax, x);
    yMin = Math.min(yMin, y);
    yMax = Math.max(yMax, y);
  }
  const w = Math.max(0, width - p.left - p.right);
  const h = Math.max(0, height - p.top - p.bottom);
  const sx = (x) => (xMax > xMin ? p.left + ((x - xMin) / (xMax - xMin)) * w : p.left + w / 2);
  const sy = (y) => (yMax > yMin ? p.top + ((yMax - y) / (yMax - yMin)) * h : p.top + h / 2);
  const scale = (series) => series.map(([x, y]) => [sx(x), sy(y)]);
  return { raw: scale(raw), smooth: scale(smooth), yMin, yMax };
}

/**
 * The widget values to save for a node: one per widget the node's inputs made, in order.
 * LiteGraph writes `widgets_values` by widget index and skips widgets whose `serialize` is
 * false, so a saved widget after a skipped one leaves a hole (null); and the frontend's
 * status-text widget ("$$node-text-preview") only sets `options.serialize`, so its text is
 * saved too (name it in `skip`). Both shift the values when the workflow is loaded again.
 */
export function savedWidgetValues(widgets, values, skip = []) {
  const out = [];
  (widgets ?? []).forEach((widget, i) => {
    // as LiteGraph: `serialize === false` stays out; `options.serialize` only keeps a widget
    // out of the prompt (a seed's "control after generate" is saved), so name the others
    if (!widget || widget.serialize === false) return;
    if (skip.includes(widget.name)) return;
    out.push(values?.[i] ?? null);
  });
  return out;
}
