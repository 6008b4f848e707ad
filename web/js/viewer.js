// The result viewer: one image large, wheel to zoom at the pointer, drag to pan,
// arrows (or the buttons) for the previous and next result, Esc to close, and an
// A/B compare: a second image under the first, revealed by a slider, to see what
// a strength or a seed changed — B is the result's own input picture (what the run
// started from) or another result.

import { wheelZoomFactor } from "./zoom.js";

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

export class Viewer {
  /** @param {HTMLElement} host */
  constructor(host) { this.host = host; this.back = null; }

  get isOpen() { return !!this.back?.isConnected; }

  /**
   * @param {{url:string, name:string, inputs?:{url:string, name:string}[]}[]} items newest first;
   *   `inputs` are the pictures the item's job loaded (B can be one of them)
   * @param {number} index the one to show
   */
  open(items, index = 0) {
    this.close();
    this.items = items; this.index = index; this.compareWith = null;
    this.scale = 1; this.offset = [0, 0];
    const back = el("div", "modal-back viewer");
    back.tabIndex = -1;
    const bar = el("div", "viewer-bar");
    const prev = el("button", "viewer-prev", "\u25C0");
    prev.type = "button"; prev.title = "Previous result (\u2190)"; prev.setAttribute("aria-label", "previous result");
    const next = el("button", "viewer-next", "\u25B6");
    next.type = "button"; next.title = "Next result (\u2192)"; next.setAttribute("aria-label", "next result");
    this.caption = el("a", "viewer-name");
    this.caption.target = "_blank";
    const compare = el("button", "viewer-compare", "A/B");
    compare.type = "button"; compare.title = "Compare with the input picture or another result: the slider reveals it (B picks which)";
    this.pickB = el("select", "viewer-b");
    this.pickB.title = "The image to compare with";
    this.pickB.hidden = true;
    const close = el("button", "viewer-close", "\u00D7");
    close.type = "button"; close.title = "Close (Esc)"; close.setAttribute("aria-label", "close");
    bar.append(prev, next, this.caption, compare, this.pickB, close);

    this.stage = el("div", "viewer-stage");
    this.frame = el("div", "viewer-frame");
    this.imgB = el("img", "viewer-img-b"); this.imgB.alt = "B"; this.imgB.hidden = true; this.imgB.draggable = false;
    this.imgA = el("img", "viewer-img"); this.imgA.alt = "result"; this.imgA.draggable = false;
    this.frame.append(this.imgB, this.imgA);
    this.stage.append(this.frame);
    this.slider = el("input", "viewer-slider");
    Object.assign(this.slider, { type: "range", min: "0", max: "100", value: "50" });
    this.slider.setAttribute("aria-label", "A/B split");
    this.slider.hidden = true;
    back.append(bar, this.stage, this.slider);
    this.back = back;
    this.host.append(back);

    prev.addEventListener("click", () => this.step(-1));
    next.addEventListener("click", () => this.step(1));
    close.addEventListener("click", () => this.close());
    compare.addEventListener("click", () => this.toggleCompare());
    this.pickB.addEventListener("change", () => { this.compareWith = this.pickB.value; this.show(); });
    this.slider.addEventListener("input", () => this.applySplit());
    back.addEventListener("keydown", (e) => {
      e.stopPropagation();
      if (e.target === this.slider && (e.key === "ArrowLeft" || e.key === "ArrowRight")) return;
      if (e.key === "Escape") { e.preventDefault(); this.close(); }
      else if (e.key === "ArrowLeft") { e.preventDefault(); this.step(-1); }
      else if (e.key === "ArrowRight") { e.preventDefault(); this.step(1); }
      else if (e.key === "0") { this.scale = 1; this.offset = [0, 0]; this.applyTransform(); }
    });
    this.stage.addEventListener("wheel", (e) => {
      e.preventDefault();
      const r = this.stage.getBoundingClientRect();
      const px = e.clientX - r.left - r.width / 2, py = e.clientY - r.top - r.height / 2;
      const next = Math.min(16, Math.max(0.25, this.scale * wheelZoomFactor(e)));
      const k = next / this.scale;
      this.offset = [px - (px - this.offset[0]) * k, py - (py - this.offset[1]) * k];
      this.scale = next;
      this.applyTransform();
    }, { passive: false });
    this.stage.addEventListener("pointerdown", (e) => {
      if (e.button !== 0) return;
      e.preventDefault();
      const start = [e.clientX, e.clientY], origin = [...this.offset];
      let moved = false;
      const move = (m) => {
        moved = moved || Math.hypot(m.clientX - start[0], m.clientY - start[1]) > 3;
        this.offset = [origin[0] + m.clientX - start[0], origin[1] + m.clientY - start[1]];
        this.applyTransform();
      };
      const up = () => {
        window.removeEventListener("pointermove", move); window.removeEventListener("pointerup", up);
        if (!moved && e.target === this.stage) this.close(); // a click beside the image closes
      };
      window.addEventListener("pointermove", move); window.addEventListener("pointerup", up);
    });
    this.show();
    back.focus();
  }

  close() { this.back?.remove(); this.back = null; }

  step(d) {
    if (!this.items.length) return;
    this.index = (this.index + d + this.items.length) % this.items.length;
    this.show();
  }

  /** What B can be for the shown result: its input pictures first, then the other results. */
  candidates() {
    const it = this.items[this.index];
    return [
      ...(it.inputs || []).map((x, i) => ({ key: `in:${i}`, url: x.url, label: `B: input ${x.name}` })),
      ...this.items.map((x, i) => ({ key: `res:${i}`, url: x.url, label: `B: ${x.name}` })).filter((c) => c.key !== `res:${this.index}`),
    ];
  }

  /** A/B on: against the result's input when it has one (input vs result), else the next result. */
  toggleCompare() {
    if (this.compareWith === null) {
      const c = this.candidates();
      if (!c.length) return;
      this.compareWith = c[0].key;
    } else this.compareWith = null;
    this.show();
  }

  show() {
    const it = this.items[this.index];
    this.imgA.src = it.url;
    this.caption.textContent = `${it.name} (${this.index + 1}/${this.items.length})`;
    this.caption.href = it.url;
    const options = this.candidates();
    // Stepping to a result without that input (or onto B itself) picks B again.
    if (this.compareWith !== null && !options.some((c) => c.key === this.compareWith)) this.compareWith = options[0]?.key ?? null;
    const b = options.find((c) => c.key === this.compareWith);
    this.back.classList.toggle("comparing", !!b);
    this.imgB.hidden = this.slider.hidden = this.pickB.hidden = !b;
    if (b) {
      this.imgB.src = b.url;
      this.pickB.replaceChildren(...options.map((c) => {
        const o = el("option", "", c.label); o.value = c.key; o.selected = c.key === this.compareWith; return o;
      }));
    }
    this.applySplit();
    this.applyTransform();
  }

  /** A shows left of the split, B right of it. */
  applySplit() {
    const v = this.compareWith === null ? 100 : Number(this.slider.value);
    this.imgA.style.clipPath = v >= 100 ? "" : `inset(0 ${100 - v}% 0 0)`;
  }

  applyTransform() {
    this.frame.style.transform = `translate(${this.offset[0]}px, ${this.offset[1]}px) scale(${this.scale})`;
  }
}
