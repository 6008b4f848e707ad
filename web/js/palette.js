// The node search palette: type part of a node's name, title or category and
// press Enter (or click) to add it. Opened by double-clicking the canvas, by a
// key, or by dropping a dragged link on empty space (then only nodes that can
// take that link are offered).

import { compatible } from "./types.js";

function score(def, words) {
  const hay = `${def.title} ${def.type} ${def.category} ${(def.aliases || []).join(" ")}`.toLowerCase();
  let s = 0;
  for (const w of words) {
    const i = hay.indexOf(w);
    if (i < 0) return -1;
    s += i === 0 ? 3 : hay[i - 1] === " " || hay[i - 1] === "/" ? 2 : 1;
  }
  if (def.title.toLowerCase() === words.join(" ") || def.type.toLowerCase() === words.join("")) s += 10;
  return s;
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
    this.input.placeholder = "Add node: type a name or category\u2026";
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
    rows.sort((a, b) => b.s - a.s || a.def.category.localeCompare(b.def.category) || a.def.title.localeCompare(b.def.title));
    this.items = rows.slice(0, 60);
    this.active = 0;
    this.list.replaceChildren(...this.items.map((r, i) => {
      const li = document.createElement("li");
      li.className = "palette-item";
      li.dataset.type = r.def.type;
      const name = document.createElement("span");
      name.className = "palette-name"; name.textContent = r.def.title;
      const cat = document.createElement("span");
      cat.className = "palette-category"; cat.textContent = r.def.category;
      li.append(name, cat);
      li.title = r.def.description || r.def.type;
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
