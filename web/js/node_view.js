// One node's DOM: title, output and input sockets coloured by type, a widget per
// literal input, and the run status areas (progress, preview, images, errors).

import { createWidget, controlWidget } from "./widgets.js";
import { typeColour } from "./types.js";
import { defaultValue, unchosenOptionInputs } from "./schema.js";
import { inactiveInputs } from "./hints.js";

function div(cls, text) {
  const e = document.createElement("div");
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function socket(kind, type, attrs) {
  const s = document.createElement("span");
  s.className = `socket ${kind}`;
  s.style.setProperty("--socket", typeColour(type));
  s.dataset.type = type;
  for (const [k, v] of Object.entries(attrs)) s.dataset[k] = v;
  s.title = type;
  return s;
}

/**
 * A description as a person reads it: node descriptions may carry HTML or
 * Markdown (ComfyUI's do), and a tooltip shows text, not markup.
 */
export function plainText(text) {
  const parsed = new DOMParser().parseFromString(String(text), "text/html").body.textContent || "";
  return parsed.replace(/\*\*|__|`/g, "").replace(/\[([^\]]*)\]\([^)]*\)/g, "$1").replace(/[ \t]+/g, " ").trim();
}

/**
 * Revoke a live preview's blob URL once the image that shows it is done with it.
 * Revoking while the <img> is still loading makes that load fail (a console
 * error, and a blank preview), so a replaced image that has not settled yet
 * revokes its URL when it does.
 */
export function releaseBlob(img) {
  const src = img.getAttribute("src") || "";
  if (!src.startsWith("blob:")) return;
  const revoke = () => URL.revokeObjectURL(src);
  if (img.complete) revoke();
  else {
    img.addEventListener("load", revoke, { once: true });
    img.addEventListener("error", revoke, { once: true });
  }
}

export class NodeView {
  /**
   * @param {import("./graph.js").Graph} graph
   * @param {string} id
   * @param {{onValue(id,name,value,final), onControl(id,name,mode), onUpload(id,name,file), onMask?(id,name), imageUrl(name):string,
   *   notes?(id):Object<string,{value:string,replacement:string}>}} hooks
   */
  constructor(graph, id, hooks) {
    this.graph = graph; this.id = id; this.hooks = hooks;
    this.widgets = new Map();
    this.rows = new Map();
    this.el = div("node");
    this.el.dataset.id = id;
    this.build();
  }

  build() {
    const n = this.graph.node(this.id);
    const def = this.graph.def(n.type);
    this.el.replaceChildren();
    this.widgets.clear(); this.rows.clear();
    this.el.classList.toggle("unknown", !def);
    this.el.classList.toggle("output-node", !!def?.outputNode);
    const title = div("node-title");
    const label = div("node-label", n.title || def?.title || n.type);
    const badge = div("node-badge");
    const idTag = div("node-id", `#${n.id}`);
    title.append(label, badge, idTag);
    title.title = def ? `${n.type} (${def.category})${def.description ? "\n" + plainText(def.description) : ""}` : `unknown node type ${n.type}`;
    this.el.append(title);
    this.titleEl = title; this.badgeEl = badge;

    const body = div("node-body");
    const outputs = this.graph.outputs(this.id);
    // A dynamic combo's unchosen options are left out; update() rebuilds when the choice changes.
    const unchosen = unchosenOptionInputs(def, n);
    this.optionKey = [...unchosen].join("\n");
    const names = this.graph.inputNames(this.id).filter((name) => !unchosen.has(name));
    const inputDef = (name) => def?.inputs.find((i) => i.name === name) || { name, type: "*", widget: !(name in n.links) && name in n.values };
    const linkInputs = names.filter((name) => !inputDef(name).widget);
    const widgetInputs = names.filter((name) => inputDef(name).widget);
    const pairRows = Math.max(outputs.length, linkInputs.length);
    for (let i = 0; i < pairRows; i++) {
      const row = div("row pair");
      const left = div("slot in-slot"), right = div("slot out-slot");
      if (i < linkInputs.length) {
        const d = inputDef(linkInputs[i]);
        left.append(socket("in", d.type, { node: this.id, input: d.name }), div("slot-name", d.name));
        left.classList.toggle("optional", d.required === false);
        this.rows.set(d.name, left);
      }
      if (i < outputs.length) {
        const o = outputs[i];
        right.append(div("slot-name", o.name), socket("out", o.type, { node: this.id, output: String(i) }));
      }
      row.append(left, right);
      body.append(row);
    }
    for (const name of widgetInputs) {
      const d = inputDef(name);
      const row = div("row widget-row");
      row.dataset.input = name;
      const head = div("widget-head");
      head.append(socket("in", d.type, { node: this.id, input: name }), div("slot-name", name));
      if (d.tooltip) head.title = d.tooltip;
      const linked = !!n.links[name];
      const w = createWidget(d, name in n.values ? n.values[name] : defaultValue(d), (v, final) => this.hooks.onValue(this.id, name, v, final));
      w.el.classList.add("widget");
      row.append(head, w.el);
      if (d.control) {
        const c = controlWidget(n.ui.controls?.[name], (mode) => this.hooks.onControl(this.id, name, mode));
        c.el.classList.add("widget");
        row.append(c.el);
        this.widgets.set(`${name}:control`, c);
      }
      if (d.imageUpload) row.append(this.uploadControls(name));
      row.append(div("row-error"), div("row-note"));
      row.classList.toggle("linked", linked);
      this.widgets.set(name, w);
      this.rows.set(name, row);
      body.append(row);
    }
    this.progressEl = div("node-progress");
    this.progressEl.append(div("node-progress-fill"));
    this.messageEl = div("node-message");
    this.errorEl = div("node-error");
    this.mediaEl = div("node-media");
    body.append(this.progressEl, this.messageEl, this.errorEl, this.mediaEl);
    this.el.append(body);
    this.update();
    if (this.lastStatus) this.applyStatus(this.lastStatus);
  }

  uploadControls(name) {
    const box = div("upload");
    const pick = document.createElement("button");
    pick.type = "button"; pick.className = "upload-button"; pick.textContent = "choose image\u2026";
    const file = document.createElement("input");
    file.type = "file"; file.accept = "image/*"; file.hidden = true; file.className = "upload-file";
    pick.addEventListener("click", () => file.click());
    file.addEventListener("change", () => { if (file.files[0]) this.hooks.onUpload(this.id, name, file.files[0]); file.value = ""; });
    const thumb = document.createElement("img");
    thumb.className = "thumb"; thumb.alt = ""; thumb.hidden = true;
    thumb.addEventListener("error", () => { thumb.hidden = true; });
    thumb.addEventListener("load", () => { thumb.hidden = false; });
    const mask = document.createElement("button");
    mask.type = "button"; mask.className = "mask-button"; mask.textContent = "mask\u2026";
    mask.title = "Paint the region to repaint (saved as the picture's transparency, as ComfyUI's mask editor does)";
    mask.addEventListener("click", () => this.hooks.onMask?.(this.id, name));
    box.append(pick, mask, file, thumb);
    this.thumbs = { ...(this.thumbs || {}), [name]: thumb };
    return box;
  }

  /** Bring widgets, linked states and thumbnails in line with the model. */
  update() {
    const n = this.graph.node(this.id);
    if (!n) return;
    if ([...unchosenOptionInputs(this.graph.def(n.type), n)].join("\n") !== this.optionKey) {
      this.build();  // another option of a dynamic combo: its own inputs replace the last one's
      return;
    }
    this.el.style.left = `${n.pos[0]}px`;
    this.el.style.top = `${n.pos[1]}px`;
    for (const [name, row] of this.rows) {
      if (row.classList.contains("widget-row")) row.classList.toggle("linked", !!n.links[name]);
    }
    for (const s of this.el.querySelectorAll(".socket.in")) s.classList.toggle("connected", !!n.links[s.dataset.input]);
    // A value the editor substituted on load stays marked while it is still in place.
    const notes = this.hooks.notes?.(this.id) || {};
    const inactive = inactiveInputs(this.graph, this.id);
    for (const [name, row] of this.rows) {
      const note = row.querySelector(".row-note");
      if (!note) continue;
      const s = notes[name];
      const on = !!s && s.type === n.type && !n.links[name] && n.values[name] === s.replacement;
      row.classList.toggle("substituted", on);
      row.classList.toggle("inactive", !on && !!inactive[name]);
      note.textContent = on ? `'${s.value}' is not available; using '${s.replacement}'` : inactive[name] || "";
    }
    for (const [key, w] of this.widgets) {
      if (key.endsWith(":control")) w.set(n.ui.controls?.[key.slice(0, -8)]);
      else if (!n.links[key]) {
        const d = this.graph.inputDef(this.id, key);
        w.set(key in n.values || !d ? n.values[key] : defaultValue(d));
      }
    }
    for (const [name, thumb] of Object.entries(this.thumbs || {})) {
      // Only files the server listed (or this page uploaded) get a thumbnail: asking
      // for a name that is not there would only log a 404.
      const d = this.graph.inputDef(this.id, name);
      const v = name in n.values ? n.values[name] : d && defaultValue(d);
      const url = v && (!d?.choices || d.choices.includes(String(v))) ? this.hooks.imageUrl(String(v)) : "";
      if (thumb.dataset.src !== url) {
        thumb.dataset.src = url;
        thumb.hidden = true;
        if (url) thumb.src = url; else thumb.removeAttribute("src");
      }
    }
    const def = this.graph.def(n.type);
    this.el.querySelector(".node-label").textContent = n.title || def?.title || n.type;
    const cls = this.el.classList;
    cls.toggle("bypassed", n.ui.mode === "bypass");
    cls.toggle("muted", n.ui.mode === "mute");
    cls.toggle("collapsed", !!n.ui.collapsed);
    cls.toggle("pinned", !!n.ui.pinned);
    if (n.ui.color) this.el.style.setProperty("--node-color", n.ui.color); else this.el.style.removeProperty("--node-color");
    this.badgeEl.dataset.mode = n.ui.mode === "bypass" ? "bypassed" : n.ui.mode === "mute" ? "muted" : "";
  }

  outputSocket(index) { return this.el.querySelector(`.socket.out[data-output="${index}"]`); }
  inputSocket(name) { return this.el.querySelector(`.socket.in[data-input="${CSS.escape(name)}"]`); }

  // -- run status ---------------------------------------------------------------

  /** @param {{state?:string, progress?:number|null, message?:string, error?:string, inputErrors?:Object<string,string>, images?:string[], preview?:string|null}} s */
  applyStatus(s) {
    this.lastStatus = s;  // build() shows it again when a combo's choice rebuilds the node
    const cls = this.el.classList;
    for (const k of ["running", "cached", "done", "failed", "queued"]) cls.toggle(k, s.state === k);
    this.badgeEl.textContent = s.state === "cached" ? "cached" : s.state === "running" ? "running" : s.state === "failed" ? "failed" : "";
    const p = s.progress;
    this.progressEl.classList.toggle("visible", p !== null && p !== undefined);
    this.progressEl.firstChild.style.width = `${Math.round((p || 0) * 100)}%`;
    this.messageEl.textContent = s.message || "";
    cls.toggle("has-error", !!s.error);
    this.errorEl.textContent = s.error || "";
    for (const [name, row] of this.rows) {
      const msg = s.inputErrors?.[name] || "";
      row.classList.toggle("error", !!msg);
      const re = row.querySelector(".row-error");
      if (re) re.textContent = msg;
    }
    const wanted = s.preview ? [s.preview] : s.images || [];
    const old = [...this.mediaEl.querySelectorAll("img")];
    const have = old.map((i) => i.getAttribute("src"));
    if (JSON.stringify(have) !== JSON.stringify(wanted)) {
      for (const img of old) if (!wanted.includes(img.getAttribute("src"))) releaseBlob(img);
      this.mediaEl.replaceChildren(...wanted.map((src) => {
        const img = document.createElement("img");
        img.src = src; img.alt = s.preview ? "live preview" : "output image";
        img.className = s.preview ? "preview" : "output";
        img.draggable = false;
        return img;
      }));
    }
  }
}
