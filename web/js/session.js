// Never lose work. The open document's graph, its name, its undo history
// (bounded) and the state it was last saved or opened in are kept in the
// browser's localStorage after every edit, so a reload, a closed tab or a crash
// brings them back as they were. The same record tells whether the document has
// unsaved changes: the modified marker and the warning before leaving the page.

const KEY = "kiln-session-v1";

export class Session {
  /**
   * @param {{history:import("./history.js").History, storage?:Storage, keepUndo?:number, onChange?(dirty:boolean):void}} o
   */
  constructor({ history, storage = globalThis.localStorage, keepUndo = 60, onChange = () => {} }) {
    this.history = history; this.storage = storage; this.keepUndo = keepUndo; this.onChange = onChange;
    this.saved = history.current; // the snapshot the document was opened or saved in
    this.timer = null;
  }

  /** The document's library name (the graph keeps it). */
  get name() { return this.history.target.name; }

  /** Whether the graph differs from what was last opened or saved. */
  get dirty() { return this.history.current !== this.saved; }

  /** The document now matches a file (just opened, or saved under `name`). */
  markSaved(name = this.name) {
    // A save names the document without an undo step of its own.
    this.history.target.name = name;
    this.history.current = this.history.target.snapshot();
    this.saved = this.history.current;
    this.changed();
  }

  /** An edit (or undo, redo) was recorded: tell the page, and store soon. */
  changed() {
    this.onChange(this.dirty);
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.store(), 150);
  }

  /** Write the record now; the undo history is cut shorter until it fits the storage quota. */
  store() {
    clearTimeout(this.timer);
    if (!this.storage) return false;
    const h = this.history;
    for (let keep = this.keepUndo; keep >= 0; keep = keep > 4 ? Math.floor(keep / 2) : keep - 1) {
      const record = {
        version: 1, at: Date.now(), current: h.current, saved: this.saved,
        past: keep ? h.past.slice(-keep) : [], future: keep ? h.future.slice(-keep) : [],
      };
      try { this.storage.setItem(KEY, JSON.stringify(record)); return true; }
      catch { /* over quota: keep fewer steps */ }
    }
    return false;
  }

  /** The stored record, or null when there is none (or it cannot be read). */
  read() {
    try {
      const r = JSON.parse(this.storage?.getItem(KEY) || "null");
      return r && r.version === 1 && typeof r.current === "string" ? r : null;
    } catch { return null; }
  }

  /** Bring back a stored document and its history into `history`'s target; false when there is none. */
  restore() {
    const r = this.read();
    if (!r) return false;
    const h = this.history;
    h.target.restore(r.current);
    h.current = h.target.snapshot();
    h.past = Array.isArray(r.past) ? r.past : [];
    h.future = Array.isArray(r.future) ? r.future : [];
    this.saved = typeof r.saved === "string" ? r.saved : null;
    this.onChange(this.dirty);
    return true;
  }

  /** Ask before the page is left with unsaved changes (the browser shows its own dialog). */
  guardUnload(win = window) {
    win.addEventListener("beforeunload", (e) => {
      this.store();
      if (!this.dirty) return;
      e.preventDefault();
      e.returnValue = "";
    });
    win.addEventListener("pagehide", () => this.store());
  }
}
