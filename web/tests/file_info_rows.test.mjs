// The file-info panel's rows for adapters other than the pack's eraser files (issue #17): the format a
// loader reads the file as, its text-encoder layers and its modules (GET /concept_erasers/file_info).
import { test } from "node:test";
import assert from "node:assert/strict";
import { infoRows } from "../js/lib/format.js";

test("an SPM membrane shows its format, modules and no text-encoder layers", () => {
  const rows = Object.fromEntries(infoRows({ file: "s.safetensors", kind: "spm", method: "spm", concepts: ["snoopy"],
    family: "sd1", format: "spm", format_title: "SPM membrane (Con6924/SPM layout)", layers: 2, unet_layers: 2,
    text_encoder_layers: 0, text_encoders: [], modules: { "attn2.to_k": 1, "ff.net.0.proj": 1 }, rank: 1, size_bytes: 10 }));
  assert.equal(rows.format, "SPM membrane (Con6924/SPM layout)");
  assert.equal(rows["text encoder"], "0 layer(s)");
  assert.equal(rows.modules, "attn2.to_k ×1, ff.net.0.proj ×1");
  assert.equal(rows.rank, "1");
});

test("a kohya LoRA names its text encoders; an unknown layout says no loader reads it", () => {
  const kohya = Object.fromEntries(infoRows({ file: "k", kind: "lora", format: "kohya", format_title: "kohya",
    text_encoder_layers: 3, text_encoders: ["te1", "te2"], modules: {} }));
  assert.equal(kohya["text encoder"], "3 layer(s) (te1, te2)");
  assert.equal(kohya.modules, undefined);
  const foreign = Object.fromEntries(infoRows({ file: "f", kind: "lora", format: null, note: "no loader …" }));
  assert.equal(foreign.format, "not recognised by any loader of the pack");
  // the pack's eraser files keep their rows (no format row)
  assert.equal(Object.fromEntries(infoRows({ file: "e", kind: "eraser", layers: 32 })).format, undefined);
});
