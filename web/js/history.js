// Undo and redo as whole-graph snapshots. Workflows are small (tens of nodes),
// so a snapshot per edit costs little and makes "undo restores exactly" hold
// by construction instead of by every edit knowing its own inverse.

export class History {
  /** @param {{snapshot(): string, restore(s: string): void}} target */
  constructor(target, limit = 200) {
    this.target = target;
    this.limit = limit;
    this.past = [];
    this.future = [];
    this.current = target.snapshot();
  }

  /** Record the target's state after an edit; a no-op when nothing changed. */
  commit() {
    const now = this.target.snapshot();
    if (now === this.current) return false;
    this.past.push(this.current);
    if (this.past.length > this.limit) this.past.shift();
    this.current = now;
    this.future = [];
    return true;
  }

  /** Forget the history (a freshly opened document) but keep its state as the base. */
  reset() {
    this.past = []; this.future = [];
    this.current = this.target.snapshot();
  }

  get canUndo() { return this.past.length > 0; }
  get canRedo() { return this.future.length > 0; }

  undo() {
    this.commit(); // an edit in progress counts before it is undone
    if (!this.past.length) return false;
    this.future.push(this.current);
    this.current = this.past.pop();
    this.target.restore(this.current);
    return true;
  }

  redo() {
    if (!this.future.length) return false;
    this.past.push(this.current);
    this.current = this.future.pop();
    this.target.restore(this.current);
    return true;
  }
}
