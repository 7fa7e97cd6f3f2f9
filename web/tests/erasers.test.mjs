import assert from "node:assert/strict";
import { test } from "node:test";

import {
  MODE_ALWAYS, MODE_BYPASS, MODE_NEVER, badgeText, collectErasers, dependents, describeNode, masterState,
  missingFiles, missingFilesMessage, missingFromSummary, setAllEnabled, setNodeEnabled, signature, splitConcepts,
  stepOf, workflowSummary,
} from "../js/lib/erasers.js";

const w = (name, value, options = {}) => ({ name, value, options });

function closedForm(id, concepts, extra = {}) {
  return { id, type: "EraserClosedForm", title: "Erase Concepts (Closed Form)", mode: MODE_ALWAYS,
    widgets: [w("method", "uce"), w("concepts", concepts), w("anchors", ""), w("preserve", ""),
      w("strength", 1.0, { min: 0, max: 2, step: 0.5, step2: 0.05 })], ...extra };
}
function loader(id, name, values = [name]) {
  return { id, type: "EraserLoad", title: "Load Eraser", mode: MODE_ALWAYS,
    widgets: [w("eraser_name", name, { values }), w("strength", 0.8, { min: 0, max: 2, step: 0.5 })] };
}
const sampler = { id: 9, type: "KSampler", mode: 0, widgets: [w("seed", 1), w("steps", 20)] };

test("splitConcepts follows erasers.text.split_concepts", () => {
  assert.deepEqual(splitConcepts("Van Gogh, Monet\n\n# note\n\"Tom, Jerry\"\n  nudity  "),
    ["Van Gogh", "Monet", "Tom, Jerry", "nudity"]);
  assert.deepEqual(splitConcepts(""), []);
  assert.deepEqual(splitConcepts(undefined), []);
  assert.deepEqual(splitConcepts('""'), []);
});

test("collectErasers keeps only the pack's nodes, sorted by id, with kind/concepts/strength/mode", () => {
  const nodes = [loader(5, "vg.safetensors"), sampler, closedForm(2, "Van Gogh\nMonet")];
  const entries = collectErasers(nodes);
  assert.deepEqual(entries.map((e) => e.id), [2, 5]);
  const [cf, ld] = entries;
  assert.equal(cf.kind, "closed form");
  assert.equal(cf.method, "uce");
  assert.deepEqual(cf.concepts, ["Van Gogh", "Monet"]);
  assert.equal(cf.conceptsWidget, "concepts");
  assert.equal(cf.strength, 1.0);
  assert.deepEqual(cf.strengthRange, { min: 0, max: 2, step: 0.05 });
  assert.equal(cf.enabled, true);
  assert.equal(ld.kind, "eraser file");
  assert.deepEqual(ld.file, { folder: "erasers", name: "vg.safetensors", widget: "eraser_name", info: null });
  assert.deepEqual(ld.concepts, []);
  assert.equal(ld.strengthRange.step, 0.05, "legacy 10x step is divided back");
});

test("file metadata supplies a loader's concepts and method", () => {
  const info = { "erasers/vg.safetensors": { concepts: ["Van Gogh"], method: "uce", sha256: "abc123" } };
  const [e] = collectErasers([loader(1, "vg.safetensors")], info);
  assert.deepEqual(e.concepts, ["Van Gogh"]);
  assert.equal(e.conceptSource, "file");
  assert.equal(e.method, "uce");
});

test("SAFREE with an empty concept box shows its preset", () => {
  const node = { id: 3, type: "EraserSAFREE", mode: 0,
    widgets: [w("prompt", ""), w("concepts", ""), w("preset", "nudity"), w("strength", 1)] };
  const e = describeNode(node);
  assert.deepEqual(e.concepts, ["preset: nudity"]);
  assert.equal(e.conceptSource, "preset");
  assert.equal(workflowSummary([e]).erasers[0].preset, "nudity");
  assert.deepEqual(workflowSummary([e]).erasers[0].concepts, []);
});

test("unknown widget names of other branches fall back to generic names", () => {
  const spm = { id: 4, type: "EraserSPMLoad", mode: 0,
    widgets: [w("spm_name", "snoopy.safetensors", { values: ["snoopy.safetensors"] }), w("multiplier", 0.5)] };
  const e = describeNode(spm);
  assert.equal(e.file.folder, "any");
  assert.equal(e.file.name, "snoopy.safetensors", "a combo named *_name is found when the spec's name is absent");
  assert.equal(e.strength, 0.5);
  assert.equal(e.strengthWidget, "multiplier");
});

test("setNodeEnabled bypasses and restores; muted nodes stay muted when switched off", () => {
  const n = closedForm(1, "x");
  assert.deepEqual(setNodeEnabled(n, false), [1]);
  assert.equal(n.mode, MODE_BYPASS);
  assert.deepEqual(setNodeEnabled(n, false), [], "no change the second time");
  assert.deepEqual(setNodeEnabled(n, true), [1]);
  assert.equal(n.mode, MODE_ALWAYS);
  n.mode = MODE_NEVER;
  setNodeEnabled(n, false);
  assert.equal(n.mode, MODE_NEVER);
});

test("switching Erase Concepts off also bypasses the Save/Apply nodes fed by its ERASER output", () => {
  const cf = closedForm(1, "x");
  const save = { id: 2, type: "EraserSave", mode: 0, widgets: [] };
  const apply = { id: 3, type: "EraserApply", mode: 0, widgets: [w("strength", 1)] };
  const ks = { id: 4, type: "KSampler", mode: 0, widgets: [] };
  const links = [
    { origin_id: 1, origin_slot: 0, target_id: 4, type: "MODEL" },
    { origin_id: 1, origin_slot: 1, target_id: 2, type: "ERASER" },
    { origin_id: 1, origin_slot: 1, target_id: 3, type: "ERASER" },
    { origin_id: 3, origin_slot: 0, target_id: 4, type: "MODEL" },
  ];
  assert.deepEqual(dependents(1, links).sort(), [2, 3]);
  const byId = new Map([cf, save, apply, ks].map((n) => [n.id, n]));
  const changed = setNodeEnabled(cf, false, { nodesById: byId, links });
  assert.deepEqual(changed.sort(), [1, 2, 3]);
  assert.equal(ks.mode, 0, "a MODEL consumer is never touched");
});

test("master switch toggles every eraser but not Save Eraser", () => {
  const nodes = [closedForm(1, "a"), loader(2, "f.safetensors"), { id: 3, type: "EraserSave", mode: 0, widgets: [] },
    sampler];
  setAllEnabled(nodes, false);
  assert.deepEqual(nodes.map((n) => n.mode), [MODE_BYPASS, MODE_BYPASS, 0, 0]);
  assert.equal(masterState(collectErasers(nodes)), "off");
  setNodeEnabled(nodes[0], true);
  assert.equal(masterState(collectErasers(nodes)), "mixed");
  setAllEnabled(nodes, true);
  assert.equal(masterState(collectErasers(nodes)), "on");
  assert.equal(masterState([]), "none");
});

test("badge text lists the first concepts, counts the rest and marks bypassed nodes", () => {
  const e = describeNode(closedForm(1, "a, b, c, d, e"));
  assert.equal(badgeText(e), "a, b, c +2");
  e.enabled = false;
  assert.equal(badgeText(e), "off · a, b, c +2");
  const long = describeNode(closedForm(2, "x".repeat(100)));
  assert.ok(badgeText(long).length <= 48);
  assert.ok(badgeText(long).endsWith("…"));
  assert.equal(badgeText(describeNode(loader(3, "vg.safetensors"))), "vg.safetensors");
  assert.equal(badgeText(null), "");
});

test("workflowSummary records kinds, concepts and files with hashes; keeps data of files it cannot see", () => {
  const info = { "erasers/vg.safetensors": { concepts: ["Van Gogh"], method: "uce", sha256: "0123456789", family: "sd1" } };
  const entries = collectErasers([closedForm(1, "nudity"), loader(2, "vg.safetensors")], info);
  const s = workflowSummary(entries);
  assert.equal(s.version, 1);
  assert.deepEqual(s.erasers[0], { node: 1, type: "EraserClosedForm", kind: "closed form", enabled: true,
    method: "uce", strength: 1, concepts: ["nudity"] });
  assert.deepEqual(s.erasers[1].file, { folder: "erasers", name: "vg.safetensors", sha256: "0123456789",
    method: "uce", family: "sd1" });
  assert.deepEqual(s.erasers[1].concepts, ["Van Gogh"]);
  // same workflow on a machine without the file: the old summary's concepts and hash survive
  const again = workflowSummary(collectErasers([closedForm(1, "nudity"), loader(2, "vg.safetensors")]), s);
  assert.deepEqual(again.erasers[1].concepts, ["Van Gogh"]);
  assert.equal(again.erasers[1].file.sha256, "0123456789");
  assert.deepEqual(JSON.parse(JSON.stringify(again)), again, "JSON-serialisable");
});

test("missingFiles names files absent from the folder listing, with the concepts they erased", () => {
  const saved = { version: 1, erasers: [{ node: 2, file: { folder: "erasers", name: "gone.safetensors", sha256: "ff00" },
    concepts: ["Van Gogh", "Monet"] }] };
  const entries = collectErasers([loader(2, "gone.safetensors", ["other.safetensors"]), loader(3, "other.safetensors")]);
  const missing = missingFiles(entries, { erasers: ["other.safetensors"] }, saved);
  assert.deepEqual(missing, [{ node: 2, folder: "erasers", name: "gone.safetensors", concepts: ["Van Gogh", "Monet"],
    sha256: "ff00" }]);
  assert.equal(missingFilesMessage(missing), "erasers/gone.safetensors [sha256 ff00] — erased: Van Gogh, Monet");
  assert.deepEqual(missingFiles(entries, {}, saved), [], "an unknown folder listing judges nothing");
  assert.deepEqual(missingFiles(entries, { erasers: ["gone.safetensors", "other.safetensors"] }, saved), []);
  assert.deepEqual(missingFromSummary(saved, { erasers: [] })[0].concepts, ["Van Gogh", "Monet"]);
  assert.equal(missingFilesMessage([{ folder: "spm", name: "a.safetensors", concepts: [], sha256: null }]),
    "spm/a.safetensors — concepts unknown");
});

test("signature changes with mode, strength and concepts only", () => {
  const n = closedForm(1, "a");
  const s0 = signature(collectErasers([n]));
  assert.equal(signature(collectErasers([n])), s0);
  n.mode = MODE_BYPASS;
  assert.notEqual(signature(collectErasers([n])), s0);
});

test("stepOf prefers step2, then round, then the legacy 10x step", () => {
  assert.equal(stepOf({ step2: 0.05, step: 0.5 }), 0.05);
  assert.equal(stepOf({ round: 0.01, step: 0.5 }), 0.01);
  assert.equal(stepOf({ step: 0.5 }), 0.05);
  assert.equal(stepOf({}), 0.01);
});

test("SLD's safety concept is one sentence, whitespace normalised", () => {
  const sld = { id: 7, type: "EraserSLD", mode: 0,
    widgets: [w("preset", "medium"), w("safety_concept", "an image showing hate,\n  violence"), w("strength", 1)] };
  assert.deepEqual(describeNode(sld).concepts, ["an image showing hate, violence"]);
});

test("SPM / LoRA loaders: folder 'any', present in any adapter folder; the summary keeps the real folder", () => {
  const spm = { id: 4, type: "EraserSPMLoad", mode: 0, widgets: [w("membrane", "snoopy.safetensors", { values: ["snoopy.safetensors"] }),
    w("strength", 1), w("transport", true), w("combination", "official"), w("concepts", "")] };
  const lora = { id: 5, type: "EraserLoRALoad", mode: 0, widgets: [w("file", "esd.safetensors", { values: [] }),
    w("strength", 1), w("gate", "always"), w("concepts", "van gogh")] };
  const info = { "any/snoopy.safetensors": { folder: "spm", concepts: ["snoopy"], method: "spm", sha256: "aa" } };
  const entries = collectErasers([spm, lora], info);
  assert.equal(entries[0].file.folder, "any");
  assert.deepEqual(entries[0].concepts, ["snoopy"]);
  assert.deepEqual(entries[1].concepts, ["van gogh"], "typed concepts when the file has none");
  const summary = workflowSummary(entries);
  assert.equal(summary.erasers[0].file.folder, "spm");
  const missing = missingFiles(entries, { erasers: [], spm: ["snoopy.safetensors"], loras: [] }, summary);
  assert.deepEqual(missing.map((m) => m.name), ["esd.safetensors"]);
  assert.deepEqual(missingFiles(entries, {}, summary), [], "no listing, no verdict");
});
