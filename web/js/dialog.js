// Small modal dialogs (pick from a list, ask for a name) and toasts, in the page
// rather than window.prompt, so they look like the editor and tests can drive them.

export class Dialogs {
  constructor(host) {
    this.host = host;
    this.toasts = document.createElement("div");
    this.toasts.className = "toasts";
    host.append(this.toasts);
  }

  toast(message, kind = "info", ms = 4000) {
    const t = document.createElement("div");
    t.className = `toast ${kind}`;
    t.textContent = message;
    t.setAttribute("role", kind === "error" ? "alert" : "status");
    this.toasts.append(t);
    setTimeout(() => t.remove(), kind === "error" ? ms * 2 : ms);
  }

  /**
   * A warning that stays until dismissed (or a minute): it says what the editor changed for the user.
   * A notice with the same `key` replaces the one shown before, so reopening a file does not stack copies.
   */
  notice(title, lines, ms = 60000, key = title) {
    for (const old of this.toasts.querySelectorAll(".toast.notice")) if (old.dataset.key === key) old.remove();
    const t = document.createElement("div");
    t.className = "toast warn notice";
    t.dataset.key = key;
    t.setAttribute("role", "alert");
    const body = document.createElement("div");
    const head = document.createElement("strong");
    head.textContent = title;
    const list = document.createElement("ul");
    list.append(...lines.map((line) => { const li = document.createElement("li"); li.textContent = line; return li; }));
    body.append(head, list);
    const close = document.createElement("button");
    close.type = "button"; close.className = "notice-close"; close.textContent = "\u00D7";
    close.setAttribute("aria-label", "dismiss");
    close.addEventListener("click", () => t.remove());
    t.append(body, close);
    this.toasts.append(t);
    setTimeout(() => t.remove(), ms);
    return t;
  }

  modal(title) {
    const back = document.createElement("div");
    back.className = "modal-back";
    const box = document.createElement("div");
    box.className = "modal";
    box.setAttribute("role", "dialog");
    const h = document.createElement("h2");
    h.textContent = title;
    box.append(h);
    back.append(box);
    this.host.append(back);
    const close = () => back.remove();
    back.addEventListener("pointerdown", (e) => { if (e.target === back) close(); });
    back.addEventListener("keydown", (e) => { if (e.key === "Escape") close(); e.stopPropagation(); });
    return { box, close };
  }

  choose(title, items, onPick) {
    const { box, close } = this.modal(title);
    const list = document.createElement("ul");
    list.className = "modal-list";
    if (!items.length) { const li = document.createElement("li"); li.textContent = "(none)"; list.append(li); }
    for (const it of items) {
      const li = document.createElement("li");
      const b = document.createElement("button");
      b.type = "button"; b.className = "modal-item"; b.dataset.value = it.value;
      b.textContent = it.label;
      if (it.detail) { const d = document.createElement("span"); d.className = "detail"; d.textContent = it.detail; b.append(d); }
      b.addEventListener("click", () => { close(); onPick(it.value); });
      li.append(b);
      list.append(li);
    }
    box.append(list);
    list.querySelector("button")?.focus();
  }

  /** Ask yes or no in the page; resolves true only for the OK button. */
  confirm(title, text, ok = "OK", cancelLabel = "Cancel") {
    return new Promise((resolve) => {
      const { box, close } = this.modal(title);
      box.classList.add("confirm");
      if (text) { const p = document.createElement("p"); p.textContent = text; box.append(p); }
      const row = document.createElement("div");
      row.className = "modal-buttons";
      const yes = document.createElement("button");
      yes.type = "button"; yes.className = "primary modal-ok"; yes.textContent = ok;
      const no = document.createElement("button");
      no.type = "button"; no.className = "modal-cancel"; no.textContent = cancelLabel;
      row.append(no, yes);
      box.append(row);
      let done = false;
      const finish = (v) => { if (!done) { done = true; close(); resolve(v); } };
      yes.addEventListener("click", () => finish(true));
      no.addEventListener("click", () => finish(false));
      box.parentElement.addEventListener("keydown", (e) => { if (e.key === "Escape") finish(false); });
      new MutationObserver((_, obs) => { if (!box.isConnected) { obs.disconnect(); finish(false); } }).observe(this.host, { childList: true });
      yes.focus();
    });
  }

  prompt(title, value = "") {
    return new Promise((resolve) => {
      const { box, close } = this.modal(title);
      const form = document.createElement("form");
      const input = document.createElement("input");
      input.type = "text"; input.value = value; input.className = "modal-input";
      const ok = document.createElement("button");
      ok.type = "submit"; ok.textContent = "OK";
      const cancel = document.createElement("button");
      cancel.type = "button"; cancel.textContent = "Cancel";
      form.append(input, ok, cancel);
      box.append(form);
      let done = false;
      const finish = (v) => { if (!done) { done = true; close(); resolve(v); } };
      form.addEventListener("submit", (e) => { e.preventDefault(); finish(input.value.trim()); });
      cancel.addEventListener("click", () => finish(null));
      box.parentElement.addEventListener("keydown", (e) => { if (e.key === "Escape") finish(null); });
      new MutationObserver((_, obs) => { if (!box.isConnected) { obs.disconnect(); finish(null); } }).observe(this.host, { childList: true });
      input.focus(); input.select();
    });
  }
}
