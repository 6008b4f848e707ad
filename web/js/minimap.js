// The minimap: the whole graph small in a corner, with the part the canvas
// shows framed; a click or drag there moves the view to that place.

const W = 180, H = 120, PAD = 40;

export class Minimap {
  /** @param {HTMLElement} host  @param {import("./view.js").CanvasView} view */
  constructor(host, view) {
    this.view = view;
    this.canvas = document.createElement("canvas");
    this.canvas.className = "minimap";
    this.canvas.width = W * devicePixelRatio; this.canvas.height = H * devicePixelRatio;
    this.canvas.setAttribute("aria-label", "minimap: click to move the view");
    host.append(this.canvas);
    this.frame = null;
    const go = (e) => { const w = this.toWorld(e.offsetX, e.offsetY); if (w) this.centreOn(w); };
    this.canvas.addEventListener("pointerdown", (e) => {
      e.stopPropagation(); e.preventDefault(); go(e);
      const move = (m) => go({ offsetX: m.clientX - this.canvas.getBoundingClientRect().left, offsetY: m.clientY - this.canvas.getBoundingClientRect().top });
      const up = () => { window.removeEventListener("pointermove", move); window.removeEventListener("pointerup", up); };
      window.addEventListener("pointermove", move); window.addEventListener("pointerup", up);
    });
    this.canvas.addEventListener("wheel", (e) => e.stopPropagation());
  }

  /** Redraw soon (many changes in one frame draw once). */
  schedule() {
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => { this.frame = null; this.draw(); });
  }

  bounds() {
    const v = this.view;
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (const [id, nv] of v.views) {
      const n = v.graph.node(id);
      x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1]);
      x1 = Math.max(x1, n.pos[0] + nv.el.offsetWidth); y1 = Math.max(y1, n.pos[1] + nv.el.offsetHeight);
    }
    const r = v.root.getBoundingClientRect();
    const [vx0, vy0] = v.toWorld(r.left, r.top), [vx1, vy1] = v.toWorld(r.right, r.bottom);
    x0 = Math.min(x0, vx0); y0 = Math.min(y0, vy0); x1 = Math.max(x1, vx1); y1 = Math.max(y1, vy1);
    const k = Math.min(W / (x1 - x0 + 2 * PAD), H / (y1 - y0 + 2 * PAD));
    return { x0: x0 - PAD, y0: y0 - PAD, k, view: [vx0, vy0, vx1, vy1] };
  }

  draw() {
    const ctx = this.canvas.getContext("2d");
    ctx.setTransform(devicePixelRatio, 0, 0, devicePixelRatio, 0, 0);
    ctx.clearRect(0, 0, W, H);
    if (!this.view.views.size) { this.last = null; return; }
    const b = this.last = this.bounds();
    const css = getComputedStyle(this.canvas);
    ctx.fillStyle = css.getPropertyValue("--minimap-node") || "#888";
    for (const [id, nv] of this.view.views) {
      const n = this.view.graph.node(id);
      ctx.fillRect((n.pos[0] - b.x0) * b.k, (n.pos[1] - b.y0) * b.k, Math.max(2, nv.el.offsetWidth * b.k), Math.max(2, nv.el.offsetHeight * b.k));
    }
    const [vx0, vy0, vx1, vy1] = b.view;
    ctx.strokeStyle = css.getPropertyValue("--minimap-view") || "#4f9dff";
    ctx.lineWidth = 1.5;
    ctx.strokeRect((vx0 - b.x0) * b.k, (vy0 - b.y0) * b.k, (vx1 - vx0) * b.k, (vy1 - vy0) * b.k);
  }

  toWorld(x, y) {
    const b = this.last;
    return b ? [b.x0 + x / b.k, b.y0 + y / b.k] : null;
  }

  centreOn([wx, wy]) {
    const v = this.view, r = v.root.getBoundingClientRect();
    v.offset = [r.width / 2 - wx * v.scale, r.height / 2 - wy * v.scale];
    v.applyTransform();
    this.draw();
  }
}
