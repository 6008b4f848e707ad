// The queue panel: this server's queued and running jobs (from every client),
// the running one with its progress, a cancel button on each, and Clear to
// cancel everything still waiting. It re-reads the queue when the server says
// the queue changed (the websocket's status message) and when this page
// submits or finishes a job.

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

export class QueuePanel extends EventTarget {
  /** @param {{list:HTMLElement, clear:HTMLElement, count:HTMLElement, api:any, runner:any, toast(m:string,k?:string):void}} o */
  constructor(o) {
    super();
    Object.assign(this, o);
    this.jobs = [];
    this.clear.addEventListener("click", () => this.clearAll());
    this.runner.addEventListener("progress", (e) => this.showProgress(e.detail));
  }

  async refresh() {
    if (this.loading) { this.again = true; return; }
    this.loading = true;
    try { this.jobs = await this.api.jobs("queued,running"); }
    catch { /* the server is restarting: the next status message refreshes */ }
    finally { this.loading = false; }
    this.render();
    if (this.again) { this.again = false; this.refresh(); }
  }

  render() {
    const mine = new Set(this.runner.mine);
    this.count.textContent = this.jobs.length ? String(this.jobs.length) : "";
    this.clear.disabled = !this.jobs.some((j) => j.status === "queued");
    const rows = this.jobs.map((job, i) => {
      const row = el("div", `queue-item ${job.status}`);
      row.dataset.job = job.id;
      const label = el("span", "queue-label", `${job.status === "running" ? "running" : `#${i + 1} waiting`}${mine.has(job.id) ? "" : " (another client)"}`);
      label.title = job.id;
      const cancel = el("button", "queue-cancel icon", "\u00D7");
      cancel.type = "button";
      cancel.title = job.status === "running" ? "Stop this job" : "Remove from the queue";
      cancel.setAttribute("aria-label", cancel.title);
      cancel.addEventListener("click", () => this.cancel(job.id));
      const bar = el("div", "queue-bar");
      bar.append(el("div", "queue-bar-fill"));
      row.append(label, cancel, bar);
      return row;
    });
    if (!rows.length) rows.push(el("p", "empty", "Nothing queued. Run while a job runs to queue another."));
    this.list.replaceChildren(...rows);
    if (this.lastProgress) this.showProgress(this.lastProgress);
  }

  showProgress(p) {
    this.lastProgress = p;
    const row = p.jobId && this.list.querySelector(`.queue-item[data-job="${CSS.escape(p.jobId)}"]`);
    if (!row) return;
    row.querySelector(".queue-bar-fill").style.width = `${Math.round((p.fraction || 0) * 100)}%`;
    row.querySelector(".queue-bar").title = p.text || "";
  }

  async cancel(jobId) {
    await this.runner.cancel(jobId);
    if (jobId !== this.runner.jobId) this.runner.forget(jobId);
    await this.refresh();
  }

  async clearAll() {
    try { await this.api.clearQueue(); }
    catch (e) { this.toast(`cannot clear the queue: ${e.message}`, "error"); return; }
    for (const j of this.jobs) if (j.status === "queued" && j.id !== this.runner.jobId) this.runner.forget(j.id);
    await this.refresh();
  }
}
