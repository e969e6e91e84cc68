// Load Learned Scheduler's in-node plot: the chosen schedule file's table as the timestep of the
// background and of the key pixels over the steps. The numbers come from the pack's server route
// GET /asyndm/schedule_plot (nodes/plot_route.py), which loads the file with the pack's own
// loader; the browser never reads the file. A file that does not load shows the server's message
// in place of the curves.
//
// Which key pixels: without a connected `schedule`, the node's key words (and k); with one from
// Attention Mask to Timestep Map, that node's masks and k; from any other node, or with no key
// words, the table's own levels. Steps: those of the sampler the schedule output feeds (a node
// with a `steps` widget), else the steps the table was fitted for.
//
// This file is also imported by ComfyUI as an extension module (every .js under web/ is): it only
// defines functions.
import { api } from "../../../scripts/api.js";
import { DEFAULT_K, mergeCoinciding, parseKeyWords } from "./asyndm_curves.js";
import { findWidget } from "./asyndm_plot_widget.js";

export const LOADER_NODE = "AsynDMSchedulerLoader";
export const PLOT_ROUTE = "/asyndm/schedule_plot";
const MASK_NODE = "AsynDMMaskToTimestepMap";
const MAX_ITEMS = 8; // distinct priorities per request (the route's limit)
const MAX_STEPS = 1000;

function linkOf(graph, id) {
  if (id == null || !graph) return null;
  return graph.getLink?.(id) ?? graph.links?.get?.(id) ?? graph.links?.[id] ?? null;
}

function linkedInput(node, name) {
  const input = node?.inputs?.find((i) => i.name === name);
  return input?.link ?? null;
}

function priority(node, name) {
  const v = Number(findWidget(node, name)?.value);
  return v >= 0 && v <= 1 ? v : DEFAULT_K;
}

/** The node feeding `schedule`, and its items when this plot can know their k (else items = null). */
function upstream(node) {
  const id = linkedInput(node, "schedule");
  if (id == null) return null;
  const link = linkOf(node.graph, id);
  const src = link ? node.graph.getNodeById?.(link.origin_id) : null;
  const type = src?.comfyClass ?? src?.type ?? null;
  const out = { type, title: src?.title || type || "another node", items: null };
  if (type === MASK_NODE) {
    if (findWidget(src, "mask_batch")?.value === "items") {
      out.items = [
        { word: "item 1", k: priority(src, "k") },
        { word: "item 2", k: priority(src, "k_2") },
        { word: "item 3", k: priority(src, "k_3") },
        { word: "items 4+", k: priority(src, "k_4") },
      ];
    } else {
      out.items = [{ word: "mask", k: priority(src, "k") }];
      for (const i of [2, 3, 4]) {
        if (linkedInput(src, `mask_${i}`) != null) out.items.push({ word: `mask_${i}`, k: priority(src, `k_${i}`) });
      }
    }
  }
  return out;
}

/** The steps of the first node fed by the schedule output that has a steps widget, or null. */
function downstreamSteps(node) {
  const output = node.outputs?.find((o) => o.name === "schedule") ?? node.outputs?.[0];
  for (const id of output?.links ?? []) {
    const link = linkOf(node.graph, id);
    const dst = link ? node.graph.getNodeById?.(link.target_id) : null;
    const steps = Math.round(Number(findWidget(dst, "steps")?.value));
    if (Number.isFinite(steps) && steps >= 1) return { steps: Math.min(steps, MAX_STEPS), from: dst.title || dst.type };
  }
  return null;
}

/** What the plot shows, read from the node and its neighbours (cheap: read on every poll). */
export function readLoaderParams(node) {
  const name = String(findWidget(node, "schedule_name")?.value ?? "");
  const up = upstream(node);
  let items = null;
  let errors = [];
  let mode;
  if (up) {
    items = up.items;
    mode = items ? "schedule" : "schedule levels";
  } else {
    const k = priority(node, "k");
    const parsed = parseKeyWords(findWidget(node, "key_words")?.value ?? "", k);
    errors = parsed.errors;
    items = parsed.items.length ? parsed.items : null;
    mode = items ? "key words" : "levels";
  }
  const down = downstreamSteps(node);
  return {
    name,
    mode,
    items,
    errors,
    upstream: up ? { type: up.type, title: up.title } : null,
    steps: down?.steps ?? null,
    stepsFrom: down?.from ?? null,
  };
}

const stem = (name) => String(name).replace(/\.safetensors$/i, "");

function note(p, body) {
  if (p.errors.length) return { text: `key_words: ${p.errors[0]}`, color: "error" };
  const file = stem(p.name);
  if (p.mode === "levels") return { text: `${file}: the table's levels (no key words: sampling stays synchronous)` };
  if (p.mode === "schedule levels") return { text: `${file}: the table's levels; the k of '${p.upstream.title}' picks among them` };
  if (p.mode === "schedule") return { text: `${file} with the masks and k of '${p.upstream.title}'` };
  return { text: `${file}: ${body.curve} table, key pixels at their k` };
}

/** The view (drawPlot's argument) for the parameters, from the server's answer. */
export async function loaderView(p) {
  const head = { text: p.name ? stem(p.name) : "Load Learned Scheduler" };
  if (!p.name) {
    return { error: "no schedule file chosen: put .safetensors schedule files in models/asyndm_schedulers and refresh (R)", note: head };
  }
  let items = p.items;
  const errors = [...p.errors];
  let ks = items ? [...new Set(items.map((i) => i.k))] : null;
  if (ks && ks.length > MAX_ITEMS) {
    ks = ks.slice(0, MAX_ITEMS);
    const dropped = items.filter((i) => !ks.includes(i.k));
    items = items.filter((i) => ks.includes(i.k));
    errors.push(`${dropped.length} more key words not drawn`);
  }
  const query = new URLSearchParams({ name: p.name });
  if (ks) query.set("k", ks.join(","));
  if (p.steps) query.set("steps", String(p.steps));
  let res;
  try {
    res = await api.fetchApi(`${PLOT_ROUTE}?${query}`, { cache: "no-store" });
  } catch (e) {
    return { error: `the server did not answer: ${e?.message ?? e}`, note: head };
  }
  let body = null;
  try {
    body = await res.json();
  } catch {
    body = null;
  }
  if (!res.ok || !body || body.error) {
    const error = body?.error ?? `the server answered ${res.status} ${res.statusText ?? ""}`.trim();
    return { error, note: { text: `${stem(p.name)}: cannot be plotted`, color: "error" }, status: res.status };
  }
  const all = [{ background: true, values: body.background }];
  if (body.source === "k") {
    for (const item of items) all.push({ word: item.word, k: item.k, values: body.tracks[ks.indexOf(item.k)].values });
  } else {
    for (const t of body.tracks) all.push({ word: "level", k: t.k, values: t.values });
  }
  const series = mergeCoinciding(all);
  const xTitle = p.steps
    ? `step (N = ${body.steps} from ${p.stepsFrom})`
    : body.fitted_steps === body.steps
      ? `step (N = ${body.steps}, the table's fitted steps)`
      : `step (N = ${body.steps})`;
  return {
    steps: body.steps,
    series,
    errors,
    note: note({ ...p, errors }, body),
    xTitle,
    response: { name: body.name, curve: body.curve, levels: body.levels, steps: body.steps, source: body.source, fitted_steps: body.fitted_steps },
  };
}

/** The plot source for a Load Learned Scheduler node (see asyndm_plot_widget.js attachPlot). */
export function loaderSource(node) {
  return {
    widgets: ["schedule_name", "key_words", "k"].map((n) => findWidget(node, n)),
    read: () => readLoaderParams(node),
    key: (p) => JSON.stringify(p),
    view: loaderView,
    loadingNote: (p) => stem(p.name),
    title: "AsynDM: the chosen schedule file's table: timestep of the background (dashed) and the key pixels over the steps",
  };
}
