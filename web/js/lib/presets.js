// Concept presets: the pack's lists (served by GET /concept_erasers/presets from data files) and the
// user's own saved lists (a {name: [concepts]} object in the ComfyUI user settings). Pure functions.

export const MAX_PRESET_NAME = 64;
export const MAX_PRESET_ITEMS = 500;

// A preset text file: one concept per line, '#' lines are comments, blank lines ignored.
export function parsePresetText(text) {
  const out = [];
  for (const raw of String(text ?? "").split(/\r?\n/)) {
    const line = raw.trim();
    if (line && !line.startsWith("#")) out.push(line);
  }
  return out;
}

// Concepts → the text a concept box holds. One per line; a concept containing a comma is quoted so that
// split_concepts keeps it whole.
export function presetToText(items) {
  return items.map((c) => (c.includes(",") ? `"${c}"` : c)).join("\n");
}

function splitBoxText(text) {
  // the same rule as erasers.text.split_concepts (duplicated to keep this module import-free)
  const out = [];
  for (const raw of String(text ?? "").split(/\r?\n/)) {
    const line = raw.trim();
    if (!line || line.startsWith("#")) continue;
    if (line.length >= 2 && line[0] === '"' && line[line.length - 1] === '"') out.push(line.slice(1, -1).trim());
    else for (const part of line.split(",")) if (part.trim()) out.push(part.trim());
  }
  return out.filter(Boolean);
}

// Put a preset into a concept box: "replace" its text, or "append" the concepts it does not hold yet
// (compared case-insensitively), keeping what the user typed.
// `oneLine`: for boxes read as one sentence (SLD's safety concept), the concepts are joined with ", ".
export function applyPreset(currentText, items, mode = "replace", { oneLine = false } = {}) {
  if (oneLine) {
    const base = mode === "append" ? String(currentText ?? "").trim() : "";
    return [base, items.join(", ")].filter(Boolean).join(", ");
  }
  if (mode === "replace") return presetToText(items);
  const have = new Set(splitBoxText(currentText).map((c) => c.toLowerCase()));
  const add = items.filter((c) => !have.has(c.toLowerCase()));
  if (!add.length) return String(currentText ?? "");
  const base = String(currentText ?? "").replace(/\s+$/, "");
  return (base ? base + "\n" : "") + presetToText(add);
}

// The server's answer → [{name, concepts, description, source: "pack"}], dropping malformed entries.
export function parseServerPresets(payload) {
  const list = Array.isArray(payload?.presets) ? payload.presets : [];
  const out = [];
  for (const p of list) {
    if (!p || typeof p.name !== "string" || !Array.isArray(p.concepts)) continue;
    const concepts = p.concepts.filter((c) => typeof c === "string" && c.trim()).map((c) => c.trim());
    if (!concepts.length) continue;
    out.push({ name: p.name, concepts, description: typeof p.description === "string" ? p.description : "",
      source: "pack", file: typeof p.file === "string" ? p.file : "" });
  }
  return out;
}

// Stored user presets (any JSON value, possibly corrupted) → a clean {name: [concepts]} object.
export function normalizeUserPresets(value) {
  let obj = value;
  if (typeof obj === "string") {
    try { obj = JSON.parse(obj); } catch { obj = null; }
  }
  const out = {};
  if (!obj || typeof obj !== "object" || Array.isArray(obj)) return out;
  for (const [name, items] of Object.entries(obj)) {
    const clean = validatePresetName(name);
    if (!clean.ok || !Array.isArray(items)) continue;
    const concepts = items.filter((c) => typeof c === "string" && c.trim()).map((c) => c.trim());
    if (concepts.length) out[clean.name] = concepts.slice(0, MAX_PRESET_ITEMS);
  }
  return out;
}

export function validatePresetName(name) {
  const s = String(name ?? "").trim();
  if (!s) return { ok: false, error: "A preset needs a name." };
  if (s.length > MAX_PRESET_NAME) return { ok: false, error: `Preset names have at most ${MAX_PRESET_NAME} characters.` };
  if (/[\u0000-\u001f]/.test(s)) return { ok: false, error: "Preset names cannot hold control characters." };
  return { ok: true, name: s };
}

// Save the concepts of a box as a user preset; returns the new object (the input is not modified).
export function saveUserPreset(userPresets, name, text) {
  const check = validatePresetName(name);
  if (!check.ok) throw new Error(check.error);
  const concepts = splitBoxText(text);
  if (!concepts.length) throw new Error("The concept box is empty: nothing to save.");
  return { ...normalizeUserPresets(userPresets), [check.name]: concepts.slice(0, MAX_PRESET_ITEMS) };
}

export function deleteUserPreset(userPresets, name) {
  const out = { ...normalizeUserPresets(userPresets) };
  delete out[name];
  return out;
}

// Pack presets first, then the user's ("user" source), for one menu.
export function mergePresets(packPresets, userPresets) {
  const user = Object.entries(normalizeUserPresets(userPresets))
    .sort(([a], [b]) => a.localeCompare(b))
    .map(([name, concepts]) => ({ name, concepts, description: "", source: "user", file: "" }));
  return [...packPresets, ...user];
}
