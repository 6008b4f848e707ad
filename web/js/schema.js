// Node definitions as the server describes them, in one shape for the editor.
// Kiln's GET /api/nodes and ComfyUI's GET /object_info are both accepted, so the
// page never carries a node list of its own.

import { WIDGET_TYPES, COMBO } from "./types.js";

/**
 * @typedef {{name:string,type:string,widget:boolean,required:boolean,default?:any,min?:number,
 *   max?:number,step?:number,round?:number,choices?:string[],openChoices?:boolean,multiline?:boolean,
 *   control?:boolean,display?:string,imageUpload?:boolean,tooltip?:string,
 *   dynamic?:Object<string,string[]>}} InputDef
 * @typedef {{type:string,title:string,category:string,description:string,outputNode:boolean,
 *   inputs:InputDef[],outputs:{name:string,type:string}[],aliases:string[]}} NodeDef
 */

/**
 * The InputDef both wire shapes share: Kiln's schema input and ComfyUI's option
 * dict use the same key names for everything past name, type and choices.
 */
function inputDef(name, type, required, widget, opts) {
  const def = { name, type, required, widget, tooltip: opts.tooltip || "" };
  for (const key of ["default", "min", "max", "step", "round", "multiline"]) {
    if (opts[key] !== undefined) def[key] = opts[key];
  }
  if (opts.control_after_generate) def.control = true;
  if (opts.display) def.display = opts.display;
  if (opts.image_upload) def.imageUpload = true;
  return def;
}

function inputFromKiln(raw) {
  const type = raw.type;
  const def = inputDef(raw.name, type, !!raw.required, raw.widget !== undefined ? !!raw.widget : WIDGET_TYPES.has(type), raw);
  if (type === COMBO || Array.isArray(raw.choices)) def.choices = raw.choices || [];
  if (raw.open_choices) def.openChoices = true;
  if (raw.dynamic) def.dynamic = raw.dynamic;
  return def;
}

/**
 * The inputs of node `n` (a graph node) that its dynamic combos' current choices leave out: a
 * choice brings only its own sub-inputs (`resize_type.width`, ...), as ComfyUI's frontend shows
 * them. A linked sub-input stays, so no link ends at a socket that is not drawn.
 * @param {NodeDef|undefined} def
 * @returns {Set<string>}
 */
export function unchosenOptionInputs(def, n) {
  const out = new Set();
  for (const combo of def?.inputs || []) {
    if (!combo.dynamic) continue;
    const choice = combo.name in n.values ? n.values[combo.name] : combo.default;
    const kept = new Set(combo.dynamic[choice] || []);
    for (const subs of Object.values(combo.dynamic)) {
      for (const name of subs) if (!kept.has(name) && !n.links[name]) out.add(name);
    }
  }
  return out;
}

function inputFromComfy(name, spec, required) {
  const [head, opts = {}] = Array.isArray(spec) ? spec : [spec];
  let type = head;
  let choices;
  if (Array.isArray(head)) { type = COMBO; choices = head.map(String); }
  else if (head === COMBO) { choices = (opts.options || []).map(String); }
  const def = inputDef(name, type, required && opts.default === undefined, WIDGET_TYPES.has(type), opts);
  if (choices) def.choices = choices;
  return def;
}

/** The NodeDef both wire shapes share; `type` is the node's own name in either. */
function nodeDef(raw, type, inputs, outputs, aliases) {
  return {
    type,
    title: raw.display_name || type,
    category: raw.category || "",
    description: raw.description || "",
    outputNode: !!raw.output_node,
    inputs,
    outputs,
    aliases,
  };
}

/** One Kiln schema (NodeSpec.schema) to a NodeDef. */
export function fromKilnSchema(type, raw) {
  return nodeDef(raw, raw.type || type, (raw.inputs || []).map(inputFromKiln),
    (raw.outputs || []).map((o) => ({ name: o.name, type: o.type })), raw.aliases || []);
}

/** One ComfyUI /object_info entry to a NodeDef. */
export function fromObjectInfo(type, raw) {
  const inputs = [];
  for (const [group, required] of [["required", true], ["optional", false]]) {
    const specs = (raw.input && raw.input[group]) || {};
    const order = (raw.input_order && raw.input_order[group]) || Object.keys(specs);
    for (const name of order) if (specs[name]) inputs.push(inputFromComfy(name, specs[name], required));
  }
  const names = raw.output_name || raw.output || [];
  return nodeDef(raw, raw.name || type, inputs,
    (raw.output || []).map((t, i) => ({ name: names[i] || t, type: t })), []);
}

/** A whole response (either shape) to a Map type -> NodeDef, aliases included. */
export function parseNodeDefs(doc) {
  const defs = new Map();
  for (const [type, raw] of Object.entries(doc || {})) {
    const def = raw && Array.isArray(raw.inputs) ? fromKilnSchema(type, raw) : fromObjectInfo(type, raw);
    defs.set(type, def);
    for (const alias of def.aliases) if (!defs.has(alias)) defs.set(alias, def);
  }
  return defs;
}

/** Is this input shown as a 0..1 slider (strength, denoise) rather than a number field? */
export function isSlider(input) {
  if (input.display === "slider") return true;
  return input.type === "FLOAT" && input.min === 0 && input.max === 1;
}

/** The value a fresh node starts with for a widget input. */
export function defaultValue(input) {
  if (input.default !== undefined) return input.default;
  switch (input.type) {
    case "INT": case "FLOAT": return input.min !== undefined && input.min > 0 ? input.min : 0;
    case "BOOLEAN": return false;
    case "STRING": return "";
    case COMBO: return input.choices && input.choices.length ? input.choices[0] : "";
    default: return undefined;
  }
}
