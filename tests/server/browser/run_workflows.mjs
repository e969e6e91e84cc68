// Drives the pack's example workflows through the real frontend in headless Chromium, for
// tests/server/test_workflows.py:
//
//   node run_workflows.mjs INPUT.json
//
// INPUT: { url, chromium, nodeDir, userDataDir, out, pack, timeoutMs, runTimeoutMs,
//          workflows: [{ name, saveAs, substitute, changes: { nodeId: { widget: value } }, run, reload, edits: { ... } }] }
//
// For each workflow, in one page, with a phase name on everything it records:
//   load      fetch /api/workflow_templates/<pack>/<name>.json, app.loadGraphData it as the template
//             browser does, report app.graphToPrompt()'s output;
//   substitute (with `substitute`, a UI workflow) open it in the same tab, in place of the template, as
//             the round trip below does: the tests' variant of a template whose text encoders cannot run
//             on the test machines (test_workflows.py, with_test_conditioning);
//   settings  set `changes` on the widgets (test models, small sizes, shifted seeds) and let the
//             change tracker see them (as the mouseup after a real edit does); snapshot the widgets;
//   roundtrip app.graph.serialize() -> JSON.stringify -> JSON.parse -> app.loadGraphData; snapshot;
//   save      Ctrl+S, type `saveAs` into the frontend's "Save workflow" prompt, Enter: the frontend
//             POSTs the workflow to /api/userdata/workflows%2F<saveAs>.json; read the file back and
//             open it (app.loadGraphData) as the workflows sidebar does; snapshot;
//   run       (unless `run` is false: no test model for it) app.queuePrompt(0, 1) on that reopened graph;
//             the POST /api/prompt reply gives the prompt id, polled in /history until it completes or errors;
//   reload    (with `reload`) set `edits` (a new value for every editable widget of the pack's nodes), snapshot,
//             page.reload(): the frontend restores the last workflow from session storage
//             (Comfy.Workflow.Persist); snapshot again.
// A snapshot lists, per node, every widget (name, type, value) and node.serialize().widgets_values.
// Dialogs, toasts and native dialogs are recorded as they appear (a MutationObserver installed in
// every document) and looked for at the end of every phase; page errors and console errors and
// warnings are recorded with their phase. The Python test judges all of it.
// Writes its report (JSON) to INPUT.out and a summary line on stdout. Every wait is bounded; the browser is always closed.
import { createRequire } from "node:module";
import fs from "node:fs";
import path from "node:path";

const input = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const require = createRequire(path.join(input.nodeDir, "package.json"));
const { chromium } = require("playwright-core");

const T = input.timeoutMs ?? 20000;
const RUN_T = input.runTimeoutMs ?? 120000;
const result = { ok: false, steps: [], workflows: {}, console: [], pageErrors: [], dialogs: [], nativeDialogs: [], timings: {} };
const t0 = Date.now();
let phase = "start";
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

// Selectors of what the user would see as a dialog or a message: PrimeVue dialogs (the error,
// missing-nodes/models and prompt dialogs of frontend 1.3x), the legacy ComfyDialog and the toasts.
const DIALOG_SELECTOR = ".p-dialog, .comfy-modal, .p-toast-message";

// In every document, before the app's scripts: report each dialog when it is shown and each toast
// when it appears (toasts go away by themselves, so looking only at the end of a phase could miss
// one). The frontend keeps some hidden legacy modals (.comfy-modal) in the page from the start: they
// count only once displayed.
function watchDialogs(selector) {
  const shown = new WeakMap();
  const visible = (el) => {
    if (!el.isConnected) return false;
    const style = getComputedStyle(el);
    const rect = el.getBoundingClientRect();
    return style.display !== "none" && style.visibility !== "hidden" && rect.width > 0 && rect.height > 0;
  };
  const report = (el, text) => window.__asyndmDialog?.({ className: String(el.className ?? ""), text: (text ?? "").trim().slice(0, 2000) });
  const check = (el) => {
    const first = (el.textContent ?? "").trim();
    const toast = el.classList.contains("p-toast-message");
    setTimeout(() => {
      const now = visible(el);
      if ((now || (toast && !shown.has(el))) && !shown.get(el)) report(el, (now ? el.innerText : "") || first);
      shown.set(el, now || toast);
    }, 300);
  };
  const scan = (root) => {
    if (!(root instanceof Element)) return;
    if (root.matches(selector)) check(root);
    for (const el of root.querySelectorAll(selector)) check(el);
  };
  new MutationObserver((records) => {
    for (const r of records) {
      if (r.type === "attributes") {
        if (r.target instanceof Element && r.target.matches(selector)) check(r.target);
      } else {
        for (const n of r.addedNodes) scan(n);
      }
    }
  }).observe(document, { childList: true, subtree: true, attributes: true, attributeFilter: ["style", "class"] });
}

// In the page: what is on screen now that looks like a dialog or an error (visible only).
async function visibleDialogs(page) {
  return page.evaluate((selector) => {
    const out = [];
    for (const el of document.querySelectorAll(selector)) {
      const style = getComputedStyle(el);
      const rect = el.getBoundingClientRect();
      if (style.display === "none" || style.visibility === "hidden" || rect.width === 0 || rect.height === 0) continue;
      out.push({ className: String(el.className ?? ""), text: (el.innerText ?? "").trim().slice(0, 2000) });
    }
    return out;
  }, DIALOG_SELECTOR);
}

// Close what is open (after recording it), so that one workflow's error dialog is not blamed on the next.
async function closeDialogs(page) {
  for (let i = 0; i < 5 && (await visibleDialogs(page)).some((d) => !d.className.includes("p-toast")); i++) {
    const close = page.locator(".p-dialog .p-dialog-close-button:visible, .comfy-modal .comfy-modal-close:visible, .comfy-modal button:visible").first();
    if ((await close.count()) > 0) await close.click({ timeout: 2000 }).catch(() => {});
    else await page.keyboard.press("Escape");
    await page.waitForTimeout(300);
  }
}

const APP = "(window.comfyAPI?.app?.app ?? window.app)";

async function waitForApp(page) {
  await page.waitForFunction(
    () => {
      const app = window.comfyAPI?.app?.app ?? window.app;
      return !!(app?.graph && app.canvas && window.LiteGraph && app.extensions?.some?.((e) => e.name === "asyndm.SchedulePlot")
        && app.extensionManager?.workflow?.activeWorkflow);
    },
    null,
    { timeout: 2 * T, polling: 100 },
  );
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

// In the page: set widget values by node id and name (a PrimitiveNode's widget is 'value'), then let
// the change tracker compare the graph with its last state, as it does on the mouseup that ends a
// real edit (that is what marks the workflow modified and persists it to session storage).
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
    app.extensionManager.workflow.activeWorkflow?.changeTracker?.checkState();
    return missing;
  }, changes);
}

// In the page: every node's widgets and serialized widgets_values; marks the node objects so a later
// snapshot can tell that the graph was really rebuilt.
const SNAPSHOT = `(() => {
  const app = ${APP};
  const nodes = {};
  let stale = 0;
  for (const node of app.graph._nodes) {
    if (node.__asyndmSeen) stale++;
    node.__asyndmSeen = true;
    nodes[String(node.id)] = {
      type: node.type,
      // serialize: saved in widgets_values; inPrompt: sent to the server
      widgets: (node.widgets ?? []).map((w) => ({ name: w.name, type: w.type, value: w.value ?? null, serialize: w.serialize !== false, inPrompt: w.options?.serialize !== false })),
      widgetsValues: node.serialize().widgets_values ?? null,
    };
  }
  const wf = app.extensionManager.workflow.activeWorkflow;
  return { nodes, stale, workflow: wf ? { key: wf.key, path: wf.path, persisted: !!wf.isPersisted, modified: !!wf.isModified, temporary: !!wf.isTemporary } : null };
})()`;

async function snapshot(page) {
  return page.evaluate(SNAPSHOT);
}

async function openSubstitute(page, graph) {
  return page.evaluate(async (graph) => {
    const app = window.comfyAPI?.app?.app ?? window.app;
    await app.loadGraphData(graph, true, true, app.extensionManager.workflow.activeWorkflow, {
      showMissingModelsDialog: false, showMissingNodesDialog: false,
    });
    return app.graph._nodes.length;
  }, graph);
}

async function roundTrip(page) {
  return page.evaluate(async () => {
    const app = window.comfyAPI?.app?.app ?? window.app;
    const json = JSON.stringify(app.graph.serialize());
    await app.loadGraphData(JSON.parse(json), true, true, app.extensionManager.workflow.activeWorkflow, {
      showMissingModelsDialog: false, showMissingNodesDialog: false,
    });
    return json.length;
  });
}

// Save with the keyboard shortcut and the frontend's own filename prompt.
async function saveThroughUi(page, saveAs) {
  const out = { saveAs };
  const posted = page.waitForResponse(
    (r) => r.request().method() === "POST" && decodeURIComponent(r.url()).includes(`/userdata/workflows/${saveAs}.json`),
    { timeout: T },
  );
  posted.catch(() => {}); // judged below
  await page.mouse.move(640, 900); // over the canvas, clear of nodes
  await page.keyboard.press("Control+s");
  const prompt = page.locator(".p-dialog .prompt-dialog-content input");
  await prompt.waitFor({ state: "visible", timeout: 5000 });
  out.promptDialog = await prompt.evaluate((el) => (el.closest(".p-dialog")?.innerText ?? "").trim());
  out.defaultName = await prompt.inputValue();
  await prompt.fill(saveAs);
  await prompt.press("Enter");
  const response = await posted;
  out.postStatus = response.status();
  out.postUrl = response.url();
  await page.waitForFunction(
    (saveAs) => {
      const app = window.comfyAPI?.app?.app ?? window.app;
      const wf = app.extensionManager.workflow.activeWorkflow;
      return wf?.path === `workflows/${saveAs}.json` && wf.isPersisted && !wf.isModified;
    },
    saveAs,
    { timeout: T, polling: 100 },
  );
  await prompt.waitFor({ state: "detached", timeout: 5000 }).catch(() => {});
  // What the server stored, opened as the workflows sidebar opens it.
  Object.assign(out, await page.evaluate(async (saveAs) => {
    const app = window.comfyAPI?.app?.app ?? window.app;
    const res = await fetch(`/api/userdata/${encodeURIComponent(`workflows/${saveAs}.json`)}`, { cache: "no-store" });
    const text = await res.text();
    await app.loadGraphData(JSON.parse(text), true, true, saveAs, { showMissingModelsDialog: false, showMissingNodesDialog: false });
    return { getStatus: res.status, saved: JSON.parse(text) };
  }, saveAs));
  return out;
}

async function queueAndWait(page) {
  const posted = page.waitForResponse((r) => r.request().method() === "POST" && new URL(r.url()).pathname.endsWith("/prompt"), { timeout: T });
  posted.catch(() => {});
  const queued = await page.evaluate(async () => {
    const app = window.comfyAPI?.app?.app ?? window.app;
    return await app.queuePrompt(0, 1);
  });
  let response;
  try {
    response = await posted;
  } catch (e) {
    return { queued, runError: `no POST /api/prompt after app.queuePrompt: ${e}` };
  }
  const body = await response.text().catch(() => "");
  if (response.status() !== 200) return { queued, runError: `POST /api/prompt answered ${response.status()}: ${body.slice(0, 3000)}` };
  const promptId = JSON.parse(body).prompt_id;
  const deadline = Date.now() + RUN_T;
  while (Date.now() < deadline) {
    const entry = await page.evaluate(async (id) => {
      const hist = await (await fetch(`/api/history/${id}`, { cache: "no-store" })).json();
      const e = hist[id];
      const s = e?.status ?? {};
      return s.completed || s.status_str === "error" ? e : null;
    }, promptId);
    if (entry) return { queued, promptId, history: entry };
    await page.waitForTimeout(250);
  }
  return { queued, promptId, runError: `prompt ${promptId}: no finished history entry within ${RUN_T} ms` };
}

async function reloadAndWait(page, expectedNodes) {
  await page.reload({ waitUntil: "domcontentloaded", timeout: T });
  await waitForApp(page);
  await page.waitForFunction(
    (ids) => {
      const app = window.comfyAPI?.app?.app ?? window.app;
      return ids.every((id) => app.graph.getNodeById(Number(id)));
    },
    expectedNodes,
    { timeout: T, polling: 100 },
  );
  await page.waitForTimeout(300); // let onAfterGraphConfigured hooks and the first draw run
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
  await page.exposeFunction("__asyndmDialog", (d) => result.dialogs.push({ phase, ...d }));
  await page.addInitScript(() => {
    try {
      localStorage.setItem("vueNodesBannerDismissed", "true");
    } catch {}
  });
  await page.addInitScript(watchDialogs, DIALOG_SELECTOR);
  page.on("console", (msg) => {
    if (!["error", "warning"].includes(msg.type())) return;
    const loc = msg.location?.() ?? {};
    result.console.push({ phase, type: msg.type(), text: msg.text().slice(0, 1500), url: loc.url ?? "" });
  });
  page.on("pageerror", (err) => result.pageErrors.push({ phase, text: String(err?.stack ?? err).slice(0, 3000) }));
  page.on("dialog", async (d) => {
    // alert/confirm/prompt are what old error paths use: record them. A beforeunload prompt (unsaved
    // changes) is accepted, as a user reloading the page would.
    result.nativeDialogs.push({ phase, type: d.type(), message: d.message().slice(0, 2000) });
    await (d.type() === "beforeunload" ? d.accept() : d.dismiss()).catch(() => {});
  });
  await page.goto(input.url, { waitUntil: "domcontentloaded", timeout: T });
  await waitForApp(page);
  mark("app ready");

  for (const item of input.workflows) {
    const seen = { phases: {}, snapshots: {} };
    result.workflows[item.name] = seen;
    const step = async (name, fn, ms = T) => {
      phase = `${item.name}:${name}`;
      const value = await withTimeout(fn(), ms, `${item.name}: ${name}`);
      await page.waitForTimeout(150); // let a dialog or toast that the step caused appear
      seen.phases[name] = { visibleDialogs: await visibleDialogs(page) };
      if (seen.phases[name].visibleDialogs.length) await closeDialogs(page);
      mark(`${item.name}: ${name}`);
      return value;
    };

    // One workflow's failure (a step that times out) is reported with it; the next one still runs.
    try {
      Object.assign(seen, await step("load", () => loadTemplate(page, input.pack, item.name)));
      if (seen.loadError) continue;
      if (item.substitute) seen.substituteNodes = await step("substitute", () => openSubstitute(page, item.substitute));
      seen.missingWidgets = await step("settings", () => applyChanges(page, item.changes ?? {}));
      seen.snapshots.settings = await snapshot(page);
      await step("roundtrip", () => roundTrip(page));
      seen.snapshots.roundtrip = await snapshot(page);
      seen.save = await step("save", () => saveThroughUi(page, item.saveAs), 3 * T);
      seen.snapshots.reopened = await snapshot(page);
      if (item.run !== false) Object.assign(seen, await step("run", () => queueAndWait(page), RUN_T + 2 * T));
      if (!item.reload) continue;
      seen.missingEdits = await step("edit", () => applyChanges(page, item.edits ?? {}));
      seen.snapshots.edited = await snapshot(page);
      seen.storedWorkflow = await page.evaluate(() => ({
        previous: localStorage.getItem("Comfy.PreviousWorkflow") ?? sessionStorage.getItem("Comfy.PreviousWorkflow"),
        session: Object.keys(sessionStorage).filter((k) => k.startsWith("workflow:")).length,
      }));
      await step("reload", () => reloadAndWait(page, Object.keys(seen.snapshots.edited.nodes)), 4 * T);
      seen.snapshots.reloaded = await snapshot(page);
    } catch (e) {
      seen.error = `${phase}: ${String(e?.stack ?? e)}`;
      await closeDialogs(page).catch(() => {});
    }
  }
  phase = "end";
  result.ok = true;
} catch (e) {
  result.error = `${phase}: ${String(e?.stack ?? e)}`;
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
