// The right-click menu: a list of actions at the pointer. Each item is
// {label, action, disabled?, checked?} or {swatches: [{color, label, action}]} (a
// row of colour buttons), or "-" for a separator. Escape, a click elsewhere or
// choosing an item closes it.

export class ContextMenu {
  constructor(host) {
    this.host = host;
    this.el = null;
    this.onAway = (e) => { if (this.el && !this.el.contains(e.target)) this.close(); };
    this.onKey = (e) => { if (e.key === "Escape" && this.el) { e.stopPropagation(); this.close(); } };
  }

  get isOpen() { return !!this.el; }

  open(x, y, items) {
    this.close();
    const menu = document.createElement("ul");
    menu.className = "context-menu";
    menu.setAttribute("role", "menu");
    for (const it of items) {
      const li = document.createElement("li");
      if (it === "-") { li.className = "separator"; li.setAttribute("role", "separator"); menu.append(li); continue; }
      if (it.swatches) {
        li.className = "swatches";
        for (const s of it.swatches) {
          const b = document.createElement("button");
          b.type = "button"; b.className = "swatch"; b.title = s.label; b.setAttribute("aria-label", s.label);
          b.style.background = s.color || "transparent";
          b.dataset.color = s.color || "";
          b.addEventListener("click", () => { this.close(); s.action(); });
          li.append(b);
        }
        menu.append(li);
        continue;
      }
      const b = document.createElement("button");
      b.type = "button"; b.className = "menu-item"; b.setAttribute("role", "menuitem");
      b.textContent = (it.checked ? "\u2713 " : "") + it.label;
      b.dataset.action = it.id || it.label;
      b.disabled = !!it.disabled;
      b.addEventListener("click", () => { this.close(); it.action(); });
      li.append(b);
      menu.append(li);
    }
    this.host.append(menu);
    const w = menu.offsetWidth, h = menu.offsetHeight;
    Object.assign(menu.style, { left: `${Math.max(4, Math.min(x, innerWidth - w - 4))}px`, top: `${Math.max(4, Math.min(y, innerHeight - h - 4))}px` });
    this.el = menu;
    setTimeout(() => window.addEventListener("pointerdown", this.onAway, true));
    window.addEventListener("keydown", this.onKey, true);
    menu.querySelector("button:not(:disabled)")?.focus();
  }

  close() {
    this.el?.remove();
    this.el = null;
    window.removeEventListener("pointerdown", this.onAway, true);
    window.removeEventListener("keydown", this.onKey, true);
  }
}
