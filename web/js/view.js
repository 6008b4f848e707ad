// The canvas: a pannable, zoomable world holding node elements and the links
// between their sockets, and every pointer gesture on it (move, box-select,
// connect, detach, pan). Edits go to the graph model; `onCommit` is called when
// a gesture ends so the undo history records one step per user action.

import { NodeView } from "./node_view.js";
import { typeColour } from "./types.js";
import { linkPath, routePath, routePoints } from "./curve.js";
import { wheelZoomFactor } from "./zoom.js";

const SVG = "http://www.w3.org/2000/svg";
const MIN_ZOOM = 0.2, MAX_ZOOM = 2.5;
// Fit never zooms out past this: node text (12-13 px) stays at about 10 px, and a
// graph too big for the window at this zoom opens at its start (top left), to pan.
export const READABLE_ZOOM = 0.8;

function isEditable(t) {
  return t instanceof Element && !!t.closest("input, textarea, select, button, .upload, [contenteditable]");
}

export class CanvasView {
  /**
   * @param {HTMLElement} root
   * @param {import("./graph.js").Graph} graph
   * @param {{onCommit():void, onRefused(reason:string):void, onPalette(world:number[], link:object|null):void,
   *   onUpload(id:string,name:string,file:File):void, imageUrl(name:string):string}} hooks
   */
  constructor(root, graph, hooks) {
    this.root = root; this.graph = graph; this.hooks = hooks;
    this.offset = [0, 0]; this.scale = 1;
    this.views = new Map();
    this.selected = new Set();
    this.status = new Map(); // node id -> run status, survives rebuilds (undo)
    this.notes = new Map();  // node id -> {input: substitution made on load}, shown on the widget
    this.world = document.createElement("div");
    this.world.className = "world";
    this.svg = document.createElementNS(SVG, "svg");
    this.svg.classList.add("links");
    this.dragPath = document.createElementNS(SVG, "path");
    this.dragPath.classList.add("link", "dragging");
    this.box = document.createElement("div");
    this.box.className = "selection-box";
    this.groupLayer = document.createElement("div");
    this.groupLayer.className = "groups";
    this.world.append(this.groupLayer, this.svg);
    this.spaceDown = false;
    root.append(this.world, this.box);
    this.lastPointer = [0, 0];
    this.lastRefusal = null;
    graph.addEventListener("change", (e) => this.onGraphChange(e.detail));
    this.bindPointer();
    this.rebuild();
  }

  // -- coordinates ---------------------------------------------------------------

  applyTransform() {
    this.world.style.transform = `translate(${this.offset[0]}px, ${this.offset[1]}px) scale(${this.scale})`;
    this.root.style.setProperty("--grid-size", `${24 * this.scale}px`);
    this.root.style.backgroundPosition = `${this.offset[0]}px ${this.offset[1]}px`;
    this.onViewChange?.();
  }

  toWorld(clientX, clientY) {
    const r = this.root.getBoundingClientRect();
    return [(clientX - r.left - this.offset[0]) / this.scale, (clientY - r.top - this.offset[1]) / this.scale];
  }

  toClient(wx, wy) {
    const r = this.root.getBoundingClientRect();
    return [r.left + this.offset[0] + wx * this.scale, r.top + this.offset[1] + wy * this.scale];
  }

  centerOf(el) {
    const r = el.getBoundingClientRect();
    return [r.left + r.width / 2, r.top + r.height / 2];
  }

  /** Client coordinates of a socket: kind "in" takes an input name, "out" an output index. */
  socketPoint(id, kind, key) {
    const v = this.views.get(String(id));
    const s = v && (kind === "out" ? v.outputSocket(key) : v.inputSocket(key));
    if (!s) return null;
    if (!s.offsetParent) {
      // A collapsed node: its links meet the title bar's edges.
      const r = v.titleEl.getBoundingClientRect();
      return [kind === "out" ? r.right : r.left, r.top + r.height / 2];
    }
    return this.centerOf(s);
  }

  zoomAt(clientX, clientY, factor) {
    const next = Math.min(MAX_ZOOM, Math.max(MIN_ZOOM, this.scale * factor));
    const [wx, wy] = this.toWorld(clientX, clientY);
    const r = this.root.getBoundingClientRect();
    this.scale = next;
    this.offset = [clientX - r.left - wx * next, clientY - r.top - wy * next];
    this.applyTransform();
  }

  /** Show every node (or the selection), at most at 100 %. */
  fit(ids = null) {
    const list = (ids && ids.length ? ids : [...this.views.keys()]).map((id) => this.views.get(id)).filter(Boolean);
    const r = this.root.getBoundingClientRect();
    if (!list.length) { this.offset = [0, 0]; this.scale = 1; this.applyTransform(); return; }
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (const v of list) {
      const n = this.graph.node(v.id);
      x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1]);
      x1 = Math.max(x1, n.pos[0] + v.el.offsetWidth); y1 = Math.max(y1, n.pos[1] + v.el.offsetHeight);
    }
    const margin = 40;
    const whole = Math.min((r.width - 2 * margin) / (x1 - x0), (r.height - 2 * margin) / (y1 - y0));
    this.scale = Math.min(1, Math.max(READABLE_ZOOM, whole));
    // Centred where it fits; else from its top-left corner, where the data flow starts.
    const place = (size, span, lo) => (span * this.scale <= size - 2 * margin ? (size - span * this.scale) / 2 : margin) - lo * this.scale;
    this.offset = [place(r.width, x1 - x0, x0), place(r.height, y1 - y0, y0)];
    this.applyTransform();
    this.drawLinks();
  }

  // -- model -> DOM --------------------------------------------------------------

  nodeHooks() {
    return {
      onValue: (id, name, value, final) => {
        this.graph.setValue(id, name, value);
        if (final) this.hooks.onCommit();
      },
      onControl: (id, name, mode) => { this.graph.setControl(id, name, mode); this.hooks.onCommit(); },
      onUpload: (id, name, file) => this.hooks.onUpload(id, name, file),
      onMask: (id, name) => this.hooks.onMask?.(id, name),
      imageUrl: (name) => this.hooks.imageUrl(name),
      notes: (id) => this.notes.get(id),
    };
  }

  rebuild() {
    for (const v of this.views.values()) v.el.remove();
    this.views.clear();
    for (const id of this.graph.nodes.keys()) this.addView(id);
    for (const id of [...this.selected]) if (!this.graph.node(id)) this.selected.delete(id);
    this.refreshSelection();
    this.applyTransform();
    this.drawLinks();
    this.drawGroups();
  }

  /** Groups, behind the nodes: a title bar to drag (with the nodes inside), rename or right-click. */
  drawGroups() {
    this.groupLayer.replaceChildren(...this.graph.groups.map((g, i) => {
      const el = document.createElement("div");
      el.className = "group-box";
      el.dataset.group = String(i);
      const [x, y, w, h] = g.bounding;
      Object.assign(el.style, { left: `${x}px`, top: `${y}px`, width: `${w}px`, height: `${h}px` });
      if (g.color) el.style.setProperty("--group-color", g.color);
      const title = document.createElement("div");
      title.className = "group-title";
      title.textContent = g.title;
      el.append(title);
      return el;
    }));
  }

  addView(id) {
    const v = new NodeView(this.graph, id, this.nodeHooks());
    this.views.set(id, v);
    this.world.append(v.el);
    if (this.status.has(id)) v.applyStatus(this.status.get(id));
    return v;
  }

  onGraphChange({ kind, ids, fresh }) {
    if (fresh) { this.status.clear(); this.notes.clear(); }
    if (kind === "load") { this.rebuild(); return; }
    if (kind === "groups") { this.drawGroups(); return; }
    if (kind === "add") for (const id of ids) if (!this.views.has(id)) this.addView(id);
    if (kind === "remove") {
      for (const id of ids) {
        this.views.get(id)?.el.remove();
        this.views.delete(id); this.selected.delete(id); this.status.delete(id);
      }
    }
    if (kind === "link" || kind === "value" || kind === "move") for (const id of ids) this.views.get(id)?.update();
    this.scheduleLinks();
  }

  scheduleLinks() {
    if (this._linkFrame) return;
    this._linkFrame = requestAnimationFrame(() => { this._linkFrame = null; this.drawLinks(); });
  }

  curve(a, b) { return linkPath(a, b); }

  /** What the tidy-up layout needs to know of the drawn nodes (world units). */
  measure() {
    return {
      size: (id) => { const v = this.views.get(id); return [v.el.offsetWidth, v.el.offsetHeight]; },
      socket: (id, kind, key) => {
        const n = this.graph.node(id), p = this.socketPoint(id, kind, key);
        if (!p) return [kind === "out" ? this.views.get(id).el.offsetWidth : 0, 14];
        const w = this.toWorld(...p);
        return [w[0] - n.pos[0], w[1] - n.pos[1]];
      },
    };
  }

  drawLinks() {
    const paths = [], handles = [];
    for (const l of this.graph.links()) {
      const a = this.socketPoint(l.from, "out", l.output), b = this.socketPoint(l.to, "in", l.input);
      if (!a || !b) continue;
      const p = document.createElementNS(SVG, "path");
      p.classList.add("link");
      const route = this.graph.node(l.to)?.ui.routes?.[l.input] || [];
      p.setAttribute("d", routePath([this.toWorld(...a), ...route, this.toWorld(...b)]));
      p.style.stroke = typeColour(l.type);
      p.dataset.from = l.from; p.dataset.to = l.to; p.dataset.input = l.input;
      paths.push(p);
      // Reroute points: a handle each, to drag (double-click removes one).
      route.forEach(([x, y], i) => {
        const c = document.createElementNS(SVG, "circle");
        c.classList.add("reroute");
        c.setAttribute("cx", String(x)); c.setAttribute("cy", String(y)); c.setAttribute("r", "5");
        c.style.fill = typeColour(l.type);
        c.dataset.to = l.to; c.dataset.input = l.input; c.dataset.index = String(i);
        handles.push(c);
      });
    }
    this.svg.replaceChildren(...paths, ...handles, this.dragPath);
  }

  /** The link drawn nearest a client point (within a few pixels), or null. */
  linkAt(clientX, clientY) {
    const p = this.toWorld(clientX, clientY), reach = 8 / this.scale;
    let best = null, bestD = reach;
    for (const l of this.graph.links()) {
      const a = this.socketPoint(l.from, "out", l.output), b = this.socketPoint(l.to, "in", l.input);
      if (!a || !b) continue;
      const route = this.graph.node(l.to)?.ui.routes?.[l.input] || [];
      for (const q of routePoints([this.toWorld(...a), ...route, this.toWorld(...b)], 24)) {
        const d = Math.hypot(q[0] - p[0], q[1] - p[1]);
        if (d < bestD) { bestD = d; best = l; }
      }
    }
    return best;
  }

  // -- selection -----------------------------------------------------------------

  select(ids, additive = false) {
    if (!additive) this.selected.clear();
    for (const id of ids) this.selected.add(String(id));
    this.refreshSelection();
  }

  refreshSelection() {
    for (const [id, v] of this.views) v.el.classList.toggle("selected", this.selected.has(id));
  }

  setStatus(id, status) {
    const s = { ...(this.status.get(id) || {}), ...status };
    this.status.set(id, s);
    this.views.get(id)?.applyStatus(s);
  }

  /** Mark a widget whose value the editor substituted on load (see choices.js). */
  noteSubstitution(s) {
    this.notes.set(s.id, { ...(this.notes.get(s.id) || {}), [s.input]: s });
    this.views.get(s.id)?.update();
  }

  clearStatus(keepImages = true) {
    for (const [id, s] of this.status) {
      const next = keepImages && s.images ? { images: s.images } : {};
      this.status.set(id, next);
      this.views.get(id)?.applyStatus(next);
    }
  }

  // -- pointer gestures ----------------------------------------------------------

  bindPointer() {
    const root = this.root;
    root.addEventListener("pointermove", (e) => { this.lastPointer = [e.clientX, e.clientY]; });
    root.addEventListener("wheel", (e) => {
      const t = e.target;
      if (t instanceof Element && t.closest("textarea, select") && !e.ctrlKey) return;
      e.preventDefault();
      this.zoomAt(e.clientX, e.clientY, wheelZoomFactor(e));
      this.scheduleLinks();
    }, { passive: false });
    root.addEventListener("dblclick", (e) => {
      const reroute = e.target.closest?.(".reroute");
      if (reroute) {
        const { to, input } = reroute.dataset;
        const pts = [...(this.graph.node(to)?.ui.routes?.[input] || [])];
        pts.splice(Number(reroute.dataset.index), 1);
        this.graph.setRoute(to, input, pts);
        this.hooks.onCommit();
        return;
      }
      const title = e.target.closest(".node-title");
      if (title) { this.hooks.onRename?.(title.closest(".node").dataset.id); return; }
      const groupTitle = e.target.closest(".group-title");
      if (groupTitle) { this.hooks.onRenameGroup?.(Number(groupTitle.parentElement.dataset.group)); return; }
      if (e.target.closest(".node")) return;
      this.hooks.onPalette(this.toWorld(e.clientX, e.clientY), null);
    });
    root.addEventListener("pointerdown", (e) => this.onPointerDown(e));
    root.addEventListener("contextmenu", (e) => {
      if (isEditable(e.target)) return;
      e.preventDefault();
      const nodeEl = e.target.closest?.(".node"), groupEl = e.target.closest?.(".group-title");
      const hit = nodeEl ? { node: nodeEl.dataset.id }
        : groupEl ? { group: Number(groupEl.parentElement.dataset.group) }
        : (this.linkAt(e.clientX, e.clientY) ? { link: this.linkAt(e.clientX, e.clientY) } : {});
      if (hit.node && !this.selected.has(hit.node)) this.select([hit.node]);
      this.hooks.onMenu?.(e.clientX, e.clientY, hit);
    });
    // Space held: drag anywhere pans (ComfyUI's habit), and no text gets selected.
    window.addEventListener("keydown", (e) => {
      if (e.key !== " " || isEditable(e.target) || e.target.closest?.(".modal-back, .palette")) return;
      e.preventDefault();
      if (!this.spaceDown) { this.spaceDown = true; root.classList.add("space-pan"); }
    });
    window.addEventListener("keyup", (e) => { if (e.key === " ") { this.spaceDown = false; root.classList.remove("space-pan"); } });
    window.addEventListener("blur", () => { this.spaceDown = false; root.classList.remove("space-pan"); });
  }

  track(e, move, up) {
    const onMove = (m) => { this.lastPointer = [m.clientX, m.clientY]; move(m); };
    const onUp = (u) => {
      window.removeEventListener("pointermove", onMove);
      window.removeEventListener("pointerup", onUp);
      window.removeEventListener("pointercancel", onUp);
      up(u);
    };
    window.addEventListener("pointermove", onMove);
    window.addEventListener("pointerup", onUp);
    window.addEventListener("pointercancel", onUp);
  }

  onPointerDown(e) {
    const t = e.target;
    if (e.button === 1 || (e.button === 0 && (e.altKey || this.spaceDown))) return this.startPan(e);
    if (e.button !== 0) return;
    const groupTitle = t.closest?.(".group-title");
    if (groupTitle) { e.preventDefault(); return this.startGroupMove(e, Number(groupTitle.parentElement.dataset.group)); }
    const reroute = t.closest?.(".reroute");
    if (reroute) { e.preventDefault(); return this.startRerouteMove(e, reroute.dataset.to, reroute.dataset.input, Number(reroute.dataset.index)); }
    const sock = t.closest?.(".socket");
    if (sock) { e.preventDefault(); return sock.classList.contains("out") ? this.startLinkFromOutput(e, sock) : this.startLinkFromInput(e, sock); }
    if (isEditable(t)) return;
    const nodeEl = t.closest?.(".node");
    if (nodeEl) { e.preventDefault(); return this.startMove(e, nodeEl.dataset.id); }
    this.root.focus({ preventScroll: true });
    if (e.shiftKey || e.ctrlKey || e.metaKey) return this.startBox(e);
    return this.startPan(e, true);
  }

  startPan(e, clearOnClick = false) {
    e.preventDefault();
    const start = [e.clientX, e.clientY], origin = [...this.offset];
    let moved = false;
    this.root.classList.add("panning");
    this.track(e, (m) => {
      if (Math.hypot(m.clientX - start[0], m.clientY - start[1]) > 3) moved = true;
      this.offset = [origin[0] + m.clientX - start[0], origin[1] + m.clientY - start[1]];
      this.applyTransform();
    }, () => {
      this.root.classList.remove("panning");
      if (!moved && clearOnClick) this.select([]);
    });
  }

  startBox(e) {
    const start = this.toWorld(e.clientX, e.clientY);
    const additive = e.shiftKey || e.ctrlKey || e.metaKey;
    const before = new Set(this.selected);
    const rect = () => {
      const [x, y] = this.toWorld(...this.lastPointer);
      return [Math.min(start[0], x), Math.min(start[1], y), Math.max(start[0], x), Math.max(start[1], y)];
    };
    this.box.style.display = "block";
    const paint = () => {
      const [x0, y0, x1, y1] = rect();
      const [cx0, cy0] = this.toClient(x0, y0), [cx1, cy1] = this.toClient(x1, y1);
      const r = this.root.getBoundingClientRect();
      Object.assign(this.box.style, { left: `${cx0 - r.left}px`, top: `${cy0 - r.top}px`, width: `${cx1 - cx0}px`, height: `${cy1 - cy0}px` });
      const hit = [];
      for (const [id, v] of this.views) {
        const n = this.graph.node(id);
        const nx1 = n.pos[0] + v.el.offsetWidth, ny1 = n.pos[1] + v.el.offsetHeight;
        if (n.pos[0] < x1 && nx1 > x0 && n.pos[1] < y1 && ny1 > y0) hit.push(id);
      }
      this.selected = new Set(additive ? [...before, ...hit] : hit);
      this.refreshSelection();
    };
    this.lastPointer = [e.clientX, e.clientY];
    paint();
    this.track(e, paint, () => { this.box.style.display = "none"; });
  }

  startMove(e, id) {
    if (e.shiftKey || e.ctrlKey || e.metaKey) {
      if (this.selected.has(id)) this.selected.delete(id); else this.selected.add(id);
      this.refreshSelection();
      return;
    }
    if (!this.selected.has(id)) this.select([id]);
    const ids = [...this.selected].filter((n) => !this.graph.node(n)?.ui.pinned);
    if (!ids.length) return;
    const start = [e.clientX, e.clientY];
    let last = [0, 0];
    this.root.classList.add("moving");
    this.track(e, (m) => {
      const d = [Math.round((m.clientX - start[0]) / this.scale), Math.round((m.clientY - start[1]) / this.scale)];
      if (d[0] === last[0] && d[1] === last[1]) return;
      this.graph.moveBy(ids, d[0] - last[0], d[1] - last[1]);
      last = d;
    }, () => {
      this.root.classList.remove("moving");
      if (last[0] || last[1]) this.hooks.onCommit();
    });
  }

  /** Drag a group by its title: the nodes inside move with it (one undo step). */
  startGroupMove(e, index) {
    const g = this.graph.groups[index];
    if (!g) return;
    const inside = this.graph.nodesInGroup(index).filter((id) => !this.graph.node(id)?.ui.pinned);
    const origin = [...g.bounding], start = [e.clientX, e.clientY];
    let last = [0, 0];
    this.track(e, (m) => {
      const d = [Math.round((m.clientX - start[0]) / this.scale), Math.round((m.clientY - start[1]) / this.scale)];
      if (d[0] === last[0] && d[1] === last[1]) return;
      if (inside.length) this.graph.moveBy(inside, d[0] - last[0], d[1] - last[1]);
      this.graph.updateGroup(index, { bounding: [origin[0] + d[0], origin[1] + d[1], origin[2], origin[3]] });
      last = d;
    }, () => { if (last[0] || last[1]) this.hooks.onCommit(); });
  }

  /** Drag one reroute point of the link into ``input`` of node ``to`` (one undo step). */
  startRerouteMove(e, to, input, index) {
    const origin = this.graph.node(to)?.ui.routes?.[input]?.[index];
    if (!origin) return;
    const start = [e.clientX, e.clientY];
    let moved = false;
    this.root.classList.add("moving");
    this.track(e, (m) => {
      const pts = (this.graph.node(to)?.ui.routes?.[input] || []).map((p) => [...p]);
      if (!pts[index]) return;
      pts[index] = [origin[0] + (m.clientX - start[0]) / this.scale, origin[1] + (m.clientY - start[1]) / this.scale];
      moved = true;
      this.graph.setRoute(to, input, pts);
    }, () => {
      this.root.classList.remove("moving");
      if (moved) this.hooks.onCommit();
    });
  }

  /** Drag a new link from an output; drop on an input connects, on empty canvas offers matching nodes. */
  startLinkFromOutput(e, sock) {
    this.dragLink({ from: sock.dataset.node, output: Number(sock.dataset.output), type: sock.dataset.type }, e, false);
  }

  /** Dragging from a linked input picks the link up (detaches it); from a free input, draws one backwards. */
  startLinkFromInput(e, sock) {
    const id = sock.dataset.node, input = sock.dataset.input;
    const was = this.graph.node(id)?.links[input];
    if (was) {
      this.graph.disconnect(id, input);
      this.dragLink({ from: was[0], output: was[1], type: this.graph.outputType(was[0], was[1]) || "*" }, e, true);
    } else {
      this.dragLink({ to: id, input, type: sock.dataset.type }, e, false);
    }
  }

  dragLink(link, e, detached) {
    const forward = link.from !== undefined;
    const anchor = forward ? this.socketPoint(link.from, "out", link.output) : this.socketPoint(link.to, "in", link.input);
    this.root.classList.add("linking");
    this.markCandidates(link, true);
    let hover = null;
    const paint = (m) => {
      const p = this.toWorld(m.clientX, m.clientY), a = this.toWorld(...anchor);
      this.dragPath.setAttribute("d", forward ? this.curve(a, p) : this.curve(p, a));
      this.dragPath.style.stroke = typeColour(link.type);
      const under = document.elementFromPoint(m.clientX, m.clientY)?.closest(".socket");
      if (hover && hover !== under) hover.classList.remove("hover");
      hover = under && under.classList.contains(forward ? "in" : "out") ? under : null;
      hover?.classList.add("hover");
    };
    paint(e);
    this.track(e, paint, (u) => {
      this.root.classList.remove("linking");
      this.markCandidates(link, false);
      hover?.classList.remove("hover");
      this.dragPath.setAttribute("d", "");
      const target = document.elementFromPoint(u.clientX, u.clientY)?.closest(".socket");
      const wanted = forward ? "in" : "out";
      if (target && target.classList.contains(wanted)) {
        const [src, out, dst, input] = forward
          ? [link.from, link.output, target.dataset.node, target.dataset.input]
          : [target.dataset.node, Number(target.dataset.output), link.to, link.input];
        const result = this.graph.connect(src, out, dst, input);
        if (!result.ok) this.refuse(target, result.reason);
      } else if (!target && !u.target.closest?.(".node") && !detached) {
        this.hooks.onPalette(this.toWorld(u.clientX, u.clientY), link);
      }
      this.hooks.onCommit();
      this.drawLinks();
    });
  }

  /** Mark sockets that could (or could not) take the link being dragged. */
  markCandidates(link, on) {
    const forward = link.from !== undefined;
    for (const s of this.root.querySelectorAll(forward ? ".socket.in" : ".socket.out")) {
      if (!on) { s.classList.remove("candidate", "incompatible"); continue; }
      const reason = forward
        ? this.graph.canConnect(link.from, link.output, s.dataset.node, s.dataset.input)
        : this.graph.canConnect(s.dataset.node, Number(s.dataset.output), link.to, link.input);
      s.classList.toggle("candidate", !reason);
      s.classList.toggle("incompatible", !!reason);
    }
  }

  refuse(socketEl, reason) {
    this.lastRefusal = reason;
    socketEl.classList.add("refused");
    const nodeEl = socketEl.closest(".node");
    nodeEl?.classList.add("refused");
    setTimeout(() => { socketEl.classList.remove("refused"); nodeEl?.classList.remove("refused"); }, 1600);
    this.hooks.onRefused(reason);
  }
}
