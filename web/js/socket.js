// Follows jobs over the websocket in Kiln's protocol: JSON text frames carry
// events; a preview image arrives as the binary frame right after its progress
// event (ComfyUI's PREVIEW_IMAGE layout), so it is attached to that event.
// The socket reconnects by itself; the run controller also polls, so a dropped
// connection can delay but never lose the end of a job.

const PREVIEW_IMAGE = 1, PREVIEW_WITH_METADATA = 4;
const MIME = { 1: "image/jpeg", 2: "image/png" };

export class JobSocket extends EventTarget {
  constructor(url) {
    super();
    this.url = url;
    this.ws = null;
    this.lastProgress = null;
    this.closed = false;
    this.retry = 500;
    this.connect();
  }

  get open() { return !!this.ws && this.ws.readyState === WebSocket.OPEN; }

  connect() {
    if (this.closed) return;
    const ws = new WebSocket(this.url);
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    ws.addEventListener("open", () => { this.retry = 500; this.emit({ type: "socket_open" }); });
    ws.addEventListener("message", (m) => this.onMessage(m.data));
    ws.addEventListener("close", () => {
      this.emit({ type: "socket_closed" });
      if (!this.closed) setTimeout(() => this.connect(), this.retry = Math.min(this.retry * 2, 8000));
    });
    ws.addEventListener("error", () => { /* close follows; reconnect there */ });
  }

  close() { this.closed = true; this.ws?.close(); }

  emit(event) { this.dispatchEvent(new CustomEvent("event", { detail: event })); }

  onMessage(data) {
    if (typeof data === "string") {
      let event;
      try { event = JSON.parse(data); } catch { return; }
      if (event.type === "progress") this.lastProgress = event;
      this.emit(event);
      return;
    }
    const preview = this.decodePreview(data);
    if (preview && this.lastProgress) {
      this.emit({ type: "preview", job_id: this.lastProgress.job_id, node_id: preview.node_id || this.lastProgress.node_id, blob: preview.blob });
    }
  }

  decodePreview(buffer) {
    if (!(buffer instanceof ArrayBuffer) || buffer.byteLength < 8) return null;
    const view = new DataView(buffer);
    const kind = view.getUint32(0);
    if (kind === PREVIEW_IMAGE) {
      const mime = MIME[view.getUint32(4)] || "image/jpeg";
      return { blob: new Blob([buffer.slice(8)], { type: mime }) };
    }
    if (kind === PREVIEW_WITH_METADATA) {
      const len = view.getUint32(4);
      let meta = {};
      try { meta = JSON.parse(new TextDecoder().decode(buffer.slice(8, 8 + len))); } catch { /* keep defaults */ }
      return { node_id: meta.node_id, blob: new Blob([buffer.slice(8 + len)], { type: meta.image_type || "image/png" }) };
    }
    return null;
  }
}
