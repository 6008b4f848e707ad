// PNG text chunks, read in the browser: how a dropped image gives back the
// workflow that made it (Kiln writes "kiln_workflow"; ComfyUI "prompt" and "workflow").

const SIGNATURE = [137, 80, 78, 71, 13, 10, 26, 10];

async function inflate(bytes) {
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

function nulAt(bytes, from) {
  const i = bytes.indexOf(0, from);
  return i < 0 ? bytes.length : i;
}

/** All tEXt / zTXt / iTXt chunks of a PNG as {keyword: text}; null if not a PNG. */
export async function readPngText(buffer) {
  const bytes = new Uint8Array(buffer);
  if (bytes.length < 8 || SIGNATURE.some((b, i) => bytes[i] !== b)) return null;
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const latin1 = new TextDecoder("latin1");
  const utf8 = new TextDecoder("utf-8");
  const out = {};
  let pos = 8;
  while (pos + 8 <= bytes.length) {
    const length = view.getUint32(pos);
    const type = String.fromCharCode(...bytes.subarray(pos + 4, pos + 8));
    const data = bytes.subarray(pos + 8, pos + 8 + length);
    pos += 12 + length;
    try {
      if (type === "tEXt") {
        const k = nulAt(data, 0);
        out[latin1.decode(data.subarray(0, k))] = latin1.decode(data.subarray(k + 1));
      } else if (type === "zTXt") {
        const k = nulAt(data, 0);
        out[latin1.decode(data.subarray(0, k))] = latin1.decode(await inflate(data.subarray(k + 2)));
      } else if (type === "iTXt") {
        const k = nulAt(data, 0);
        const compressed = data[k + 1] === 1;
        const lang = nulAt(data, k + 3);
        const translated = nulAt(data, lang + 1);
        const body = data.subarray(translated + 1);
        out[latin1.decode(data.subarray(0, k))] = utf8.decode(compressed ? await inflate(body) : body);
      } else if (type === "IEND") break;
    } catch { /* a damaged chunk: skip it, keep the others */ }
  }
  return out;
}

/**
 * The workflow a PNG carries, best source first: Kiln's own document, then
 * ComfyUI's editor workflow, then its API prompt. Returns {kind, doc} or null.
 */
export function workflowFromPngText(chunks) {
  if (!chunks) return null;
  const tryParse = (text) => { try { return JSON.parse(text); } catch { return null; } };
  for (const [key, kind] of [["kiln_workflow", "kiln"], ["workflow", "comfyui-ui"], ["prompt", "comfyui-api"]]) {
    if (chunks[key]) {
      const doc = tryParse(chunks[key]);
      if (doc && typeof doc === "object") return { kind, doc };
    }
  }
  return null;
}
