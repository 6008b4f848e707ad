// Choices a loaded workflow names but this server does not have. A workflow
// written elsewhere names that machine's checkpoint (ComfyUI's customary
// "v1-5-pruned-emaonly.safetensors", say); left alone, the first Run would only
// fail validation with value_not_in_list. So on load the editor switches each
// such value to the first choice the server offers and says so, visibly: the
// user learns what changed instead of meeting a server error.

import { COMBO } from "./types.js";

/**
 * @typedef {{id:string, type:string, label:string, input:string, value:string, replacement:string}} Substitution
 */

/**
 * The substitutions a graph needs (nothing is changed): every literal COMBO value
 * whose input has a closed, non-empty choice list that does not hold it.
 * Open choices (uploaded images) and empty lists (nothing to switch to) are left
 * for the server to judge. `ids` limits the check to some nodes (a paste).
 * @param {import("./graph.js").Graph} graph
 * @param {Iterable<string>|null} ids
 * @returns {Substitution[]}
 */
export function unavailableChoices(graph, ids = null) {
  const out = [];
  for (const id of ids ? [...ids].map(String) : [...graph.nodes.keys()]) {
    const n = graph.node(id);
    const def = n && graph.def(n.type);
    if (!def) continue;
    for (const inp of def.inputs) {
      if (inp.type !== COMBO || inp.openChoices || !inp.choices?.length) continue;
      if (n.links[inp.name] || !(inp.name in n.values)) continue;
      const v = n.values[inp.name];
      // The server takes a number for its text (validate.py), and judges other kinds itself.
      if (typeof v !== "string" && typeof v !== "number") continue;
      if (inp.choices.includes(String(v))) continue;
      out.push({ id: n.id, type: n.type, label: n.title || def.title || n.type, input: inp.name,
        value: String(v), replacement: inp.choices[0] });
    }
  }
  return out;
}

/** Apply substitutions to the graph as one change (the caller records the undo step). */
export function applySubstitutions(graph, subs) {
  const changed = new Set();
  for (const s of subs) {
    const n = graph.node(s.id);
    if (!n) continue;
    n.values[s.input] = s.replacement;
    changed.add(n.id);
  }
  if (changed.size) graph._emit("value", [...changed]);
}

/** One line a person can act on: which node and input, the old name and the new one. */
export function describeSubstitution(s) {
  return `${s.label} #${s.id}: ${s.input} '${s.value}' is not available here; using '${s.replacement}'`;
}
