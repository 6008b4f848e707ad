// The graph model: nodes, links, values and positions, with no DOM in sight.
// It reads and writes Kiln's workflow format (positions in each node's "ui") and
// ComfyUI's API format, refuses connections the server would refuse, and
// announces every change so views and the undo history can follow.

import { compatible } from "./types.js";
import { defaultValue } from "./schema.js";
import { autoLayout } from "./layout.js";

const CLIP_MARK = "kiln_clipboard";
let graphCounter = 0;

/** @typedef {{id:string,type:string,title:string|null,pos:number[],values:Object,links:Object,ui:Object}} GNode */

function clone(x) { return x === undefined ? undefined : JSON.parse(JSON.stringify(x)); }

/** Seed-like inputs without an after-run rule start with "fixed". */
function defaultControls(node, def) {
  for (const inp of def ? def.inputs : []) {
    if (inp.control && !node.ui.controls?.[inp.name]) node.ui.controls = { ...(node.ui.controls || {}), [inp.name]: "fixed" };
  }
}

function isLinkValue(v) {
  return Array.isArray(v) && v.length === 2 && (typeof v[0] === "string" || typeof v[0] === "number")
    && typeof v[0] !== "boolean" && Number.isInteger(v[1]);
}

export class Graph extends EventTarget {
  /** @param {Map<string, import("./schema.js").NodeDef>} defs */
  constructor(defs = new Map()) {
    super();
    this.defs = defs;
    /** @type {Map<string, GNode>} */
    this.nodes = new Map();
    this.meta = {};       // title, description, other top-level keys of the document
    this.params = {};     // named parameters, kept as the document wrote them
    this.uid = `g${++graphCounter}-${Math.random().toString(36).slice(2, 8)}`;
    // Counts documents: a new or opened one is a new generation, so state kept by
    // node id (run badges, substitution notes) is not carried onto the next graph's
    // nodes that happen to reuse the same numbers. Undo and redo keep the generation.
    this.generation = 0;
    // The library name the document was opened or saved as. It is part of the
    // undo state (undoing an Open brings back the name too, so Save cannot write
    // one document over another's file), but not of the workflow document.
    this.name = null;
    /** Groups: boxes on the canvas with a title and colour ({title, color, bounding:[x, y, w, h]}), saved as "groups". */
    this.groups = [];
  }

  // -- reading ------------------------------------------------------------------

  def(type) { return this.defs.get(type) || null; }
  node(id) { return this.nodes.get(String(id)) || null; }

  inputDef(id, name) {
    const n = this.node(id);
    const d = n && this.def(n.type);
    return d ? d.inputs.find((i) => i.name === name) || null : null;
  }

  /** Inputs of a node in display order: declared ones, then any the document carried extra. */
  inputNames(id) {
    const n = this.node(id);
    if (!n) return [];
    const d = this.def(n.type);
    const names = d ? d.inputs.map((i) => i.name) : [];
    for (const k of [...Object.keys(n.values), ...Object.keys(n.links)]) if (!names.includes(k)) names.push(k);
    return names;
  }

  outputs(id) {
    const n = this.node(id);
    const d = n && this.def(n.type);
    if (d) return d.outputs;
    // Unknown node: as many untyped outputs as links use, so they can still be drawn.
    let count = 0;
    for (const m of this.nodes.values()) for (const [src, idx] of Object.values(m.links)) if (src === n?.id) count = Math.max(count, idx + 1);
    return Array.from({ length: count }, (_, i) => ({ name: `out ${i}`, type: "*" }));
  }

  outputType(id, index) {
    const o = this.outputs(id)[index];
    return o ? o.type : null;
  }

  inputType(id, name) {
    const d = this.inputDef(id, name);
    return d ? d.type : "*";
  }

  /** Every link as {from, output, to, input, type}. */
  links() {
    const out = [];
    for (const n of this.nodes.values()) {
      for (const [input, [from, output]] of Object.entries(n.links)) {
        out.push({ from, output, to: n.id, input, type: this.outputType(from, output) || "*" });
      }
    }
    return out;
  }

  nextId() {
    let max = 0;
    for (const id of this.nodes.keys()) { const v = parseInt(id, 10); if (Number.isFinite(v) && v > max) max = v; }
    return String(max + 1);
  }

  // -- editing ------------------------------------------------------------------

  _emit(kind, ids = [], extra = {}) {
    this.dispatchEvent(new CustomEvent("change", { detail: { kind, ids: ids.map(String), ...extra } }));
  }

  /** Add a node of a known type with its default widget values. */
  addNode(type, pos = [0, 0], opts = {}) {
    const d = this.def(type);
    if (!d && !opts.allowUnknown) throw new Error(`unknown node type '${type}'`);
    const id = opts.id !== undefined ? String(opts.id) : this.nextId();
    if (this.nodes.has(id)) throw new Error(`node id ${id} already used`);
    const values = {};
    if (d) {
      for (const inp of d.inputs) {
        if (!inp.widget) continue;
        const v = defaultValue(inp);
        if (v !== undefined) values[inp.name] = v;
      }
    }
    Object.assign(values, opts.values || {});
    const node = { id, type: d ? d.type : type, title: opts.title || null, pos: [Math.round(pos[0]), Math.round(pos[1])],
      values, links: {}, ui: clone(opts.ui) || {} };
    defaultControls(node, d);
    this.nodes.set(id, node);
    this._emit("add", [id]);
    return node;
  }

  /** Remove nodes, the links into and out of them, and parameters naming them. */
  removeNodes(ids) {
    const gone = new Set(ids.map(String).filter((id) => this.nodes.has(id)));
    if (!gone.size) return;
    for (const id of gone) this.nodes.delete(id);
    for (const n of this.nodes.values()) {
      for (const [input, [src]] of Object.entries(n.links)) if (gone.has(src)) delete n.links[input];
    }
    this._pruneParams((nodeId) => !gone.has(nodeId));
    this._emit("remove", [...gone]);
  }

  _pruneParams(keep) {
    for (const [name, target] of Object.entries(this.params)) {
      const list = (Array.isArray(target) ? target : [target]).filter((t) => keep(String(t).split(".")[0]));
      if (!list.length) delete this.params[name];
      else this.params[name] = Array.isArray(target) ? list : list[0];
    }
  }

  /** Why a link from (src, output) to (dst, input) cannot be made, or null when it can. */
  canConnect(src, output, dst, input) {
    src = String(src); dst = String(dst);
    const a = this.node(src), b = this.node(dst);
    if (!a || !b) return "no such node";
    if (src === dst) return "a node cannot feed itself";
    const outType = this.outputType(src, output);
    if (outType === null) return `node ${src} has no output ${output}`;
    const inDef = this.inputDef(dst, input);
    if (this.def(b.type) && !inDef) return `${b.type} has no input '${input}'`;
    const inType = inDef ? inDef.type : "*";
    if (!compatible(outType, inType)) return `cannot connect ${outType} to ${inType} (input '${input}')`;
    if (this._reaches(dst, src)) return "that link would make a cycle";
    return null;
  }

  _reaches(from, target) {
    const down = new Map();
    for (const l of this.links()) {
      if (!down.has(l.from)) down.set(l.from, []);
      down.get(l.from).push(l.to);
    }
    const stack = [from], seen = new Set();
    while (stack.length) {
      const id = stack.pop();
      if (id === target) return true;
      if (seen.has(id)) continue;
      seen.add(id);
      stack.push(...(down.get(id) || []));
    }
    return false;
  }

  /** Connect, replacing what fed that input; returns {ok, reason}. */
  connect(src, output, dst, input) {
    const reason = this.canConnect(src, output, dst, input);
    if (reason) return { ok: false, reason };
    this.node(dst).links[input] = [String(src), output];
    this._dropRoute(this.node(dst), input);
    this._emit("link", [dst]);
    return { ok: true, reason: null };
  }

  disconnect(dst, input) {
    const n = this.node(dst);
    if (!n || !n.links[input]) return null;
    const was = n.links[input];
    delete n.links[input];
    this._dropRoute(n, input);
    this._emit("link", [dst]);
    return was;
  }

  setValue(id, name, value) {
    const n = this.node(id);
    if (!n) return;
    n.values[name] = value;
    this._emit("value", [id]);
  }

  setControl(id, name, mode) {
    const n = this.node(id);
    if (!n) return;
    n.ui.controls = { ...(n.ui.controls || {}), [name]: mode };
    this._emit("value", [id]);
  }

  setTitle(id, title) {
    const n = this.node(id);
    if (!n) return;
    n.title = title || null;
    this._emit("value", [id]);
  }

  setPos(id, pos) {
    const n = this.node(id);
    if (!n) return;
    n.pos = [Math.round(pos[0]), Math.round(pos[1])];
    this._emit("move", [id]);
  }

  moveBy(ids, dx, dy) {
    const moved = new Set(ids.map(String));
    for (const id of moved) {
      const n = this.node(id);
      if (!n) continue;
      n.pos = [Math.round(n.pos[0] + dx), Math.round(n.pos[1] + dy)];
      // A routed link between two moved nodes moves with them.
      for (const [input, pts] of Object.entries(n.ui.routes || {})) {
        if (moved.has(n.links[input]?.[0])) n.ui.routes[input] = pts.map(([x, y]) => [x + dx, y + dy]);
      }
    }
    this._emit("move", ids);
  }

  /**
   * Waypoints a link passes through on its way into `input` (world coordinates,
   * kept in the node's ui as `routes`); Tidy up sets them so long links run
   * through gaps. An empty list removes the route.
   */
  setRoute(id, input, points) {
    const n = this.node(id);
    if (!n) return;
    const routes = { ...(n.ui.routes || {}) };
    if (points && points.length) routes[input] = points.map(([x, y]) => [Math.round(x), Math.round(y)]);
    else delete routes[input];
    if (Object.keys(routes).length) n.ui.routes = routes; else delete n.ui.routes;
    this._emit("move", [id]);
  }

  _dropRoute(n, input) {
    if (!n.ui.routes?.[input]) return;
    delete n.ui.routes[input];
    if (!Object.keys(n.ui.routes).length) delete n.ui.routes;
  }

  /** Set (or, with null, remove) a display flag in a node's ui: mode, collapsed, color, pinned. */
  setUi(id, key, value) {
    const n = this.node(id);
    if (!n) return;
    if (value === null || value === undefined || value === false) delete n.ui[key]; else n.ui[key] = value;
    this._emit("value", [id]);
  }

  // -- groups ---------------------------------------------------------------------

  addGroup(bounding, title = "Group", color = null) {
    const g = { title, bounding: bounding.map(Math.round) };
    if (color) g.color = color;
    this.groups.push(g);
    this._emit("groups");
    return this.groups.length - 1;
  }

  updateGroup(index, changes) {
    const g = this.groups[index];
    if (!g) return;
    Object.assign(g, changes);
    if (!g.color) delete g.color;
    this._emit("groups");
  }

  removeGroup(index) {
    this.groups.splice(index, 1);
    this._emit("groups");
  }

  /** Ids of the nodes whose top-left corner lies inside group `index`. */
  nodesInGroup(index) {
    const [x, y, w, h] = this.groups[index]?.bounding || [0, 0, 0, 0];
    return [...this.nodes.values()].filter((n) => n.pos[0] >= x && n.pos[0] < x + w && n.pos[1] >= y && n.pos[1] < y + h).map((n) => n.id);
  }

  // -- what runs ------------------------------------------------------------------

  /**
   * The workflow to submit: Kiln's document as it is. Bypassed and muted nodes
   * keep their `ui.mode` and the server applies them (engine/modes.py), the one
   * rule that `kiln run`, /prompt and /api/jobs also follow, so a saved workflow
   * gives the same result from every front door.
   */
  toSubmit() { return this.toKiln(); }

  /** Apply each seed-like widget's after-run rule (increment / randomize). */
  applyControls(random = Math.random) {
    const changed = [];
    for (const n of this.nodes.values()) {
      for (const [name, mode] of Object.entries(n.ui.controls || {})) {
        if (n.links[name] || mode === "fixed") continue;
        const d = this.inputDef(n.id, name) || {};
        const max = Math.min(d.max ?? Number.MAX_SAFE_INTEGER, Number.MAX_SAFE_INTEGER);
        const min = d.min ?? 0;
        const v = Number(n.values[name] ?? min);
        let next = v;
        if (mode === "increment") next = v + 1 > max ? min : v + 1;
        else if (mode === "decrement") next = v - 1 < min ? max : v - 1;
        else if (mode === "randomize") next = min + Math.floor(random() * Math.min(max - min + 1, 2 ** 32));
        if (next !== v) { n.values[name] = next; changed.push(n.id); }
      }
    }
    if (changed.length) this._emit("value", changed);
    return changed;
  }

  // -- whole-graph state (undo history) -----------------------------------------

  /** Everything the editor knows, exactly; restore() brings it back. */
  snapshot() {
    return JSON.stringify({ nodes: [...this.nodes.values()], meta: this.meta, params: this.params, name: this.name, groups: this.groups });
  }

  restore(text) {
    const s = JSON.parse(text);
    this.nodes = new Map(s.nodes.map((n) => [n.id, n]));
    this.meta = s.meta; this.params = s.params; this.name = s.name ?? null; this.groups = s.groups || [];
    this._emit("load", [...this.nodes.keys()]);
  }

  clear() {
    this.nodes = new Map(); this.meta = {}; this.params = {}; this.name = null; this.groups = [];
    this.generation++;
    this._emit("load", [], { fresh: true });
  }

  // -- Kiln format ---------------------------------------------------------------

  _nodeEntry(n, withUi = true) {
    const inputs = {};
    for (const name of this.inputNames(n.id)) {
      if (n.links[name]) inputs[name] = [...n.links[name]];
      else if (name in n.values) {
        const v = n.values[name];
        inputs[name] = Array.isArray(v) ? { __value__: clone(v) } : clone(v);
      }
    }
    const entry = { type: n.type, inputs };
    if (n.title) entry.title = n.title;
    if (withUi) entry.ui = { ...clone(n.ui), pos: [...n.pos] };
    return entry;
  }

  toKiln() {
    const doc = { version: 1, ...clone(this.meta) };
    if (Object.keys(this.params).length) doc.params = clone(this.params);
    if (this.groups.length) doc.groups = clone(this.groups);
    doc.nodes = {};
    for (const n of this.nodes.values()) doc.nodes[n.id] = this._nodeEntry(n);
    return doc;
  }

  _nodeFrom(id, raw, typeKey) {
    const values = {}, links = {};
    for (const [name, v] of Object.entries(raw.inputs || {})) {
      if (isLinkValue(v)) links[name] = [String(v[0]), v[1]];
      else if (v && typeof v === "object" && !Array.isArray(v) && "__value__" in v) values[name] = clone(v.__value__);
      else values[name] = clone(v);
    }
    const ui = raw.ui && typeof raw.ui === "object" ? clone(raw.ui) : {};
    const pos = Array.isArray(ui.pos) ? ui.pos.map(Number) : (ui.pos && typeof ui.pos === "object" ? [Number(ui.pos[0]), Number(ui.pos[1])] : null);
    delete ui.pos;
    const title = raw.title || raw._meta?.title || null;
    const node = { id: String(id), type: String(raw[typeKey] ?? ""), title, pos: pos || [0, 0], values, links, ui };
    // Missing widget values are left out (the server fills the same defaults), so
    // opening and saving a file changes nothing the user did not change.
    defaultControls(node, this.def(node.type));
    return { node, placed: !!pos };
  }

  /** Replace the graph with a document in Kiln, ComfyUI API or /prompt-body form. */
  load(doc) {
    if (typeof doc === "string") doc = JSON.parse(doc);
    if (!doc || typeof doc !== "object") throw new Error("a workflow must be a JSON object");
    if (doc.prompt && typeof doc.prompt === "object" && !doc.nodes) doc = doc.prompt;
    let kiln = doc.nodes && typeof doc.nodes === "object" && !Array.isArray(doc.nodes);
    if (!kiln && Array.isArray(doc.nodes)) throw new Error("this is a ComfyUI editor file; convert it first (POST /api/convert/comfyui, files.js)");
    const entries = kiln ? doc.nodes : doc;
    if (!kiln && !Object.values(entries).every((v) => v && typeof v === "object" && "class_type" in v)) {
      throw new Error("not a workflow: expected {\"version\": 1, \"nodes\": {...}} or a ComfyUI API prompt");
    }
    const nodes = new Map();
    let allPlaced = true;
    for (const [id, raw] of Object.entries(entries)) {
      const typeKey = kiln && !("class_type" in raw && !("type" in raw)) ? "type" : "class_type";
      const { node, placed } = this._nodeFrom(id, raw, typeKey);
      allPlaced = allPlaced && placed;
      nodes.set(node.id, node);
    }
    this.nodes = nodes;
    this.meta = {};
    this.params = {};
    this.groups = [];
    if (kiln) {
      for (const [k, v] of Object.entries(doc)) {
        if (k === "nodes" || k === "version") continue;
        if (k === "params") this.params = clone(v);
        else if (k === "groups" && Array.isArray(v)) this.groups = clone(v);
        else this.meta[k] = clone(v);
      }
    }
    if (!allPlaced) autoLayout(this);
    this.generation++;
    this._emit("load", [...nodes.keys()], { fresh: true });
    return { format: kiln ? "kiln" : "comfyui-api", laidOut: !allPlaced };
  }

  /** ComfyUI's API format (what its `prompt` PNG chunk and /prompt carry). */
  toApi() {
    const out = {};
    for (const n of this.nodes.values()) {
      const e = this._nodeEntry(n, false);
      const entry = { class_type: e.type, inputs: e.inputs };
      if (n.title) entry._meta = { title: n.title };
      out[n.id] = entry;
    }
    return out;
  }

  // -- clipboard -----------------------------------------------------------------

  /** Selected nodes as clipboard JSON; links between them travel, and links from outside when pasted back here. */
  copy(ids) {
    const nodes = {};
    for (const id of ids.map(String)) {
      const n = this.node(id);
      if (n) nodes[id] = this._nodeEntry(n);
    }
    return { [CLIP_MARK]: 1, source: this.uid, nodes };
  }

  static isClipboard(doc) { return !!(doc && typeof doc === "object" && doc[CLIP_MARK] && doc.nodes); }

  /** Paste clipboard JSON with fresh ids, its top-left at `at` (or offset); returns the new ids. */
  paste(clip, at = null, offset = [30, 30]) {
    if (!Graph.isClipboard(clip)) throw new Error("not Kiln clipboard data");
    const entries = Object.entries(clip.nodes);
    if (!entries.length) return [];
    const sameGraph = clip.source === this.uid;
    const minX = Math.min(...entries.map(([, e]) => e.ui?.pos?.[0] ?? 0));
    const minY = Math.min(...entries.map(([, e]) => e.ui?.pos?.[1] ?? 0));
    const shift = at ? [at[0] - minX, at[1] - minY] : offset;
    const idMap = new Map();
    let next = parseInt(this.nextId(), 10);
    for (const [oldId] of entries) idMap.set(oldId, String(next++));
    const created = [];
    for (const [oldId, raw] of entries) {
      const { node } = this._nodeFrom(idMap.get(oldId), raw, "type");
      node.pos = [node.pos[0] + shift[0], node.pos[1] + shift[1]];
      const links = node.links;
      node.links = {};
      this.nodes.set(node.id, node);
      created.push([node, links]);
    }
    for (const [node, links] of created) {
      for (const [input, [src, out]] of Object.entries(links)) {
        const from = idMap.get(src) || (sameGraph && this.nodes.has(src) ? src : null);
        if (from && !this.canConnect(from, out, node.id, input)) node.links[input] = [from, out];
      }
    }
    const ids = created.map(([n]) => n.id);
    this._emit("add", ids);
    return ids;
  }

  duplicate(ids) { return this.paste(this.copy(ids)); }
}
