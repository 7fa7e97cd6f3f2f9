// Pure logic over the pack's nodes in a graph: which nodes erase what, bypass toggling, badge text,
// the workflow summary written into `extra`, and missing-file detection.
// Imports nothing from ComfyUI: nodes are plain objects {id, type, title, mode, widgets:[{name, value,
// options}]}, which LiteGraph nodes already are, so Node's test runner exercises this file directly.

export const EXTRA_KEY = "concept_erasers";
export const SUMMARY_VERSION = 1;

// LiteGraph node modes: 0 = always, 2 = never (muted), 4 = bypass (inputs pass through to outputs).
export const MODE_ALWAYS = 0;
export const MODE_NEVER = 2;
export const MODE_BYPASS = 4;

// node id → how to read it. `concepts`: text widgets holding concepts (first non-empty wins);
// `file`: the combo naming a model file and its folder; `toggle: false`: not switched by the master switch.
export const ANY_FOLDER = "any";
export const ADAPTER_FOLDERS = ["erasers", "spm", "loras"];

export const NODE_KINDS = {
  EraserClosedForm: { kind: "closed form", concepts: ["concepts"], strength: "strength", method: "method" },
  EraserLoad: { kind: "eraser file", file: { widget: "eraser_name", folder: "erasers" }, strength: "strength" },
  EraserApply: { kind: "apply eraser", strength: "strength" },
  EraserSave: { kind: "save eraser", toggle: false },
  // these two list the files of models/erasers, spm and loras together: folder "any" (the route searches
  // them in that order); their `concepts` box only matters for files without concept metadata
  EraserSPMLoad: { kind: "SPM membrane", file: { widget: "membrane", folder: "any" }, concepts: ["concepts"],
    strength: "strength" },
  EraserLoRALoad: { kind: "erasure LoRA", file: { widget: "file", folder: "any" }, concepts: ["concepts"],
    strength: "strength" },
  EraserSAFREE: { kind: "SAFREE", concepts: ["concepts"], preset: "preset", strength: "strength" },
  // SLD reads its safety concept as one sentence, not a list
  EraserSLD: { kind: "SLD", concepts: ["safety_concept"], wholeText: true, strength: "strength" },
  EraserConceptGuidance: { kind: "concept guidance", concepts: ["concepts"], strength: "strength" },
  EraserTokenSuppress: { kind: "token suppression", concepts: ["concepts"], strength: "strength" },
};

// Fallbacks for nodes whose widget names the table does not fix (other branches may name them freely).
const STRENGTH_NAMES = ["strength", "multiplier", "strength_model", "weight", "scale"];
const FILE_NAME = /(^|_)(name|file)$/;

export function isPackType(type) {
  return Object.prototype.hasOwnProperty.call(NODE_KINDS, type);
}

function widgetByName(node, name) {
  return (node.widgets || []).find((w) => w && w.name === name) || null;
}

export function findStrengthWidget(node) {
  const spec = NODE_KINDS[node.type] || {};
  const names = spec.strength ? [spec.strength, ...STRENGTH_NAMES] : STRENGTH_NAMES;
  for (const name of names) {
    const w = widgetByName(node, name);
    if (w && typeof w.value === "number") return w;
  }
  return null;
}

export function findFileWidget(node) {
  const spec = NODE_KINDS[node.type] || {};
  if (!spec.file) return null;
  const named = spec.file.widget ? widgetByName(node, spec.file.widget) : null;
  if (named) return named;
  return (node.widgets || []).find((w) => w && typeof w.value === "string" && FILE_NAME.test(w.name)
    && Array.isArray(w.options?.values)) || null;
}

// User text box → list, the same rule as erasers/text.py split_concepts: one concept per line, commas
// separate too unless the whole line is quoted; blank lines and '#' comments are skipped.
export function splitConcepts(text) {
  const out = [];
  for (const raw of String(text ?? "").split(/\r?\n/)) {
    const line = raw.trim();
    if (!line || line.startsWith("#")) continue;
    if (line.length >= 2 && line[0] === '"' && line[line.length - 1] === '"') {
      const inner = line.slice(1, -1).trim();
      if (inner) out.push(inner);
    } else {
      for (const part of line.split(",")) if (part.trim()) out.push(part.trim());
    }
  }
  return out;
}

export function fileKey(folder, name) {
  return `${folder}/${name}`;
}

export function isEnabled(mode) {
  return mode !== MODE_NEVER && mode !== MODE_BYPASS;
}

// One entry per node of the pack. `fileInfo` maps fileKey → server metadata ({concepts, method, sha256…}).
export function describeNode(node, fileInfo = {}) {
  const spec = NODE_KINDS[node.type];
  if (!spec) return null;
  const entry = {
    id: node.id,
    type: node.type,
    title: node.title || node.type,
    kind: spec.kind,
    method: null,
    concepts: [],
    conceptSource: null,
    conceptsWidget: null,
    strength: null,
    strengthWidget: null,
    strengthRange: null,
    mode: node.mode ?? MODE_ALWAYS,
    enabled: isEnabled(node.mode ?? MODE_ALWAYS),
    toggle: spec.toggle !== false,
    file: null,
  };
  if (spec.method) entry.method = widgetByName(node, spec.method)?.value ?? null;
  for (const name of spec.concepts || []) {
    const w = widgetByName(node, name);
    if (!w) continue;
    entry.conceptsWidget = entry.conceptsWidget || name;
    const list = spec.wholeText ? [String(w.value ?? "").split(/\s+/).filter(Boolean).join(" ")].filter(Boolean)
      : splitConcepts(w.value);
    if (list.length) {
      entry.concepts = list;
      entry.conceptsWidget = name;
      entry.conceptSource = "text";
      break;
    }
  }
  if (!entry.concepts.length && spec.preset) {
    const preset = widgetByName(node, spec.preset)?.value;
    if (preset) {
      entry.concepts = [`preset: ${preset}`];
      entry.conceptSource = "preset";
    }
  }
  const sw = findStrengthWidget(node);
  if (sw) {
    entry.strength = sw.value;
    entry.strengthWidget = sw.name;
    const o = sw.options || {};
    entry.strengthRange = { min: o.min ?? 0, max: o.max ?? 2, step: stepOf(o) };
  }
  const fw = findFileWidget(node);
  if (fw) {
    const folder = spec.file.folder;
    const info = fileInfo[fileKey(folder, fw.value)] || null;
    entry.file = { folder, name: fw.value, widget: fw.name, info };
    if (info && Array.isArray(info.concepts) && info.concepts.length) {
      entry.concepts = info.concepts.slice();
      entry.conceptSource = "file";
    }
    if (info && info.method) entry.method = info.method;
  }
  return entry;
}

// LiteGraph keeps the legacy 10x `step` for number widgets and the real one in `step2`.
export function stepOf(options) {
  if (typeof options.step2 === "number") return options.step2;
  if (typeof options.round === "number" && options.round > 0) return options.round;
  if (typeof options.step === "number") return options.step / 10;
  return 0.01;
}

export function collectErasers(nodes, fileInfo = {}) {
  const out = [];
  for (const node of nodes || []) {
    const entry = node && describeNode(node, fileInfo);
    if (entry) out.push(entry);
  }
  out.sort((a, b) => Number(a.id) - Number(b.id));
  return out;
}

// Nodes that only make sense with this node on: those fed by its non-MODEL outputs (an eraser from
// Erase Concepts going into Save/Apply Eraser). Bypass passes MODEL through but has nothing to pass for
// an ERASER output, so they are switched together. `links`: [{origin_id, origin_slot, target_id, type}].
export function dependents(nodeId, links) {
  const out = new Set();
  const queue = [nodeId];
  while (queue.length) {
    const id = queue.shift();
    for (const link of links || []) {
      if (!link || link.origin_id !== id || link.type === "MODEL") continue;
      if (!out.has(link.target_id) && link.target_id !== nodeId) {
        out.add(link.target_id);
        queue.push(link.target_id);
      }
    }
  }
  return [...out];
}

// Switch a node on (mode 0) or off (bypass). Muted nodes stay muted when switched off. Returns the
// ids whose mode changed.
export function setNodeEnabled(node, on, { nodesById = null, links = null } = {}) {
  const changed = [];
  const apply = (n) => {
    if (!n) return;
    const next = on ? MODE_ALWAYS : (n.mode === MODE_NEVER ? MODE_NEVER : MODE_BYPASS);
    if (n.mode !== next) {
      n.mode = next;
      changed.push(n.id);
    }
  };
  apply(node);
  if (nodesById && links) {
    for (const id of dependents(node.id, links)) {
      const dep = nodesById.get(id);
      if (dep && isPackType(dep.type)) apply(dep);
    }
  }
  return changed;
}

// The master switch: every toggleable node of the pack on or off.
export function setAllEnabled(nodes, on) {
  const changed = [];
  for (const node of nodes || []) {
    const spec = node && NODE_KINDS[node.type];
    if (!spec || spec.toggle === false) continue;
    changed.push(...setNodeEnabled(node, on));
  }
  return changed;
}

// Master switch state: "on", "off", "mixed" or "none".
export function masterState(entries) {
  const toggled = entries.filter((e) => e.toggle);
  if (!toggled.length) return "none";
  const on = toggled.filter((e) => e.enabled).length;
  return on === toggled.length ? "on" : on === 0 ? "off" : "mixed";
}

export function truncate(text, max) {
  const s = String(text ?? "");
  return s.length <= max ? s : s.slice(0, Math.max(1, max - 1)) + "…";
}

// Short badge for the canvas: the first concepts, then "+N"; says "off" when bypassed.
export function badgeText(entry, { maxConcepts = 3, maxChars = 48 } = {}) {
  if (!entry) return "";
  let text;
  if (entry.concepts.length) {
    const shown = entry.concepts.slice(0, maxConcepts).join(", ");
    const more = entry.concepts.length - maxConcepts;
    text = truncate(shown, maxChars) + (more > 0 ? ` +${more}` : "");
  } else if (entry.file && entry.file.name) {
    text = truncate(entry.file.name, maxChars);
  } else {
    text = "";
  }
  if (!text) return entry.enabled ? "" : "off";
  return entry.enabled ? text : `off · ${text}`;
}

// What goes into workflow.extra.concept_erasers: enough for someone who opens the workflow without the
// files (or without the pack) to see what was erased. `previous` (the summary the workflow was loaded
// with) keeps concepts and hashes of files this machine does not have.
export function workflowSummary(entries, previous = null) {
  const prev = new Map();
  const prevByName = new Map();
  for (const e of previous?.erasers || []) {
    if (e && e.file && e.file.folder && e.file.name) {
      prev.set(fileKey(e.file.folder, e.file.name), e);
      if (!prevByName.has(e.file.name)) prevByName.set(e.file.name, e);
    }
  }
  const erasers = entries.map((e) => {
    const item = { node: e.id, type: e.type, kind: e.kind, enabled: e.enabled };
    if (e.method) item.method = e.method;
    if (e.strength !== null && e.strength !== undefined) item.strength = e.strength;
    let concepts = e.conceptSource === "preset" ? [] : e.concepts.slice();
    if (e.conceptSource === "preset") item.preset = e.concepts[0].replace(/^preset: /, "");
    if (e.file) {
      const info = e.file.info;
      const old = prev.get(fileKey(e.file.folder, e.file.name)) || prevByName.get(e.file.name);
      const file = { folder: info?.folder || old?.file?.folder || e.file.folder, name: e.file.name };
      const sha = info?.sha256 || old?.file?.sha256;
      if (sha) file.sha256 = sha;
      const method = info?.method || old?.file?.method;
      if (method) file.method = method;
      const family = info?.family || old?.file?.family;
      if (family) file.family = family;
      if (!concepts.length && old && Array.isArray(old.concepts)) concepts = old.concepts.slice();
      item.file = file;
    }
    item.concepts = concepts;
    return item;
  });
  return { version: SUMMARY_VERSION, erasers };
}

// Files a loaded workflow names but this server does not have. `available`: folder → list of file
// names (a combo's options or GET /models/<folder>); a folder missing from `available` is not judged.
// Folder "any" (the SPM / LoRA loaders) counts as present if any of erasers, spm, loras holds the name.
export function availableIn(available, folder) {
  if (folder !== ANY_FOLDER) return available?.[folder];
  const lists = ADAPTER_FOLDERS.map((f) => available?.[f]).filter(Array.isArray);
  return lists.length ? lists.flat() : undefined;
}

export function missingFiles(entries, available, savedSummary = null) {
  const saved = new Map();
  const savedByName = new Map();
  for (const e of savedSummary?.erasers || []) {
    if (e && e.file && e.file.folder && e.file.name) {
      saved.set(fileKey(e.file.folder, e.file.name), e);
      if (!savedByName.has(e.file.name)) savedByName.set(e.file.name, e);
    }
  }
  const out = [];
  const seen = new Set();
  for (const e of entries) {
    if (!e.file || !e.file.name) continue;
    const list = availableIn(available, e.file.folder);
    if (!Array.isArray(list) || list.includes(e.file.name)) continue;
    const key = fileKey(e.file.folder, e.file.name);
    if (seen.has(key)) continue;
    seen.add(key);
    const old = saved.get(key) || savedByName.get(e.file.name);
    out.push({
      node: e.id,
      folder: old?.file?.folder || e.file.folder,
      name: e.file.name,
      concepts: Array.isArray(old?.concepts) ? old.concepts.slice() : [],
      sha256: old?.file?.sha256 || null,
    });
  }
  return out;
}

// Also report files named only in the saved summary (e.g. the pack's nodes are missing entirely).
export function missingFromSummary(savedSummary, available) {
  const out = [];
  const seen = new Set();
  for (const e of savedSummary?.erasers || []) {
    if (!e || !e.file || !e.file.folder || !e.file.name) continue;
    const list = availableIn(available, e.file.folder);
    if (!Array.isArray(list) || list.includes(e.file.name)) continue;
    const key = fileKey(e.file.folder, e.file.name);
    if (seen.has(key)) continue;
    seen.add(key);
    out.push({ node: e.node, folder: e.file.folder, name: e.file.name,
      concepts: Array.isArray(e.concepts) ? e.concepts.slice() : [], sha256: e.file.sha256 || null });
  }
  return out;
}

// One line per missing file, for a toast or dialog (plain text; the caller renders it as text).
export function missingFilesMessage(missing) {
  return missing.map((m) => {
    const what = m.concepts.length ? `erased: ${m.concepts.join(", ")}` : "concepts unknown";
    const hash = m.sha256 ? ` [sha256 ${m.sha256}]` : "";
    return `${m.folder}/${m.name}${hash} — ${what}`;
  }).join("\n");
}

// A string that changes whenever anything the sidebar shows changes (to skip needless re-renders).
export function signature(entries) {
  return JSON.stringify(entries.map((e) => [e.id, e.title, e.mode, e.strength, e.concepts, e.method,
    e.file && e.file.name, e.file && !!e.file.info]));
}
