// Loads the pack's example workflows in headless Chromium the way the template browser does, for
// tests/server/test_workflows.py:
//
//   node run_workflows.mjs INPUT.json
//
// INPUT: { url, chromium, nodeDir, userDataDir, out, pack, timeoutMs, runTimeoutMs,
//          workflows: [{ name, run, changes: { nodeId: { widget: value } } }] }
// For each workflow: fetch /api/workflow_templates/<pack>/<name>.json, app.loadGraphData it, report
// app.graphToPrompt()'s output; with run, set the given widget values (test models, small sizes),
// app.queuePrompt(0, 1) (it returns false even on success) and poll /history for the new entry.
// Writes its report (JSON) to INPUT.out and a summary line on stdout. Every wait is bounded; the browser is always closed.
import { createRequire } from "node:module";
import fs from "node:fs";
import path from "node:path";

const input = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const require = createRequire(path.join(input.nodeDir, "package.json"));
const { chromium } = require("playwright-core");

const T = input.timeoutMs ?? 20000;
const RUN_T = input.runTimeoutMs ?? 120000;
const result = { ok: false, steps: [], workflows: {}, console: [], pageErrors: [], timings: {} };
const t0 = Date.now();
const mark = (name) => {
  result.timings[name] = (Date.now() - t0) / 1000;
  result.steps.push(name);
};

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

// In the page: load one template the way the template browser does, and convert it.
async function loadTemplate(page, pack, name) {
  return page.evaluate(
    async ([pack, name]) => {
      const app = window.comfyAPI?.app?.app ?? window.app;
      const LiteGraph = window.LiteGraph ?? window.comfyAPI?.litegraph?.LiteGraph;
      const out = { loadError: null };
      const res = await fetch(`/api/workflow_templates/${pack}/${name}.json`, { cache: "no-store" });
      out.status = res.status;
      out.template = await res.json();
      try {
        await app.loadGraphData(out.template, true, true, name, { showMissingModelsDialog: false, showMissingNodesDialog: false });
      } catch (e) {
        out.loadError = String(e?.stack ?? e);
        return out;
      }
      out.nodes = app.graph._nodes.length;
      out.missingTypes = app.graph._nodes.filter((n) => !LiteGraph.registered_node_types[n.type]).map((n) => n.type);
      out.prompt = (await app.graphToPrompt()).output;
      return out;
    },
    [pack, name],
  );
}

// In the page: set widget values by node id and name (a PrimitiveNode's widget is 'value').
async function applyChanges(page, changes) {
  return page.evaluate((changes) => {
    const app = window.comfyAPI?.app?.app ?? window.app;
    const missing = [];
    for (const [id, widgets] of Object.entries(changes)) {
      const node = app.graph.getNodeById(Number(id));
      for (const [name, value] of Object.entries(widgets)) {
        const w = node?.widgets?.find((x) => x.name === name);
        if (!w) {
          missing.push(`${id}.${name}`);
          continue;
        }
        w.value = value;
        w.callback?.(w.value, app.canvas, node);
      }
    }
    app.canvas.setDirty(true, true);
    return missing;
  }, changes);
}

async function historyIds(page) {
  return page.evaluate(async () => Object.keys(await (await fetch("/history", { cache: "no-store" })).json()));
}

async function queueAndWait(page, before) {
  const queued = await page.evaluate(async () => {
    const app = window.comfyAPI?.app?.app ?? window.app;
    return await app.queuePrompt(0, 1);
  });
  const known = new Set(before);
  const deadline = Date.now() + RUN_T;
  while (Date.now() < deadline) {
    const done = await page.evaluate(async (known) => {
      const hist = await (await fetch("/history", { cache: "no-store" })).json();
      for (const [id, entry] of Object.entries(hist)) {
        if (known.includes(id)) continue;
        const s = entry.status ?? {};
        if (s.completed || s.status_str === "error") return { id, entry };
      }
      return null;
    }, [...known]);
    if (done) return { queued, promptId: done.id, history: done.entry };
    await page.waitForTimeout(250);
  }
  return { queued, runError: `no finished history entry within ${RUN_T} ms` };
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
    if (msg.type() === "error") result.console.push(msg.text().slice(0, 500));
  });
  page.on("pageerror", (err) => result.pageErrors.push(String(err?.stack ?? err).slice(0, 1500)));
  await page.goto(input.url, { waitUntil: "domcontentloaded", timeout: T });
  await page.waitForFunction(
    () => {
      const app = window.comfyAPI?.app?.app ?? window.app;
      return !!(app?.graph && app.canvas && window.LiteGraph && app.extensions?.length);
    },
    null,
    { timeout: 2 * T, polling: 100 },
  );
  mark("app ready");
  for (const item of input.workflows) {
    const c0 = result.console.length;
    const p0 = result.pageErrors.length;
    const seen = await withTimeout(loadTemplate(page, input.pack, item.name), T, `loading ${item.name}`);
    await page.waitForTimeout(200); // let the canvas draw the loaded graph once
    seen.consoleErrors = result.console.slice(c0);
    seen.pageErrors = result.pageErrors.slice(p0);
    result.workflows[item.name] = seen;
    mark(`loaded ${item.name}`);
    if (!item.run || seen.loadError) continue;
    seen.missingWidgets = await applyChanges(page, item.changes ?? {});
    const before = await historyIds(page);
    Object.assign(seen, await queueAndWait(page, before));
    mark(`ran ${item.name}`);
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
  // The report is large (templates, history entries): write it to a file, synchronously, before exiting.
  fs.writeFileSync(input.out, JSON.stringify(result));
  process.stdout.write(`${JSON.stringify({ ok: result.ok, steps: result.steps, error: result.error ?? null })}\n`);
  process.exit(0);
}
