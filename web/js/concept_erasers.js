// Concept Erasers — ComfyUI front-end extension (checked with comfyui-frontend-package 1.27.10,
// bundled by ComfyUI 0.3.64).
//
// * "Erasers" sidebar tab: every node of the pack in the open workflow, with kind, concepts, strength,
//   an on/off switch (bypass) and a strength control that edit the graph; a master switch; click = focus.
// * A badge on each eraser node with its concepts (drawn large when the canvas is zoomed out).
// * Concept presets for the concept boxes (pack data files + the user's saved lists), from the sidebar
//   and the node's right-click menu.
// * Eraser-file info panel when a file is chosen in a loader node (GET /concept_erasers/file_info).
// * The workflow's `extra.concept_erasers` carries a summary (kinds, concepts, files with hashes); a
//   loaded workflow whose files are missing names each file and the concepts it erased.
//
// All user and file text is set with textContent (or escaped for LiteGraph's menu), never as HTML.
// The logic lives in ./lib/*.js (no ComfyUI imports; tested with `node --test web/tests/`).

import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

import {
  ADAPTER_FOLDERS, ANY_FOLDER, EXTRA_KEY, NODE_KINDS, badgeText, collectErasers, describeNode, fileKey, findFileWidget, isPackType, masterState,
  missingFiles, missingFilesMessage, missingFromSummary, setAllEnabled, setNodeEnabled, signature, workflowSummary,
} from "./lib/erasers.js";
import { escapeHtml, infoRows } from "./lib/format.js";
import {
  applyPreset, deleteUserPreset, mergePresets, normalizeUserPresets, parseServerPresets, saveUserPreset,
} from "./lib/presets.js";

const EXT_NAME = "ConceptErasers";
const TAB_ID = "concept-erasers";
const SETTING_BADGES = "ConceptErasers.ShowBadges";
const SETTING_USER_PRESETS = "ConceptErasers.UserPresets";
const LOCAL_PRESETS_KEY = "concept-erasers.user-presets";

const state = {
  fileInfo: {}, // fileKey → server metadata, or {error}
  pending: new Map(), // fileKey → Promise
  packPresets: [],
  savedSummary: null, // extra.concept_erasers of the workflow being loaded
  missing: [],
  tab: null, // {container, timer, sig}
};

// ------------------------------------------------------------------------------------------------
// graph access

function rootGraph() {
  return app.graph || app.canvas?.graph || null;
}

function graphNodes() {
  const out = [];
  const seen = new Set();
  for (const graph of [rootGraph(), app.canvas?.graph]) {
    for (const node of graph?.nodes || []) {
      if (!seen.has(node)) {
        seen.add(node);
        out.push(node);
      }
    }
  }
  return out;
}

function findNode(id) {
  return graphNodes().find((n) => n.id === id) || null;
}

// LiteGraph links → the plain form lib/erasers.js expects.
function graphLinks() {
  const links = rootGraph()?.links;
  const values = links instanceof Map ? [...links.values()] : Object.values(links || {});
  return values.filter(Boolean).map((l) => ({ origin_id: l.origin_id, origin_slot: l.origin_slot,
    target_id: l.target_id, type: l.type }));
}

function currentEntries() {
  return collectErasers(graphNodes(), state.fileInfo);
}

function markChanged() {
  const graph = rootGraph();
  graph?.setDirtyCanvas?.(true, true);
  app.canvas?.setDirty?.(true, true);
  // the change tracker samples the graph on canvas events; edits made from the sidebar tell it directly
  try {
    app.extensionManager?.workflow?.activeWorkflow?.changeTracker?.checkState?.();
  } catch (err) {
    console.debug("[Concept Erasers] change tracker not reachable", err);
  }
}

function focusNode(node) {
  const canvas = app.canvas;
  if (!canvas || !node) return;
  if (node.graph && canvas.graph !== node.graph) return; // inside a closed subgraph: nothing to centre
  canvas.centerOnNode?.(node);
  canvas.selectNode?.(node, false);
  canvas.setDirty?.(true, true);
}

// ------------------------------------------------------------------------------------------------
// server data

async function fetchJson(route) {
  const res = await api.fetchApi(route);
  let body = null;
  try {
    body = await res.json();
  } catch {
    body = null;
  }
  if (!res.ok) throw new Error(body?.error || `${route}: HTTP ${res.status}`);
  return body;
}

function requestFileInfo(folder, name) {
  if (!folder || !name) return Promise.resolve(null);
  const key = fileKey(folder, name);
  if (state.fileInfo[key]) return Promise.resolve(state.fileInfo[key]);
  if (state.pending.has(key)) return state.pending.get(key);
  const query = new URLSearchParams({ folder, name }).toString();
  const p = fetchJson(`/concept_erasers/file_info?${query}`)
    .then((info) => {
      state.fileInfo[key] = info;
      return info;
    })
    .catch((err) => {
      state.fileInfo[key] = { error: String(err.message || err), file: name, folder };
      return state.fileInfo[key];
    })
    .finally(() => {
      state.pending.delete(key);
      rootGraph()?.setDirtyCanvas?.(true, false);
      refreshTab();
    });
  state.pending.set(key, p);
  return p;
}

function fileInfoOk(info) {
  return info && !info.error ? info : null;
}

async function loadPackPresets() {
  try {
    state.packPresets = parseServerPresets(await fetchJson("/concept_erasers/presets"));
  } catch (err) {
    console.warn("[Concept Erasers] presets unavailable:", err);
    state.packPresets = [];
  }
}

// The user's presets: ComfyUI user settings (kept per user on the server), localStorage as a fallback.
function getUserPresets() {
  try {
    const v = app.extensionManager?.setting?.get?.(SETTING_USER_PRESETS);
    if (v !== undefined && v !== null) return normalizeUserPresets(v);
  } catch {
    /* settings store not ready */
  }
  try {
    return normalizeUserPresets(window.localStorage.getItem(LOCAL_PRESETS_KEY));
  } catch {
    return {};
  }
}

async function setUserPresets(value) {
  const clean = normalizeUserPresets(value);
  try {
    if (app.extensionManager?.setting?.set) {
      await app.extensionManager.setting.set(SETTING_USER_PRESETS, clean);
      return;
    }
  } catch (err) {
    console.warn("[Concept Erasers] could not store presets in the user settings:", err);
  }
  window.localStorage.setItem(LOCAL_PRESETS_KEY, JSON.stringify(clean));
}

function allPresets() {
  return mergePresets(state.packPresets, getUserPresets());
}

// ------------------------------------------------------------------------------------------------
// editing nodes

function widget(node, name) {
  return (node?.widgets || []).find((w) => w.name === name) || null;
}

function setWidgetValue(node, name, value) {
  const w = widget(node, name);
  if (!w) return;
  w.value = value;
  try {
    w.callback?.(value, app.canvas, node);
  } catch (err) {
    console.debug("[Concept Erasers] widget callback failed", err);
  }
  markChanged();
}

function setEnabled(node, on) {
  const byId = new Map(graphNodes().map((n) => [n.id, n]));
  setNodeEnabled(node, on, { nodesById: byId, links: graphLinks() });
  markChanged();
  refreshTab(true);
}

function setAll(on) {
  setAllEnabled(graphNodes(), on);
  markChanged();
  refreshTab(true);
}

function applyPresetToNode(node, preset, mode) {
  const entry = describeNode(node, state.fileInfo);
  const spec = NODE_KINDS[node.type] || {};
  const name = entry?.conceptsWidget || (spec.concepts || [])[0];
  const w = widget(node, name);
  if (!w) return;
  setWidgetValue(node, name, applyPreset(w.value, preset.concepts, mode, { oneLine: !!spec.wholeText }));
  refreshTab(true);
}

async function saveNodeConceptsAsPreset(node) {
  const entry = describeNode(node, state.fileInfo);
  const w = widget(node, entry?.conceptsWidget);
  if (!w) return;
  const name = window.prompt("Save these concepts as a preset named:", "");
  if (name === null) return;
  try {
    await setUserPresets(saveUserPreset(getUserPresets(), name, w.value));
    toast("success", "Preset saved", `"${name.trim()}" is now in your concept presets.`);
  } catch (err) {
    toast("error", "Preset not saved", String(err.message || err));
  }
  refreshTab(true);
}

function toast(severity, summary, detail, life = 6000) {
  const t = app.extensionManager?.toast;
  if (t?.add) t.add({ severity, summary, detail, life });
  else console.log(`[Concept Erasers] ${summary}: ${detail}`);
}

// ------------------------------------------------------------------------------------------------
// small DOM helpers (text only)

function el(tag, { cls = "", text = null, attrs = {}, style = "" } = {}, children = []) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== null && text !== undefined) node.textContent = String(text);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (style) node.style.cssText = style;
  for (const child of children) if (child) node.appendChild(child);
  return node;
}

const STYLE = `
.ce-tab { padding: 8px; font-size: 13px; color: var(--fg-color, #ddd); display: flex; flex-direction: column; gap: 8px; }
.ce-head { display: flex; align-items: center; justify-content: space-between; gap: 8px; }
.ce-head h3 { margin: 0; font-size: 15px; }
.ce-muted { color: var(--descrip-text, #999); font-size: 12px; }
.ce-entry { border: 1px solid var(--border-color, #444); border-radius: 6px; padding: 6px 8px; cursor: pointer;
  background: var(--comfy-input-bg, #222); display: flex; flex-direction: column; gap: 4px; }
.ce-entry.ce-off { opacity: 0.55; }
.ce-entry:hover { border-color: var(--p-primary-color, #6aa0ff); }
.ce-row { display: flex; align-items: center; gap: 6px; flex-wrap: wrap; }
.ce-title { font-weight: 600; flex: 1; min-width: 0; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.ce-chip { background: var(--comfy-menu-bg, #333); border: 1px solid var(--border-color, #555); border-radius: 10px;
  padding: 0 6px; font-size: 12px; max-width: 100%; overflow-wrap: anywhere; }
.ce-switch { appearance: none; width: 30px; height: 16px; border-radius: 8px; background: #666; position: relative;
  cursor: pointer; flex: none; margin: 0; }
.ce-switch::after { content: ""; position: absolute; top: 2px; left: 2px; width: 12px; height: 12px; border-radius: 6px;
  background: #fff; transition: left .1s; }
.ce-switch:checked { background: #3b9a57; }
.ce-switch:checked::after { left: 16px; }
.ce-switch:indeterminate { background: #a08a2a; }
.ce-strength { flex: 1; min-width: 80px; }
.ce-num { width: 56px; background: var(--comfy-input-bg, #222); color: inherit; border: 1px solid var(--border-color, #555); border-radius: 4px; }
.ce-preset { flex: 1; min-width: 0; }
.ce-select, .ce-btn { background: var(--comfy-menu-bg, #333); color: inherit; border: 1px solid var(--border-color, #555);
  border-radius: 4px; font-size: 12px; padding: 1px 4px; cursor: pointer; }
.ce-missing { border: 1px solid #c0392b; background: rgba(192,57,43,.15); border-radius: 6px; padding: 6px 8px; }
.ce-missing li { overflow-wrap: anywhere; }
.ce-info-panel { position: fixed; right: 16px; bottom: 64px; z-index: 1000; max-width: 380px; min-width: 240px;
  background: var(--comfy-menu-bg, #2a2a2a); color: var(--fg-color, #ddd); border: 1px solid var(--border-color, #555);
  border-radius: 8px; padding: 8px 10px; font-size: 12px; box-shadow: 0 4px 16px rgba(0,0,0,.4); }
.ce-info-panel table { border-collapse: collapse; width: 100%; }
.ce-info-panel td { padding: 1px 4px; vertical-align: top; overflow-wrap: anywhere; }
.ce-info-panel td:first-child { color: var(--descrip-text, #999); white-space: nowrap; }
`;

function injectStyle() {
  if (document.getElementById("ce-style")) return;
  const style = document.createElement("style");
  style.id = "ce-style";
  style.textContent = STYLE;
  document.head.appendChild(style);
}

// ------------------------------------------------------------------------------------------------
// eraser-file info panel

function renderInfoInto(box, entry, info) {
  box.replaceChildren();
  if (!info) {
    box.appendChild(el("div", { cls: "ce-muted", text: "Reading the file header…" }));
    return;
  }
  if (info.error) {
    box.appendChild(el("div", { text: info.error }));
    return;
  }
  const table = el("table");
  for (const [label, value] of infoRows(info)) {
    table.appendChild(el("tr", { attrs: { "data-row": label } }, [el("td", { text: label }), el("td", { text: value })]));
  }
  box.appendChild(table);
}

function showInfoPanel(node) {
  const entry = describeNode(node, state.fileInfo);
  if (!entry?.file) return;
  injectStyle();
  let panel = document.getElementById("ce-info-panel");
  if (!panel) {
    panel = el("div", { cls: "ce-info-panel", attrs: { id: "ce-info-panel", role: "dialog" } });
    document.body.appendChild(panel);
  }
  const close = el("button", { cls: "ce-btn", text: "×", attrs: { title: "Close", "aria-label": "Close" } });
  close.addEventListener("click", () => panel.remove());
  const body = el("div", { cls: "ce-info-body" });
  panel.replaceChildren(
    el("div", { cls: "ce-head" }, [el("strong", { text: `${entry.title} · ${entry.file.folder}` }), close]),
    body,
  );
  panel.dataset.nodeId = String(node.id);
  panel.dataset.file = entry.file.name;
  const key = fileKey(entry.file.folder, entry.file.name);
  renderInfoInto(body, entry, state.fileInfo[key]);
  requestFileInfo(entry.file.folder, entry.file.name).then((info) => {
    if (panel.isConnected && panel.dataset.nodeId === String(node.id) && panel.dataset.file === entry.file.name) {
      renderInfoInto(body, entry, info);
    }
  });
}

// ------------------------------------------------------------------------------------------------
// badges

class ConceptBadge {
  // duck-typed like LiteGraph's LGraphBadge (height, getWidth, draw): LGraphBadge is not exported
  constructor(text, off) {
    this.text = text;
    this.off = off;
    this.height = 20;
    this.padding = 6;
    this.fontSize = 12;
  }

  get visible() {
    return !!this.text;
  }

  getWidth(ctx) {
    if (!this.text) return 0;
    ctx.save();
    ctx.font = `${this.fontSize}px sans-serif`;
    const w = ctx.measureText(this.text).width + 2 * this.padding;
    ctx.restore();
    return w;
  }

  draw(ctx, x, y) {
    if (!this.text) return;
    const w = this.getWidth(ctx);
    ctx.save();
    ctx.fillStyle = this.off ? "#555" : "#7a2e2e";
    ctx.beginPath();
    if (ctx.roundRect) ctx.roundRect(x, y, w, this.height, 5);
    else ctx.rect(x, y, w, this.height);
    ctx.fill();
    ctx.fillStyle = "#fff";
    ctx.font = `${this.fontSize}px sans-serif`;
    ctx.textBaseline = "middle";
    ctx.textAlign = "left";
    ctx.fillText(this.text, x + this.padding, y + this.height / 2 + 1);
    ctx.restore();
  }
}

function badgesEnabled() {
  try {
    return app.extensionManager?.setting?.get?.(SETTING_BADGES) !== false;
  } catch {
    return true;
  }
}

function nodeBadgeText(node) {
  if (!badgesEnabled()) return "";
  const entry = describeNode(node, state.fileInfo);
  if (entry?.file && !state.fileInfo[fileKey(entry.file.folder, entry.file.name)]) {
    requestFileInfo(entry.file.folder, entry.file.name);
  }
  return badgeText(entry);
}

function attachBadge(node) {
  if (!Array.isArray(node.badges) || node.__ceBadge) return;
  node.__ceBadge = true;
  node.badges.push(() => {
    const entry = describeNode(node, state.fileInfo);
    return new ConceptBadge(nodeBadgeText(node), !entry?.enabled);
  });
}

// Zoomed out, LiteGraph skips badges (low-quality mode): draw the concepts large above the node instead.
function drawZoomedOutLabel(node, ctx, canvas) {
  if (!canvas?.low_quality || node.flags?.collapsed) return;
  const text = nodeBadgeText(node);
  if (!text) return;
  const scale = canvas.ds?.scale || 1;
  const size = Math.min(64, Math.max(14, 14 / scale));
  const titleHeight = window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
  ctx.save();
  ctx.font = `bold ${size}px sans-serif`;
  ctx.textBaseline = "bottom";
  ctx.fillStyle = "#ff8a80";
  ctx.fillText(text, 0, -titleHeight - 4);
  ctx.restore();
}

// ------------------------------------------------------------------------------------------------
// node hooks: info panel on file choice, right-click presets

function hookFileWidget(node) {
  const type = node.type || node.comfyClass || node.constructor?.comfyClass;
  const fw = findFileWidget({ type, widgets: node.widgets });
  if (!fw || fw.__ceHooked) return;
  fw.__ceHooked = true;
  const original = fw.callback;
  fw.callback = function (value, ...rest) {
    const r = original?.call(this, value, ...rest);
    showInfoPanel(node);
    refreshTab();
    return r;
  };
}

function presetMenu(node) {
  const entry = describeNode(node, state.fileInfo);
  const spec = NODE_KINDS[node.type] || {};
  if (!entry || !(spec.concepts || []).length) return null;
  const presets = allPresets();
  const item = (p, mode) => ({
    content: escapeHtml(`${p.source === "user" ? "★ " : ""}${p.name}`),
    callback: () => applyPresetToNode(node, p, mode),
  });
  return {
    content: "Concept presets",
    has_submenu: true,
    submenu: {
      options: [
        { content: "Replace with…", has_submenu: true, submenu: { options: presets.map((p) => item(p, "replace")) } },
        { content: "Add…", has_submenu: true, submenu: { options: presets.map((p) => item(p, "append")) } },
        null,
        { content: "Save concepts as my preset…", callback: () => saveNodeConceptsAsPreset(node) },
      ],
    },
  };
}

// ------------------------------------------------------------------------------------------------
// workflow summary in extra, and missing files on load

function updateExtra(graph) {
  const entries = collectErasers(graph?.nodes || [], state.fileInfo);
  graph.extra = graph.extra || {};
  if (!entries.length && !state.savedSummary) {
    delete graph.extra[EXTRA_KEY];
    return;
  }
  graph.extra[EXTRA_KEY] = workflowSummary(entries, state.savedSummary);
}

// Every save / export / change-tracker snapshot goes through LGraph.serialize: the summary is refreshed
// there, so the saved JSON always matches the graph it describes.
function wrapSerialize() {
  const graph = rootGraph();
  let proto = graph && Object.getPrototypeOf(graph);
  while (proto && !Object.prototype.hasOwnProperty.call(proto, "serialize")) proto = Object.getPrototypeOf(proto);
  if (!proto || proto.serialize.__ceWrapped) return;
  const original = proto.serialize;
  const wrapped = function (...args) {
    if (this === rootGraph()) {
      try {
        updateExtra(this);
      } catch (err) {
        console.warn("[Concept Erasers] summary not written:", err);
      }
    }
    return original.apply(this, args);
  };
  wrapped.__ceWrapped = true;
  proto.serialize = wrapped;
}

async function availableFiles(folders) {
  const out = {};
  // "any" is not a ComfyUI folder: it stands for the three the SPM / LoRA loaders list together
  const real = new Set([...folders].flatMap((f) => (f === ANY_FOLDER ? ADAPTER_FOLDERS : [f])));
  await Promise.all([...real].map(async (folder) => {
    try {
      const list = await fetchJson(`/models/${encodeURIComponent(folder)}`);
      if (Array.isArray(list)) out[folder] = list;
    } catch {
      /* folder not registered on this server: every file of it is missing */
      out[folder] = [];
    }
  }));
  return out;
}

async function checkLoadedWorkflow() {
  const entries = currentEntries();
  const folders = new Set(entries.filter((e) => e.file).map((e) => e.file.folder));
  for (const e of state.savedSummary?.erasers || []) if (e?.file?.folder) folders.add(e.file.folder);
  state.missing = [];
  if (folders.size) {
    const available = await availableFiles(folders);
    const missing = missingFiles(entries, available, state.savedSummary);
    const seen = new Set(missing.map((m) => fileKey(m.folder, m.name)));
    for (const m of missingFromSummary(state.savedSummary, available)) {
      if (!seen.has(fileKey(m.folder, m.name))) missing.push(m);
    }
    state.missing = missing;
    // read the present files' headers now, so the first snapshot of the workflow already has their hashes
    const present = entries.filter((e) => e.file && !missing.some((m) => m.name === e.file.name && m.folder === e.file.folder));
    await Promise.race([
      Promise.all(present.map((e) => requestFileInfo(e.file.folder, e.file.name))),
      new Promise((resolve) => setTimeout(resolve, 3000)),
    ]);
  }
  if (state.missing.length) {
    toast("warn", `This workflow needs ${state.missing.length} eraser file(s) you do not have`,
      missingFilesMessage(state.missing), 20000);
  }
  refreshTab(true);
}

// ------------------------------------------------------------------------------------------------
// the sidebar tab

// A missing file stops being reported once its node names another file (the user picked a present one).
function currentMissing() {
  const nodes = new Map(graphNodes().map((n) => [n.id, n]));
  return state.missing.filter((m) => {
    const node = nodes.get(m.node);
    if (!node) return true;
    const fw = findFileWidget(node);
    return !fw || fw.value === m.name;
  });
}

function renderMissing(container) {
  state.missing = currentMissing();
  if (!state.missing.length) return;
  const list = el("ul", { style: "margin: 4px 0 0 16px; padding: 0;" });
  for (const m of state.missing) {
    const what = m.concepts.length ? `erased: ${m.concepts.join(", ")}` : "concepts unknown";
    list.appendChild(el("li", { cls: "ce-missing-file", text: `${m.folder}/${m.name}${m.sha256 ? ` [${m.sha256}]` : ""} — ${what}` }));
  }
  container.appendChild(el("div", { cls: "ce-missing" }, [
    el("strong", { text: "Missing eraser files" }),
    el("div", { cls: "ce-muted", text: "Put them into the named models folder and reload the workflow." }),
    list,
  ]));
}

function renderEntry(entry) {
  const node = findNode(entry.id);
  const card = el("div", { cls: `ce-entry${entry.enabled ? "" : " ce-off"}`, attrs: { "data-node-id": entry.id,
    title: "Click to show this node on the canvas" } });
  card.addEventListener("click", (ev) => {
    if (ev.target.closest("input, select, button")) return;
    focusNode(findNode(entry.id));
  });

  const sw = el("input", { cls: "ce-switch", attrs: { type: "checkbox", role: "switch", "aria-label": "on / off" } });
  sw.checked = entry.enabled;
  if (!entry.toggle) sw.title = "Not switched by the master switch";
  sw.addEventListener("change", () => setEnabled(findNode(entry.id), sw.checked));
  const kind = entry.method ? `${entry.kind} · ${entry.method}` : entry.kind;
  card.appendChild(el("div", { cls: "ce-row" }, [
    sw,
    el("span", { cls: "ce-title", text: entry.title }),
    el("span", { cls: "ce-muted", text: `#${entry.id}` }),
  ]));
  card.appendChild(el("div", { cls: "ce-muted ce-kind", text: kind }));

  const chips = el("div", { cls: "ce-row ce-concepts" });
  if (entry.concepts.length) {
    for (const c of entry.concepts.slice(0, 12)) chips.appendChild(el("span", { cls: "ce-chip", text: c }));
    if (entry.concepts.length > 12) chips.appendChild(el("span", { cls: "ce-muted", text: `+${entry.concepts.length - 12} more` }));
  } else if (entry.type !== "EraserSave" && entry.type !== "EraserApply") {
    chips.appendChild(el("span", { cls: "ce-muted", text: entry.file ? "concepts: reading file…" : "no concepts yet" }));
  }
  if (chips.childNodes.length) card.appendChild(chips);

  if (entry.strengthWidget && node) {
    const r = entry.strengthRange;
    const slider = el("input", { cls: "ce-strength", attrs: { type: "range", min: r.min, max: r.max, step: r.step,
      "aria-label": "strength" } });
    const num = el("input", { cls: "ce-num", attrs: { type: "number", min: r.min, max: r.max, step: r.step,
      "aria-label": "strength value" } });
    slider.value = String(entry.strength);
    num.value = String(entry.strength);
    const commit = (raw) => {
      const v = Math.min(r.max, Math.max(r.min, Number(raw)));
      if (!Number.isFinite(v)) return;
      slider.value = String(v);
      num.value = String(v);
      setWidgetValue(findNode(entry.id), entry.strengthWidget, v);
    };
    slider.addEventListener("input", () => commit(slider.value));
    num.addEventListener("change", () => commit(num.value));
    card.appendChild(el("div", { cls: "ce-row" }, [el("span", { cls: "ce-muted", text: entry.strengthWidget }), slider, num]));
  }

  if (entry.file) {
    const info = fileInfoOk(entry.file.info);
    const line = info ? [entry.file.name, info.method, info.sha256 && `sha256 ${info.sha256}`].filter(Boolean).join(" · ")
      : entry.file.name;
    const btn = el("button", { cls: "ce-btn ce-info-btn", text: "info" });
    btn.addEventListener("click", () => showInfoPanel(findNode(entry.id)));
    card.appendChild(el("div", { cls: "ce-row" }, [el("span", { cls: "ce-muted", text: `file: ${line}`, style: "flex:1; overflow-wrap:anywhere;" }), btn]));
  }

  const spec = NODE_KINDS[entry.type] || {};
  if ((spec.concepts || []).length) {
    const select = el("select", { cls: "ce-select ce-preset", attrs: { "aria-label": "concept preset" } });
    select.appendChild(el("option", { text: "preset…", attrs: { value: "" } }));
    allPresets().forEach((p, i) => {
      const opt = el("option", { text: `${p.source === "user" ? "★ " : ""}${p.name} (${p.concepts.length})`, attrs: { value: i } });
      if (p.description) opt.title = p.description;
      select.appendChild(opt);
    });
    const mode = el("select", { cls: "ce-select", attrs: { "aria-label": "replace or add" } });
    mode.appendChild(el("option", { text: "replace", attrs: { value: "replace" } }));
    mode.appendChild(el("option", { text: "add", attrs: { value: "append" } }));
    select.addEventListener("change", () => {
      const p = allPresets()[Number(select.value)];
      if (p) applyPresetToNode(findNode(entry.id), p, mode.value);
      select.value = "";
    });
    const save = el("button", { cls: "ce-btn", text: "save as preset" });
    save.addEventListener("click", () => saveNodeConceptsAsPreset(findNode(entry.id)));
    card.appendChild(el("div", { cls: "ce-row" }, [select, mode, save]));
  }
  return card;
}

function renderUserPresets(container) {
  const user = getUserPresets();
  const names = Object.keys(user).sort();
  if (!names.length) return;
  const box = el("details", { cls: "ce-user-presets" }, [el("summary", { text: `My presets (${names.length})` })]);
  for (const name of names) {
    const del = el("button", { cls: "ce-btn", text: "delete" });
    del.addEventListener("click", async () => {
      await setUserPresets(deleteUserPreset(getUserPresets(), name));
      refreshTab(true);
    });
    box.appendChild(el("div", { cls: "ce-row" }, [el("span", { text: name, style: "flex:1" }),
      el("span", { cls: "ce-muted", text: `${user[name].length} concepts` }), del]));
  }
  container.appendChild(box);
}

function renderTab(container) {
  injectStyle();
  const entries = currentEntries();
  const root = el("div", { cls: "ce-tab" });
  const master = el("input", { cls: "ce-switch ce-master", attrs: { type: "checkbox", role: "switch",
    "aria-label": "all erasers on / off" } });
  const ms = masterState(entries);
  master.checked = ms === "on";
  master.indeterminate = ms === "mixed";
  master.disabled = ms === "none";
  master.addEventListener("change", () => setAll(master.checked));
  root.appendChild(el("div", { cls: "ce-head" }, [
    el("h3", { text: `Erasers (${entries.length})` }),
    el("label", { cls: "ce-row ce-muted" }, [el("span", { text: "all" }), master]),
  ]));
  renderMissing(root);
  if (!entries.length) {
    root.appendChild(el("div", { cls: "ce-muted", text: "This workflow has no Concept Erasers nodes. Add one from the node library (category concept_erasers) or open an example from Browse Templates." }));
  }
  const list = el("div", { cls: "ce-list", style: "display:flex; flex-direction:column; gap:6px;" });
  for (const entry of entries) list.appendChild(renderEntry(entry));
  root.appendChild(list);
  renderUserPresets(root);
  container.replaceChildren(root);
  if (state.tab) state.tab.sig = signature(entries) + `|${currentMissing().length}|${ms}`;
}

function refreshTab(force = false) {
  const tab = state.tab;
  if (!tab || !tab.container?.isConnected) return;
  const entries = currentEntries();
  const sig = signature(entries) + `|${currentMissing().length}|${masterState(entries)}`;
  if (!force && sig === tab.sig) return;
  // do not pull an input from under the user's cursor while they type in it
  if (!force && tab.container.contains(document.activeElement) && document.activeElement.tagName !== "BODY") return;
  renderTab(tab.container);
}

function registerTab() {
  const manager = app.extensionManager;
  if (!manager?.registerSidebarTab) {
    console.warn("[Concept Erasers] this ComfyUI frontend has no sidebar tabs; the Erasers tab is unavailable.");
    return;
  }
  manager.registerSidebarTab({
    id: TAB_ID,
    icon: "pi pi-eraser",
    title: "Erasers",
    tooltip: "Concept Erasers in this workflow",
    type: "custom",
    render: (container) => {
      if (state.tab?.timer) clearInterval(state.tab.timer);
      state.tab = { container, timer: null, sig: "" };
      renderTab(container);
      // the graph changes in many ways (canvas edits, undo, workflow switch): poll cheaply while shown
      state.tab.timer = setInterval(() => {
        if (!container.isConnected) {
          clearInterval(state.tab?.timer);
          return;
        }
        refreshTab();
      }, 500);
    },
    destroy: () => {
      if (state.tab?.timer) clearInterval(state.tab.timer);
      state.tab = null;
    },
  });
}

// ------------------------------------------------------------------------------------------------

app.registerExtension({
  name: EXT_NAME,
  settings: [
    { id: SETTING_BADGES, name: "Show concept badges on eraser nodes", type: "boolean", defaultValue: true,
      category: ["Concept Erasers", "Canvas", "Badges"] },
    { id: SETTING_USER_PRESETS, name: "Concept Erasers: my concept presets", type: "hidden", defaultValue: {} },
  ],

  async setup() {
    wrapSerialize();
    registerTab();
    await loadPackPresets();
    refreshTab(true);
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!isPackType(nodeData?.name)) return;
    const proto = nodeType.prototype;
    const drawFg = proto.onDrawForeground;
    proto.onDrawForeground = function (ctx, canvas, ...rest) {
      const r = drawFg?.call(this, ctx, canvas, ...rest);
      drawZoomedOutLabel(this, ctx, canvas);
      return r;
    };
    const menu = proto.getExtraMenuOptions;
    proto.getExtraMenuOptions = function (canvas, options) {
      const r = menu?.call(this, canvas, options);
      const m = presetMenu(this);
      if (m) options.push(null, m);
      return r;
    };
  },

  nodeCreated(node) {
    // node.type is set only after the constructor that fires this hook; the class knows its id
    if (!isPackType(node.type || node.comfyClass || node.constructor?.comfyClass)) return;
    attachBadge(node);
    hookFileWidget(node);
  },

  beforeConfigureGraph(graphData) {
    const saved = graphData?.extra?.[EXTRA_KEY];
    state.savedSummary = saved && Array.isArray(saved.erasers) ? saved : null;
    state.missing = [];
  },

  async afterConfigureGraph() {
    await checkLoadedWorkflow();
  },
});
