// AsynDM plot widget: a <canvas> in a DOM widget (so it works in the classic LiteGraph canvas and
// in the Vue node renderer alike) showing timestep curves over the steps, or an error message in
// place of the curves. The nodes' data come from a "source" (asyndm_schedule_plot.js: the
// analytic curves, computed here; asyndm_loader_plot.js: a schedule file's table, from the server).
//
// This file is also imported by ComfyUI as an extension module (every .js under web/ is): it only
// defines functions.
import { START } from "./asyndm_curves.js";

export const WIDGET_NAME = "asyndm_schedule_plot";
export const PLOT_HEIGHT = 152; // CSS pixels of the canvas
const MARGIN = 4; // the DOM widget's margin inside the node
const WIDGET_HEIGHT = PLOT_HEIGHT + 2 * MARGIN;
const POLL_MS = 400;
const LOADING_DELAY_MS = 150; // a slower answer first shows "loading", never the previous curve

export const COLORS = {
  background: "#1e1e1e",
  grid: "#323232",
  axis: "#808080",
  text: "#c8c8c8",
  dim: "#8a8a8a",
  error: "#ff6b6b",
  linear: "#b0b0b0",
  words: ["#ff9f40", "#4fc3f7", "#9ccc65", "#f06292", "#ba68c8", "#ffd54f", "#4db6ac", "#e57373"],
};

export const log = (...args) => console.warn("[asyndm.SchedulePlot]", ...args);

export function findWidget(node, name) {
  if (!name) return undefined;
  return node?.widgets?.find((w) => w.name === name);
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

/** text broken into lines of at most maxWidth pixels (long words are cut), at most maxLines */
function wrap(ctx, text, maxWidth, maxLines) {
  const lines = [];
  let line = "";
  for (const word of String(text).split(/\s+/).filter(Boolean)) {
    const next = line ? `${line} ${word}` : word;
    if (ctx.measureText(next).width <= maxWidth || !line) line = next;
    else {
      lines.push(line);
      line = word;
    }
  }
  if (line) lines.push(line);
  const out = lines.slice(0, maxLines).map((l) => fit(ctx, l, maxWidth));
  if (lines.length > maxLines) out[maxLines - 1] = fit(ctx, `${lines[maxLines - 1]} ${lines.slice(maxLines).join(" ")}`, maxWidth);
  return out;
}

/** Colour of the j-th drawn series: grey (dashed) for the background, then the word colours. */
export function seriesColors(series) {
  let j = 0;
  return series.map((s) => (s.background ? COLORS.linear : COLORS.words[j++ % COLORS.words.length]));
}

function setUp(canvas) {
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
  ctx.font = "10px sans-serif";
  ctx.lineWidth = 1;
  return { ctx, cssW, cssH };
}

function drawNote(ctx, note, left, top, cssW) {
  if (!note?.text) return;
  ctx.fillStyle = note.color === "error" ? COLORS.error : COLORS.dim;
  ctx.textAlign = "left";
  ctx.textBaseline = "middle";
  ctx.fillText(fit(ctx, note.text, cssW - left - 4), left + 2, top / 2 + 1);
}

/**
 * Draw a view on the canvas:
 *   { steps, series: [{ label, background?, values }], note: { text, color? }, xTitle }  curves, or
 *   { error, note }  the error text in the plot area (no curve), or { message, note }  a dim message.
 * Returns what was drawn (the browser test reads it): { series, errors, legend, error, message }.
 */
export function drawPlot(canvas, view) {
  const setup = setUp(canvas);
  if (!setup) return null;
  const { ctx, cssW, cssH } = setup;
  const left = 40, right = 10, top = 15, bottom = 26;
  const pw = cssW - left - right, ph = cssH - top - bottom;
  const count = () => {
    canvas.dataset.asyndmDraws = String(Number(canvas.dataset.asyndmDraws || 0) + 1);
  };

  if (view.error || view.message) {
    // the message takes the whole plot area (no axes: nothing is plotted)
    const text = view.error || view.message;
    const bx = 8, bw = cssW - 16, bh = cssH - top - 8;
    ctx.strokeStyle = COLORS.grid;
    ctx.strokeRect(bx + 0.5, top + 0.5, bw - 1, bh - 1);
    ctx.fillStyle = view.error ? COLORS.error : COLORS.dim;
    ctx.textAlign = "left";
    ctx.textBaseline = "top";
    const lines = wrap(ctx, text, bw - 12, Math.max(1, Math.floor((bh - 8) / 12)));
    lines.forEach((line, i) => ctx.fillText(line, bx + 6, top + 5 + i * 12));
    drawNote(ctx, view.note, bx, top, cssW);
    count();
    return { series: [], errors: view.error ? [view.error] : [], legend: [], error: view.error ?? null, message: view.message ?? null, lines };
  }

  const series = view.series;
  const colors = seriesColors(series);
  const n = view.steps;
  const x = (i) => left + (i / n) * pw;
  const y = (t) => top + (1 - t / START) * ph;

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
  ctx.fillText(view.xTitle ?? "step", left + pw / 2, cssH - 1, pw);
  ctx.save();
  ctx.translate(8, top + ph / 2);
  ctx.rotate(-Math.PI / 2);
  ctx.textBaseline = "middle";
  ctx.fillText("timestep", 0, 0);
  ctx.restore();

  // curves: background dashed, key pixels solid
  series.forEach((s, j) => {
    ctx.strokeStyle = colors[j];
    ctx.lineWidth = s.background ? 1.25 : 1.75;
    ctx.setLineDash(s.background ? [4, 3] : []);
    ctx.beginPath();
    s.values.forEach((v, i) => (i === 0 ? ctx.moveTo(x(i), y(v)) : ctx.lineTo(x(i), y(v))));
    ctx.stroke();
  });
  ctx.setLineDash([]);

  // legend, bottom left: below the background's diagonal no curve goes (all are concave
  // delays of it), so the legend takes as many rows as fit under that line.
  const lineH = 12, swatch = 16, lx = left + 5, bottomY = top + ph - 3;
  const textMax = Math.max(40, pw * 0.6 - swatch - 8);
  let rows = series.map((s, j) => ({ text: fit(ctx, s.label, textMax), color: colors[j], dash: !!s.background }));
  const boxW = (list) => swatch + 6 + Math.max(...list.map((r) => ctx.measureText(r.text).width));
  const fits = (rowCount, width) => {
    const boxTop = bottomY - rowCount * lineH - 2;
    const lineAtRight = top + ((lx + width + 3 - left) / pw) * ph; // the diagonal, at the box's right edge
    return boxTop >= lineAtRight - 2;
  };
  let shown = rows.length;
  while (shown > 2 && !fits(shown, boxW(rows.slice(0, shown)))) shown--;
  if (shown < rows.length) {
    const more = rows.length - shown + 1;
    rows = [...rows.slice(0, shown - 1), { text: `+${more} more`, color: COLORS.dim, dash: false, more: true }];
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

  drawNote(ctx, view.note, left, top, cssW);
  count();
  return { series, errors: view.errors ?? [], legend: rows.map((r) => r.text), colors, error: null, message: null };
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

export function chain(obj, key, after) {
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

/**
 * Add the plot widget to a node. `source` says what to draw:
 *   widgets    the node's widgets whose changes redraw at once (others are polled)
 *   read()     the parameters now (cheap, synchronous: read on every poll)
 *   key(p)     a string that changes exactly when the picture must change
 *   view(p)    the view to draw (drawPlot's argument), or a Promise of it
 *   title      the canvas's tooltip
 * The widget's `asyndmPlot` exposes params, data (what was drawn), view and state for tests.
 */
export function attachPlot(node, source) {
  if (typeof node.addDOMWidget !== "function") {
    log("this frontend has no node.addDOMWidget: no schedule plot");
    return null;
  }
  if (findWidget(node, WIDGET_NAME)) return null;

  const box = document.createElement("div");
  box.className = "asyndm-schedule-plot";
  Object.assign(box.style, { width: "100%", height: "100%", minHeight: `${PLOT_HEIGHT}px`, boxSizing: "border-box", overflow: "hidden" });
  const canvas = document.createElement("canvas");
  Object.assign(canvas.style, { display: "block", width: "100%", height: `${PLOT_HEIGHT}px`, borderRadius: "4px" });
  canvas.title = source.title ?? "AsynDM: timestep of background and key pixels over the steps (dashed: background)";
  box.appendChild(canvas);

  const widget = node.addDOMWidget(WIDGET_NAME, "asyndm_plot", box, {
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

  let last = null; // key and canvas size last drawn (or asked for)
  let lastKey = null;
  let token = 0;
  const plot = {
    node,
    state: "new",
    show(view, params) {
      plot.view = view;
      plot.params = params;
      plot.data = drawPlot(canvas, view);
      plot.state = view.error ? "error" : view.message ? "message" : "ready";
    },
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
      const params = source.read();
      const key = source.key(params);
      const sig = `${key}|${canvas.clientWidth}x${canvas.clientHeight}`;
      if (!force && sig === last) return;
      last = sig;
      if (key === lastKey && plot.view && plot.state !== "loading" && !force) {
        plot.show(plot.view, plot.params); // only the size changed
        return;
      }
      lastKey = key;
      const mine = ++token;
      let result;
      try {
        result = source.view(params);
      } catch (e) {
        result = { error: `could not compute the plot: ${e?.message ?? e}` };
      }
      if (!result || typeof result.then !== "function") {
        plot.show(result, params);
        return;
      }
      plot.state = "loading";
      setTimeout(() => {
        if (mine === token && plot.state === "loading") {
          plot.data = drawPlot(canvas, { message: "loading…", note: { text: source.loadingNote?.(params) ?? "" } });
        }
      }, LOADING_DELAY_MS);
      plot.pending = result.then(
        (view) => {
          if (mine === token) plot.show(view, params);
        },
        (e) => {
          if (mine === token) plot.show({ error: String(e?.message ?? e) }, params);
        },
      );
    },
  };
  widget.asyndmPlot = plot;

  // redraw on widget changes: their callbacks, the canvas's onWidgetChanged, a cheap poll
  for (const watched of source.widgets ?? []) {
    if (watched) chain(watched, "callback", () => plot.refresh(false));
  }
  chain(node, "onWidgetChanged", () => plot.refresh(false));
  chain(node, "onConfigure", () => plot.refresh(true));
  chain(node, "onConnectionsChange", () => plot.refresh(false));
  chain(node, "onAdded", () => plot.refresh(true));
  chain(node, "onExecuted", () => plot.refresh(true)); // after a run: a schedule file may have changed on disk
  chain(node, "onRemoved", () => livePlots.delete(plot));
  if (typeof ResizeObserver === "function") {
    new ResizeObserver(() => plot.refresh(false)).observe(box);
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
  return plot;
}
