// Drives the real ComfyUI frontend in headless Debian chromium (playwright-core, no browser download) for
// tests/comfyui/test_check_screenshot.py: loads a check_erasure workflow, queues it from the page, waits
// until the Eraser Check node shows its output image, and screenshots the canvas region holding the node
// and the Preview Image node. Usage: node check_screenshot_driver.mjs <config.json>
// Prints one JSON line of observations (the Python test asserts on them).

import { readFileSync } from "node:fs";
import { createRequire } from "node:module";

const config = JSON.parse(readFileSync(process.argv[2], "utf-8"));
const require = createRequire(config.playwrightDir.endsWith("/") ? config.playwrightDir : config.playwrightDir + "/");
const { chromium } = require("playwright-core");

const out = { console: [] };
const browser = await chromium.launch({
  executablePath: config.chromium,
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run"],
});

try {
  const page = await browser.newPage({ viewport: config.viewport });
  page.on("console", (m) => { if (m.type() === "error") out.console.push(`${m.type()}: ${m.text()}`); });
  page.on("pageerror", (e) => out.console.push(`pageerror: ${e.message}`));
  await page.goto(config.url);
  await page.waitForFunction(() => window.comfyAPI?.app?.app?.graph && window.comfyAPI.app.app.extensionManager,
    null, { timeout: 120000 });
  out.frontendVersion = await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__ ?? null);

  // The app object and its graph exist before the node definitions are registered (frontend 1.47 fetches
  // them after the canvas is up): a workflow loaded in between comes back as placeholder nodes with no
  // comfyClass, which the server refuses as "missing_node_type". Load until every node is a real one.
  const deadline = Date.now() + 120000;
  for (;;) {
    // the canvas may still be coming up as well ("getCanvas: canvas is null"): that is also a retry
    out.loadError = await page.evaluate(async (wf) => {
      const app = window.comfyAPI.app.app;
      if (!app.canvas) return "no canvas yet";
      try {
        await app.loadGraphData(wf, true, true, null, { showMissingNodesDialog: false, showMissingModelsDialog: false });
        return null;
      } catch (e) { return String(e); }
    }, config.workflow);
    await page.waitForTimeout(500);
    out.loadedNodes = await page.evaluate(() => window.comfyAPI.app.app.graph.nodes.map((n) =>
      ({ id: n.id, type: n.type, comfyClass: n.comfyClass ?? null, mode: n.mode })));
    if (!out.loadError && out.loadedNodes.length && out.loadedNodes.every((n) => n.comfyClass)) break;
    if (Date.now() > deadline) throw new Error(`the workflow never loaded as real nodes: ${out.loadError ?? ""} ${JSON.stringify(out.loadedNodes)}`);
    await page.waitForTimeout(1000);
  }

  // queue exactly as the Queue button does; the server's "executed" message names the prompt id, which
  // the test uses to read the server's history. A prompt the server refuses (400: validation) raises no
  // execution_error event — newer frontends only mark the nodes — so the POST's answer is read too, and
  // a refusal fails at once with the server's node errors instead of waiting out the timeout.
  const posted = page.waitForResponse((r) => r.url().endsWith("/prompt") && r.request().method() === "POST",
    { timeout: 120000 });
  await page.evaluate(async (id) => {
    const api = window.comfyAPI.api.api;
    window.__ceExecuted = [];
    window.__ceError = null;
    api.addEventListener("executed", (e) => {
      if (String(e.detail?.node) === String(id)) window.__ceExecuted.push(e.detail.prompt_id);
    });
    api.addEventListener("execution_error", (e) => {
      window.__ceError = `${e.detail?.node_type ?? "?"}: ${e.detail?.exception_message ?? JSON.stringify(e.detail)}`;
    });
    await window.comfyAPI.app.app.queuePrompt(0, 1);
  }, config.checkNodeId);
  const answer = await posted;
  out.promptStatus = answer.status();
  if (!answer.ok()) throw new Error(`the server refused the prompt (${answer.status()}) for the loaded nodes ${JSON.stringify(out.loadedNodes)}: ${(await answer.text()).slice(0, 2000)}`);

  // first the server finishes the prompt, then the node shows the image it returned
  const checkId = config.checkNodeId;
  await page.waitForFunction(() => window.__ceExecuted.length > 0 || window.__ceError, null,
    { timeout: config.timeoutMs, polling: 1000 });
  const failed = await page.evaluate(() => window.__ceError);
  if (failed) throw new Error(`the prompt failed on the server: ${failed}`);
  try {
    await page.waitForFunction((id) => {
      const node = window.comfyAPI.app.app.graph.getNodeById(id);
      window.comfyAPI.app.app.canvas.setDirty(true, true);
      return node?.imgs?.length > 0 && node.imgs.every((im) => im.complete && im.naturalWidth > 0);
    }, checkId, { timeout: 60000, polling: 500 });
  } catch (e) {
    out.nodeState = await page.evaluate((id) => {
      const node = window.comfyAPI.app.app.graph.getNodeById(id);
      return { keys: Object.keys(node), imgs: node.imgs?.length ?? null,
        outputs: JSON.stringify(window.comfyAPI.app.app.nodeOutputs?.[String(id)] ?? null).slice(0, 400) };
    }, checkId);
    throw new Error(`the node did not show its image: ${JSON.stringify(out.nodeState)}`);
  }

  // frame the two nodes, let the canvas redraw, then screenshot their region only
  const clip = await page.evaluate(({ ids, margin }) => {
    const app = window.comfyAPI.app.app;
    const nodes = ids.map((id) => app.graph.getNodeById(id));
    const title = window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
    const x0 = Math.min(...nodes.map((n) => n.pos[0])) - margin;
    const y0 = Math.min(...nodes.map((n) => n.pos[1])) - title - margin;
    const x1 = Math.max(...nodes.map((n) => n.pos[0] + n.size[0])) + margin;
    const y1 = Math.max(...nodes.map((n) => n.pos[1] + n.size[1])) + margin;
    const el = app.canvas.canvas.getBoundingClientRect();
    const top = 56; // the workflow tabs are drawn over the canvas's top edge
    const scale = Math.min(el.width / (x1 - x0), (el.height - top) / (y1 - y0), 1);
    app.canvas.ds.scale = scale;
    app.canvas.ds.offset = [-x0 + (el.width / scale - (x1 - x0)) / 2, -y0 + top / scale];
    app.canvas.deselectAllNodes?.();
    app.canvas.setDirty(true, true);
    const [sx, sy] = app.canvas.ds.convertOffsetToCanvas([x0, y0]);
    return { x: el.left + Math.max(sx, 0), y: el.top + Math.max(sy, top),
      width: Math.min((x1 - x0) * scale, el.width), height: Math.min((y1 - y0) * scale, el.height - top) };
  }, { ids: config.frameNodeIds, margin: 20 });
  await page.waitForTimeout(1500);
  out.executed = await page.evaluate(() => window.__ceExecuted);
  out.nodeImages = await page.evaluate((id) => window.comfyAPI.app.app.graph.getNodeById(id).imgs
    .map((im) => ({ src: im.src, width: im.naturalWidth, height: im.naturalHeight })), checkId);
  await page.evaluate(() => document.querySelectorAll(".p-toast-message").forEach((t) => t.remove()));
  await page.screenshot({ path: config.screenshot, clip });
  out.clip = clip;
} finally {
  await browser.close();
}
console.log(JSON.stringify(out));
