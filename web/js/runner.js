// Running the graph: submit it, follow the job's events, and show them on the
// canvas (running node, step progress, live previews, cached marks, images,
// errors). The websocket gives the live picture; a slow poll of the job's status
// makes sure the end of a job is seen even if the socket dropped meanwhile.

import { ApiError } from "./api.js";

const TERMINAL = new Set(["succeeded", "failed", "interrupted", "cancelled"]);

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

export class Runner extends EventTarget {
  /**
   * @param {{api:import("./api.js").Api, socket:import("./socket.js").JobSocket, graph:any, view:any,
   *   clientId:string, onCommit():void, onImages(images:object[], nodeId:string):void, toast(msg:string, kind?:string):void}} o
   */
  constructor(o) {
    super();
    Object.assign(this, o);
    this.jobId = null;
    this.running = false;
    this.pending = new Map(); // job id -> events that came before the POST answered
    this.previewUrls = new Map();
    this.total = 0; this.done = new Set();
    this.current = null;
    this.shown = new Set(); this.planned = []; this.started = new Set();
    this.socket.addEventListener("event", (e) => this.onEvent(e.detail));
  }

  emitState(extra = {}) {
    this.dispatchEvent(new CustomEvent("state", { detail: { running: this.running, jobId: this.jobId, ...extra } }));
  }

  progress(text, fraction) { this.dispatchEvent(new CustomEvent("progress", { detail: { text, fraction } })); }

  async run() {
    if (this.running) { this.toast("a job is already running", "warn"); return null; }
    this.view.clearStatus(true);
    const workflow = this.graph.toKiln();
    this.running = true; this.jobId = null; this.total = 0; this.done = new Set(); this.current = null;
    this.shown = new Set(); this.planned = []; this.started = new Set();
    this.emitState();
    this.progress("submitting\u2026", 0);
    let res;
    try {
      // Previews are opt-in per job, as in ComfyUI (a server started without
      // --preview-method sends none); the editor always wants them.
      res = await this.api.submit(workflow, this.clientId, { extra_data: { preview_method: "auto" } });
    } catch (e) {
      this.running = false;
      this.emitState();
      if (e instanceof ApiError && e.status === 400) this.showValidation(validationErrors(e.body));
      else this.toast(`could not submit: ${e.message}`, "error");
      this.progress("", 0);
      return null;
    }
    this.jobId = res.job_id || res.prompt_id;
    this.emitState();
    if (this.graph.applyControls().length) this.onCommit();
    for (const ev of this.pending.get(this.jobId) || []) this.handle(ev);
    this.pending.clear();
    this.poll();
    return this.jobId;
  }

  async stop() {
    if (!this.jobId || !this.running) return;
    try { await this.api.cancel(this.jobId); }
    catch { try { await this.api.interrupt(); } catch (e) { this.toast(`could not stop: ${e.message}`, "error"); } }
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
    if (this.jobId === null && this.running) {
      if (!this.pending.has(ev.job_id)) this.pending.set(ev.job_id, []);
      this.pending.get(ev.job_id).push(ev);
      return;
    }
    if (ev.job_id === this.jobId) this.handle(ev);
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
    this.view.setStatus(nodeId, { images: images.map((i) => this.api.viewUrl(i)), preview: null });
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
        for (const n of ev.node_ids || []) this.view.setStatus(String(n), { state: "queued", error: "", inputErrors: {}, message: "" });
        this.updateBar();
        break;
      case "nodes_cached":
        for (const n of ev.node_ids || []) { this.view.setStatus(String(n), { state: "cached" }); this.done.add(String(n)); }
        this.updateBar();
        break;
      case "node_started":
        this.started.add(id);
        this.current = { id, type: ev.node_type, value: 0, max: 0 };
        this.view.setStatus(id, { state: "running", progress: null, message: "" });
        this.updateBar();
        break;
      case "progress":
        this.current = { id, type: ev.node_type || this.graph.node(id)?.type, value: ev.value, max: ev.max };
        this.view.setStatus(id, { progress: ev.max ? ev.value / ev.max : null });
        this.updateBar();
        break;
      case "preview": {
        const url = URL.createObjectURL(ev.blob);
        const old = this.previewUrls.get(id);
        if (old) URL.revokeObjectURL(old);
        this.previewUrls.set(id, url);
        this.view.setStatus(id, { preview: url });
        break;
      }
      case "node_message":
        this.view.setStatus(id, { message: ev.message });
        break;
      case "node_finished":
        this.done.add(id);
        this.view.setStatus(id, { state: ev.cached ? "cached" : "done", progress: null, preview: null });
        this.showImages(id, ev.ui);
        if (this.current?.id === id) this.current = null;
        this.updateBar();
        break;
      case "job_finished":
        for (const [n, ui] of Object.entries(ev.outputs || {})) if (this.graph.node(n)) this.showImages(n, ui);
        this.finish("succeeded");
        break;
      case "job_failed":
        if (id && this.graph.node(id)) {
          this.view.setStatus(id, { state: "failed", progress: null, error: ev.message,
            inputErrors: ev.input_name ? { [ev.input_name]: ev.message } : {} });
        }
        this.finish("failed", ev.message);
        break;
      case "job_interrupted":
        this.finish("interrupted");
        break;
      default:
        break;
    }
  }

  finish(status, message = "") {
    if (!this.running) return;
    this.running = false;
    clearTimeout(this.pollTimer);
    if (status === "succeeded") {
      // Planned nodes that never started were not needed: a cached result downstream
      // (or their own) stood in for them, so they count as cached too.
      for (const id of this.planned) if (!this.started.has(id)) this.view.setStatus(id, { state: "cached" });
    }
    for (const [id, s] of this.view.status) if (s.state === "running" || s.state === "queued") this.view.setStatus(id, { state: s.state === "running" && status !== "succeeded" ? "failed" : "", progress: null });
    for (const url of this.previewUrls.values()) URL.revokeObjectURL(url);
    this.previewUrls.clear();
    this.progress(status === "succeeded" ? "done" : status, status === "succeeded" ? 1 : 0);
    if (status === "failed") this.toast(`the run failed${message ? ": " + message : ""}`, "error");
    else if (status !== "succeeded") this.toast(`the run was ${status}`, "warn");
    this.emitState({ status });
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
      this.handle({ type: "job_failed", node_id: job.error.node_id, input_name: job.error.input_name, message: job.error.message });
    } else {
      this.finish(job.status === "succeeded" ? "succeeded" : job.status);
    }
  }
}
