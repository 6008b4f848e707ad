// Automatic placement for workflows that carry no positions (ComfyUI API files):
// columns by longest path from the sources, so data flows left to right, and
// within a column an order that follows the nodes feeding it, to keep links short.

const GAP_X = 70, GAP_Y = 36, ORIGIN = [40, 40];

/** A size guess from the node's definition: the layout runs in the model, before any view has measured a node. */
function estimateSize(graph, node) {
  const d = graph.def(node.type);
  const rows = d ? d.inputs.length + d.outputs.length : Object.keys(node.values).length + Object.keys(node.links).length + 1;
  let extra = 0;
  if (d) for (const i of d.inputs) if (i.multiline) extra += 60;
  return [260, 44 + rows * 28 + extra];
}

/** Nodes in columns by the longest path from a source (a cycle is cut where it is met). */
export function columnsOf(graph) {
  const depth = new Map();
  const visiting = new Set();
  const depthOf = (n) => {
    if (depth.has(n.id)) return depth.get(n.id);
    if (visiting.has(n.id)) return 0; // a cycle: the server will say so; just place it
    visiting.add(n.id);
    let d = 0;
    for (const [src] of Object.values(n.links)) {
      const s = graph.node(src);
      if (s) d = Math.max(d, depthOf(s) + 1);
    }
    visiting.delete(n.id);
    depth.set(n.id, d);
    return d;
  };
  const columns = [];
  for (const n of graph.nodes.values()) (columns[depthOf(n)] ||= []).push(n);
  return columns.filter(Boolean);
}

/** Set every node's pos from the graph's links. */
export function autoLayout(graph) {
  const columns = columnsOf(graph);
  const rank = new Map();
  let x = ORIGIN[0];
  for (const column of columns) {
    const key = (n) => {
      const ranks = Object.values(n.links).map(([src]) => rank.get(src)).filter((r) => r !== undefined);
      return ranks.length ? ranks.reduce((a, b) => a + b, 0) / ranks.length : Infinity;
    };
    column.sort((a, b) => key(a) - key(b) || String(a.id).localeCompare(String(b.id), undefined, { numeric: true }));
    let y = ORIGIN[1], width = 0;
    column.forEach((n, i) => {
      const [w, h] = estimateSize(graph, n);
      n.pos = [x, y];
      rank.set(n.id, i);
      y += h + GAP_Y;
      width = Math.max(width, w);
    });
    x += width + GAP_X;
  }
}
