// Tidy up: lay out any graph so that data flows left to right, no two nodes
// touch and no link passes under a node. Nodes go in columns by the longest path
// from the sources (layout.js). A link that skips columns runs through a lane in
// each column it crosses (a pair of waypoints, saved as the link's route in the
// target node's ui): lanes are stacked with the nodes like small nodes of their
// own, so the link runs level through a gap; between columns links curve through
// empty space. Within a column, nodes and lanes sit level with what feeds them.

import { columnsOf } from "./layout.js";

const GAP_X = 70, GAP_Y = 40, LANE = 14, ORIGIN = [40, 40];

/**
 * @param {import("./graph.js").Graph} graph
 * @param {{size(id:string):number[], socket(id:string, kind:"in"|"out", key:string|number):number[]}} measure
 *   a node's drawn size, and a socket's offset from the node's top-left corner
 * @returns {{pos:Map<string, number[]>, routes:Map<string, Object<string, number[][]>>}} each node's new
 *   position and the routes of the links into it (the graph is not changed)
 */
export function tidyLayout(graph, measure) {
  const nodeColumns = columnsOf(graph);
  const col = new Map();
  nodeColumns.forEach((c, i) => c.forEach((n) => col.set(n.id, i)));
  // Column members: nodes, and one lane per link per column it skips.
  const members = nodeColumns.map((c) => c.map((n) => ({ kind: "node", id: n.id, h: measure.size(n.id)[1] })));
  // One lane per output per column its links skip: links from the same output
  // share it, as a bus, so a loader feeding many nodes takes one gap, not many.
  const lanes = new Map(); // "from:output" -> {from, output, cells: [member per skipped column, from its column + 1]}
  const routed = [];       // [link, lane] for every link that skips a column
  for (const l of graph.links()) {
    const a = col.get(l.from), b = col.get(l.to);
    if (b - a < 2) continue;
    const key = `${l.from}:${l.output}`;
    if (!lanes.has(key)) lanes.set(key, { from: l.from, output: l.output, cells: [] });
    const lane = lanes.get(key);
    for (let c = a + 1 + lane.cells.length; c < b; c++) {
      const m = { kind: "lane", lane, h: LANE };
      lane.cells.push(m);
      members[c].push(m);
    }
    routed.push([l, lane]);
  }
  const width = nodeColumns.map((c) => Math.max(...c.map((n) => measure.size(n.id)[0])));
  const xs = [];
  width.reduce((x, w, i) => { xs[i] = x; return x + w + GAP_X; }, ORIGIN[0]);

  const pos = new Map();
  const outY = (id, output) => pos.get(id)[1] + measure.socket(id, "out", output)[1];
  /** Where a member would like its top: level with what feeds it. */
  const want = (m, c) => {
    if (m.kind === "lane") {
      const i = m.lane.cells.indexOf(m);
      return i === 0 ? outY(m.lane.from, m.lane.output) - LANE / 2 : m.lane.cells[i - 1].y;
    }
    const n = graph.node(m.id);
    const ys = [];
    for (const [input, [src, out]] of Object.entries(n.links)) {
      const lane = lanes.get(`${src}:${out}`);
      const last = lane && lane.cells[c - col.get(src) - 2];
      const y = last && last.y !== undefined ? last.y + LANE / 2 : pos.has(src) ? outY(src, out) : null;
      if (y !== null) ys.push(y - measure.socket(m.id, "in", input)[1]);
    }
    return ys.length ? ys.reduce((p, q) => p + q, 0) / ys.length : ORIGIN[1];
  };
  members.forEach((column, c) => {
    const wanted = new Map(column.map((m) => [m, want(m, c)]));
    column.sort((p, q) => wanted.get(p) - wanted.get(q) || (p.kind === q.kind ? 0 : p.kind === "lane" ? -1 : 1));
    let bottom = -Infinity;
    for (const m of column) {
      const gap = m.kind === "lane" ? GAP_Y / 2 : GAP_Y;
      const y = Math.round(Math.max(wanted.get(m), bottom + gap, ORIGIN[1]));
      m.y = y;
      if (m.kind === "node") pos.set(m.id, [xs[c], y]);
      bottom = y + m.h;
    }
  });

  const routes = new Map([...graph.nodes.keys()].map((id) => [id, {}]));
  for (const [l, lane] of routed) {
    const a = col.get(l.from), b = col.get(l.to);
    const points = [];
    for (let c = a + 1; c < b; c++) {
      const y = lane.cells[c - a - 1].y + LANE / 2;
      points.push([xs[c] - 1, y], [xs[c] + width[c] + 1, y]);
    }
    routes.get(l.to)[l.input] = points;
  }
  // A node narrower than its column: its links leave level to the column's edge.
  for (const l of graph.links()) {
    const c = col.get(l.from), w = measure.size(l.from)[0];
    if (w >= width[c] - 1) continue;
    const y = outY(l.from, l.output);
    const r = routes.get(l.to);
    r[l.input] = [[xs[c] + width[c] + 1, y], ...(r[l.input] || [])];
  }
  return { pos, routes };
}
