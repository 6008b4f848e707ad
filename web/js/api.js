// The server's HTTP routes, as the editor uses them. Every call goes through
// `request`, so a token (for a server started with one) is added in one place.

import { split } from "./image_ref.js";

export class ApiError extends Error {
  constructor(status, body, message) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

export class Api {
  constructor(base = "", token = null) {
    this.base = base.replace(/\/$/, "");
    this.token = token;
  }

  headers(extra = {}) {
    return this.token ? { ...extra, Authorization: `Bearer ${this.token}` } : extra;
  }

  async request(method, path, body, { raw = false } = {}) {
    const init = { method, headers: this.headers() };
    if (body instanceof FormData) init.body = body;
    else if (body !== undefined) {
      init.body = JSON.stringify(body);
      init.headers["Content-Type"] = "application/json";
    }
    const res = await fetch(this.base + path, init);
    if (raw) return res;
    const text = await res.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch { data = text; }
    if (!res.ok) {
      const msg = (data && (data.error?.message || data.message || (typeof data.error === "string" && data.error)))
        || `${method} ${path}: HTTP ${res.status}`;
      throw new ApiError(res.status, data, msg);
    }
    return data;
  }

  /** Node definitions: Kiln's schemas, or ComfyUI's /object_info from a plain ComfyUI-compatible server. */
  async nodes() {
    try { return await this.request("GET", "/api/nodes"); }
    catch (e) { if (e.status === 404) return this.request("GET", "/object_info"); throw e; }
  }

  submit(workflow, clientId, opts = {}) {
    return this.request("POST", "/api/jobs", { workflow, client_id: clientId, ...opts });
  }

  job(id) { return this.request("GET", `/api/jobs/${encodeURIComponent(id)}`); }
  cancel(id) { return this.request("POST", `/api/jobs/${encodeURIComponent(id)}/cancel`, {}); }
  interrupt() { return this.request("POST", "/interrupt", {}); }

  /** Jobs by status ("queued,running"), active ones first in run order. */
  async jobs(status) {
    const data = await this.request("GET", `/api/jobs?${new URLSearchParams({ status, limit: "200" })}`);
    return data?.jobs || [];
  }

  /** Finished jobs, newest first (the server keeps them across restarts). */
  async history(limit = 30) {
    const data = await this.request("GET", `/api/history?${new URLSearchParams({ limit: String(limit) })}`);
    return data?.jobs || [];
  }

  deleteHistory(ids) { return this.request("POST", "/history", { delete: ids }); }
  clearQueue() { return this.request("POST", "/queue", { clear: true }); }

  async workflows() {
    const data = await this.request("GET", "/api/workflows");
    const list = Array.isArray(data) ? data : data?.workflows || [];
    return list.map((w) => (typeof w === "string" ? { name: w } : w));
  }

  async workflow(name) {
    const data = await this.request("GET", `/api/workflows/${encodeURIComponent(name)}`);
    // The document itself, or wrapped with its metadata.
    return data && !data.nodes && data.workflow ? data.workflow : data;
  }

  /** A ComfyUI editor file as a Kiln document, converted by the server (the one converter). */
  convertComfyUi(doc) { return this.request("POST", "/api/convert/comfyui", doc); }

  /** ComfyUI's API format of a document, as it would run (bypassed and muted nodes applied by the server). */
  toApiFormat(doc) { return this.request("POST", "/api/convert/api", doc); }

  saveWorkflow(name, doc) { return this.request("PUT", `/api/workflows/${encodeURIComponent(name)}`, doc); }

  /** Upload an input image; returns the value a LoadImage input takes. */
  async upload(file) {
    const form = new FormData();
    form.append("image", file, file.name || "image.png");
    form.append("type", "input");
    const r = await this.request("POST", "/upload/image", form);
    return r.subfolder ? `${r.subfolder}/${r.name}` : r.name;
  }

  /** URL of an image the server holds ({filename, subfolder, type}); `extra` adds e.g. {channel: "a"}. */
  viewUrl(image, extra = {}) {
    const q = new URLSearchParams({ filename: image.filename, subfolder: image.subfolder || "", type: image.type || "output", ...extra });
    if (this.token) q.set("token", this.token);
    return `${this.base}/view?${q}`;
  }

  /** URL of a LoadImage value (a name in the input folder, maybe with a subfolder or ComfyUI's " [input]"). */
  inputUrl(value) { return this.viewUrl(split(value)); }

  socketUrl(clientId) {
    const u = new URL(this.base || window.location.origin, window.location.href);
    u.protocol = u.protocol === "https:" ? "wss:" : "ws:";
    u.pathname = "/ws";
    u.search = new URLSearchParams({ clientId, protocol: "kiln", ...(this.token ? { token: this.token } : {}) }).toString();
    return u.toString();
  }
}
