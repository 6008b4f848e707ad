// ComfyUI's editor ("litegraph") files converted to Kiln's format, with the node
// definitions: widgets_values is positional, in the order of a node's widget
// inputs, and a seed-like widget is followed by its "fixed"/"randomize" mode.
// Notes are dropped, Reroutes and bypassed nodes pass their input through, muted
// nodes vanish and Primitive nodes become the value of what they feed.

const CONTROL = new Set(["fixed", "increment", "decrement", "randomize"]);
const IGNORED = new Set(["Note", "MarkdownNote"]);
const MUTED = 2, BYPASS = 4;

export function isComfyUiWorkflow(doc) {
  return !!doc && Array.isArray(doc.nodes) && "links" in doc;
}

function linkTable(doc) {
  const table = new Map();
  for (const l of doc.links || []) {
    if (Array.isArray(l) && l.length >= 5) table.set(l[0], { from: String(l[1]), slot: l[2], to: String(l[3]) });
    else if (l && typeof l === "object") table.set(l.id, { from: String(l.origin_id), slot: l.origin_slot, to: String(l.target_id) });
  }
  return table;
}

/** @param {Map<string, import("./schema.js").NodeDef>} defs */
export function comfyUiToKiln(doc, defs) {
  const raw = new Map(doc.nodes.filter((n) => n && typeof n === "object").map((n) => [String(n.id), n]));
  const links = linkTable(doc);
  const passes = (n) => n.type === "Reroute" || n.mode === BYPASS;
  const follow = (id, slot, seen = new Set()) => {
    const n = raw.get(id);
    if (!n || seen.has(id)) return null;
    seen.add(id);
    if (passes(n)) {
      for (const inp of n.inputs || []) {
        const l = inp.link != null ? links.get(inp.link) : null;
        if (l) return follow(l.from, l.slot, seen);
      }
      return null;
    }
    if (n.mode === MUTED || n.type === "PrimitiveNode") return null;
    return [id, slot];
  };
  const primitive = (id) => {
    const n = raw.get(id);
    return n && n.type === "PrimitiveNode" && Array.isArray(n.widgets_values) ? n.widgets_values[0] : undefined;
  };
  const nodes = {};
  for (const [id, n] of raw) {
    if (IGNORED.has(n.type) || passes(n) || n.mode === MUTED || n.type === "PrimitiveNode") continue;
    const def = defs.get(n.type);
    const inputs = {};
    const controls = {};
    const values = Array.isArray(n.widgets_values) ? [...n.widgets_values] : null;
    if (values && def) {
      for (const inp of def.inputs) {
        if (!inp.widget || !values.length) continue;
        inputs[inp.name] = values.shift();
        if (inp.control && values.length && CONTROL.has(values[0])) controls[inp.name] = values.shift();
      }
    } else if (n.widgets_values && typeof n.widgets_values === "object" && !values) {
      Object.assign(inputs, n.widgets_values);
    }
    for (const inp of n.inputs || []) {
      const l = inp.link != null ? links.get(inp.link) : null;
      if (!l) continue;
      const p = primitive(l.from);
      if (p !== undefined) { inputs[inp.name] = p; continue; }
      const src = follow(l.from, l.slot);
      if (src) inputs[inp.name] = src;
    }
    const pos = Array.isArray(n.pos) ? n.pos : n.pos ? [n.pos[0] ?? n.pos["0"], n.pos[1] ?? n.pos["1"]] : null;
    const entry = { type: n.type, inputs, ui: {} };
    if (pos) entry.ui.pos = [Number(pos[0]), Number(pos[1])];
    if (Object.keys(controls).length) entry.ui.controls = controls;
    if (n.title) entry.title = n.title;
    nodes[id] = entry;
  }
  for (const entry of Object.values(nodes)) {
    for (const [name, v] of Object.entries(entry.inputs)) {
      if (Array.isArray(v) && v.length === 2 && typeof v[0] === "string" && !nodes[v[0]]) delete entry.inputs[name];
    }
  }
  return { version: 1, nodes };
}
