// AsynDM schedule plot: a small chart inside the asynchronous sampler nodes showing, before
// anything runs, the timestep each kind of pixel is at over the steps: the background (linear
// from 1001) and one concave curve per key word (its own k). Drawn on a <canvas> in a DOM
// widget, so it works in the classic LiteGraph canvas and in the Vue node renderer alike.
//
// Served at /extensions/asyndm-comfyui/js/asyndm_schedule_plot.js, hence ../../../scripts/app.js.
import { app } from "../../../scripts/app.js";
import { DEFAULT_K, DEFAULT_STEPS, START, backgroundTrack, parseKeyWords, track } from "./asyndm_curves.js";

const EXTENSION = "asyndm.SchedulePlot";
export const WIDGET_NAME = "asyndm_schedule_plot";
const PLOT_HEIGHT = 152; // CSS pixels of the canvas
const MARGIN = 4; // the DOM widget's margin inside the node
const WIDGET_HEIGHT = PLOT_HEIGHT + 2 * MARGIN;
const POLL_MS = 400;
const MAX_CURVES = 8;

// Which widgets each node's plot reads. A widget that a node lacks falls back to its default
// (steps: DEFAULT_STEPS, curve: "bin", k: DEFAULT_K, key words: none); a node with neither a
// curve nor a k widget gets no plot. `steps` lists candidate names, the first present wins.
export const NODE_CONFIG = {
  AsynDMKSampler: { steps: ["steps"], curve: "curve", k: "k", keyWords: "key_words", override: "schedule" },
  AsynDMSampler: { steps: ["steps"], curve: "curve", k: "k", keyWords: "key_words", override: "schedule" },
  AsynDMMaskToTimestepMap: { steps: ["preview_steps", "steps"], curve: "curve", k: "k", keyWords: "key_words" },
};

const COLORS = {
  background: "#1e1e1e",
  grid: "#323232",
  axis: "#808080",
  text: "#c8c8c8",
  dim: "#8a8a8a",
  error: "#ff6b6b",
  linear: "#b0b0b0",
  words: ["#ff9f40", "#4fc3f7", "#9ccc65", "#f06292", "#ba68c8", "#ffd54f", "#4db6ac", "#e57373"],
};

const log = (...args) => console.warn(`[${EXTENSION}]`, ...args);

function findWidget(node, name) {
  if (!name) return undefined;
  return node.widgets?.find((w) => w.name === name);
}

function watchedWidgets(node, config) {
  const steps = (config.steps ?? []).map((n) => findWidget(node, n)).find(Boolean);
  return { steps, curve: findWidget(node, config.curve), k: findWidget(node, config.k), keyWords: findWidget(node, config.keyWords) };
}

/** What the plot shows, read from the node's widgets (with defaults for absent ones). */
function readParams(node, config) {
  const w = watchedWidgets(node, config);
  let steps = Math.round(Number(w.steps?.value));
  const stepsFromWidget = Number.isFinite(steps) && steps >= 1;
  if (!stepsFromWidget) steps = DEFAULT_STEPS;
  steps = Math.min(steps, 10000);
  let k = Number(w.k?.value);
  if (!(k >= 0 && k <= 1)) k = DEFAULT_K;
  const curve = ["bin", "lin", "exp"].includes(w.curve?.value) ? w.curve.value : "bin";
  const keyWords = typeof w.keyWords?.value === "string" ? w.keyWords.value : "";
  let overridden = false;
  if (config.override) {
    const input = node.inputs?.find((i) => i.name === config.override);
    overridden = input?.link != null;
  }
  return { steps, stepsFromWidget, k, curve, keyWords, overridden };
}

function signature(p) {
  return `${p.steps}|${p.k}|${p.curve}|${p.keyWords}|${p.overridden}`;
}

/** Everything drawn, as numbers: also what the browser test inspects. */
export function plotSeries({ steps, k, curve, keyWords }) {
  const { items, errors } = parseKeyWords(keyWords, k);
  const series = [{ label: "background", curve: "linear", k: 0, values: backgroundTrack(steps) }];
  const words = items.length ? items : [{ word: null, k }];
  for (const item of words.slice(0, MAX_CURVES)) {
    const label = `${item.word ?? "key pixels"} k=${fmt(item.k)}`;
    series.push({ label, curve, k: item.k, word: item.word, values: track(curve, item.k, steps) });
  }
  if (items.length > MAX_CURVES) errors.push(`${items.length - MAX_CURVES} more key words not drawn`);
  return { series, errors };
}

function fmt(v) {
  return String(Math.round(v * 100) / 100);
}

function niceStep(n) {
  const raw = n / 4;
  const pow = 10 ** Math.floor(Math.log10(Math.max(raw, 1)));
  for (const m of [1, 2, 5, 10]) if (m * pow >= raw) return m * pow;
  return 10 * pow;
}

/** text cut with an ellipsis to fit maxWidth pixels */
function fit(ctx, text, maxWidth) {
  if (ctx.measureText(text).width <= maxWidth) return text;
  let lo = 0, hi = text.length;
  while (lo < hi) {
    const mid = Math.ceil((lo + hi) / 2);
    if (ctx.measureText(`${text.slice(0, mid)}…`).width <= maxWidth) lo = mid;
    else hi = mid - 1;
  }
  return `${text.slice(0, lo)}…`;
}

const seriesColor = (j) => (j === 0 ? COLORS.linear : COLORS.words[(j - 1) % COLORS.words.length]);

function draw(canvas, params) {
  const dpr = Math.max(1, Math.min(3, window.devicePixelRatio || 1));
  const cssW = Math.max(120, Math.round(canvas.clientWidth || canvas.parentElement?.clientWidth || 300));
  const cssH = Math.max(80, Math.round(canvas.clientHeight || PLOT_HEIGHT));
  if (canvas.width !== Math.round(cssW * dpr) || canvas.height !== Math.round(cssH * dpr)) {
    canvas.width = Math.round(cssW * dpr);
    canvas.height = Math.round(cssH * dpr);
  }
  const ctx = canvas.getContext("2d");
  if (!ctx) return null;
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.fillStyle = COLORS.background;
  ctx.fillRect(0, 0, cssW, cssH);

  const { series, errors } = plotSeries(params);
  const n = params.steps;
  const left = 40, right = 10, top = 15, bottom = 26;
  const pw = cssW - left - right, ph = cssH - top - bottom;
  const x = (i) => left + (i / n) * pw;
  const y = (t) => top + (1 - t / START) * ph;
  ctx.font = "10px sans-serif";
  ctx.lineWidth = 1;

  // grid and ticks: timestep 0..1001 upwards, step 0..N to the right
  ctx.textBaseline = "middle";
  ctx.textAlign = "right";
  for (const t of [0, 250, 500, 750, 1000]) {
    ctx.strokeStyle = COLORS.grid;
    ctx.beginPath();
    ctx.moveTo(left, Math.round(y(t)) + 0.5);
    ctx.lineTo(left + pw, Math.round(y(t)) + 0.5);
    ctx.stroke();
    if (t % 500 === 0) {
      ctx.fillStyle = COLORS.dim;
      ctx.fillText(String(t), left - 3, y(t));
    }
  }
  const xs = niceStep(n);
  const ticks = [];
  for (let i = 0; i <= n; i += xs) ticks.push(i);
  if (ticks[ticks.length - 1] !== n) {
    // keep N itself, dropping a tick that would crowd it
    if (ticks.length > 1 && x(n) - x(ticks[ticks.length - 1]) < 24) ticks.pop();
    ticks.push(n);
  }
  ctx.textBaseline = "top";
  for (const i of ticks) {
    ctx.strokeStyle = COLORS.grid;
    ctx.beginPath();
    ctx.moveTo(Math.round(x(i)) + 0.5, top);
    ctx.lineTo(Math.round(x(i)) + 0.5, top + ph);
    ctx.stroke();
    const label = String(i);
    const half = ctx.measureText(label).width / 2;
    ctx.fillStyle = COLORS.dim;
    ctx.textAlign = "center";
    ctx.fillText(label, Math.min(x(i), cssW - half - 1), top + ph + 2);
  }
  ctx.strokeStyle = COLORS.axis;
  ctx.beginPath();
  ctx.moveTo(left + 0.5, top);
  ctx.lineTo(left + 0.5, top + ph + 0.5);
  ctx.lineTo(left + pw, top + ph + 0.5);
  ctx.stroke();

  // axis titles
  ctx.fillStyle = COLORS.text;
  ctx.textAlign = "center";
  ctx.textBaseline = "bottom";
  ctx.fillText(params.stepsFromWidget ? "step" : `step (preview N = ${n}: your sigmas set it)`, left + pw / 2, cssH - 1, pw);
  ctx.save();
  ctx.translate(8, top + ph / 2);
  ctx.rotate(-Math.PI / 2);
  ctx.textBaseline = "middle";
  ctx.fillText("timestep", 0, 0);
  ctx.restore();

  // curves: background dashed, key words solid
  series.forEach((s, j) => {
    ctx.strokeStyle = seriesColor(j);
    ctx.lineWidth = j === 0 ? 1.25 : 1.75;
    ctx.setLineDash(j === 0 ? [4, 3] : []);
    ctx.beginPath();
    s.values.forEach((v, i) => (i === 0 ? ctx.moveTo(x(i), y(v)) : ctx.lineTo(x(i), y(v))));
    ctx.stroke();
  });
  ctx.setLineDash([]);

  // legend, bottom left: below the background's diagonal no curve goes (all are concave
  // delays of it), so the legend takes as many rows as fit under that line.
  const lineH = 12, swatch = 16, lx = left + 5, bottomY = top + ph - 3;
  const textMax = Math.max(40, pw * 0.5 - swatch - 8);
  let rows = series.map((s, j) => ({ text: fit(ctx, s.label, textMax), color: seriesColor(j), dash: j === 0 }));
  const boxW = (list) => swatch + 6 + Math.max(...list.map((r) => ctx.measureText(r.text).width));
  const fits = (count, width) => {
    const boxTop = bottomY - count * lineH - 2;
    const lineAtRight = top + ((lx + width + 3 - left) / pw) * ph; // the diagonal, at the box's right edge
    return boxTop >= lineAtRight - 2;
  };
  let count = rows.length;
  while (count > 2 && !fits(count, boxW(rows.slice(0, count)))) count--;
  if (count < rows.length) {
    const more = rows.length - count + 1;
    rows = [...rows.slice(0, count - 1), { text: `+${more} more`, color: COLORS.dim, dash: false, more: true }];
  }
  const legendW = boxW(rows);
  const ly = bottomY - rows.length * lineH;
  ctx.fillStyle = "rgba(30,30,30,0.8)";
  ctx.fillRect(lx - 3, ly - 2, legendW + 6, rows.length * lineH + 4);
  ctx.textAlign = "left";
  ctx.textBaseline = "middle";
  rows.forEach((r, j) => {
    const cy = ly + j * lineH + lineH / 2;
    if (!r.more) {
      ctx.strokeStyle = r.color;
      ctx.lineWidth = 2;
      ctx.setLineDash(r.dash ? [4, 3] : []);
      ctx.beginPath();
      ctx.moveTo(lx, cy);
      ctx.lineTo(lx + swatch, cy);
      ctx.stroke();
      ctx.setLineDash([]);
    }
    ctx.fillStyle = r.more ? COLORS.dim : COLORS.text;
    ctx.fillText(r.text, lx + swatch + 4, cy);
  });

  // one line of notes across the top
  const note = params.overridden
    ? { text: "schedule input connected: it replaces these widgets", color: COLORS.dim }
    : errors.length
      ? { text: `key_words: ${errors[0]}`, color: COLORS.error }
      : { text: `${params.curve} curve, timestep per pixel (start ${START})`, color: COLORS.dim };
  ctx.fillStyle = note.color;
  ctx.textAlign = "left";
  ctx.textBaseline = "middle";
  ctx.fillText(fit(ctx, note.text, cssW - left - 4), left + 2, top / 2 + 1);

  canvas.dataset.asyndmDraws = String(Number(canvas.dataset.asyndmDraws || 0) + 1);
  return { series, errors };
}

// -- one plot per node ---------------------------------------------------------------------------
const livePlots = new Set();
let pollTimer = null;

function ensurePolling() {
  if (pollTimer !== null) return;
  pollTimer = setInterval(() => {
    for (const plot of livePlots) {
      try {
        plot.refresh(false);
      } catch (e) {
        log("redraw failed", e);
        livePlots.delete(plot);
      }
    }
    if (!livePlots.size) {
      clearInterval(pollTimer);
      pollTimer = null;
    }
  }, POLL_MS);
}

function chain(obj, key, after) {
  const original = obj[key];
  obj[key] = function (...args) {
    const result = typeof original === "function" ? original.apply(this, args) : undefined;
    try {
      after.apply(this, args);
    } catch (e) {
      log(`${key} hook failed`, e);
    }
    return result;
  };
}

function attachPlot(node, config) {
  if (typeof node.addDOMWidget !== "function") {
    log("this frontend has no node.addDOMWidget: no schedule plot");
    return;
  }
  if (findWidget(node, WIDGET_NAME)) return;
  const w = watchedWidgets(node, config);
  if (!w.curve && !w.k) return; // nothing to plot on this node

  const wrap = document.createElement("div");
  wrap.className = "asyndm-schedule-plot";
  Object.assign(wrap.style, { width: "100%", height: "100%", minHeight: `${PLOT_HEIGHT}px`, boxSizing: "border-box", overflow: "hidden" });
  const canvas = document.createElement("canvas");
  Object.assign(canvas.style, { display: "block", width: "100%", height: `${PLOT_HEIGHT}px`, borderRadius: "4px" });
  canvas.title = "AsynDM: timestep of background and key-word pixels over the steps (dashed: background)";
  wrap.appendChild(canvas);

  const widget = node.addDOMWidget(WIDGET_NAME, "asyndm_plot", wrap, {
    serialize: false,
    hideOnZoom: false,
    margin: MARGIN,
    getValue: () => "",
    setValue: () => {},
    getMinHeight: () => WIDGET_HEIGHT,
    getMaxHeight: () => WIDGET_HEIGHT,
    getHeight: () => WIDGET_HEIGHT,
  });
  widget.serialize = false; // keep it out of widgets_values: saved workflows stay the same
  if (typeof widget.computeSize !== "function" && typeof widget.computeLayoutSize !== "function") {
    widget.computeSize = (width) => [width ?? node.size?.[0] ?? 300, WIDGET_HEIGHT]; // older frontends
  }

  let last = null;
  const plot = {
    node,
    refresh(force) {
      if (!node.graph && !force) {
        // removed from its graph, or never added (a node made only to be inspected): stop polling
        plot.idle = (plot.idle ?? 0) + 1;
        if (plot.added || plot.idle > 150) livePlots.delete(plot);
        return;
      }
      plot.added = plot.added || !!node.graph;
      plot.idle = 0;
      if (node.graph && !livePlots.has(plot)) {
        livePlots.add(plot); // back in a graph (re-added after a removal)
        ensurePolling();
      }
      if (!force && last !== null && canvas.clientWidth === 0) return; // hidden (off screen): keep the last picture
      const params = readParams(node, config);
      const sig = `${signature(params)}|${canvas.clientWidth}x${canvas.clientHeight}`;
      if (!force && sig === last) return;
      last = sig;
      plot.data = draw(canvas, params);
      plot.params = params;
    },
  };
  widget.asyndmPlot = plot;

  // redraw on widget changes: their callbacks, the canvas's onWidgetChanged, a cheap poll
  for (const watched of Object.values(w)) {
    if (watched) chain(watched, "callback", () => plot.refresh(false));
  }
  chain(node, "onWidgetChanged", () => plot.refresh(false));
  chain(node, "onConfigure", () => plot.refresh(true));
  chain(node, "onConnectionsChange", () => plot.refresh(false));
  chain(node, "onAdded", () => plot.refresh(true));
  chain(node, "onRemoved", () => livePlots.delete(plot));
  if (typeof ResizeObserver === "function") {
    new ResizeObserver(() => plot.refresh(false)).observe(wrap);
  }
  livePlots.add(plot);
  ensurePolling();

  // let the node grow to fit the plot
  try {
    const size = node.computeSize?.();
    if (size && node.size && typeof node.setSize === "function") {
      node.setSize([Math.max(node.size[0], size[0], 300), Math.max(node.size[1], size[1])]);
    }
  } catch (e) {
    log("could not resize the node", e);
  }
  plot.refresh(true);
}

app.registerExtension({
  name: EXTENSION,
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const config = NODE_CONFIG[nodeData?.name];
    if (!config) return;
    chain(nodeType.prototype, "onNodeCreated", function () {
      try {
        attachPlot(this, config);
      } catch (e) {
        log(`could not add the schedule plot to ${nodeData.name}`, e);
      }
    });
  },
});
