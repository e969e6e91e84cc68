// Drives headless Chromium against a running ComfyUI with this pack, for tests/server/test_frontend.py.
//
//   node frontend_plot.mjs INPUT.json
//
// INPUT: { url, chromium, nodeDir, userDataDir, screenshots: { classic: [paths], vue: [paths], loader: [paths],
//          loaderVue: [paths], templates: [paths] }, curveCases: [{ curve, k, steps }], timeoutMs,
//          loader: { files: [good file names], broken: a listed file that fails to load }, templates: { pack, names } }
// Prints one JSON object on stdout (the last line): what it saw, for the Python test to judge.
// Every wait is bounded; the browser is always closed.
import { createRequire } from "node:module";
import fs from "node:fs";
import path from "node:path";

const input = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const require = createRequire(path.join(input.nodeDir, "package.json"));
const { chromium } = require("playwright-core");

const T = input.timeoutMs ?? 20000;
const PACK = "/extensions/asyndm-comfyui/";
const result = { ok: false, steps: [], console: [], pageErrors: [], badResponses: [], timings: {} };
const t0 = Date.now();
const mark = (name) => {
  result.timings[name] = (Date.now() - t0) / 1000;
  result.steps.push(name);
};

// Ours: raised in or about our modules. (The frontend also asks api.comfy.org about every custom
// node, which the page's CSP blocks with an error naming the node: that one is harmless.)
function ours(text) {
  return (text ?? "").includes(PACK) || (text ?? "").includes("asyndm.SchedulePlot");
}

async function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

// In the page: find our node's plot canvas and measure it.
const MEASURE = `(() => {
  const app = window.comfyAPI?.app?.app ?? window.app;
  const node = app.graph.getNodeById(window.__asyndmNodeId);
  const widget = node?.widgets?.find((w) => w.name === "asyndm_schedule_plot");
  const canvas = widget?.element?.querySelector("canvas");
  if (!canvas) return { found: false, widgetNames: node?.widgets?.map((w) => w.name) ?? null };
  const rect = canvas.getBoundingClientRect();
  const ctx = canvas.getContext("2d");
  const { width, height } = canvas;
  const data = width && height ? ctx.getImageData(0, 0, width, height).data : [];
  let nonBackground = 0;
  let firstCurve = 0; // pixels in the first key curve's colour (#ff9f40): a curve is drawn
  let hash = 2166136261;
  for (let i = 0; i < data.length; i += 4) {
    const d = Math.abs(data[i] - 30) + Math.abs(data[i + 1] - 30) + Math.abs(data[i + 2] - 30);
    if (d > 24) nonBackground++;
    if (Math.abs(data[i] - 255) + Math.abs(data[i + 1] - 159) + Math.abs(data[i + 2] - 64) < 40) firstCurve++;
    hash = Math.imul(hash ^ (data[i] * 7 + data[i + 1] * 3 + data[i + 2]), 16777619) >>> 0;
  }
  // where the canvas sits (to tell classic overlay from a Vue node)
  const vueNode = canvas.closest("[data-node-id]");
  const top = document.elementFromPoint(rect.left + rect.width / 2, rect.top + rect.height / 2);
  return {
    found: true,
    width, height,
    cssWidth: canvas.clientWidth, cssHeight: canvas.clientHeight,
    rect: { x: rect.x, y: rect.y, width: rect.width, height: rect.height },
    connected: canvas.isConnected,
    visible: !!(canvas.offsetParent || canvas.getClientRects().length) && rect.width > 0 && rect.height > 0,
    onTop: !!top && (top === canvas || canvas.contains(top) || top.contains(canvas)),
    draws: Number(canvas.dataset.asyndmDraws || 0),
    nonBackground,
    firstCurve,
    pixels: data.length / 4,
    hash,
    inVueNode: !!vueNode,
    vueNodeId: vueNode?.getAttribute("data-node-id") ?? null,
    nodeSize: [node.size[0], node.size[1]],
    widgetY: widget.y ?? null,
    params: widget.asyndmPlot?.params ?? null,
    series: widget.asyndmPlot?.data?.series?.map((s) => ({ label: s.label, curve: s.curve, k: s.k, values: s.values, background: !!s.background, members: s.members })) ?? null,
    errors: widget.asyndmPlot?.data?.errors ?? null,
    legend: widget.asyndmPlot?.data?.legend ?? null,
    error: widget.asyndmPlot?.data?.error ?? null,
    message: widget.asyndmPlot?.data?.message ?? null,
    state: widget.asyndmPlot?.state ?? null,
    response: widget.asyndmPlot?.view?.response ?? null,
    note: widget.asyndmPlot?.view?.note?.text ?? null,
    xTitle: widget.asyndmPlot?.view?.xTitle ?? null,
  };
})()`;

async function measure(page) {
  return page.evaluate(MEASURE);
}

async function waitForDraw(page, predicate, what, ms = T) {
  const deadline = Date.now() + ms;
  let last;
  while (Date.now() < deadline) {
    last = await measure(page);
    if (predicate(last)) return last;
    await page.waitForTimeout(100);
  }
  throw new Error(`timed out after ${ms} ms waiting for ${what}; last state: ${JSON.stringify({ ...last, series: undefined })}`);
}

async function setWidget(page, name, value) {
  return page.evaluate(
    ([name, value]) => {
      const app = window.comfyAPI?.app?.app ?? window.app;
      const node = app.graph.getNodeById(window.__asyndmNodeId);
      const widget = node.widgets.find((w) => w.name === name);
      widget.value = value;
      widget.callback?.(widget.value, app.canvas, node);
      return widget.value;
    },
    [name, value],
  );
}

async function screenshotNode(page, paths) {
  // The node's rectangle on screen, from the plot canvas up to the node's title.
  const clip = await page.evaluate(() => {
    const app = window.comfyAPI?.app?.app ?? window.app;
    const node = app.graph.getNodeById(window.__asyndmNodeId);
    const vue = document.querySelector(`[data-node-id="${node.id}"]`);
    if (vue) {
      const r = vue.getBoundingClientRect();
      return { x: r.x, y: r.y, width: r.width, height: r.height };
    }
    const ds = app.canvas.ds;
    const c = app.canvas.canvas.getBoundingClientRect();
    const title = window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
    return {
      x: c.left + (node.pos[0] + ds.offset[0]) * ds.scale,
      y: c.top + (node.pos[1] - title + ds.offset[1]) * ds.scale,
      width: node.size[0] * ds.scale,
      height: (node.size[1] + title) * ds.scale,
    };
  });
  const pad = 12, badge = 24; // the node-source badge sits above the title
  const box = {
    x: Math.max(0, clip.x - pad),
    y: Math.max(0, clip.y - pad - badge),
    width: clip.width + 2 * pad,
    height: clip.height + 2 * pad + badge,
  };
  for (const p of paths ?? []) {
    fs.mkdirSync(path.dirname(p), { recursive: true });
    await page.screenshot({ path: p, clip: box, timeout: T });
  }
  return box;
}

async function addNode(page, type, widgets) {
  return page.evaluate(
    ([type, widgets]) => {
      const app = window.comfyAPI?.app?.app ?? window.app;
      const LiteGraph = window.LiteGraph ?? window.comfyAPI?.litegraph?.LiteGraph;
      app.graph.clear();
      const node = LiteGraph.createNode(type);
      if (!node) throw new Error(`LiteGraph.createNode(${type}) returned nothing`);
      node.pos = [420, 120]; // clear of the floating workflow menu at the top left
      app.graph.add(node);
      for (const [name, value] of Object.entries(widgets)) {
        const w = node.widgets.find((x) => x.name === name);
        if (!w) throw new Error(`node has no widget ${name}`);
        w.value = value;
        w.callback?.(w.value, app.canvas, node);
      }
      app.canvas.ds.scale = 1;
      app.canvas.ds.offset = [0, 0];
      app.canvas.setDirty(true, true);
      window.__asyndmNodeId = node.id;
      return { id: node.id, size: [node.size[0], node.size[1]], widgets: node.widgets.map((w) => w.name) };
    },
    [type, widgets],
  );
}

async function classicOrVueRound(page, label, screenshots) {
  const out = {};
  out.before = await waitForDraw(
    page,
    (m) => m.found && m.visible && m.draws > 0 && m.cssWidth > 100 && m.nonBackground > 500,
    `${label}: a visible plot with pixels drawn`,
  );
  await page.waitForTimeout(300); // let the layout settle before the reference picture
  out.before = await measure(page);
  out.screenshot = await screenshotNode(page, screenshots);
  const k = label === "vue" ? 0.35 : 0.2;
  await setWidget(page, "k", k);
  out.afterK = await waitForDraw(page, (m) => m.found && m.hash !== out.before.hash, `${label}: the plot to change after k = ${k}`);
  out.kSet = k;
  return out;
}

// A real click on the steps widget's increment arrow, drawn by LiteGraph on the canvas.
async function classicUiEdit(page) {
  const at = await page.evaluate(() => {
    const app = window.comfyAPI?.app?.app ?? window.app;
    const node = app.graph.getNodeById(window.__asyndmNodeId);
    const w = node.widgets.find((x) => x.name === "steps");
    const ds = app.canvas.ds;
    const c = app.canvas.canvas.getBoundingClientRect();
    const h = window.LiteGraph?.NODE_WIDGET_HEIGHT ?? 20;
    const lx = node.size[0] - 15 - 6, ly = w.y + h / 2; // the right arrow, in node coordinates
    return { x: c.left + (node.pos[0] + lx + ds.offset[0]) * ds.scale, y: c.top + (node.pos[1] + ly + ds.offset[1]) * ds.scale, steps: w.value };
  });
  await page.mouse.click(at.x, at.y);
  const after = await waitForDraw(page, (m) => m.params?.steps !== at.steps, "classic: the plot to follow a click on steps", 5000).catch((e) => ({ error: String(e) }));
  return { stepsBefore: at.steps, stepsAfter: after.params?.steps ?? null, error: after.error, series: after.series };
}

// A real click on the steps widget's "+" button of the Vue node: a PrimeVue InputNumber in
// frontend 1.32, the frontend's own number field (data-testid "increment") in 1.58.
async function vueUiEdit(page) {
  const id = await page.evaluate(() => window.__asyndmNodeId);
  let button = null;
  for (const selector of [
    `[data-node-id="${id}"] span:has(> input[aria-label="steps"]) button.p-inputnumber-increment-button`,
    `[data-node-id="${id}"] [aria-label="steps"] button[data-testid="increment"]`,
  ]) {
    const candidate = page.locator(selector);
    if ((await candidate.count()) === 1) {
      button = candidate;
      break;
    }
  }
  if (!button) return { available: false };
  const stepsBefore = (await measure(page)).params?.steps;
  await button.click({ timeout: T });
  const after = await waitForDraw(page, (m) => m.params?.steps !== stepsBefore, "vue: the plot to follow a click on steps' +", 5000).catch((e) => ({ error: String(e) }));
  return { available: true, stepsBefore, stepsAfter: after.params?.steps ?? null, error: after.error, series: after.series };
}

// The plot stays out of the saved workflow and the API prompt, and follows a reloaded workflow.
async function saveAndReload(page) {
  const saved = await page.evaluate(async () => {
    const app = window.comfyAPI?.app?.app ?? window.app;
    const node = app.graph.getNodeById(window.__asyndmNodeId);
    const serialized = node.serialize();
    const prompt = await app.graphToPrompt();
    const workflow = app.graph.serialize();
    const w = workflow.nodes.find((n) => String(n.id) === String(node.id)); // newer frontends give node.id as a string
    w.widgets_values[node.widgets.findIndex((x) => x.name === "k")] = 0.45; // widgets_values[i] is widgets[i]'s
    await app.loadGraphData(workflow);
    const loaded = app.graph.getNodeById(node.id);
    app.canvas.ds.scale = 1;
    app.canvas.ds.offset = [0, 0];
    app.canvas.setDirty(true, true);
    return {
      widgets: node.widgets.length,
      widgetsValues: serialized.widgets_values,
      promptInputs: Object.keys(prompt.output[String(node.id)]?.inputs ?? {}),
      reloadedK: loaded?.widgets?.find((x) => x.name === "k")?.value ?? null,
      reloadedPlots: loaded?.widgets?.filter((x) => x.name === "asyndm_schedule_plot").length ?? 0,
    };
  });
  saved.after = await waitForDraw(page, (m) => m.found && m.params?.k === 0.45 && m.visible && m.nonBackground > 500, "the plot of a reloaded workflow", 10000).catch((e) => ({ error: String(e) }));
  if (saved.after.series) saved.after.series = saved.after.series.length;
  return saved;
}

// Two curves with the same k: drawn once, with one legend entry naming both.
async function equalKRound(page) {
  await addNode(page, "AsynDMKSampler", { steps: 30, key_words: "rabbit, basketball", curve: "bin", k: 0.7 });
  return waitForDraw(page, (m) => m.found && m.visible && m.draws > 0 && m.nonBackground > 500 && m.params?.keyWords === "rabbit, basketball", "equal k: the plot");
}

// Load Learned Scheduler: its plot draws the chosen file, follows a change of file, shows a file
// that fails to load as an error (no stale curve), and recovers with a good file.
async function loaderRound(page, label, files, broken, screenshots) {
  const [first, second] = files;
  const out = {};
  const ready = (name) => (m) => m.found && m.visible && m.state === "ready" && m.params?.name === name && m.nonBackground > 500;
  out.node = await addNode(page, "AsynDMSchedulerLoader", { schedule_name: first, key_words: "rabbit, basketball", k: 0.7 });
  if (label === "vue") await page.waitForSelector(`[data-node-id="${out.node.id}"]`, { timeout: T });
  out.first = await waitForDraw(page, ready(first), `${label}: the loader's plot of ${first}`);
  await page.waitForTimeout(200);
  out.first = await measure(page);
  out.screenshot = await screenshotNode(page, screenshots);
  await setWidget(page, "schedule_name", second);
  out.fileChange = await waitForDraw(page, ready(second), `${label}: the loader's plot to follow the file ${second}`);
  await setWidget(page, "schedule_name", broken);
  out.broken = await waitForDraw(page, (m) => m.found && m.state === "error" && m.params?.name === broken, `${label}: the load error of ${broken}`);
  await setWidget(page, "schedule_name", first);
  out.recovered = await waitForDraw(page, ready(first), `${label}: the plot of ${first} after the error`);
  return out;
}

// The loader's plot follows the schedule connected to it (Attention Mask to Timestep Map's k) and
// the steps of the sampler it feeds; disconnected, it is back on its own key words.
async function loaderLinks(page, file) {
  const out = {};
  const ready = (pred) => (m) => m.found && m.state === "ready" && m.params?.name === file && pred(m.params);
  out.ids = await page.evaluate(() => {
    const app = window.comfyAPI?.app?.app ?? window.app;
    const LiteGraph = window.LiteGraph ?? window.comfyAPI?.litegraph?.LiteGraph;
    const loader = app.graph.getNodeById(window.__asyndmNodeId);
    const mask = LiteGraph.createNode("AsynDMMaskToTimestepMap");
    mask.pos = [20, 480];
    app.graph.add(mask);
    const k = mask.widgets.find((w) => w.name === "k");
    k.value = 0.4;
    k.callback?.(k.value, app.canvas, mask);
    mask.connect(mask.findOutputSlot("schedule"), loader, loader.findInputSlot("schedule"));
    window.__asyndmMaskId = mask.id;
    return { mask: mask.id, loader: loader.id };
  });
  out.upstream = await waitForDraw(page, ready((p) => p.mode === "schedule" && p.items?.[0]?.k === 0.4), "the loader's plot with a connected schedule (k 0.4)");
  await page.evaluate(() => {
    const app = window.comfyAPI?.app?.app ?? window.app;
    const mask = app.graph.getNodeById(window.__asyndmMaskId);
    const k = mask.widgets.find((w) => w.name === "k");
    k.value = 0.9;
    k.callback?.(k.value, app.canvas, mask);
  });
  out.upstreamK = await waitForDraw(page, ready((p) => p.mode === "schedule" && p.items?.[0]?.k === 0.9), "the loader's plot after the connected schedule's k changed to 0.9");
  await page.evaluate(() => {
    const app = window.comfyAPI?.app?.app ?? window.app;
    const LiteGraph = window.LiteGraph ?? window.comfyAPI?.litegraph?.LiteGraph;
    const loader = app.graph.getNodeById(window.__asyndmNodeId);
    const sampler = LiteGraph.createNode("AsynDMKSampler");
    sampler.pos = [900, 120];
    app.graph.add(sampler);
    const steps = sampler.widgets.find((w) => w.name === "steps");
    steps.value = 20;
    steps.callback?.(steps.value, app.canvas, sampler);
    loader.connect(loader.findOutputSlot("schedule"), sampler, sampler.findInputSlot("schedule"));
  });
  out.downstream = await waitForDraw(page, ready((p) => p.steps === 20), "the loader's plot at the steps of the sampler it feeds");
  await page.evaluate(() => {
    const app = window.comfyAPI?.app?.app ?? window.app;
    const loader = app.graph.getNodeById(window.__asyndmNodeId);
    loader.disconnectInput(loader.findInputSlot("schedule"));
  });
  out.disconnected = await waitForDraw(page, ready((p) => p.mode === "key words"), "the loader's plot after the schedule was disconnected");
  return out;
}

// The template browser (Workflow > Browse Templates): the pack's category lists every template
// with its thumbnail, fetched from /api/workflow_templates/<pack>/<name>.jpg and decoded.
async function templateThumbnails(page, spec, screenshots) {
  const out = { served: {}, cards: {}, listed: [] };
  const prefix = `/api/workflow_templates/${spec.pack}/`;
  const onResponse = (res) => {
    const url = new URL(res.url());
    if (url.pathname.startsWith(prefix) && url.pathname.endsWith(".jpg")) {
      out.served[decodeURIComponent(url.pathname.slice(prefix.length, -4))] = { status: res.status(), type: res.headers()["content-type"] ?? null };
    }
  };
  page.on("response", onResponse);
  try {
    await page.evaluate(async () => {
      const app = window.comfyAPI?.app?.app ?? window.app;
      await app.extensionManager.command.execute("Comfy.BrowseTemplates");
    });
    const dialog = page.locator('[role="dialog"]');
    await dialog.locator(`[role="button"]:has-text("${spec.pack}")`).first().click({ timeout: T });
    await dialog.locator(`h3[title="${spec.names[0]}"]`).first().waitFor({ timeout: T });
    out.listed = await dialog.locator("h3[title]").evaluateAll((els) => els.map((e) => e.getAttribute("title")));
    for (const name of spec.names) {
      try {
        // cards below the fold load their image only once scrolled into view
        // (centred: the newest frontend renders a card's image only while the whole card is near the view)
        await dialog.locator(`h3[title="${name}"]`).first().evaluate((el) => el.scrollIntoView({ block: "center" }));
        const img = dialog.locator(`img[alt="${name}"]`).first();
        await img.waitFor({ state: "attached", timeout: 5000 });
        await img.scrollIntoViewIfNeeded({ timeout: 5000 });
        out.cards[name] = await img.evaluate(async (el) => {
          const deadline = Date.now() + 10000;
          while (!(el.complete && el.naturalWidth > 0) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
          const r = el.getBoundingClientRect();
          return { complete: el.complete, width: el.naturalWidth, height: el.naturalHeight, shown: [r.width, r.height], src: el.currentSrc || el.src };
        });
      } catch (e) {
        out.cards[name] = { error: String(e).slice(0, 500) };
      }
    }
    const box = await dialog.first().boundingBox();
    for (const p of screenshots ?? []) {
      fs.mkdirSync(path.dirname(p), { recursive: true });
      await page.screenshot({ path: p, clip: box ?? undefined, timeout: T });
    }
    await page.keyboard.press("Escape");
  } finally {
    page.off("response", onResponse);
  }
  return out;
}

let context;
try {
  context = await withTimeout(
    chromium.launchPersistentContext(input.userDataDir, {
      executablePath: input.chromium,
      headless: true,
      args: [
        "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
      ],
      viewport: { width: 1280, height: 1000 },
      deviceScaleFactor: 2,
      timeout: T,
    }),
    T + 5000,
    "launching chromium",
  );
  mark("launched");
  const page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(T);
  await page.addInitScript(() => {
    try {
      localStorage.setItem("vueNodesBannerDismissed", "true");
    } catch {}
  });
  page.on("console", (msg) => {
    const loc = msg.location?.() ?? {};
    const entry = { type: msg.type(), text: msg.text().slice(0, 2000), url: loc.url ?? "" };
    if (["error", "warning"].includes(entry.type)) result.console.push(entry);
  });
  page.on("pageerror", (err) => result.pageErrors.push({ text: String(err?.stack ?? err).slice(0, 3000) }));
  page.on("response", (res) => {
    if (res.status() >= 400 && res.url().includes(PACK)) result.badResponses.push({ url: res.url(), status: res.status() });
  });

  await page.goto(input.url, { waitUntil: "domcontentloaded", timeout: T });
  await page.waitForFunction(
    () => {
      const app = window.comfyAPI?.app?.app ?? window.app;
      // ... and the start-up workflow is in (newer frontends load it a moment after the app is up;
      // a node added before that would be cleared with the graph)
      const workflows = app?.extensionManager?.workflow;
      return !!(app?.graph && app.canvas && window.LiteGraph && app.extensions?.some?.((e) => e.name === "asyndm.SchedulePlot")
        && (!workflows || workflows.activeWorkflow));
    },
    null,
    { timeout: 2 * T, polling: 100 },
  );
  mark("app ready");
  result.frontendVersion = await page.evaluate(async () => {
    const app = window.comfyAPI?.app?.app ?? window.app;
    return (await app.graphToPrompt()).workflow?.extra?.frontendVersion ?? null;
  });
  result.extensions = await page.evaluate(async () => (await (await fetch("/extensions")).json()).filter((u) => /asyndm/i.test(u)));
  result.vueSetting = await page.evaluate(() => {
    const app = window.comfyAPI?.app?.app ?? window.app;
    return app.extensionManager?.setting?.get?.("Comfy.VueNodes.Enabled") ?? null;
  });

  // 1. The curve module alone, against the numbers the Python test computed.
  result.curves = await page.evaluate(
    async ([url, cases]) => {
      const m = await import(url);
      return {
        values: cases.map((c) => m.track(c.curve, c.k, c.steps)),
        parsed: m.parseKeyWords("rabbit, basketball:0.9", 0.7),
      };
    },
    [`${PACK}js/asyndm_curves.js`, input.curveCases],
  );
  mark("curves");

  // 2. Classic LiteGraph canvas.
  result.node = await addNode(page, "AsynDMKSampler", { steps: 50, key_words: "rabbit, basketball:0.9", curve: "bin", k: 0.7 });
  result.classic = await classicOrVueRound(page, "classic", input.screenshots?.classic);
  mark("classic");
  result.classic.uiEdit = await classicUiEdit(page);
  mark("classic ui edit");
  result.classic.saved = await saveAndReload(page);
  mark("classic reload");

  // A node without a steps widget (AsynDMSampler) also gets its plot, at the default N.
  result.samplerNode = await addNode(page, "AsynDMSampler", {});
  result.sampler = await waitForDraw(page, (m) => m.found && m.draws > 0 && m.nonBackground > 500, "AsynDMSampler plot");
  result.sampler.series = result.sampler.series?.map((s) => ({ ...s, values: s.values.length }));
  mark("sampler node");

  // Curves with the same k, and Load Learned Scheduler, in the classic canvas.
  result.equalK = await equalKRound(page);
  mark("equal k");
  if (input.loader) {
    result.loader = await loaderRound(page, "classic", input.loader.files, input.loader.broken, input.screenshots?.loader);
    mark("loader");
    result.loader.links = await loaderLinks(page, input.loader.files[0]);
    mark("loader links");
  }

  // 3. The Vue node renderer ("Nodes 2.0"), when this frontend has it.
  if (input.vue !== false) {
    const has = await page.evaluate(async () => {
      const app = window.comfyAPI?.app?.app ?? window.app;
      const setting = app.extensionManager?.setting;
      if (!setting?.set) return false;
      await setting.set("Comfy.VueNodes.Enabled", true);
      return setting.get("Comfy.VueNodes.Enabled") === true;
    });
    result.vueAvailable = has;
    if (has) {
      result.vueNode = await addNode(page, "AsynDMKSampler", { steps: 30, key_words: "rabbit, basketball:0.95", curve: "exp", k: 0.7 });
      await page.waitForSelector(`[data-node-id="${result.vueNode.id}"]`, { timeout: T });
      result.vue = await classicOrVueRound(page, "vue", input.screenshots?.vue);
      mark("vue");
      result.vue.uiEdit = await vueUiEdit(page);
      mark("vue ui edit");
      if (input.loader) {
        result.loaderVue = await loaderRound(page, "vue", input.loader.files, input.loader.broken, input.screenshots?.loaderVue);
        mark("vue loader");
      }
      await page.evaluate(async () => {
        const app = window.comfyAPI?.app?.app ?? window.app;
        await app.extensionManager.setting.set("Comfy.VueNodes.Enabled", false);
      });
    }
  }
  if (input.templates) {
    result.templates = await templateThumbnails(page, input.templates, input.screenshots?.templates);
    mark("templates");
  }
  result.ok = true;
} catch (e) {
  result.error = String(e?.stack ?? e);
} finally {
  try {
    if (context) await withTimeout(context.close(), 15000, "closing the browser");
  } catch (e) {
    result.closeError = String(e);
  }
  result.timings.total = (Date.now() - t0) / 1000;
  result.consoleOurs = result.console.filter((c) => c.type === "error" && (ours(c.url) || ours(c.text)));
  result.pageErrorsOurs = result.pageErrors.filter((e) => ours(e.text));
  result.warningsOurs = result.console.filter((c) => c.type === "warning" && /asyndm\.SchedulePlot/.test(c.text));
  // exit once the line is flushed: a pipe takes 64 KiB at a time, and process.exit would cut a longer report
  process.stdout.write(`${JSON.stringify(result)}\n`, () => process.exit(0));
}
