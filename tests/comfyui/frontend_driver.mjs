// Drives the real ComfyUI frontend in headless Debian chromium (playwright-core, no browser download)
// for tests/comfyui/test_frontend.py. Usage: node frontend_driver.mjs <config.json>
// The config names the server URL, the workflows to load, the eraser file to choose and the screenshot
// path; the driver prints one JSON line of observations (the Python test asserts on them).

import { readFileSync } from "node:fs";
import { createRequire } from "node:module";

const config = JSON.parse(readFileSync(process.argv[2], "utf-8"));
const require = createRequire(config.playwrightDir.endsWith("/") ? config.playwrightDir : config.playwrightDir + "/");
const { chromium } = require("playwright-core");

const out = { console: [], steps: {} };
const browser = await chromium.launch({
  executablePath: config.chromium,
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run"],
});

try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 760 } });
  page.on("console", (m) => { if (m.type() === "error" || m.type() === "warning") out.console.push(`${m.type()}: ${m.text()}`); });
  page.on("pageerror", (e) => out.console.push(`pageerror: ${e.message}`));
  await page.goto(config.url);
  await page.waitForFunction(() => window.comfyAPI?.app?.app?.graph && window.comfyAPI.app.app.extensionManager
    && window.comfyAPI.app.app.extensionManager.getSidebarTabs().some((t) => t.id === "concept-erasers"),
  null, { timeout: 120000 });
  out.frontendVersion = await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__ ?? null);

  const load = async (workflow) => {
    await page.evaluate(async (wf) => {
      const app = window.comfyAPI.app.app;
      await app.loadGraphData(wf, true, true, null, { showMissingNodesDialog: false, showMissingModelsDialog: false });
    }, workflow);
    await page.waitForTimeout(400);
  };
  const openTab = async () => {
    const open = await page.locator(".ce-tab").count();
    if (open) return;
    const button = page.locator(".concept-erasers-tab-button");
    if (await button.count()) await button.first().click();
    else await page.evaluate(() => window.comfyAPI.app.app.extensionManager.sidebarTab.toggleSidebarTab("concept-erasers"));
    await page.waitForSelector(".ce-tab", { timeout: 10000 });
  };
  const entries = () => page.$$eval(".ce-entry", (els) => els.map((e) => ({
    id: Number(e.getAttribute("data-node-id")),
    title: e.querySelector(".ce-title")?.textContent,
    kind: e.querySelector(".ce-kind")?.textContent,
    concepts: [...e.querySelectorAll(".ce-chip")].map((c) => c.textContent),
    switchOn: e.querySelector(".ce-switch")?.checked,
    text: e.textContent,
  })));
  const modes = () => page.evaluate(() => Object.fromEntries(window.comfyAPI.app.app.graph.nodes.map((n) => [n.id, n.mode])));

  // 1. every example workflow loads with all its node types known to the frontend
  out.steps.examples = {};
  for (const [name, wf] of Object.entries(config.examples)) {
    await load(wf);
    out.steps.examples[name] = await page.evaluate(() => {
      const nodes = window.comfyAPI.app.app.graph.nodes;
      return { count: nodes.length, unknown: nodes.filter((n) => n.constructor?.nodeData?.name !== n.type && !["Note", "MarkdownNote"].includes(n.type)).map((n) => n.type) };
    });
  }

  // 2. a workflow whose eraser file is missing names the file and the concepts it erased
  await load(config.missingWorkflow);
  await openTab();
  await page.waitForTimeout(800);
  out.steps.missing = {
    sidebar: await page.$$eval(".ce-missing-file", (els) => els.map((e) => e.textContent)),
    toasts: await page.$$eval(".p-toast-message", (els) => els.map((e) => e.textContent)),
  };

  // 3. the sidebar lists the erasers of a loaded example; its switches bypass nodes
  await load(config.listWorkflow);
  await page.waitForTimeout(800);
  out.steps.list = { entries: await entries(), modes: await modes() };
  const firstId = out.steps.list.entries[0]?.id;
  await page.locator(`.ce-entry[data-node-id="${firstId}"] .ce-switch`).click();
  await page.waitForTimeout(200);
  out.steps.list.afterSwitchOff = (await modes())[firstId];
  await page.locator(`.ce-entry[data-node-id="${firstId}"] .ce-switch`).click();
  await page.waitForTimeout(200);
  out.steps.list.afterSwitchOn = (await modes())[firstId];
  await page.locator(".ce-master").click();
  await page.waitForTimeout(200);
  out.steps.list.afterMasterOff = await modes();
  await page.locator(".ce-master").click();
  await page.waitForTimeout(200);
  out.steps.list.afterMasterOn = await modes();
  const num = page.locator(`.ce-entry[data-node-id="${firstId}"] .ce-num`);
  await num.fill("0.35");
  await num.press("Enter");
  await num.blur();
  await page.waitForTimeout(200);
  out.steps.list.strength = await page.evaluate((id) => window.comfyAPI.app.app.graph.getNodeById(id).widgets
    .find((w) => w.name === "strength").value, firstId);

  // 4. choosing a file in Load Eraser shows its metadata; the workflow's extra gets the summary
  await load(config.fileWorkflow);
  await page.evaluate(({ type, widget, file }) => {
    const node = window.comfyAPI.app.app.graph.nodes.find((n) => n.type === type);
    const w = node.widgets.find((x) => x.name === widget);
    w.value = file;
    w.callback(file, window.comfyAPI.app.app.canvas, node);
  }, config.choose);
  await page.waitForFunction(() => document.querySelector("#ce-info-panel tr[data-row='concepts']"), null, { timeout: 15000 });
  out.steps.info = {
    rows: await page.$$eval("#ce-info-panel tr", (trs) => Object.fromEntries(trs.map((tr) => [tr.children[0].textContent, tr.children[1].textContent]))),
  };
  await page.waitForTimeout(700);
  out.steps.info.entries = await entries();
  out.steps.info.extra = await page.evaluate(() => window.comfyAPI.app.app.graph.serialize().extra?.concept_erasers ?? null);
  out.steps.info.badge = await page.evaluate(() => {
    const node = window.comfyAPI.app.app.graph.nodes.find((n) => n.type === "EraserLoad");
    return node.badges.map((b) => (typeof b === "function" ? b() : b)).map((b) => b.text).filter(Boolean);
  });

  // 5. screenshot for the README: the showcase workflow with the tab open and the info panel
  if (config.showcaseWorkflow) {
    await load(config.showcaseWorkflow);
    await page.evaluate(({ type, widget, file }) => {
      const app = window.comfyAPI.app.app;
      const node = app.graph.nodes.find((n) => n.type === type);
      const w = node.widgets.find((x) => x.name === widget);
      w.value = file;
      w.callback(file, app.canvas, node);
      app.canvas.ds.scale = 0.8;
      app.canvas.ds.offset = [40, 90];
      app.canvas.setDirty(true, true);
    }, config.choose);
    await page.waitForFunction(() => document.querySelector("#ce-info-panel tr[data-row='concepts']"), null, { timeout: 15000 });
    await page.waitForTimeout(1200);
  }
  await page.evaluate(() => document.querySelectorAll(".p-toast-message").forEach((t) => t.remove()));
  await page.screenshot({ path: config.screenshot });
  out.screenshot = config.screenshot;
} finally {
  await browser.close();
}
console.log(JSON.stringify(out));
