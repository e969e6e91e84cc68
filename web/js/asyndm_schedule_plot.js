// AsynDM schedule plots: a small chart inside the asynchronous nodes showing, before anything
// runs, the timestep each kind of pixel is at over the steps: the background (linear from 1001)
// and one concave curve per key word (its own k); curves that coincide are drawn once with one
// legend entry naming them all. Load Learned Scheduler plots the chosen file's table instead, with
// numbers from the server (asyndm_loader_plot.js). The canvas and its DOM widget, which work in
// the classic LiteGraph canvas and in the Vue node renderer alike: asyndm_plot_widget.js.
//
// Served at /extensions/asyndm-comfyui/js/asyndm_schedule_plot.js, hence ../../../scripts/app.js.
import { app } from "../../../scripts/app.js";
import { DEFAULT_K, DEFAULT_STEPS, START, backgroundTrack, mergeCoinciding, parseKeyWords, track } from "./asyndm_curves.js";
import { LOADER_NODE, loaderSource } from "./asyndm_loader_plot.js";
import { WIDGET_NAME, attachPlot, chain, findWidget, log } from "./asyndm_plot_widget.js";

const EXTENSION = "asyndm.SchedulePlot";
export { WIDGET_NAME };
const MAX_CURVES = 8;

// Which widgets each node's plot reads. A widget that a node lacks falls back to its default
// (steps: DEFAULT_STEPS, curve: "bin", k: DEFAULT_K, key words: none); a node with neither a
// curve nor a k widget gets no plot. `steps` lists candidate names, the first present wins.
export const NODE_CONFIG = {
  AsynDMKSampler: { steps: ["steps"], curve: "curve", k: "k", keyWords: "key_words", override: "schedule" },
  AsynDMSampler: { steps: ["steps"], curve: "curve", k: "k", keyWords: "key_words", override: "schedule" },
  AsynDMMaskToTimestepMap: { steps: ["preview_steps", "steps"], curve: "curve", k: "k", keyWords: "key_words" },
};

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

/**
 * Everything drawn, as numbers: also what the browser test inspects. Items whose curves coincide
 * (the same k, or k = 0 on the background's line) are drawn once, with one legend entry naming
 * them all ("rabbit, basketball k=0.7").
 */
export function plotSeries({ steps, k, curve, keyWords }) {
  const { items, errors } = parseKeyWords(keyWords, k);
  const all = [{ background: true, curve: "linear", k: 0, values: backgroundTrack(steps) }];
  const words = items.length ? items : [{ word: null, k }];
  for (const item of words) all.push({ curve, k: item.k, word: item.word, values: track(curve, item.k, steps) });
  const merged = mergeCoinciding(all);
  if (merged.length > MAX_CURVES + 1) {
    errors.push(`${merged.length - 1 - MAX_CURVES} more curves not drawn`);
  }
  return { series: merged.slice(0, MAX_CURVES + 1), errors };
}

/** The view of an analytic-curve node (drawPlot's argument). */
function curveView(params) {
  const { series, errors } = plotSeries(params);
  const note = params.overridden
    ? { text: "schedule input connected: it replaces these widgets" }
    : errors.length
      ? { text: `key_words: ${errors[0]}`, color: "error" }
      : { text: `${params.curve} curve, timestep per pixel (start ${START})` };
  const xTitle = params.stepsFromWidget ? "step" : `step (preview N = ${params.steps}: your sigmas set it)`;
  return { steps: params.steps, series, errors, note, xTitle };
}

function curveSource(node, config) {
  const w = watchedWidgets(node, config);
  if (!w.curve && !w.k) return null; // nothing to plot on this node
  return {
    widgets: Object.values(w),
    read: () => readParams(node, config),
    key: signature,
    view: curveView,
  };
}

app.registerExtension({
  name: EXTENSION,
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const name = nodeData?.name;
    const config = NODE_CONFIG[name];
    if (!config && name !== LOADER_NODE) return;
    chain(nodeType.prototype, "onNodeCreated", function () {
      try {
        const source = config ? curveSource(this, config) : loaderSource(this);
        if (source) attachPlot(this, source);
      } catch (e) {
        log(`could not add the schedule plot to ${name}`, e);
      }
    });
  },
});
