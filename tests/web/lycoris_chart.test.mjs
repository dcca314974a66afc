// Unit tests of web/lycoris_chart.js (the pure logic of the Train node's live view).
// Run: node --test tests/web/   (Node >= 18; no dependencies)
import assert from "node:assert/strict";
import { describe, test } from "node:test";

import {
  MAX_DRAWN,
  MAX_IMAGES,
  MAX_STORED,
  chartGeometry,
  downsample,
  emptyRun,
  formatEta,
  formatLoss,
  reduceRun,
  savedWidgetValues,
  statusLine,
  viewPath,
} from "../../web/lycoris_chart.js";

const NODE = "7";

function stepEvent(step, extra = {}) {
  return {
    node: NODE,
    step,
    total: 100,
    loss: 1 / step,
    smoothed_loss: 2 / step,
    lr: 1e-4,
    it_per_s: 2.5,
    eta: 40,
    ...extra,
  };
}

function run(...events) {
  return events.reduce(reduceRun, emptyRun());
}

function image(name) {
  return { filename: name, subfolder: "lycoris", type: "temp" };
}

describe("reduceRun", () => {
  test("starts idle and empty", () => {
    const s = emptyRun();
    assert.equal(s.status, "idle");
    assert.deepEqual(s.points, []);
    assert.equal(s.count, 0);
    assert.equal(s.step, null);
  });

  test("steps accumulate points and the latest figures", () => {
    const s = run(stepEvent(1), stepEvent(2), stepEvent(3, { it_per_s: 3.25, eta: 12 }));
    assert.equal(s.status, "running");
    assert.equal(s.count, 3);
    assert.deepEqual(
      s.points.map((p) => p.step),
      [1, 2, 3],
    );
    assert.deepEqual(s.points[1], { step: 2, loss: 0.5, smoothed: 1 });
    assert.equal(s.step, 3);
    assert.equal(s.total, 100);
    assert.equal(s.lr, 1e-4);
    assert.equal(s.itPerS, 3.25);
    assert.equal(s.eta, 12);
  });

  test("does not mutate the state it is given", () => {
    const a = run(stepEvent(1));
    const frozen = JSON.stringify(a);
    const b = reduceRun(a, stepEvent(2));
    assert.equal(JSON.stringify(a), frozen);
    assert.notEqual(a, b);
    assert.notEqual(a.points, b.points);
  });

  test("a step not after the last one starts a new run", () => {
    let s = run(stepEvent(1), stepEvent(2), stepEvent(3), {
      node: NODE,
      step: 3,
      validation: [image("a.png")],
    });
    s = reduceRun(s, stepEvent(1, { total: 50 }));
    assert.equal(s.count, 1);
    assert.deepEqual(
      s.points.map((p) => p.step),
      [1],
    );
    assert.equal(s.total, 50);
    assert.deepEqual(s.images, []);
    // The same step again is also a restart (a one-step run queued twice).
    s = reduceRun(s, stepEvent(1));
    assert.equal(s.count, 1);
  });

  test("a step after a finished run starts a new run (resume after Cancel)", () => {
    let s = run(stepEvent(1), stepEvent(2), {
      node: NODE,
      status: "cancelled",
      checkpoint: "/out/ckpt-2",
    });
    s = reduceRun(s, stepEvent(3));
    assert.equal(s.status, "running");
    assert.equal(s.count, 1);
    assert.equal(s.points[0].step, 3);
    assert.equal(s.checkpoint, null);
  });

  test("missing or non-numeric losses become NaN points; bad figures become null", () => {
    const s = run({ node: NODE, step: 1, loss: null, lr: "x", it_per_s: null });
    assert.equal(s.count, 1);
    assert.ok(Number.isNaN(s.points[0].loss));
    assert.ok(Number.isNaN(s.points[0].smoothed));
    assert.equal(s.total, null);
    assert.equal(s.lr, null);
    assert.equal(s.itPerS, null);
    assert.equal(s.eta, null);
  });

  test("validation refs: latest first, capped, defaults filled", () => {
    let s = run(stepEvent(1));
    s = reduceRun(s, { node: NODE, step: 10, validation: [image("s10a.png"), image("s10b.png")] });
    s = reduceRun(s, { node: NODE, step: 20, validation: [image("s20.png")] });
    assert.deepEqual(
      s.images.map((r) => r.filename),
      ["s20.png", "s10a.png", "s10b.png"],
    );
    assert.deepEqual(s.images[0], {
      filename: "s20.png",
      subfolder: "lycoris",
      type: "temp",
      step: 20,
    });
    for (let i = 0; i < MAX_IMAGES + 5; i++) {
      s = reduceRun(s, { node: NODE, step: 30 + i, validation: [image(`n${i}.png`)] });
    }
    assert.equal(s.images.length, MAX_IMAGES);
    assert.equal(s.images[0].filename, `n${MAX_IMAGES + 4}.png`);
    const bare = reduceRun(emptyRun(), { node: NODE, validation: [{ filename: "x.png" }, {}, null] });
    assert.deepEqual(bare.images, [{ filename: "x.png", subfolder: "", type: "output", step: null }]);
  });

  test("validation events do not add points", () => {
    const s = run(stepEvent(1), { node: NODE, step: 1, validation: [image("a.png")] });
    assert.equal(s.count, 1);
    assert.equal(s.points.length, 1);
  });

  test("done and cancelled end the run and keep the curve", () => {
    const done = run(stepEvent(1), stepEvent(2), {
      node: NODE,
      status: "done",
      adapter_path: "/models/loras/my_lokr.safetensors",
    });
    assert.equal(done.status, "done");
    assert.equal(done.adapterPath, "/models/loras/my_lokr.safetensors");
    assert.equal(done.count, 2);
    const cancelled = run(stepEvent(1), { node: NODE, status: "cancelled", checkpoint: null });
    assert.equal(cancelled.status, "cancelled");
    assert.equal(cancelled.checkpoint, null);
    assert.equal(cancelled.points.length, 1);
  });

  test("junk events leave the state alone", () => {
    const s = run(stepEvent(1));
    for (const junk of [null, undefined, 42, "x", {}, { node: NODE }, { step: "3" }]) {
      assert.equal(reduceRun(s, junk), s);
    }
    assert.deepEqual(reduceRun(undefined, null), emptyRun());
  });

  test("very long runs keep a bounded, thinned series but count every step", () => {
    let s = emptyRun();
    const n = MAX_STORED + 10;
    for (let i = 1; i <= n; i++) s = reduceRun(s, stepEvent(i));
    assert.equal(s.count, n);
    assert.ok(s.points.length <= MAX_STORED);
    assert.equal(s.points[0].step, 1);
    assert.equal(s.points[s.points.length - 1].step, n);
  });
});

describe("statusLine", () => {
  test("waiting before any step", () => {
    assert.equal(statusLine(emptyRun()), "waiting for training...");
    assert.equal(statusLine(undefined), "waiting for training...");
  });

  test("running: step, smoothed loss, lr, speed, eta", () => {
    const s = run(stepEvent(120, { total: 1000, smoothed_loss: 0.12341, it_per_s: 2.314, eta: 381 }));
    assert.equal(statusLine(s), "step 120/1000 · loss 0.1234 · lr 1.0e-4 · 2.31 it/s · eta 6m 21s");
  });

  test("running with missing figures leaves them out; raw loss when no smoothed", () => {
    const s = run({ node: NODE, step: 3, loss: 0.5 });
    assert.equal(statusLine(s), "step 3 · loss 0.5000");
  });

  test("done shows the file name", () => {
    const s = run(stepEvent(1), {
      node: NODE,
      status: "done",
      adapter_path: "/x/models/loras/style_lokr.safetensors",
    });
    assert.equal(statusLine(s), "done: style_lokr.safetensors");
    const win = run({ node: NODE, status: "done", adapter_path: "C:\\loras\\a.safetensors" });
    assert.equal(statusLine(win), "done: a.safetensors");
    assert.equal(statusLine(run({ node: NODE, status: "done" })), "done");
  });

  test("cancelled shows the checkpoint path, or says none was saved", () => {
    const s = run(stepEvent(1), { node: NODE, status: "cancelled", checkpoint: "/out/ckpt/step-13" });
    assert.equal(statusLine(s), "cancelled: checkpoint at /out/ckpt/step-13");
    const none = run(stepEvent(1), { node: NODE, status: "cancelled", checkpoint: null });
    assert.equal(statusLine(none), "cancelled: no checkpoint saved");
  });

  test("error shows the message", () => {
    const s = run(stepEvent(1), { status: "error", message: "loss is NaN at step 2" });
    assert.equal(statusLine(s), "error: loss is NaN at step 2");
  });
});

describe("formatEta and formatLoss", () => {
  test("formatEta", () => {
    assert.equal(formatEta(0), "0s");
    assert.equal(formatEta(59), "59s");
    assert.equal(formatEta(59.6), "1m 00s");
    assert.equal(formatEta(61), "1m 01s");
    assert.equal(formatEta(381), "6m 21s");
    assert.equal(formatEta(3599), "59m 59s");
    assert.equal(formatEta(3600), "1h 00m");
    assert.equal(formatEta(3661), "1h 01m");
    assert.equal(formatEta(90000), "25h 00m");
    for (const bad of [-1, NaN, Infinity, null, undefined, "5"]) assert.equal(formatEta(bad), "?");
  });

  test("formatLoss", () => {
    assert.equal(formatLoss(0.12345), "0.1235");
    assert.equal(formatLoss(0), "0.0000");
    assert.equal(formatLoss(0.00012), "1.20e-4");
    assert.equal(formatLoss(123456), "1.23e+5");
    assert.equal(formatLoss(NaN), "nan");
  });
});

test("viewPath encodes the image reference", () => {
  assert.equal(
    viewPath({ filename: "a b&c.png", subfolder: "lycoris/x", type: "temp" }),
    "/view?filename=a+b%26c.png&subfolder=lycoris%2Fx&type=temp",
  );
  assert.equal(viewPath({ filename: "a.png" }), "/view?filename=a.png&subfolder=&type=output");
});

describe("downsample", () => {
  const items = Array.from({ length: 1000 }, (_, i) => i);

  test("short series are copied unchanged", () => {
    const few = [1, 2, 3];
    const out = downsample(few, 10);
    assert.deepEqual(out, few);
    assert.notEqual(out, few);
    assert.deepEqual(downsample([], 10), []);
  });

  test("long series: at most max items, first and last kept, order kept, no repeats", () => {
    for (const max of [2, 3, 7, 600, 999]) {
      const out = downsample(items, max);
      assert.equal(out.length, max);
      assert.equal(out[0], 0);
      assert.equal(out[out.length - 1], 999);
      for (let i = 1; i < out.length; i++) assert.ok(out[i] > out[i - 1]);
    }
    assert.equal(downsample(items).length, MAX_DRAWN);
  });
});

describe("chartGeometry", () => {
  const pts = (values) => values.map((v, i) => ({ step: i + 1, loss: v, smoothed: v / 2 }));

  function inBox([x, y], w, h, pad) {
    return x >= pad - 1e-9 && x <= w - pad + 1e-9 && y >= pad - 1e-9 && y <= h - pad + 1e-9;
  }

  test("no points: empty series and null bounds", () => {
    for (const empty of [[], undefined, null]) {
      assert.deepEqual(chartGeometry(empty, 300, 100, 10), {
        raw: [],
        smooth: [],
        yMin: null,
        yMax: null,
      });
    }
  });

  test("scales into the padded box: larger loss higher, first step left, last right", () => {
    const g = chartGeometry(pts([4, 2, 1, 3]), 300, 100, 10);
    assert.equal(g.yMin, 0.5);
    assert.equal(g.yMax, 4);
    assert.equal(g.raw.length, 4);
    assert.equal(g.smooth.length, 4);
    for (const p of [...g.raw, ...g.smooth]) assert.ok(inBox(p, 300, 100, 10), String(p));
    assert.deepEqual(g.raw[0], [10, 10]); // step 1, max loss: top left
    assert.equal(g.raw[3][0], 290); // last step: right edge
    assert.equal(g.smooth[2][1], 90); // smoothed 0.5 is the minimum: bottom
    assert.ok(g.raw[1][1] > g.raw[0][1]); // loss 2 sits below loss 4
  });

  test("padding per side", () => {
    const g = chartGeometry(pts([2, 1]), 200, 100, { top: 5, right: 10, bottom: 15, left: 40 });
    assert.deepEqual(g.raw[0], [40, 5]);
    assert.deepEqual(g.smooth[1], [190, 85]);
  });

  test("x follows the step value, not the index", () => {
    const g = chartGeometry(
      [
        { step: 1, loss: 1, smoothed: 1 },
        { step: 2, loss: 2, smoothed: 2 },
        { step: 11, loss: 3, smoothed: 3 },
      ],
      110,
      50,
      5,
    );
    assert.deepEqual(
      g.raw.map(([x]) => x),
      [5, 15, 105],
    );
  });

  test("a single point sits in the middle", () => {
    const g = chartGeometry([{ step: 5, loss: 0.3, smoothed: 0.3 }], 200, 100, 10);
    assert.deepEqual(g.raw, [[100, 50]]);
    assert.deepEqual(g.smooth, [[100, 50]]);
    assert.equal(g.yMin, 0.3);
    assert.equal(g.yMax, 0.3);
  });

  test("equal values draw a flat line in the middle", () => {
    const g = chartGeometry(
      [1, 2, 3].map((step) => ({ step, loss: 0.25, smoothed: 0.25 })),
      200,
      100,
      10,
    );
    for (const [, y] of [...g.raw, ...g.smooth]) assert.equal(y, 50);
    assert.deepEqual(
      g.raw.map(([x]) => x),
      [10, 100, 190],
    );
  });

  test("NaN, Infinity and missing values are skipped per series", () => {
    const g = chartGeometry(
      [
        { step: 1, loss: 1, smoothed: NaN },
        { step: 2, loss: NaN, smoothed: 0.5 },
        { step: 3, loss: Infinity, smoothed: -Infinity },
        { step: 4, loss: 3, smoothed: 1 },
        { step: NaN, loss: 2, smoothed: 2 },
        null,
      ],
      100,
      100,
      0,
    );
    assert.equal(g.raw.length, 2);
    assert.equal(g.smooth.length, 2);
    assert.equal(g.yMin, 0.5);
    assert.equal(g.yMax, 3);
    for (const [x, y] of [...g.raw, ...g.smooth]) {
      assert.ok(Number.isFinite(x) && Number.isFinite(y));
    }
  });

  test("only non-finite values: like no points", () => {
    const g = chartGeometry([{ step: 1, loss: NaN, smoothed: Infinity }], 100, 100, 0);
    assert.deepEqual(g, { raw: [], smooth: [], yMin: null, yMax: null });
  });

  test("long runs are thinned to maxPoints per series, keeping first and last", () => {
    const many = Array.from({ length: 5000 }, (_, i) => ({
      step: i + 1,
      loss: Math.sin(i) + 2,
      smoothed: 2,
    }));
    const g = chartGeometry(many, 400, 200, 10);
    assert.equal(g.raw.length, MAX_DRAWN);
    assert.equal(g.smooth.length, MAX_DRAWN);
    assert.equal(g.raw[0][0], 10);
    assert.equal(g.raw[g.raw.length - 1][0], 390);
    for (const p of [...g.raw, ...g.smooth]) assert.ok(inBox(p, 400, 200, 10));
    assert.equal(chartGeometry(many, 400, 200, 10, 50).smooth.length, 50);
  });
});

describe("savedWidgetValues", () => {
  const steps = { name: "steps", value: 100 };
  const seed = { name: "seed", value: 3 };
  const live = { name: "lycoris_live", serialize: false };
  const preview = { name: "$$node-text-preview", options: { serialize: false }, value: "step 5" };

  test("drops the hole LiteGraph leaves at a skipped widget and the status text", () => {
    // as LiteGraph wrote it: index 2 skipped (a hole), the preview's text saved at 3
    const written = [100, 3, undefined, "step 5"];
    const skip = ["lycoris_live", "$$node-text-preview"];
    assert.deepEqual(savedWidgetValues([steps, seed, live, preview], written, skip), [100, 3]);
  });

  test("keeps widgets kept out of the prompt only (a seed's control after generate)", () => {
    const control = { name: "control_after_generate", options: { serialize: false } };
    const values = savedWidgetValues([seed, control, live], [3, "fixed"], ["lycoris_live"]);
    assert.deepEqual(values, [3, "fixed"]);
  });

  test("keeps every declared widget in order, nulls included", () => {
    const text = { name: "prompt", value: null };
    assert.deepEqual(savedWidgetValues([steps, text, seed], [100, null, 3]), [100, null, 3]);
  });

  test("skips named widgets even when they would serialize", () => {
    const custom = { name: "$$node-text-preview", value: "x" };
    const values = savedWidgetValues([steps, custom, seed], [100, "x", 3], [custom.name]);
    assert.deepEqual(values, [100, 3]);
  });

  test("no widgets, no values", () => {
    assert.deepEqual(savedWidgetValues(undefined, [1, 2]), []);
  });
});
