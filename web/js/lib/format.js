// Formatting helpers for the info panel (pure).

export function formatBytes(n) {
  if (typeof n !== "number" || !Number.isFinite(n) || n < 0) return "?";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return i === 0 ? `${n} B` : `${v.toFixed(v >= 100 ? 0 : 1)} ${units[i]}`;
}

const FAMILY_LABELS = { sd1: "SD1.x", sd2: "SD2.x", sdxl: "SDXL", sd3: "SD3/SD3.5", flux: "Flux", unet: "cross-attention UNet" };

export function familyLabel(family) {
  return FAMILY_LABELS[family] || (family ? String(family) : "unknown");
}

// GET /concept_erasers/file_info answer → [label, value] rows for the info panel (all plain text).
export function infoRows(info) {
  if (!info) return [];
  const rows = [["file", info.file || ""]];
  rows.push(["kind", info.kind || "?"]);
  if (info.method) rows.push(["method", info.method]);
  // adapters other than the pack's eraser files: the format a loader reads them as (file_info.adapter_layout)
  if (info.format) rows.push(["format", info.format_title || info.format]);
  else if (info.note) rows.push(["format", "not recognised by any loader of the pack"]);
  rows.push(["concepts", Array.isArray(info.concepts) && info.concepts.length ? info.concepts.join(", ") : "none recorded"]);
  if (Array.isArray(info.anchors) && info.anchors.length) rows.push(["anchors", info.anchors.join(", ")]);
  if (Array.isArray(info.preserve) && info.preserve.length) rows.push(["preserve", info.preserve.join(", ")]);
  rows.push(["family", familyLabel(info.family)]);
  if (typeof info.layers === "number") rows.push(["layers", String(info.layers)]);
  if (typeof info.text_encoder_layers === "number") {
    const encoders = Array.isArray(info.text_encoders) && info.text_encoders.length ? ` (${info.text_encoders.join(", ")})` : "";
    rows.push(["text encoder", `${info.text_encoder_layers} layer(s)${encoders}`]);
  }
  if (info.modules && typeof info.modules === "object" && Object.keys(info.modules).length) {
    rows.push(["modules", Object.entries(info.modules).map(([m, n]) => `${m} ×${n}`).join(", ")]);
  }
  if (info.rank) rows.push(["rank", String(info.rank)]);
  rows.push(["size", formatBytes(info.size_bytes)]);
  if (info.sha256) rows.push(["sha256", info.sha256]);
  if (info.pack_version) rows.push(["made by", `Concept Erasers ${info.pack_version}`]);
  return rows;
}

// LiteGraph's context menu sets entries with innerHTML: preset names (user-typed) are escaped for it.
export function escapeHtml(text) {
  return String(text ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}
