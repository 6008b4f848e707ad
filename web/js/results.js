// The results panel, fed by the server's history: every finished job, newest
// first, with thumbnails of its images, so results of earlier runs (and of
// earlier page loads, or other tabs) are there after a reload. A job's graph can
// be opened again, and a job can be deleted from the history.

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

/** The saved images of a job's outputs (previews in the temp folder are not kept, so not listed). */
export function jobImages(job) {
  const out = [];
  for (const ui of Object.values(job.outputs || {})) {
    for (const img of (ui && Array.isArray(ui.images) ? ui.images : [])) {
      if (img && img.filename && (img.type || "output") === "output") out.push(img);
    }
  }
  return out;
}

function when(seconds) {
  if (!seconds) return "";
  const d = new Date(typeof seconds === "number" ? seconds * 1000 : seconds);
  return Number.isNaN(d.getTime()) ? "" : d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

export class Results {
  /**
   * @param {{list:HTMLElement, api:any, viewer:import("./viewer.js").Viewer, onOpenJob(jobId:string):void,
   *   toast(m:string,k?:string):void, limit?:number}} o
   */
  constructor(o) {
    Object.assign(this, { limit: 30 }, o);
    this.jobs = [];
  }

  async refresh() {
    let jobs;
    try { jobs = await this.api.history(this.limit); }
    catch (e) { this.toast(`cannot read the history: ${e.message}`, "error"); return; }
    this.jobs = jobs;
    this.render();
  }

  /** Every image listed, newest first, as the viewer takes them. */
  images() {
    const out = [];
    for (const job of this.jobs) {
      // The pictures the job loaded, for the viewer's A/B "input vs result".
      const inputs = (job.input_images || []).map((img) => ({ url: this.api.viewUrl(img), name: img.filename }));
      for (const img of jobImages(job)) out.push({ url: this.api.viewUrl(img), name: img.filename, job: job.id, inputs });
    }
    return out;
  }

  render() {
    const all = this.images();
    const cards = this.jobs.map((job) => {
      const card = el("div", `result-job ${job.status}`);
      card.dataset.job = job.id;
      const head = el("div", "result-head");
      const label = el("span", "result-label", `${when(job.finished)} ${job.status === "succeeded" ? "" : job.status}`.trim());
      label.title = job.error?.message || job.id;
      const open = el("button", "result-open icon", "\u21BA");
      open.type = "button"; open.title = "Open this run's graph"; open.setAttribute("aria-label", "open this run's graph");
      open.addEventListener("click", () => this.onOpenJob(job.id));
      const del = el("button", "result-delete icon", "\u00D7");
      del.type = "button"; del.title = "Delete from the history"; del.setAttribute("aria-label", "delete from the history");
      del.addEventListener("click", () => this.remove(job.id));
      head.append(label, open, del);
      const thumbs = el("div", "gallery");
      for (const img of jobImages(job)) {
        const url = this.api.viewUrl(img);
        const a = el("a", "gallery-item");
        a.href = url; a.target = "_blank"; a.title = img.filename;
        const t = el("img");
        t.src = url; t.alt = img.filename; t.loading = "lazy"; t.draggable = false;
        a.append(t);
        a.addEventListener("click", (e) => { e.preventDefault(); this.viewer.open(all, all.findIndex((x) => x.url === url)); });
        thumbs.append(a);
      }
      card.append(head, thumbs);
      return card;
    });
    if (!cards.length) cards.push(el("p", "empty", "No results yet: Run (Ctrl+Enter) makes one."));
    this.list.replaceChildren(...cards);
  }

  async remove(jobId) {
    try { await this.api.deleteHistory([jobId]); }
    catch (e) { this.toast(`cannot delete: ${e.message}`, "error"); return; }
    await this.refresh();
  }
}
