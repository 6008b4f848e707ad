// The shape of a link: one cubic curve from an output socket to an input socket.
// The view draws it and the tidy-up layout checks it against nodes, so both take
// it from here.

/** Control points [a, c1, c2, b] of the link from a to b (world coordinates). */
export function linkControls(a, b) {
  const span = Math.abs(b[0] - a[0]);
  // Half the span, so a forward link stays between its two ends in x (no node
  // beside either end is crossed); a backward one loops out at least 40 px.
  const dx = b[0] > a[0] ? span / 2 : Math.max(40, span * 0.5);
  return [a, [a[0] + dx, a[1]], [b[0] - dx, b[1]], b];
}

/** The SVG path of the link from a to b. */
export function linkPath(a, b) {
  const [, c1, c2] = linkControls(a, b);
  return `M ${a[0]} ${a[1]} C ${c1[0]} ${c1[1]}, ${c2[0]} ${c2[1]}, ${b[0]} ${b[1]}`;
}

/** `n + 1` points along the link from a to b. */
export function linkPoints(a, b, n = 32) {
  const [p0, p1, p2, p3] = linkControls(a, b);
  const out = [];
  for (let i = 0; i <= n; i++) {
    const t = i / n, u = 1 - t;
    const w = [u * u * u, 3 * u * u * t, 3 * u * t * t, t * t * t];
    out.push([w[0] * p0[0] + w[1] * p1[0] + w[2] * p2[0] + w[3] * p3[0], w[0] * p0[1] + w[1] * p1[1] + w[2] * p2[1] + w[3] * p3[1]]);
  }
  return out;
}

/** The path through waypoints: a curve from one point to the next, level at each. */
export function routePath(points) {
  let d = `M ${points[0][0]} ${points[0][1]}`;
  for (let i = 1; i < points.length; i++) {
    const a = points[i - 1], b = points[i];
    const [, c1, c2] = linkControls(a, b);
    d += ` C ${c1[0]} ${c1[1]}, ${c2[0]} ${c2[1]}, ${b[0]} ${b[1]}`;
  }
  return d;
}

/** Points along the path through waypoints (as routePath draws it). */
export function routePoints(points, n = 32) {
  const out = [];
  for (let i = 1; i < points.length; i++) out.push(...linkPoints(points[i - 1], points[i], n));
  return out;
}
