import assert from "node:assert/strict";
import { test } from "node:test";

import { splitConcepts } from "../js/lib/erasers.js";
import { familyLabel, formatBytes, infoRows } from "../js/lib/format.js";
import {
  applyPreset, deleteUserPreset, mergePresets, normalizeUserPresets, parsePresetText, parseServerPresets,
  presetToText, saveUserPreset, validatePresetName,
} from "../js/lib/presets.js";

test("preset text files: one concept per line, comments and blanks dropped", () => {
  assert.deepEqual(parsePresetText("# SAFREE nudity\nNudity\n\n  Sexual Acts  \r\n# end"), ["Nudity", "Sexual Acts"]);
  assert.deepEqual(parsePresetText(""), []);
});

test("presetToText round-trips through the concept splitter, commas included", () => {
  const items = ["Van Gogh", "Tom, Jerry", "nudity"];
  assert.deepEqual(splitConcepts(presetToText(items)), items);
});

test("applyPreset replaces or appends only what is new", () => {
  assert.equal(applyPreset("old", ["a", "b"], "replace"), "a\nb");
  assert.equal(applyPreset("A\n", ["a", "b"], "append"), "A\nb");
  assert.equal(applyPreset("", ["a"], "append"), "a");
  assert.equal(applyPreset("a, b", ["A", "b"], "append"), "a, b", "nothing new: unchanged");
});

test("server presets: malformed entries are dropped, concepts trimmed", () => {
  const got = parseServerPresets({ presets: [
    { name: "nudity", concepts: [" Nudity ", "", 3], description: "SAFREE", file: "erasers/data/presets/nudity.txt" },
    { name: "broken" }, { concepts: ["x"] }, { name: "empty", concepts: [] }, null] });
  assert.deepEqual(got, [{ name: "nudity", concepts: ["Nudity"], description: "SAFREE", source: "pack",
    file: "erasers/data/presets/nudity.txt" }]);
  assert.deepEqual(parseServerPresets(null), []);
  assert.deepEqual(parseServerPresets({ presets: "nope" }), []);
});

test("user presets: stored values are cleaned, saved and deleted without mutating the input", () => {
  assert.deepEqual(normalizeUserPresets('{"mine": ["a", " b "], "bad": "x", "": ["y"]}'), { mine: ["a", "b"] });
  assert.deepEqual(normalizeUserPresets("not json"), {});
  assert.deepEqual(normalizeUserPresets([1, 2]), {});
  const before = { mine: ["a"] };
  const after = saveUserPreset(before, " celebs ", "Tom Cruise\n\"Smith, Will\"");
  assert.deepEqual(after, { mine: ["a"], celebs: ["Tom Cruise", "Smith, Will"] });
  assert.deepEqual(before, { mine: ["a"] });
  assert.throws(() => saveUserPreset(before, "", "x"), /needs a name/);
  assert.throws(() => saveUserPreset(before, "n", "  \n# only a comment"), /empty/);
  assert.deepEqual(deleteUserPreset(after, "mine"), { celebs: ["Tom Cruise", "Smith, Will"] });
  assert.equal(validatePresetName("x".repeat(65)).ok, false);
  assert.equal(validatePresetName("a\u0007b").ok, false);
});

test("mergePresets lists pack presets first, then user presets by name", () => {
  const pack = [{ name: "nudity", concepts: ["Nudity"], description: "", source: "pack", file: "" }];
  const merged = mergePresets(pack, { zeta: ["z"], alpha: ["a"] });
  assert.deepEqual(merged.map((p) => [p.name, p.source]), [["nudity", "pack"], ["alpha", "user"], ["zeta", "user"]]);
});

test("info rows and formatting", () => {
  assert.equal(formatBytes(512), "512 B");
  assert.equal(formatBytes(1536), "1.5 KB");
  assert.equal(formatBytes(3 * 1024 * 1024 * 1024), "3.0 GB");
  assert.equal(formatBytes(-1), "?");
  assert.equal(familyLabel("sd1"), "SD1.x");
  assert.equal(familyLabel(null), "unknown");
  const rows = infoRows({ file: "vg.safetensors", kind: "eraser", method: "uce", concepts: ["Van Gogh"], family: "sd1",
    size_bytes: 2048, sha256: "0123456789", layers: 32 });
  assert.deepEqual(Object.fromEntries(rows), { file: "vg.safetensors", kind: "eraser", method: "uce",
    concepts: "Van Gogh", family: "SD1.x", layers: "32", size: "2.0 KB", sha256: "0123456789" });
  assert.deepEqual(Object.fromEntries(infoRows({ file: "x", concepts: [] })).concepts, "none recorded");
  assert.deepEqual(infoRows(null), []);
});

test("one-line boxes (SLD) get the concepts joined with commas, unquoted", () => {
  assert.equal(applyPreset("old", ["hate", "violence, gore"], "replace", { oneLine: true }), "hate, violence, gore");
  assert.equal(applyPreset("nudity", ["blood"], "append", { oneLine: true }), "nudity, blood");
});

test("escapeHtml neutralises markup in preset names shown by LiteGraph's menu", async () => {
  const { escapeHtml } = await import("../js/lib/format.js");
  assert.equal(escapeHtml('<img src=x onerror="alert(1)">&\''), "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;&amp;&#39;");
  assert.equal(escapeHtml(null), "");
});
