// The editor page: loads node definitions from the server, opens the starter
// workflow, and wires the graph model, canvas, palette, runner, files, keyboard
// and toolbar together. `window.kiln` exposes the pieces for tests and the console.

import { Api } from "./api.js";
import { parseNodeDefs } from "./schema.js";
import { Graph } from "./graph.js";
import { History } from "./history.js";
import { Session } from "./session.js";
import { CanvasView } from "./view.js";
import { Palette } from "./palette.js";
import { JobSocket } from "./socket.js";
import { Runner } from "./runner.js";
import { Files, isComfyUiWorkflow, normalizeDocument } from "./files.js";
import { Dialogs } from "./dialog.js";
import { Results } from "./results.js";
import { QueuePanel } from "./queue.js";
import { Viewer } from "./viewer.js";
import { MaskPainter } from "./mask_painter.js";
import { defaultValue } from "./schema.js";
import { tidyLayout } from "./tidy.js";
import { ContextMenu } from "./menu.js";
import { Minimap } from "./minimap.js";
import { unavailableChoices, applySubstitutions, describeSubstitution } from "./choices.js";

const STARTER = "img2img.json";

function isTyping(t) {
  return t instanceof Element && !!t.closest("input, textarea, select, [contenteditable]");
}

function tokenFromUrl() {
  const q = new URLSearchParams(location.search);
  const t = q.get("token");
  if (t) sessionStorage.setItem("kiln-token", t);
  return t || sessionStorage.getItem("kiln-token");
}

/**
 * A job's workflow with the parameters it was submitted with written into the
 * inputs they name (a declared parameter, or "NODE.INPUT"), so the graph opened
 * from the history is the one that ran.
 */
export function withParams(workflow, params) {
  const doc = JSON.parse(JSON.stringify(workflow));
  for (const [name, value] of Object.entries(params || {})) {
    const declared = doc.params?.[name];
    const targets = declared === undefined ? [name] : Array.isArray(declared) ? declared : [declared];
    for (const t of targets) {
      const [id, input] = String(t).split(/\.(.+)/);
      const node = doc.nodes?.[id];
      if (node && input) node.inputs = { ...(node.inputs || {}), [input]: value };
    }
  }
  return doc;
}

export class App {
  constructor(doc = document) {
    this.doc = doc;
    this.$ = (sel) => doc.querySelector(sel);
    this.api = new Api("", tokenFromUrl());
    this.clientId = `editor-${crypto.randomUUID ? crypto.randomUUID() : Math.random().toString(36).slice(2)}`;
    this.graph = new Graph(new Map());
    this.history = new History(this.graph);
    this.session = new Session({ history: this.history, onChange: () => this.showDocName() });
    this.dialogs = new Dialogs(doc.body);
  }

  toast(msg, kind) { this.dialogs.toast(msg, kind); }
  commit() { if (this.history.commit()) { this.updateUndoButtons(); this.session.changed(); } }

  /** The document's name, with a marker while it has unsaved changes. */
  showDocName() {
    const name = this.session.name || "untitled";
    const el = this.$("#doc-name");
    el.textContent = name;
    el.classList.toggle("modified", this.session.dirty);
    el.title = this.session.dirty ? `${name}: unsaved changes (kept in this browser)` : name;
    this.doc.title = `${this.session.dirty ? "\u2022 " : ""}${name} \u2014 Kiln`;
  }

  /** Before the open document is replaced: ask, when it has unsaved changes. */
  async confirmReplace() {
    if (!this.session.dirty) return true;
    return this.dialogs.confirm("Replace the open workflow?",
      `${this.session.name || "The untitled workflow"} has unsaved changes. Replacing it can be undone (Ctrl+Z).`, "Replace");
  }

  async start() {
    const canvasEl = this.$("#canvas");
    this.view = new CanvasView(canvasEl, this.graph, {
      onCommit: () => this.commit(),
      onRefused: (reason) => this.toast(`refused: ${reason}`, "warn"),
      onPalette: (world, link) => this.openPalette(world, link),
      onUpload: (id, name, file) => this.files.uploadTo(id, name, file),
      onMask: (id, name) => this.editMask(id, name),
      imageUrl: (name) => this.api.inputUrl(name),
      onRename: async (id) => {
        const n = this.graph.node(id);
        const title = await this.dialogs.prompt("Node title (empty for the default)", n.title || this.graph.def(n.type)?.title || n.type);
        if (title === null) return;
        this.graph.setTitle(id, !title || title === (this.graph.def(n.type)?.title || n.type) ? null : title);
        this.commit();
      },
      onRenameGroup: (i) => this.renameGroup(i),
      onMenu: (x, y, hit) => this.openMenu(x, y, hit),
    });
    this.menu = new ContextMenu(this.doc.body);
    this.minimap = new Minimap(canvasEl, this.view);
    this.view.onViewChange = () => this.minimap.schedule();
    this.graph.addEventListener("change", () => this.minimap.schedule());
    this.palette = new Palette(this.doc.body, () => this.graph.defs);
    this.viewer = new Viewer(this.doc.body);
    this.maskPainter = new MaskPainter(this.doc.body, this.api);
    this.results = new Results({ list: this.$("#gallery-list"), api: this.api, viewer: this.viewer,
      onOpenJob: (id) => this.openJob(id), toast: (m, k) => this.toast(m, k) });
    this.files = new Files({
      api: this.api, graph: this.graph, view: this.view, dialog: this.dialogs,
      onCommit: () => this.commit(), toast: (m, k) => this.toast(m, k),
      onLoaded: (name) => this.session.markSaved(name),
      adapt: (ids) => this.fixChoices(ids),
      confirmReplace: () => this.confirmReplace(),
    });
    this.files.bindDrop(canvasEl);
    this.socket = new JobSocket(this.api.socketUrl(this.clientId));
    this.socket.addEventListener("event", (e) => {
      if (e.detail.type === "socket_open") this.$("#conn").classList.add("online");
      if (e.detail.type === "socket_closed") this.$("#conn").classList.remove("online");
      if (e.detail.type === "status" || e.detail.type === "socket_open") this.queue?.refresh();
    });
    this.runner = new Runner({
      api: this.api, socket: this.socket, graph: this.graph, view: this.view, clientId: this.clientId,
      onCommit: () => this.commit(), toast: (m, k) => this.toast(m, k),
      onImages: () => {},
    });
    this.queue = new QueuePanel({ list: this.$("#queue-list"), clear: this.$("#queue-clear"), count: this.$("#queue-count"),
      api: this.api, runner: this.runner, toast: (m, k) => this.toast(m, k) });
    this.runner.addEventListener("state", (e) => this.onRunState(e.detail));
    this.runner.addEventListener("progress", (e) => this.onProgress(e.detail));
    this.bindToolbar();
    this.bindKeys();
    this.bindClipboard();
    window.addEventListener("resize", () => this.view.drawLinks());

    try {
      this.graph.defs = parseNodeDefs(await this.api.nodes());
    } catch (e) {
      this.toast(`cannot load node definitions: ${e.message}`, "error");
    }
    if (this.session.restore()) {
      // The graph as it was before the reload (or crash), with its undo history.
      this.view.fit();
    } else {
      try {
        await this.files.loadDocument(await this.api.workflow(STARTER), STARTER);
      } catch (e) {
        this.graph.clear();
        this.toast(`starter workflow unavailable (${e.message}); double-click the canvas to add nodes`, "warn");
      }
      this.history.reset();
      this.session.markSaved(this.files.name);
    }
    this.session.guardUnload();
    this.updateUndoButtons();
    await Promise.all([this.results.refresh(), this.queue.refresh()]);
    this.doc.body.classList.add("ready");
  }

  /**
   * Switch loaded values this server does not offer (another machine's checkpoint)
   * to its first choice, mark each widget and say so; the caller's undo step
   * includes the change, so the load is still one step and nothing looks edited.
   */
  fixChoices(ids = null) {
    const subs = unavailableChoices(this.graph, ids);
    if (!subs.length) return subs;
    applySubstitutions(this.graph, subs);
    for (const s of subs) this.view.noteSubstitution(s);
    this.dialogs.notice(subs.length === 1 ? "A value this server does not have was replaced"
      : `${subs.length} values this server does not have were replaced`, subs.map(describeSubstitution), undefined, "substitutions");
    return subs;
  }

  // -- toolbar ------------------------------------------------------------------

  bindToolbar() {
    const on = (id, fn) => this.$(id).addEventListener("click", fn);
    on("#run", () => this.runner.run());
    on("#stop", () => this.runner.stop());
    on("#open", () => this.files.showLibrary());
    on("#save", () => this.files.saveToLibrary(false));
    on("#save-as", () => this.files.saveToLibrary(true));
    on("#download", () => this.files.download());
    on("#download-api", () => this.files.download("api"));
    on("#open-file", () => this.$("#file-input").click());
    this.$("#file-input").addEventListener("change", async (e) => {
      const f = e.target.files[0];
      e.target.value = "";
      if (f) await this.files.openFile(f);
    });
    on("#new", () => this.newDocument());
    on("#add", () => this.openPalette(null, null));
    on("#fit", () => this.view.fit());
    on("#tidy", () => this.tidy());
    on("#menu-toggle", () => {
      const open = this.$(".toolbar").classList.toggle("menu-open");
      this.$("#menu-toggle").setAttribute("aria-expanded", String(open));
    });
    // A choice in the folded menu closes it.
    this.$("#toolbar-menu").addEventListener("click", (e) => {
      if (e.target.closest("button")) { this.$(".toolbar").classList.remove("menu-open"); this.$("#menu-toggle").setAttribute("aria-expanded", "false"); }
    });
    on("#sidebar-toggle", () => {
      const open = this.doc.body.classList.toggle("drawer-open");
      this.$("#sidebar-toggle").setAttribute("aria-expanded", String(open));
    });
    on("#tab-results", () => this.showTab("results"));
    on("#tab-queue", () => this.showTab("queue"));
    on("#undo", () => this.undo());
    on("#redo", () => this.redo());
  }

  /** An empty canvas; the old graph stays one undo step away. */
  async newDocument() {
    if (!(await this.confirmReplace())) return;
    this.graph.clear();
    this.commit();
    this.session.markSaved(null);
  }

  updateUndoButtons() {
    this.$("#undo").disabled = !this.history.canUndo;
    this.$("#redo").disabled = !this.history.canRedo;
  }

  onRunState({ running, busy, status }) {
    this.$("#stop").disabled = !running;
    this.doc.body.classList.toggle("running", running);
    this.doc.body.classList.toggle("busy", busy);
    if (status) this.$("#status").textContent = `last run: ${status}`;
    this.queue.refresh();
    if (status) this.results.refresh();
  }

  showTab(name) {
    for (const t of ["results", "queue"]) {
      const on = t === name;
      this.$(`#tab-${t}`).classList.toggle("active", on);
      this.$(`#tab-${t}`).setAttribute("aria-selected", String(on));
      this.$(`#${t}-panel`).hidden = !on;
    }
  }

  /**
   * Paint the mask of a LoadImage picture; the saved copy (input/clipspace/...)
   * becomes the node's image, as one undo step.
   */
  async editMask(id, input) {
    const d = this.graph.inputDef(id, input);
    const n = this.graph.node(id);
    const value = n && (input in n.values ? n.values[input] : d && defaultValue(d));
    if (!value) { this.toast("choose an image first, then paint its mask", "warn"); return null; }
    let next;
    try { next = await this.maskPainter.open(String(value)); }
    catch (e) { this.maskPainter.close(); this.toast(`cannot paint a mask on ${value}: ${e.message}`, "error"); return null; }
    if (!next || !this.graph.node(id)) return null;
    if (d?.choices && !d.choices.includes(next)) d.choices.push(next);
    this.graph.setValue(id, input, next);
    this.commit();
    this.toast(`mask saved: ${next}`);
    return next;
  }

  /** Open the graph a past job ran (from the results panel), as one undo step. */
  async openJob(id) {
    let job;
    try { job = await this.api.job(id); }
    catch (e) { this.toast(`cannot open that run: ${e.message}`, "error"); return; }
    if (!job.workflow) { this.toast("that run kept no graph", "warn"); return; }
    if (!(await this.confirmReplace())) return;
    try { await this.files.loadDocument(withParams(job.workflow, job.params), null); }
    catch (e) { this.toast(`cannot open that run: ${e.message}`, "error"); return; }
    this.toast("opened the graph of that run");
  }

  onProgress({ text, fraction }) {
    this.$("#progress-fill").style.width = `${Math.round(fraction * 100)}%`;
    this.$("#progress-text").textContent = text;
  }

  undo() { if (this.history.undo()) this.afterHistory(); }
  redo() { if (this.history.redo()) this.afterHistory(); }
  afterHistory() { this.updateUndoButtons(); this.session.changed(); }

  // -- palette ------------------------------------------------------------------

  /** Add a node where asked (world coordinates), connecting the dragged link if there was one. */
  openPalette(world, link) {
    const view = this.view;
    const at = world || view.toWorld(...view.lastPointer);
    const client = view.toClient(...at);
    const dragged = link ? { type: link.type, forward: link.from !== undefined } : null;
    this.palette.open(client, (type, match) => {
      const node = this.graph.addNode(type, at);
      if (link && match) {
        if (match.input !== undefined) this.graph.connect(link.from, link.output, node.id, match.input);
        else this.graph.connect(node.id, match.output, link.to, link.input);
      }
      view.select([node.id]);
      this.commit();
    }, dragged);
  }

  // -- keyboard & clipboard -----------------------------------------------------

  bindKeys() {
    this.doc.addEventListener("keydown", (e) => {
      const mod = e.ctrlKey || e.metaKey;
      if (mod && e.key === "Enter") { e.preventDefault(); this.runner.run(); return; }
      if (isTyping(e.target) || this.doc.querySelector(".modal-back") || this.menu.isOpen) return;
      if (e.key === "Escape" && this.runner.running && !this.palette.isOpen) { this.runner.stop(); return; }
      const key = e.key.toLowerCase();
      if (mod && key === "z") { e.preventDefault(); if (e.shiftKey) this.redo(); else this.undo(); }
      else if (mod && key === "y") { e.preventDefault(); this.redo(); }
      else if (mod && key === "s") { e.preventDefault(); this.files.saveToLibrary(e.shiftKey); }
      else if (mod && key === "o") { e.preventDefault(); this.files.showLibrary(); }
      else if (mod && key === "a") { e.preventDefault(); this.view.select([...this.graph.nodes.keys()]); }
      else if (mod && key === "d") { e.preventDefault(); this.duplicate(); }
      else if (mod && key === "k") { e.preventDefault(); this.openPalette(null, null); }
      else if (mod && key === "g") { e.preventDefault(); this.groupSelection(); }
      else if (!mod && e.key === "/") { e.preventDefault(); this.openPalette(null, null); }
      else if (!mod && (e.key === "Delete" || e.key === "Backspace")) { e.preventDefault(); this.deleteSelection(); }
      else if (!mod && key === "f") { e.preventDefault(); this.view.fit(); }
    });
  }

  /** Lay the graph out so no two nodes touch and no link hides under a node (one undo step). */
  tidy() {
    const { pos, routes } = tidyLayout(this.graph, this.view.measure());
    for (const [id, p] of pos) this.graph.setPos(id, p);
    for (const [id, byInput] of routes) {
      for (const input of Object.keys(this.graph.node(id).links)) this.graph.setRoute(id, input, byInput[input] || []);
    }
    this.commit();
    this.view.drawLinks();
    this.view.fit();
  }

  // -- groups and the right-click menu --------------------------------------------

  /** A group around the selected nodes (Ctrl+G), or around everything when nothing is selected. */
  groupSelection() {
    const ids = this.view.selected.size ? [...this.view.selected] : [...this.graph.nodes.keys()];
    if (!ids.length) return null;
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (const id of ids) {
      const n = this.graph.node(id), el = this.view.views.get(id)?.el;
      x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1]);
      x1 = Math.max(x1, n.pos[0] + (el?.offsetWidth || 260)); y1 = Math.max(y1, n.pos[1] + (el?.offsetHeight || 100));
    }
    const pad = 20, head = 34;
    const index = this.graph.addGroup([x0 - pad, y0 - pad - head, x1 - x0 + 2 * pad, y1 - y0 + 2 * pad + head]);
    this.commit();
    return index;
  }

  async renameGroup(i) {
    const g = this.graph.groups[i];
    if (!g) return;
    const title = await this.dialogs.prompt("Group title", g.title);
    if (title === null) return;
    this.graph.updateGroup(i, { title: title || "Group" });
    this.commit();
  }

  /** What a right-click offers: on a node (acting on the selection), a group, a link, or the canvas. */
  openMenu(x, y, hit) {
    const COLOURS = [["", "no colour"], ["#8a3b3b", "red"], ["#8a6a2b", "brown"], ["#3f7a3a", "green"], ["#2f5f8f", "blue"], ["#5d3f8f", "purple"]];
    const done = (fn) => () => { fn(); this.commit(); };
    let items;
    if (hit.node) {
      const ids = [...this.view.selected];
      const n = this.graph.node(hit.node);
      const all = (key, value) => done(() => ids.forEach((id) => this.graph.setUi(id, key, value)));
      items = [
        { id: "bypass", label: "Bypass", checked: n.ui.mode === "bypass", action: all("mode", n.ui.mode === "bypass" ? null : "bypass") },
        { id: "mute", label: "Mute", checked: n.ui.mode === "mute", action: all("mode", n.ui.mode === "mute" ? null : "mute") },
        { id: "collapse", label: n.ui.collapsed ? "Expand" : "Collapse", action: all("collapsed", !n.ui.collapsed) },
        { id: "pin", label: n.ui.pinned ? "Unpin" : "Pin", action: all("pinned", !n.ui.pinned) },
        { swatches: COLOURS.map(([c, name]) => ({ color: c, label: `colour: ${name}`, action: all("color", c || null) })) },
        "-",
        ...this.maskItem(hit.node),
        { id: "rename", label: "Rename…", action: () => this.view.hooks.onRename(hit.node) },
        { id: "clone", label: "Clone", action: () => this.duplicate() },
        { id: "group", label: "Group selection (Ctrl+G)", action: () => this.groupSelection() },
        { id: "remove", label: "Remove", action: () => this.deleteSelection() },
      ];
    } else if (hit.group !== undefined) {
      const i = hit.group;
      items = [
        { id: "rename-group", label: "Rename group…", action: () => this.renameGroup(i) },
        { swatches: COLOURS.map(([c, name]) => ({ color: c, label: `colour: ${name}`, action: done(() => this.graph.updateGroup(i, { color: c || null })) })) },
        { id: "select-group", label: "Select nodes in group", action: () => this.view.select(this.graph.nodesInGroup(i)) },
        { id: "remove-group", label: "Remove group (keep nodes)", action: done(() => this.graph.removeGroup(i)) },
      ];
    } else if (hit.link) {
      const l = hit.link;
      items = [
        { id: "reroute", label: "Add reroute point here", action: done(() => this.addReroute(l, this.view.toWorld(x, y))) },
        { id: "straighten", label: "Remove reroute points", disabled: !this.graph.node(l.to)?.ui.routes?.[l.input], action: done(() => this.graph.setRoute(l.to, l.input, [])) },
        { id: "delete-link", label: "Delete link", action: done(() => this.graph.disconnect(l.to, l.input)) },
      ];
    } else {
      const at = this.view.toWorld(x, y);
      items = [
        { id: "add-node", label: "Add node here…", action: () => this.openPalette(at, null) },
        { id: "group-all", label: this.view.selected.size ? "Group selection (Ctrl+G)" : "Group everything", action: () => this.groupSelection() },
        { id: "tidy", label: "Tidy up", action: () => this.tidy() },
        { id: "fit", label: "Fit (F)", action: () => this.view.fit() },
      ];
    }
    this.menu.open(x, y, items);
  }

  /** "Edit mask…" for a node that takes an uploaded picture (LoadImage). */
  maskItem(id) {
    const input = this.graph.def(this.graph.node(id)?.type)?.inputs.find((i) => i.imageUpload);
    return input ? [{ id: "edit-mask", label: "Edit mask…", action: () => this.editMask(id, input.name) }] : [];
  }

  /** A reroute point: a waypoint the link passes through, kept in the order along the link. */
  addReroute(link, at) {
    const n = this.graph.node(link.to);
    const pts = [...(n.ui.routes?.[link.input] || [])];
    // Insert by x, since links run left to right.
    const i = pts.findIndex((p) => p[0] > at[0]);
    pts.splice(i < 0 ? pts.length : i, 0, at);
    this.graph.setRoute(link.to, link.input, pts);
  }

  deleteSelection() {
    const ids = [...this.view.selected];
    if (!ids.length) return;
    this.graph.removeNodes(ids);
    this.commit();
  }

  duplicate() {
    const ids = [...this.view.selected];
    if (!ids.length) return;
    this.view.select(this.graph.duplicate(ids));
    this.commit();
  }

  /** Copy/paste travel as JSON text on the system clipboard, so they work between tabs. */
  bindClipboard() {
    const canUse = (e) => !isTyping(e.target) && !this.doc.querySelector(".modal-back");
    const copy = (e, cut) => {
      if (!canUse(e) || !this.view.selected.size) return;
      const text = JSON.stringify(this.graph.copy([...this.view.selected]));
      e.clipboardData.setData("text/plain", text);
      e.preventDefault();
      if (cut) this.deleteSelection();
    };
    this.doc.addEventListener("copy", (e) => copy(e, false));
    this.doc.addEventListener("cut", (e) => copy(e, true));
    this.doc.addEventListener("paste", (e) => {
      if (!canUse(e)) return;
      const text = e.clipboardData.getData("text/plain");
      if (!text) return;
      e.preventDefault();
      this.pasteText(text);
    });
  }

  /** Paste Kiln clipboard JSON (or a whole workflow document) at the pointer. */
  async pasteText(text) {
    let doc;
    try { doc = JSON.parse(text); } catch { this.toast("the clipboard holds no nodes", "warn"); return []; }
    if (!Graph.isClipboard(doc)) {
      try {
        const scratch = new Graph(this.graph.defs);
        scratch.load(await normalizeDocument(doc, this.api));
        doc = scratch.copy([...scratch.nodes.keys()]);
      } catch (e) {
        // A ComfyUI editor file the server refused (a subgraph cycle, ...) says why.
        this.toast(isComfyUiWorkflow(doc) ? `cannot paste this ComfyUI workflow: ${e.message}` : "the clipboard holds no nodes", "warn");
        return [];
      }
    }
    return this.files.paste(doc, this.view.toWorld(...this.view.lastPointer));
  }
}
