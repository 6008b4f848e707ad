// The node search palette: type part of a node's name, title or category and
// press Enter (or click) to add it. Opened by double-clicking the canvas, by a
// key, or by dropping a dragged link on empty space (then only nodes that can
// take that link are offered).

import { compatible } from "./types.js";
import { plainText } from "./node_view.js";

/**
 * How well a node matches the typed words; -1 when it does not. Each word must be
 * found in the node's title, type, category or aliases, whole or as a fuzzy
 * subsequence ("ksmp" finds KSampler), or be one of its input or output types
 * ("latent" lists what takes or makes a LATENT). "in:TYPE" and "out:TYPE" ask for
 * that side only. Word starts and exact titles rank first.
 */
export function score(def, words) {
  const hay = `${def.title} ${def.type} ${def.category} ${(def.aliases || []).join(" ")}`.toLowerCase();
  const ins = def.inputs.filter((i) => !i.widget || i.type !== "COMBO").map((i) => i.type.toLowerCase());
  const outs = def.outputs.map((o) => o.type.toLowerCase());
  let s = 0;
  for (const w of words) {
    const side = /^(in|out):(.+)$/.exec(w);
    if (side) {
      if (!(side[1] === "in" ? ins : outs).includes(side[2])) return -1;
      s += 2;
      continue;
    }
    const i = hay.indexOf(w);
    if (i >= 0) { s += i === 0 ? 3 : hay[i - 1] === " " || hay[i - 1] === "/" ? 2 : 1; continue; }
    if (ins.includes(w) || outs.includes(w)) { s += 1; continue; }
    const f = fuzzy(hay, w);
    if (f < 0) return -1;
    s += f;
  }
  if (def.title.toLowerCase() === words.join(" ") || def.type.toLowerCase() === words.join("")) s += 10;
  return s;
}

/** A subsequence match inside one word of `hay`, scored below any plain match (0..0.9); -1 when none. */
function fuzzy(hay, w) {
  if (w.length < 2) return -1;
  let best = -1;
  for (const word of hay.split(/[\s/_-]+/)) {
    let j = 0, gaps = 0, last = -1;
    for (let k = 0; k < word.length && j < w.length; k++) {
      if (word[k] === w[j]) { if (last >= 0 && k > last + 1) gaps++; last = k; j++; }
    }
    if (j === w.length && word[0] === w[0]) best = Math.max(best, 0.9 - Math.min(0.8, gaps * 0.2));
  }
  return best;
}

export class Palette {
  /** @param {HTMLElement} host  @param {() => Map<string, any>} defs */
  constructor(host, defs) {
    this.defs = defs;
    this.el = document.createElement("div");
    this.el.className = "palette";
    this.el.hidden = true;
    this.input = document.createElement("input");
    this.input.type = "search";
    this.input.placeholder = "Add node: a name, category or type (in:LATENT)\u2026";
    this.input.className = "palette-input";
    this.list = document.createElement("ul");
    this.list.className = "palette-list";
    this.el.append(this.input, this.list);
    host.append(this.el);
    this.active = 0;
    this.items = [];
    this.input.addEventListener("input", () => this.refresh());
    this.input.addEventListener("keydown", (e) => this.onKey(e));
    this.input.addEventListener("blur", () => setTimeout(() => { if (!this.el.contains(document.activeElement)) this.close(); }, 120));
  }

  get isOpen() { return !this.el.hidden; }

  /**
   * @param {number[]} clientPos where to show it
   * @param {(type:string, match:object|null) => void} onPick
   * @param {{type:string, forward:boolean}|null} link only offer nodes that can take this link
   */
  open(clientPos, onPick, link = null) {
    this.onPick = onPick;
    this.link = link;
    this.el.hidden = false;
    const w = 320, h = 360;
    const x = Math.min(Math.max(8, clientPos[0]), window.innerWidth - w - 8);
    const y = Math.min(Math.max(8, clientPos[1]), window.innerHeight - h - 8);
    Object.assign(this.el.style, { left: `${x}px`, top: `${y}px` });
    this.input.value = "";
    this.refresh();
    this.input.focus();
  }

  close() { this.el.hidden = true; this.onPick = null; }

  /** Which socket of `def` takes the dragged link, or null. */
  matchFor(def) {
    if (!this.link) return null;
    if (this.link.forward) {
      const inp = def.inputs.find((i) => compatible(this.link.type, i.type) && !(i.widget && this.link.type !== i.type));
      return inp ? { input: inp.name } : null;
    }
    const idx = def.outputs.findIndex((o) => compatible(o.type, this.link.type));
    return idx >= 0 ? { output: idx } : null;
  }

  refresh() {
    const words = this.input.value.toLowerCase().split(/\s+/).filter(Boolean);
    const seen = new Set();
    const rows = [];
    for (const def of this.defs().values()) {
      if (seen.has(def.type)) continue;
      seen.add(def.type);
      const match = this.matchFor(def);
      if (this.link && !match) continue;
      const s = words.length ? score(def, words) : 0;
      if (s < 0) continue;
      rows.push({ def, match, s });
    }
    // Equal scores: everyday nodes before those filed under "advanced" (typing "checkpoint"
    // should offer Load Checkpoint before Save Checkpoint), then by category and title.
    const advanced = (def) => (/^(advanced|_for_testing)(\/|$)/.test(def.category) ? 1 : 0);
    rows.sort((a, b) => b.s - a.s || advanced(a.def) - advanced(b.def) || a.def.category.localeCompare(b.def.category)
      || a.def.title.localeCompare(b.def.title));
    this.items = rows.slice(0, 60);
    this.active = 0;
    if (!this.items.length) {
      const none = document.createElement("li");
      none.className = "palette-empty";
      none.textContent = `Nothing found for \u201c${this.input.value.trim()}\u201d. Try part of a name, a category, or a type (latent, in:IMAGE).`;
      this.list.replaceChildren(none);
      return;
    }
    this.list.replaceChildren(...this.items.map((r, i) => {
      const li = document.createElement("li");
      li.className = "palette-item";
      li.dataset.type = r.def.type;
      const name = document.createElement("span");
      name.className = "palette-name"; name.textContent = r.def.title;
      const cat = document.createElement("span");
      cat.className = "palette-category"; cat.textContent = r.def.category;
      li.append(name, cat);
      li.title = r.def.description ? plainText(r.def.description) : r.def.type;
      li.addEventListener("pointerdown", (e) => { e.preventDefault(); this.pick(i); });
      return li;
    }));
    this.highlight();
  }

  highlight() {
    [...this.list.children].forEach((li, i) => li.classList.toggle("active", i === this.active));
    this.list.children[this.active]?.scrollIntoView({ block: "nearest" });
  }

  onKey(e) {
    if (e.key === "ArrowDown") { this.active = Math.min(this.items.length - 1, this.active + 1); this.highlight(); e.preventDefault(); }
    else if (e.key === "ArrowUp") { this.active = Math.max(0, this.active - 1); this.highlight(); e.preventDefault(); }
    else if (e.key === "Enter") { e.preventDefault(); this.pick(this.active); }
    else if (e.key === "Escape") { e.preventDefault(); this.close(); }
    e.stopPropagation();
  }

  pick(i) {
    const row = this.items[i];
    const cb = this.onPick;
    this.close();
    if (row && cb) cb(row.def.type, row.match);
  }
}
