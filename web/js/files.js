// Workflow files: the server's library, local JSON files, and drops onto the
// canvas (a workflow JSON, a PNG carrying its workflow, or an image for LoadImage).

import { readPngText, workflowFromPngText } from "./png.js";
import { Graph } from "./graph.js";

/** A ComfyUI editor ("litegraph") file: a list of nodes plus links. */
export function isComfyUiWorkflow(doc) {
  return !!doc && typeof doc === "object" && Array.isArray(doc.nodes) && "links" in doc;
}

/**
 * Any supported document to something Graph.load takes (Kiln or API format).
 * An editor file is converted by the server, which runs the same conversion for
 * /prompt and `kiln run` (subgraphs, bypass, widget order): one converter, so the
 * editor can never show a graph other than the one that would run.
 */
export async function normalizeDocument(doc, api) {
  return isComfyUiWorkflow(doc) ? api.convertComfyUi(doc) : doc;
}

function isImage(file) {
  return file.type.startsWith("image/") || /\.(png|jpe?g|webp|gif|bmp)$/i.test(file.name);
}

export class Files {
  /**
   * `adapt(ids)` runs on freshly loaded (ids null) or pasted nodes before the undo
   * step is recorded, so what it changes is part of the load (app.js: choices).
   * @param {{api:any, graph:any, view:any, onLoaded(name:string|null):void, onCommit():void, toast(m:string,k?:string):void,
   *   dialog:any, adapt?(ids:string[]|null):void, confirmReplace?():Promise<boolean>}} o
   */
  constructor(o) {
    Object.assign(this, o);
  }

  /** The library name of the open workflow (kept by the graph, so undo restores it). */
  get name() { return this.graph.name; }
  set name(v) { this.graph.name = v; }

  /** Replace the graph with a document; resolves to what Graph.load says. */
  async loadDocument(doc, name = null) {
    const info = this.graph.load(await normalizeDocument(doc, this.api));
    this.name = name;
    this.view.status.clear();
    this.view.notes.clear();
    this.adapt?.(null);
    this.view.rebuild();
    this.view.fit();
    this.onCommit();
    this.onLoaded(name);
    return info;
  }

  /** Whether the open document may be replaced (app.js asks when it has unsaved changes). */
  async mayReplace() { return this.confirmReplace ? this.confirmReplace() : true; }

  async openFromLibrary(name) {
    const doc = await this.api.workflow(name);
    if (!(await this.mayReplace())) return;
    await this.loadDocument(doc, name);
    this.toast(`opened ${name}`);
  }

  async showLibrary() {
    let list;
    try { list = await this.api.workflows(); }
    catch (e) { this.toast(`cannot list workflows: ${e.message}`, "error"); return; }
    this.dialog.choose("Open a workflow", list.map((w) => ({ label: w.name, detail: w.title || w.description || "", value: w.name })),
      (name) => this.openFromLibrary(name).catch((e) => this.toast(`cannot open ${name}: ${e.message}`, "error")));
  }

  async saveToLibrary(askName = false) {
    let name = this.name;
    if (askName || !name) {
      name = await this.dialog.prompt("Save workflow as", name || "my-workflow.json");
      if (!name) return null;
    }
    if (!/\.json$/i.test(name)) name += ".json";
    try {
      await this.api.saveWorkflow(name, this.graph.toKiln());
      this.name = name;
      this.onLoaded(name);
      this.toast(`saved ${name}`);
      return name;
    } catch (e) { this.toast(`cannot save ${name}: ${e.message}`, "error"); return null; }
  }

  /** Download the workflow: Kiln's format, or ComfyUI's API format (what its /prompt and `prompt` PNG chunk take). */
  async download(format = "kiln") {
    const api = format === "api";
    let doc = this.graph.toKiln();
    if (api) {
      // ComfyUI's API format has no modes: the server applies bypass/mute as a run would.
      try { doc = await this.api.toApiFormat(doc); }
      catch (e) { this.toast(`cannot export in ComfyUI's API format: ${e.message}`, "error"); return; }
    }
    const base = (this.name || "workflow.json").replace(/\.json$/i, "");
    const blob = new Blob([JSON.stringify(doc, null, 2)], { type: "application/json" });
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = api ? `${base}.api.json` : `${base}.json`;
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 1000);
  }

  /** A file picked or dropped: a workflow JSON, a PNG with a workflow, or an image. */
  async openFile(file, clientPos = null) {
    const targetNode = clientPos ? this.loadImageNodeAt(clientPos) : null;
    if (isImage(file)) {
      if (targetNode) return this.uploadTo(targetNode.id, targetNode.input, file);
      const buffer = await file.arrayBuffer();
      const found = workflowFromPngText(await readPngText(buffer));
      if (found) {
        if (!(await this.mayReplace())) return null;
        try { await this.loadDocument(found.doc, null); }
        catch (e) { this.toast(`cannot open the workflow in ${file.name}: ${e.message}`, "error"); return null; }
        this.toast(`restored the workflow from ${file.name}`);
        return "workflow";
      }
      return this.imageAsNewNode(file, clientPos);
    }
    let doc;
    try { doc = JSON.parse(await file.text()); }
    catch { this.toast(`${file.name} is neither JSON nor an image`, "error"); return null; }
    if (Graph.isClipboard(doc)) {
      this.paste(doc, clientPos ? this.view.toWorld(...clientPos) : null);
      return "paste";
    }
    if (!(await this.mayReplace())) return null;
    try { await this.loadDocument(doc, null); }
    catch (e) { this.toast(`cannot open ${file.name}: ${e.message}`, "error"); return null; }
    this.toast(`opened ${file.name}`);
    return "workflow";
  }

  /** Paste clipboard JSON at `at` (world coordinates), adapted and selected, as one undo step; returns the new ids. */
  paste(clip, at) {
    const ids = this.graph.paste(clip, at);
    this.adapt?.(ids);
    this.view.select(ids);
    this.onCommit();
    return ids;
  }

  /** The LoadImage-like node (an image_upload input) under a point, if any. */
  loadImageNodeAt(clientPos) {
    const el = document.elementFromPoint(...clientPos)?.closest(".node");
    if (!el) return null;
    const n = this.graph.node(el.dataset.id);
    const def = n && this.graph.def(n.type);
    const inp = def?.inputs.find((i) => i.imageUpload);
    return inp ? { id: n.id, input: inp.name } : null;
  }

  async uploadTo(id, input, file) {
    try {
      const value = await this.api.upload(file);
      const def = this.graph.inputDef(id, input);
      if (def && def.choices && !def.choices.includes(value)) def.choices.push(value);
      this.graph.setValue(id, input, value);
      this.onCommit();
      this.toast(`uploaded ${value}`);
      return "upload";
    } catch (e) { this.toast(`upload failed: ${e.message}`, "error"); return null; }
  }

  async imageAsNewNode(file, clientPos) {
    const type = [...this.graph.defs.values()].find((d) => d.inputs.some((i) => i.imageUpload));
    if (!type) { this.toast("no node here can take an image", "warn"); return null; }
    const at = clientPos ? this.view.toWorld(...clientPos) : [40, 40];
    const node = this.graph.addNode(type.type, at);
    return this.uploadTo(node.id, type.inputs.find((i) => i.imageUpload).name, file);
  }

  /** Wire drag-and-drop of files onto the canvas. */
  bindDrop(target) {
    target.addEventListener("dragover", (e) => {
      if ([...(e.dataTransfer?.types || [])].includes("Files")) { e.preventDefault(); target.classList.add("dropping"); }
    });
    target.addEventListener("dragleave", () => target.classList.remove("dropping"));
    target.addEventListener("drop", async (e) => {
      target.classList.remove("dropping");
      const file = e.dataTransfer?.files?.[0];
      if (!file) return;
      e.preventDefault();
      await this.openFile(file, [e.clientX, e.clientY]);
    });
  }
}
