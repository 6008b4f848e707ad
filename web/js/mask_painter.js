// The mask painter: paint (or erase) the region a LoadImage picture should have
// repainted, over the picture at any zoom, and save it the way ComfyUI's mask
// editor does, so one file serves both programs:
//
//   POST /upload/mask  (multipart)
//     image         the picture as PNG with alpha = 255 - mask (painted = transparent),
//                   named clipspace-mask-<milliseconds>.png
//     original_ref  JSON {filename, subfolder, type} of the picture being masked
//     type          "input"       subfolder  "clipspace"
//
// The server writes that alpha into a copy of the original (its colours and text
// chunks kept), and the LoadImage input becomes "clipspace/<name>"; LoadImage's
// MASK output is then 1 exactly where the painter painted. Reopening the painter on
// such a file reads its alpha back (`/view?...&channel=a`), as ComfyUI's does.
//
// The mask is one canvas at the picture's own size; its alpha is the mask. Strokes
// are hard-edged (a finished stroke is thresholded), so what is painted is exactly
// what LoadImage reports, with no faint antialiased fringe.

import { wheelZoomFactor } from "./zoom.js";
import { split } from "./image_ref.js";

const MASK_RGB = [255, 40, 90];
const UNDO_LIMIT = 40;
const MIN_SIZE = 1, MAX_SIZE = 256;

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function button(cls, text, title) {
  const b = el("button", cls, text);
  b.type = "button";
  if (title) b.title = title;
  return b;
}

function loadImage(url) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the picture could not be loaded"));
    img.src = url;
  });
}

export class MaskPainter {
  /** @param {HTMLElement} host @param {import("./api.js").Api} api */
  constructor(host, api) { this.host = host; this.api = api; this.back = null; }

  get isOpen() { return !!this.back?.isConnected; }

  /**
   * Open on a LoadImage value; resolves to the new value after Save, or null.
   * @param {string} value e.g. "photo.png" or "clipspace/clipspace-mask-1.png [input]"
   */
  async open(value) {
    this.close();
    this.ref = split(value);
    const [rgb, alpha] = await Promise.all([
      loadImage(this.api.viewUrl(this.ref, { channel: "rgb" })),
      loadImage(this.api.viewUrl(this.ref, { channel: "a" })),
    ]);
    this.image = rgb;
    this.build(rgb.naturalWidth, rgb.naturalHeight);
    this.readMask(alpha);
    this.fitView();
    return new Promise((resolve) => { this.resolve = resolve; });
  }

  build(w, h) {
    this.mode = "paint"; this.size = Math.max(MIN_SIZE, Math.round(Math.min(w, h) / 12)); this.undoStack = [];
    const back = el("div", "modal-back mask-painter");
    back.tabIndex = -1;
    const bar = el("div", "mask-bar");
    this.paintBtn = button("mask-paint", "Paint", "Paint the region to repaint (B)");
    this.eraseBtn = button("mask-erase", "Erase", "Erase from the mask (E)");
    const sizeLabel = el("label", "mask-size-label", "Brush ");
    this.sizeInput = el("input", "mask-size");
    Object.assign(this.sizeInput, { type: "range", min: String(MIN_SIZE), max: String(MAX_SIZE), step: "1" });
    this.sizeInput.setAttribute("aria-label", "brush size in pixels ([ and ])");
    this.sizeText = el("span", "mask-size-value");
    sizeLabel.append(this.sizeInput, this.sizeText);
    const invert = button("mask-invert", "Invert", "Swap painted and unpainted (I)");
    const clear = button("mask-clear", "Clear", "Remove the whole mask");
    this.undoBtn = button("mask-undo", "Undo", "Undo the last stroke (Ctrl+Z)");
    const fit = button("mask-fit", "Fit", "Show the whole picture (0)");
    this.info = el("span", "mask-info", `${w}\u00D7${h}`);
    const cancel = button("mask-cancel", "Cancel", "Close without saving (Esc)");
    const save = button("mask-save primary", "Save", "Save the mask into a copy of the picture");
    bar.append(this.paintBtn, this.eraseBtn, sizeLabel, invert, clear, this.undoBtn, fit, this.info, cancel, save);

    this.stage = el("div", "mask-stage");
    this.frame = el("div", "mask-frame");
    const shown = el("img", "mask-image");
    shown.src = this.image.src; shown.alt = "picture"; shown.draggable = false;
    this.canvas = el("canvas", "mask-canvas");
    this.canvas.width = w; this.canvas.height = h;
    this.ctx = this.canvas.getContext("2d", { willReadFrequently: true });
    this.frame.append(shown, this.canvas);
    Object.assign(this.frame.style, { width: `${w}px`, height: `${h}px` });
    this.ring = el("div", "mask-ring");
    this.stage.append(this.frame, this.ring);
    back.append(bar, this.stage);
    this.back = back;
    this.host.append(back);

    this.paintBtn.addEventListener("click", () => this.setMode("paint"));
    this.eraseBtn.addEventListener("click", () => this.setMode("erase"));
    this.sizeInput.addEventListener("input", () => this.setSize(Number(this.sizeInput.value)));
    invert.addEventListener("click", () => this.invert());
    clear.addEventListener("click", () => this.clear());
    this.undoBtn.addEventListener("click", () => this.undo());
    fit.addEventListener("click", () => this.fitView());
    cancel.addEventListener("click", () => this.finish(null));
    save.addEventListener("click", () => this.save());
    back.addEventListener("keydown", (e) => this.onKey(e));
    back.addEventListener("keyup", (e) => { if (e.key === " ") this.spaceHeld = false; });
    this.stage.addEventListener("wheel", (e) => {
      e.preventDefault();
      this.zoomAt(e.clientX, e.clientY, wheelZoomFactor(e));
      this.moveRing(e.clientX, e.clientY);
    }, { passive: false });
    this.stage.addEventListener("pointerdown", (e) => this.onPointerDown(e));
    this.stage.addEventListener("pointermove", (e) => this.moveRing(e.clientX, e.clientY));
    this.stage.addEventListener("pointerleave", () => { this.ring.hidden = true; });
    this.stage.addEventListener("contextmenu", (e) => e.preventDefault());
    this.setMode("paint"); this.setSize(this.size);
    this.updateUndo();
    back.focus();
  }

  // -- the mask -------------------------------------------------------------------

  /** An existing mask from the picture's alpha: transparent = painted. */
  readMask(alphaImage) {
    const { width: w, height: h } = this.canvas;
    const tmp = el("canvas");
    tmp.width = w; tmp.height = h;
    const t = tmp.getContext("2d", { willReadFrequently: true });
    t.drawImage(alphaImage, 0, 0, w, h);
    const src = t.getImageData(0, 0, w, h).data;
    const out = this.ctx.createImageData(w, h);
    for (let i = 0; i < src.length; i += 4) this.setPixel(out.data, i, 255 - src[i + 3] >= 128);
    this.ctx.putImageData(out, 0, 0);
  }

  setPixel(data, i, on) {
    data[i] = MASK_RGB[0]; data[i + 1] = MASK_RGB[1]; data[i + 2] = MASK_RGB[2]; data[i + 3] = on ? 255 : 0;
  }

  /** Every pixel either painted or not (strokes are antialiased while drawn). */
  harden() {
    const { width: w, height: h } = this.canvas;
    const img = this.ctx.getImageData(0, 0, w, h);
    for (let i = 0; i < img.data.length; i += 4) this.setPixel(img.data, i, img.data[i + 3] >= 128);
    this.ctx.putImageData(img, 0, 0);
  }

  /** The mask as 0/1 per pixel, row by row (for tests and callers). */
  maskBits() {
    const { width: w, height: h } = this.canvas;
    const d = this.ctx.getImageData(0, 0, w, h).data;
    const bits = new Array(w * h);
    for (let i = 0; i < bits.length; i++) bits[i] = d[i * 4 + 3] >= 128 ? 1 : 0;
    return bits;
  }

  remember() {
    const { width: w, height: h } = this.canvas;
    this.undoStack.push(this.ctx.getImageData(0, 0, w, h));
    if (this.undoStack.length > UNDO_LIMIT) this.undoStack.shift();
    this.updateUndo();
  }

  undo() {
    const last = this.undoStack.pop();
    if (last) this.ctx.putImageData(last, 0, 0);
    this.updateUndo();
  }

  updateUndo() { if (this.undoBtn) this.undoBtn.disabled = !this.undoStack.length; }

  invert() {
    this.remember();
    const { width: w, height: h } = this.canvas;
    const img = this.ctx.getImageData(0, 0, w, h);
    for (let i = 0; i < img.data.length; i += 4) this.setPixel(img.data, i, img.data[i + 3] < 128);
    this.ctx.putImageData(img, 0, 0);
  }

  clear() {
    this.remember();
    this.ctx.clearRect(0, 0, this.canvas.width, this.canvas.height);
  }

  // -- tools ----------------------------------------------------------------------

  setMode(mode) {
    this.mode = mode;
    this.paintBtn.classList.toggle("active", mode === "paint");
    this.eraseBtn.classList.toggle("active", mode === "erase");
    this.paintBtn.setAttribute("aria-pressed", String(mode === "paint"));
    this.eraseBtn.setAttribute("aria-pressed", String(mode === "erase"));
    this.back.classList.toggle("erasing", mode === "erase");
  }

  setSize(px) {
    this.size = Math.max(MIN_SIZE, Math.min(MAX_SIZE, Math.round(px) || MIN_SIZE));
    this.sizeInput.value = String(this.size);
    this.sizeText.textContent = `${this.size} px`;
    this.sizeRing();
  }

  onKey(e) {
    e.stopPropagation();
    const mod = e.ctrlKey || e.metaKey;
    if (e.target === this.sizeInput && e.key.startsWith("Arrow")) return;
    if (e.key === " ") { e.preventDefault(); this.spaceHeld = true; }
    else if (e.key === "Escape") { e.preventDefault(); this.finish(null); }
    else if (mod && e.key.toLowerCase() === "z") { e.preventDefault(); this.undo(); }
    else if (e.key === "[") this.setSize(this.size / 1.25);
    else if (e.key === "]") this.setSize(this.size * 1.25 + 1);
    else if (e.key.toLowerCase() === "e") this.setMode("erase");
    else if (e.key.toLowerCase() === "b") this.setMode("paint");
    else if (e.key.toLowerCase() === "i") this.invert();
    else if (e.key === "0") this.fitView();
  }

  // -- view -----------------------------------------------------------------------

  fitView() {
    const r = this.stage.getBoundingClientRect();
    const { width: w, height: h } = this.canvas;
    this.scale = Math.max(0.05, Math.min((r.width - 40) / w, (r.height - 40) / h));
    this.offset = [(r.width - w * this.scale) / 2, (r.height - h * this.scale) / 2];
    this.applyTransform();
  }

  zoomAt(clientX, clientY, factor) {
    const r = this.stage.getBoundingClientRect();
    const next = Math.min(64, Math.max(0.05, this.scale * factor));
    const px = clientX - r.left, py = clientY - r.top;
    const k = next / this.scale;
    this.offset = [px - (px - this.offset[0]) * k, py - (py - this.offset[1]) * k];
    this.scale = next;
    this.applyTransform();
  }

  applyTransform() {
    this.frame.style.transform = `translate(${this.offset[0]}px, ${this.offset[1]}px) scale(${this.scale})`;
    // Big pixels stay square when zoomed in: the mask is judged pixel by pixel.
    this.back.classList.toggle("pixelated", this.scale >= 4);
    this.sizeRing();
  }

  sizeRing() {
    if (!this.ring) return;
    const d = this.size * (this.scale || 1);
    Object.assign(this.ring.style, { width: `${d}px`, height: `${d}px` });
  }

  moveRing(clientX, clientY) {
    const r = this.stage.getBoundingClientRect();
    this.ring.hidden = false;
    Object.assign(this.ring.style, { left: `${clientX - r.left}px`, top: `${clientY - r.top}px` });
  }

  /** Client coordinates to picture pixels (fractional), at whatever zoom and pan. */
  toImage(clientX, clientY) {
    const r = this.canvas.getBoundingClientRect();
    return [(clientX - r.left) * this.canvas.width / r.width, (clientY - r.top) * this.canvas.height / r.height];
  }

  onPointerDown(e) {
    if (e.button === 1 || e.button === 2 || (e.button === 0 && (e.altKey || this.spaceHeld))) return this.pan(e);
    if (e.button !== 0) return;
    e.preventDefault();
    this.stage.setPointerCapture?.(e.pointerId);
    this.remember();
    const ctx = this.ctx;
    ctx.save();
    ctx.globalCompositeOperation = this.mode === "erase" ? "destination-out" : "source-over";
    ctx.strokeStyle = ctx.fillStyle = `rgb(${MASK_RGB.join(",")})`;
    ctx.lineWidth = this.size; ctx.lineCap = "round"; ctx.lineJoin = "round";
    let last = this.toImage(e.clientX, e.clientY);
    ctx.beginPath(); ctx.arc(last[0], last[1], this.size / 2, 0, Math.PI * 2); ctx.fill();
    const move = (m) => {
      this.moveRing(m.clientX, m.clientY);
      const p = this.toImage(m.clientX, m.clientY);
      ctx.beginPath(); ctx.moveTo(last[0], last[1]); ctx.lineTo(p[0], p[1]); ctx.stroke();
      last = p;
    };
    const up = () => {
      this.stage.removeEventListener("pointermove", move);
      this.stage.removeEventListener("pointerup", up);
      this.stage.removeEventListener("pointercancel", up);
      ctx.restore();
      this.harden();
    };
    this.stage.addEventListener("pointermove", move);
    this.stage.addEventListener("pointerup", up);
    this.stage.addEventListener("pointercancel", up);
  }

  pan(e) {
    e.preventDefault();
    const start = [e.clientX, e.clientY], origin = [...this.offset];
    this.back.classList.add("panning");
    const move = (m) => {
      this.offset = [origin[0] + m.clientX - start[0], origin[1] + m.clientY - start[1]];
      this.applyTransform();
    };
    const up = () => {
      window.removeEventListener("pointermove", move);
      window.removeEventListener("pointerup", up);
      this.back?.classList.remove("panning");
    };
    window.addEventListener("pointermove", move);
    window.addEventListener("pointerup", up);
  }

  // -- saving ---------------------------------------------------------------------

  /** The picture with alpha = 255 - mask, as ComfyUI's mask editor uploads it. */
  async maskedPicture() {
    const { width: w, height: h } = this.canvas;
    const out = el("canvas");
    out.width = w; out.height = h;
    const c = out.getContext("2d", { willReadFrequently: true });
    c.drawImage(this.image, 0, 0, w, h);
    const img = c.getImageData(0, 0, w, h);
    const mask = this.ctx.getImageData(0, 0, w, h).data;
    for (let i = 0; i < img.data.length; i += 4) img.data[i + 3] = 255 - mask[i + 3];
    c.putImageData(img, 0, 0);
    return new Promise((resolve, reject) => out.toBlob((b) => (b ? resolve(b) : reject(new Error("cannot encode the mask"))), "image/png"));
  }

  async save() {
    if (this.saving) return;
    this.saving = true;
    this.back.classList.add("saving");
    try {
      const blob = await this.maskedPicture();
      const form = new FormData();
      form.append("image", blob, `clipspace-mask-${Date.now()}.png`);
      form.append("original_ref", JSON.stringify(this.ref));
      form.append("type", "input");
      form.append("subfolder", "clipspace");
      const r = await this.api.request("POST", "/upload/mask", form);
      this.finish(r.subfolder ? `${r.subfolder}/${r.name}` : r.name);
    } catch (e) {
      this.info.textContent = `not saved: ${e.message}`;
      this.info.classList.add("error");
    } finally {
      this.saving = false;
      this.back?.classList.remove("saving");
    }
  }

  finish(value) {
    const resolve = this.resolve;
    this.resolve = null;
    this.close();
    resolve?.(value);
  }

  close() { this.back?.remove(); this.back = null; }
}
