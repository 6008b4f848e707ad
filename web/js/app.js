// The editor page: loads node definitions from the server, opens the starter
// workflow, and wires the graph model, canvas, palette, runner, files, keyboard
// and toolbar together. `window.kiln` exposes the pieces for tests and the console.

import { Api } from "./api.js";
import { parseNodeDefs } from "./schema.js";
import { Graph } from "./graph.js";
import { History } from "./history.js";
import { CanvasView } from "./view.js";
import { Palette } from "./palette.js";
import { JobSocket } from "./socket.js";
import { Runner } from "./runner.js";
import { Files, isComfyUiWorkflow, normalizeDocument } from "./files.js";
import { Dialogs } from "./dialog.js";
import { Gallery } from "./gallery.js";
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

export class App {
  constructor(doc = document) {
    this.doc = doc;
    this.$ = (sel) => doc.querySelector(sel);
    this.api = new Api("", tokenFromUrl());
    this.clientId = `editor-${crypto.randomUUID ? crypto.randomUUID() : Math.random().toString(36).slice(2)}`;
    this.graph = new Graph(new Map());
    this.history = new History(this.graph);
    this.dialogs = new Dialogs(doc.body);
  }

  toast(msg, kind) { this.dialogs.toast(msg, kind); }
  commit() { if (this.history.commit()) this.updateUndoButtons(); }

  async start() {
    const canvasEl = this.$("#canvas");
    this.view = new CanvasView(canvasEl, this.graph, {
      onCommit: () => this.commit(),
      onRefused: (reason) => this.toast(`refused: ${reason}`, "warn"),
      onPalette: (world, link) => this.openPalette(world, link),
      onUpload: (id, name, file) => this.files.uploadTo(id, name, file),
      imageUrl: (name) => this.api.inputUrl(name),
      onRename: async (id) => {
        const n = this.graph.node(id);
        const title = await this.dialogs.prompt("Node title (empty for the default)", n.title || this.graph.def(n.type)?.title || n.type);
        if (title === null) return;
        this.graph.setTitle(id, !title || title === (this.graph.def(n.type)?.title || n.type) ? null : title);
        this.commit();
      },
    });
    this.palette = new Palette(this.doc.body, () => this.graph.defs);
    this.gallery = new Gallery(this.$("#gallery-list"), this.doc.body, (img) => this.api.viewUrl(img));
    this.files = new Files({
      api: this.api, graph: this.graph, view: this.view, dialog: this.dialogs,
      onCommit: () => this.commit(), toast: (m, k) => this.toast(m, k),
      onLoaded: (name) => { this.$("#doc-name").textContent = name || "untitled"; },
      adapt: (ids) => this.fixChoices(ids),
    });
    this.files.bindDrop(canvasEl);
    this.socket = new JobSocket(this.api.socketUrl(this.clientId));
    this.socket.addEventListener("event", (e) => {
      if (e.detail.type === "socket_open") this.$("#conn").classList.add("online");
      if (e.detail.type === "socket_closed") this.$("#conn").classList.remove("online");
    });
    this.runner = new Runner({
      api: this.api, socket: this.socket, graph: this.graph, view: this.view, clientId: this.clientId,
      onCommit: () => this.commit(), toast: (m, k) => this.toast(m, k),
      onImages: (images) => this.gallery.add(images),
    });
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
    try {
      await this.files.loadDocument(await this.api.workflow(STARTER), STARTER);
    } catch (e) {
      this.graph.clear();
      this.toast(`starter workflow unavailable (${e.message}); double-click the canvas to add nodes`, "warn");
    }
    this.history.reset();
    this.updateUndoButtons();
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
      : `${subs.length} values this server does not have were replaced`, subs.map(describeSubstitution));
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
    on("#open-file", () => this.$("#file-input").click());
    this.$("#file-input").addEventListener("change", async (e) => {
      const f = e.target.files[0];
      e.target.value = "";
      if (f) await this.files.openFile(f);
    });
    on("#new", () => { this.graph.clear(); this.files.name = null; this.$("#doc-name").textContent = "untitled"; this.commit(); });
    on("#add", () => this.openPalette(null, null));
    on("#fit", () => this.view.fit());
    on("#undo", () => this.undo());
    on("#redo", () => this.redo());
  }

  updateUndoButtons() {
    this.$("#undo").disabled = !this.history.canUndo;
    this.$("#redo").disabled = !this.history.canRedo;
  }

  onRunState({ running, status }) {
    this.$("#run").disabled = running;
    this.$("#stop").disabled = !running;
    this.doc.body.classList.toggle("running", running);
    if (status) this.$("#status").textContent = `last run: ${status}`;
  }

  onProgress({ text, fraction }) {
    this.$("#progress-fill").style.width = `${Math.round(fraction * 100)}%`;
    this.$("#progress-text").textContent = text;
  }

  undo() { if (this.history.undo()) this.afterHistory(); }
  redo() { if (this.history.redo()) this.afterHistory(); }
  afterHistory() { this.updateUndoButtons(); }

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
      if (isTyping(e.target) || this.doc.querySelector(".modal-back")) return;
      if (e.key === "Escape" && this.runner.running && !this.palette.isOpen) { this.runner.stop(); return; }
      const key = e.key.toLowerCase();
      if (mod && key === "z") { e.preventDefault(); if (e.shiftKey) this.redo(); else this.undo(); }
      else if (mod && key === "y") { e.preventDefault(); this.redo(); }
      else if (mod && key === "s") { e.preventDefault(); this.files.saveToLibrary(e.shiftKey); }
      else if (mod && key === "o") { e.preventDefault(); this.files.showLibrary(); }
      else if (mod && key === "a") { e.preventDefault(); this.view.select([...this.graph.nodes.keys()]); }
      else if (mod && key === "d") { e.preventDefault(); this.duplicate(); }
      else if (mod && key === "k") { e.preventDefault(); this.openPalette(null, null); }
      else if (!mod && (e.key === "/" || e.key === " ")) { e.preventDefault(); this.openPalette(null, null); }
      else if (!mod && (e.key === "Delete" || e.key === "Backspace")) { e.preventDefault(); this.deleteSelection(); }
      else if (!mod && key === "f") { e.preventDefault(); this.view.fit(); }
    });
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
