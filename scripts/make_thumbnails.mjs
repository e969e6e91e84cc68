// Screenshots behind the template thumbnails (scripts/make_thumbnails.py runs this and composes
// workflows/<name>.jpg from what it writes).
//
//   node make_thumbnails.mjs INPUT.json
//
// INPUT: { url, chromium, nodeDir, userDataDir, out, workflows: [{ name, path }], timeoutMs }
// For each workflow, loaded as the template browser loads it (app.loadGraphData), in the classic
// renderer, it writes OUT/<name>-overview.png (the whole graph fitted into the window) and
// OUT/<name>-plot.png (the in-node schedule plot of its main AsynDM node at zoom 1, as drawn when
// the graph opens), and prints one JSON line: { ok, error, workflows: [{ name, hero, plotState }] }.
import { createRequire } from "node:module";
import fs from "node:fs";
import path from "node:path";

const input = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const require = createRequire(path.join(input.nodeDir, "package.json"));
const { chromium } = require("playwright-core");

const T = input.timeoutMs ?? 20000;
const VIEW = { width: 2400, height: 1500 };
const HERO_TYPES = ["AsynDMSchedulerLoader", "AsynDMMaskToTimestepMap", "AsynDMKSampler", "AsynDMSampler"];
const result = { ok: false, workflows: [] };

async function plotsSettled(page) {
  const deadline = Date.now() + T;
  while (Date.now() < deadline) {
    const states = await page.evaluate(() => {
      const app = window.comfyAPI?.app?.app ?? window.app;
      return app.graph.nodes.flatMap((n) => (n.widgets ?? []).filter((w) => w.name === "asyndm_schedule_plot").map((w) => w.asyndmPlot?.state ?? null));
    });
    if (states.every((s) => s === "ready" || s === "error")) return states;
    await page.waitForTimeout(100);
  }
  throw new Error("the schedule plots did not finish drawing");
}

async function frames(page, ms = 400) {
  await page.evaluate(() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r))));
  await page.waitForTimeout(ms);
}

let context;
try {
  context = await chromium.launchPersistentContext(input.userDataDir, {
    executablePath: input.chromium,
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
      "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--font-render-hinting=none"],
    viewport: VIEW,
    deviceScaleFactor: 2,
    timeout: T,
  });
  const page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(T);
  await page.addInitScript(() => {
    try {
      localStorage.setItem("vueNodesBannerDismissed", "true");
    } catch {}
  });
  await page.goto(input.url, { waitUntil: "domcontentloaded" });
  await page.waitForFunction(() => {
    const app = window.comfyAPI?.app?.app ?? window.app;
    const workflows = app?.extensionManager?.workflow;
    return !!(app?.graph && app.canvas && app.extensions?.some?.((e) => e.name === "asyndm.SchedulePlot") && (!workflows || workflows.activeWorkflow));
  }, null, { timeout: 2 * T, polling: 100 });

  for (const wf of input.workflows) {
    const json = JSON.parse(fs.readFileSync(wf.path, "utf8"));
    await page.evaluate(async ([json, name]) => {
      const app = window.comfyAPI?.app?.app ?? window.app;
      await app.loadGraphData(json, true, true, name);
    }, [json, wf.name]);
    await frames(page);
    const states = await plotsSettled(page);

    // 1. the whole graph, fitted into the window away from the frontend's menus
    const clip = await page.evaluate(([view]) => {
      const app = window.comfyAPI?.app?.app ?? window.app;
      const title = window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
      let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
      const add = (a, b, c, d) => {
        x0 = Math.min(x0, a); y0 = Math.min(y0, b); x1 = Math.max(x1, c); y1 = Math.max(y1, d);
      };
      for (const n of app.graph.nodes) add(n.pos[0], n.pos[1] - title, n.pos[0] + n.size[0], n.pos[1] + n.size[1]);
      for (const g of app.graph.groups ?? []) {
        const b = g._bounding ?? g.bounding ?? [g.pos[0], g.pos[1], g.size[0], g.size[1]];
        add(b[0], b[1], b[0] + b[2], b[1] + b[3]);
      }
      const pad = 20;
      x0 -= pad; y0 -= pad; x1 += pad; y1 += pad;
      const rect = app.canvas.canvas.getBoundingClientRect();
      const area = { x: 120, y: 140, w: view.width - 240, h: view.height - 280 };
      const scale = Math.min(area.w / (x1 - x0), area.h / (y1 - y0), 1.25);
      const w = (x1 - x0) * scale, h = (y1 - y0) * scale;
      const sx = area.x + (area.w - w) / 2, sy = area.y + (area.h - h) / 2; // where the box goes on screen
      app.canvas.ds.scale = scale;
      app.canvas.ds.offset = [(sx - rect.left) / scale - x0, (sy - rect.top) / scale - y0];
      app.canvas.deselectAll?.();
      app.canvas.setDirty(true, true);
      return { x: sx, y: sy, width: w, height: h };
    }, [VIEW]);
    await frames(page, 600);
    await page.screenshot({ path: path.join(input.out, `${wf.name}-overview.png`), clip });

    // 2. the main AsynDM node's schedule plot at zoom 1
    const hero = await page.evaluate(([types]) => {
      const app = window.comfyAPI?.app?.app ?? window.app;
      const plotted = (n) => (n.widgets ?? []).some((w) => w.name === "asyndm_schedule_plot");
      const node = types.map((t) => app.graph.nodes.find((n) => n.type === t && plotted(n))).find(Boolean);
      if (!node) return null;
      const rect = app.canvas.canvas.getBoundingClientRect();
      app.canvas.ds.scale = 1;
      app.canvas.ds.offset = [(rect.width / 2) - node.pos[0] - node.size[0] / 2, 200 - node.pos[1]];
      app.canvas.setDirty(true, true);
      window.__asyndmHero = node.id;
      return { id: node.id, type: node.type, title: node.title };
    }, [HERO_TYPES]);
    if (!hero) throw new Error(`${wf.name}: no AsynDM node with a schedule plot`);
    await frames(page, 600);
    const plotState = await plotsSettled(page);
    const box = await page.evaluate(() => {
      const app = window.comfyAPI?.app?.app ?? window.app;
      const node = app.graph.getNodeById(window.__asyndmHero);
      const canvas = node.widgets.find((w) => w.name === "asyndm_schedule_plot").element.querySelector("canvas");
      const r = canvas.getBoundingClientRect();
      return { x: r.x, y: r.y, width: r.width, height: r.height, state: node.widgets.find((w) => w.name === "asyndm_schedule_plot").asyndmPlot.state };
    });
    if (box.state !== "ready") throw new Error(`${wf.name}: the plot of ${hero.title} shows no curve (${box.state})`);
    await page.screenshot({ path: path.join(input.out, `${wf.name}-plot.png`), clip: { x: box.x, y: box.y, width: box.width, height: box.height } });
    result.workflows.push({ name: wf.name, hero, states, plotState });
  }
  result.ok = true;
} catch (e) {
  result.error = String(e?.stack ?? e);
} finally {
  try {
    if (context) await context.close();
  } catch (e) {
    result.closeError = String(e);
  }
  process.stdout.write(`${JSON.stringify(result)}\n`);
  process.exit(result.ok ? 0 : 1);
}
