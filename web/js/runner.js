// Running the graph: submit it, follow the job's events, and show them on the
// canvas (running node, step progress, live previews, cached marks, images,
// errors). The websocket gives the live picture; a slow poll of the job's status
// makes sure the end of a job is seen even if the socket dropped meanwhile.

import { ApiError } from "./api.js";

const TERMINAL = new Set(["succeeded", "failed", "interrupted", "cancelled"]);
const TERMINAL_EVENTS = new Set(["job_finished", "job_failed", "job_interrupted", "job_cancelled"]);

/** Validation errors of a 400 body, in Kiln's list or ComfyUI's node_errors form. */
export function validationErrors(body) {
  if (!body || typeof body !== "object") return [];
  if (Array.isArray(body.errors)) return body.errors;
  const out = [];
  for (const [nodeId, entry] of Object.entries(body.node_errors || {})) {
    for (const e of entry.errors || []) {
      out.push({ ...e, node_id: nodeId, node_type: entry.class_type, input_name: e.input_name || e.extra_info?.input_name });
    }
  }
  if (!out.length && body.error) out.push(typeof body.error === "string" ? { message: body.error } : body.error);
  return out;
}

/** The notice for problems of nodes no output needs: the job runs without them (the server's rule). */
export function notRunNotice(ignored) {
  const nodes = [...new Set(ignored.map((e) => `#${e.node_id}${e.node_type ? ` ${e.node_type}` : ""}`))];
  const first = ignored[0];
  const where = first.input_name ? `${first.input_name}: ` : "";
  return `not run, no output needs ${nodes.length === 1 ? "it" : "them"}: ${nodes.join(", ")} (${where}${first.message})`;
}

export class Runner extends EventTarget {
  /**
   * Run queues: each Run submits a job; the canvas follows one job at a time (the
   * one the server is running, else the oldest of this page's that is waiting),
   * and the queue panel shows the rest.
   * @param {{api:import("./api.js").Api, socket:import("./socket.js").JobSocket, graph:any, view:any,
   *   clientId:string, onCommit():void, onImages(images:object[], nodeId:string):void, toast(msg:string, kind?:string):void}} o
   */
  constructor(o) {
    super();
    Object.assign(this, o);
    this.jobId = null;       // the job the canvas follows
    this.running = false;    // whether that job is still queued or running
    this.mine = [];          // this page's submitted jobs that have not ended, oldest first
    this.submitting = 0;
    this.early = new Map();  // job id -> events that came before the POST answered
    this.total = 0; this.done = new Set();
    this.current = null;
    this.shown = new Set(); this.planned = []; this.started = new Set();
    this.socket.addEventListener("event", (e) => this.onEvent(e.detail));
  }

  /** Whether any job this page submitted is still queued or running. */
  get busy() { return this.mine.length > 0 || this.submitting > 0; }

  emitState(extra = {}) {
    this.dispatchEvent(new CustomEvent("state", { detail: { running: this.running, busy: this.busy, jobId: this.jobId, queued: [...this.mine], ...extra } }));
  }

  progress(text, fraction) { this.dispatchEvent(new CustomEvent("progress", { detail: { text, fraction, jobId: this.jobId } })); }

  /** Submit the graph as it is now; while another job runs, it waits in the server's queue. */
  async run() {
    const workflow = this.graph.toSubmit();
    if (!this.running) {
      this.view.clearStatus(true);
      this.progress("submitting\u2026", 0);
    }
    this.submitting++;
    this.emitState();
    let res;
    try {
      // Previews are opt-in per job, as in ComfyUI (a server started without
      // --preview-method sends none); the editor always wants them. A failing node
      // skips only what needs it: the canvas shows it red and every other branch's
      // results still arrive (keep_going).
      res = await this.api.submit(workflow, this.clientId, { keep_going: true, extra_data: { preview_method: "auto" } });
    } catch (e) {
      this.submitting--;
      this.emitState();
      if (e instanceof ApiError && e.status === 400) this.showValidation(validationErrors(e.body));
      else this.toast(`could not submit: ${e.message}`, "error");
      if (!this.running) this.progress("", 0);
      return null;
    }
    this.submitting--;
    const id = res.job_id || res.prompt_id;
    this.mine.push(id);
    if (res.ignored?.length) this.toast(notRunNotice(res.ignored), "warn");
    if (this.graph.applyControls().length) this.onCommit();
    if (!this.running) this.follow(id);
    else { this.toast("queued: it runs when the current job ends"); this.emitState(); }
    const early = this.early.get(id) || [];
    this.early.delete(id);
    for (const ev of early) this.onEvent(ev);
    return id;
  }

  /** Show this job on the canvas from now on. */
  follow(id) {
    clearTimeout(this.pollTimer);
    if (this.jobId !== id) this.view.clearStatus(true);
    this.jobId = id; this.running = true;
    this.total = 0; this.done = new Set(); this.current = null;
    this.shown = new Set(); this.planned = []; this.started = new Set();
    this.generation = this.graph.generation;
    this.emitState();
    this.progress("queued", 0);
    this.poll();
  }

  /** Stop the job the canvas follows (queued or running). */
  async stop() {
    if (!this.jobId || !this.running) return;
    await this.cancel(this.jobId);
  }

  async cancel(jobId) {
    try { await this.api.cancel(jobId); }
    catch (e) {
      if (e instanceof ApiError && e.status === 409) return; // it ended meanwhile
      try { await this.api.interrupt(); } catch (e2) { this.toast(`could not stop: ${e2.message}`, "error"); }
    }
  }

  /** A job the page no longer waits for (ended, cancelled in the queue panel). */
  forget(jobId) {
    const i = this.mine.indexOf(jobId);
    if (i >= 0) this.mine.splice(i, 1);
  }

  showValidation(errors) {
    const byNode = new Map();
    const loose = [];
    for (const e of errors) {
      if (e.node_id == null || !this.graph.node(e.node_id)) { loose.push(e.message); continue; }
      const id = String(e.node_id);
      const s = byNode.get(id) || { lines: [], inputs: {} };
      s.lines.push(e.input_name ? `${e.input_name}: ${e.message}` : e.message);
      if (e.input_name) s.inputs[e.input_name] = e.message;
      byNode.set(id, s);
    }
    for (const [id, s] of byNode) this.view.setStatus(id, { state: "failed", error: s.lines.join("\n"), inputErrors: s.inputs });
    const count = errors.length;
    this.toast(`the workflow has ${count} problem${count === 1 ? "" : "s"}${loose.length ? ": " + loose.join("; ") : " (marked on the nodes)"}`, "error");
    this.dispatchEvent(new CustomEvent("validation", { detail: { errors } }));
  }

  onEvent(ev) {
    if (!ev || !ev.type || ev.type.startsWith("socket_") || ev.type === "status") return;
    if (!ev.job_id) return;
    if (ev.job_id === this.jobId && this.running) { this.handle(ev); return; }
    if (this.mine.includes(ev.job_id)) {
      // The server moved on to the next of this page's jobs: follow it.
      if (ev.type === "job_started") { this.follow(ev.job_id); this.handle(ev); }
      else if (TERMINAL_EVENTS.has(ev.type)) { this.forget(ev.job_id); this.emitState(); }
      return;
    }
    if (this.submitting) {
      // A job whose POST has not answered yet: keep its events for when it does.
      if (!this.early.has(ev.job_id)) this.early.set(ev.job_id, []);
      this.early.get(ev.job_id).push(ev);
    }
  }

  /** Node status for the followed job, unless the graph was replaced since it was submitted. */
  setStatus(id, status) {
    if (this.graph.generation !== this.generation || !this.graph.node(id)) return;
    this.view.setStatus(id, status);
  }

  updateBar() {
    const step = this.current && this.current.max ? this.current.value / this.current.max : 0;
    const fraction = this.total ? Math.min(1, (this.done.size + step) / this.total) : step;
    let text = `${this.done.size}/${this.total || "?"} nodes`;
    if (this.current && this.current.max) text += ` \u00b7 ${this.current.type || "node"} ${this.current.value}/${this.current.max}`;
    this.progress(text, fraction);
  }

  imagesOf(ui) {
    return (ui && Array.isArray(ui.images) ? ui.images : []).filter((i) => i && i.filename);
  }

  showImages(nodeId, ui) {
    const images = this.imagesOf(ui);
    if (!images.length) return;
    this.setStatus(nodeId, { images: images.map((i) => this.api.viewUrl(i)), preview: null });
    // node_finished and job_finished both report a node's images: show each once.
    const fresh = images.filter((i) => {
      const key = `${i.type}/${i.subfolder || ""}/${i.filename}`;
      if (this.shown.has(key)) return false;
      this.shown.add(key);
      return true;
    });
    if (fresh.length) this.onImages(fresh, nodeId);
  }

  handle(ev) {
    const id = ev.node_id != null ? String(ev.node_id) : null;
    switch (ev.type) {
      case "job_started":
        this.planned = (ev.node_ids || []).map(String);
        this.total = this.planned.length;
        for (const n of ev.node_ids || []) this.setStatus(String(n), { state: "queued", error: "", inputErrors: {}, message: "" });
        this.updateBar();
        break;
      case "nodes_cached":
        for (const n of ev.node_ids || []) { this.setStatus(String(n), { state: "cached" }); this.done.add(String(n)); }
        this.updateBar();
        break;
      case "node_started":
        this.started.add(id);
        this.current = { id, type: ev.node_type, value: 0, max: 0 };
        this.setStatus(id, { state: "running", progress: null, message: "" });
        this.updateBar();
        break;
      case "progress":
        this.current = { id, type: ev.node_type || this.graph.node(id)?.type, value: ev.value, max: ev.max };
        this.setStatus(id, { progress: ev.max ? ev.value / ev.max : null });
        this.updateBar();
        break;
      case "preview":
        // The node view revokes the URL once its image is replaced and settled (node_view.js).
        if (this.graph.generation === this.generation && this.view.views.has(id)) this.setStatus(id, { preview: URL.createObjectURL(ev.blob) });
        break;
      case "node_message":
        this.setStatus(id, { message: ev.message });
        break;
      case "node_finished":
        this.done.add(id);
        this.setStatus(id, { state: ev.cached ? "cached" : "done", progress: null, preview: null });
        this.showImages(id, ev.ui);
        if (this.current?.id === id) this.current = null;
        this.updateBar();
        break;
      case "job_finished":
        for (const [n, ui] of Object.entries(ev.outputs || {})) if (this.graph.node(n)) this.showImages(n, ui);
        this.finish("succeeded");
        break;
      case "node_failed":
        this.markFailed(ev);
        for (const n of ev.blocked || []) this.setStatus(String(n), { state: "", progress: null });
        break;
      case "job_failed": {
        const failures = ev.failures?.length ? ev.failures : [ev];
        for (const f of failures) this.markFailed(f);
        this.finish("failed", failures.length > 1 ? `${failures.length} nodes failed, the first: ${ev.message}` : ev.message);
        break;
      }
      case "job_interrupted":
        this.finish("interrupted");
        break;
      default:
        break;
    }
  }

  /** A failed node's status: red, with its message on the node and on the input it names. */
  markFailed(f) {
    const id = f.node_id != null ? String(f.node_id) : null;
    if (!id || !this.graph.node(id)) return;
    this.setStatus(id, { state: "failed", progress: null, error: f.message,
      inputErrors: f.input_name ? { [f.input_name]: f.message } : {} });
  }

  finish(status, message = "") {
    if (!this.running) return;
    this.running = false;
    this.forget(this.jobId);
    clearTimeout(this.pollTimer);
    if (status === "succeeded") {
      // Planned nodes that never started were not needed: a cached result downstream
      // (or their own) stood in for them, so they count as cached too.
      for (const id of this.planned) if (!this.started.has(id)) this.setStatus(id, { state: "cached" });
    }
    for (const [id, s] of this.view.status) if (s.state === "running" || s.state === "queued") this.setStatus(id, { state: s.state === "running" && status !== "succeeded" ? "failed" : "", progress: null });
    this.progress(status === "succeeded" ? "done" : status, status === "succeeded" ? 1 : 0);
    if (status === "failed") this.toast(`the run failed${message ? ": " + message : ""}`, "error");
    else if (status !== "succeeded") this.toast(`the run was ${status}`, "warn");
    this.emitState({ status, finished: this.jobId });
    // The next of this page's queued jobs, if any: its job_started will confirm it.
    if (this.mine.length) this.follow(this.mine[0]);
  }

  /** The safety net: ask the server how the job stands, now and then. */
  poll() {
    clearTimeout(this.pollTimer);
    const jobId = this.jobId;
    this.pollTimer = setTimeout(async () => {
      if (!this.running || this.jobId !== jobId) return;
      try {
        const job = await this.api.job(jobId);
        if (TERMINAL.has(job.status)) {
          // Give the socket a moment to deliver the same news with its details first.
          await new Promise((r) => setTimeout(r, this.socket.open ? 1500 : 0));
          if (this.running && this.jobId === jobId) this.applyJob(job);
          return;
        }
      } catch { /* server busy or restarting: try again */ }
      this.poll();
    }, 1000);
  }

  applyJob(job) {
    for (const [n, ui] of Object.entries(job.outputs || {})) if (this.graph.node(n)) this.showImages(n, ui);
    if (job.status === "failed" && job.error) {
      this.handle({ type: "job_failed", node_id: job.error.node_id, input_name: job.error.input_name,
        message: job.error.message, failures: job.error.failures });
    } else {
      this.finish(job.status === "succeeded" ? "succeeded" : job.status);
    }
  }
}
