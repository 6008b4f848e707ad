// Unit tests of the editor's model modules (no DOM needed). The same cases run in
// Node (`node --test tests/js`) and in Chromium (tests/test_editor_model.py), so
// they stay runnable on machines that have only one of the two.

import { Graph } from "../../web/js/graph.js";
import { History } from "../../web/js/history.js";
import { parseNodeDefs, isSlider, defaultValue } from "../../web/js/schema.js";
import { compatible } from "../../web/js/types.js";
import { normalizeNumber } from "../../web/js/widgets.js";
import { readPngText, workflowFromPngText } from "../../web/js/png.js";
import { validationErrors } from "../../web/js/runner.js";
import { autoLayout } from "../../web/js/layout.js";
import { unavailableChoices, applySubstitutions, describeSubstitution } from "../../web/js/choices.js";

// -- a tiny assertion kit (node:assert does not exist in the browser) -------------

function canon(x) {
  if (Array.isArray(x)) return x.map(canon);
  if (x && typeof x === "object") return Object.fromEntries(Object.keys(x).sort().map((k) => [k, canon(x[k])]));
  return x;
}
function eq(actual, expected, msg = "") {
  const a = JSON.stringify(canon(actual)), e = JSON.stringify(canon(expected));
  if (a !== e) throw new Error(`${msg} expected ${e} but got ${a}`);
}
function ok(cond, msg) { if (!cond) throw new Error(msg || "assertion failed"); }
function throws(fn, pattern, msg = "") {
  try { fn(); } catch (e) { if (pattern && !pattern.test(e.message)) throw new Error(`${msg} wrong error: ${e.message}`); return; }
  throw new Error(`${msg} did not throw`);
}

// -- fixtures: node schemas in Kiln's /api/nodes shape ------------------------------

const I = (name, type, extra = {}) => ({ name, type, required: !("default" in extra) && !extra.optional,
  widget: ["INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"].includes(type), ...extra });
const N = (type, category, inputs, outputs, extra = {}) => ({ type, display_name: extra.display_name || type, category,
  description: "", version: 1, output_node: !!extra.output_node, inputs, outputs: outputs.map((o) => ({ name: o, type: o })), aliases: extra.aliases || [] });

export const SCHEMAS = {
  CheckpointLoaderSimple: N("CheckpointLoaderSimple", "loaders", [I("ckpt_name", "COMBO", { choices: ["tiny.safetensors"] })], ["MODEL", "CLIP", "VAE"]),
  CLIPTextEncode: N("CLIPTextEncode", "conditioning", [I("text", "STRING", { multiline: true, default: "" }), I("clip", "CLIP")], ["CONDITIONING"]),
  LoadImage: N("LoadImage", "image", [I("image", "COMBO", { choices: ["a.png"], open_choices: true, image_upload: true })], ["IMAGE", "MASK"]),
  VAEEncode: N("VAEEncode", "latent", [I("pixels", "IMAGE"), I("vae", "VAE")], ["LATENT"]),
  AddNoise: N("AddNoise", "latent", [I("model", "MODEL"), I("latent", "LATENT"), I("strength", "FLOAT", { default: 0.6, min: 0, max: 1, step: 0.01 }),
    I("seed", "INT", { default: 0, min: 0, max: 2 ** 53, control_after_generate: true })], ["LATENT"]),
  KSampler: N("KSampler", "sampling", [I("model", "MODEL"), I("seed", "INT", { default: 0, min: 0, max: 2 ** 53, control_after_generate: true }),
    I("steps", "INT", { default: 20, min: 1, max: 10000 }), I("cfg", "FLOAT", { default: 8, min: 0, max: 100, step: 0.1, round: 0.01 }),
    I("sampler_name", "COMBO", { choices: ["euler", "dpmpp_2m"] }), I("scheduler", "COMBO", { choices: ["normal", "karras"] }),
    I("positive", "CONDITIONING"), I("negative", "CONDITIONING"), I("latent_image", "LATENT"),
    I("denoise", "FLOAT", { default: 1, min: 0, max: 1, step: 0.01 })], ["LATENT"]),
  VAEDecode: N("VAEDecode", "latent", [I("samples", "LATENT"), I("vae", "VAE")], ["IMAGE"]),
  SaveImage: N("SaveImage", "image", [I("images", "IMAGE"), I("filename_prefix", "STRING", { default: "Kiln" })], [], { output_node: true }),
};

const IMG2IMG_API = {
  "1": { class_type: "CheckpointLoaderSimple", inputs: { ckpt_name: "tiny.safetensors" } },
  "2": { class_type: "CLIPTextEncode", inputs: { text: "a lake", clip: ["1", 1] } },
  "3": { class_type: "CLIPTextEncode", inputs: { text: "blurry", clip: ["1", 1] }, _meta: { title: "negative" } },
  "4": { class_type: "LoadImage", inputs: { image: "a.png" } },
  "5": { class_type: "VAEEncode", inputs: { pixels: ["4", 0], vae: ["1", 2] } },
  "6": { class_type: "AddNoise", inputs: { model: ["1", 0], latent: ["5", 0], strength: 0.5, seed: 7 } },
  "7": { class_type: "KSampler", inputs: { model: ["1", 0], seed: 7, steps: 4, cfg: 7, sampler_name: "euler", scheduler: "normal",
    positive: ["2", 0], negative: ["3", 0], latent_image: ["6", 0], denoise: 1 } },
  "8": { class_type: "VAEDecode", inputs: { samples: ["7", 0], vae: ["1", 2] } },
  "9": { class_type: "SaveImage", inputs: { images: ["8", 0], filename_prefix: "t" } },
};

function defs() { return parseNodeDefs(JSON.parse(JSON.stringify(SCHEMAS))); }
function img2img() { const g = new Graph(defs()); g.load(JSON.parse(JSON.stringify(IMG2IMG_API))); return g; }

// -- cases -------------------------------------------------------------------------

export const cases = [
  ["types: compatibility mirrors the engine's rules", () => {
    ok(!compatible("LATENT", "IMAGE"), "LATENT must not feed IMAGE");
    ok(compatible("IMAGE", "IMAGE"));
    ok(compatible("*", "LATENT") && compatible("MASK", "*"));
    ok(compatible("STRING", "COMBO") && !compatible("INT", "COMBO"));
    ok(compatible("IMAGE", "MASK,IMAGE") && !compatible("LATENT", "MASK,IMAGE"));
  }],

  ["schema: Kiln schemas and ComfyUI object_info give the same inputs", () => {
    const kiln = defs().get("KSampler");
    const info = parseNodeDefs({ KSampler: {
      input: { required: { model: ["MODEL"], seed: ["INT", { default: 0, min: 0, max: 2 ** 53, control_after_generate: true }],
        steps: ["INT", { default: 20, min: 1, max: 10000 }], cfg: ["FLOAT", { default: 8, min: 0, max: 100, step: 0.1, round: 0.01 }],
        sampler_name: [["euler", "dpmpp_2m"]], scheduler: ["COMBO", { options: ["normal", "karras"] }],
        positive: ["CONDITIONING"], negative: ["CONDITIONING"], latent_image: ["LATENT"], denoise: ["FLOAT", { default: 1, min: 0, max: 1, step: 0.01 }] } },
      input_order: { required: ["model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive", "negative", "latent_image", "denoise"] },
      output: ["LATENT"], output_name: ["LATENT"], name: "KSampler", display_name: "KSampler", category: "sampling", output_node: false } }).get("KSampler");
    const brief = (d) => d.inputs.map((i) => [i.name, i.type, i.widget, i.choices || null, !!i.control]);
    eq(brief(info), brief(kiln));
    eq(info.outputs, kiln.outputs);
    eq(info, kiln, "the whole NodeDef, titles, flags and widget options included:");
    ok(isSlider(kiln.inputs.find((i) => i.name === "denoise")), "0..1 floats are sliders");
    ok(!isSlider(kiln.inputs.find((i) => i.name === "cfg")), "cfg is a number field");
    eq(defaultValue(kiln.inputs.find((i) => i.name === "sampler_name")), "euler");
  }],

  ["graph: a new node has its defaults and a fixed seed rule", () => {
    const g = new Graph(defs());
    const n = g.addNode("KSampler", [10, 20]);
    eq(n.id, "1");
    eq(n.values, { seed: 0, steps: 20, cfg: 8, sampler_name: "euler", scheduler: "normal", denoise: 1 });
    eq(n.ui.controls, { seed: "fixed" });
    throws(() => g.addNode("NoSuchNode"), /unknown node type/);
    eq(g.addNode("VAEDecode").id, "2");
  }],

  ["graph: connections are type-checked, acyclic and replace the old link", () => {
    const g = img2img();
    const r = g.connect("7", 0, "8", "vae");
    ok(!r.ok && /LATENT to VAE/.test(r.reason), r.reason);
    const r2 = g.connect("5", 0, "8", "samples"); // VAEEncode LATENT -> VAEDecode samples: allowed
    ok(r2.ok, r2.reason);
    eq(g.node("8").links.samples, ["5", 0]);
    ok(/cycle/.test(g.canConnect("8", 0, "5", "pixels")), "a link back upstream is a cycle");
    ok(/itself/.test(g.canConnect("5", 0, "5", "pixels")));
    ok(/no input/.test(g.canConnect("5", 0, "8", "nope")));
    eq(g.disconnect("8", "samples"), ["5", 0]);
    ok(!g.node("8").links.samples);
  }],

  ["graph: Kiln format round-trips exactly, positions in ui", () => {
    const g = img2img();
    g.setPos("4", [100.4, 220.6]);
    const doc = g.toKiln();
    eq(doc.nodes["4"].ui.pos, [100, 221]);
    eq(doc.nodes["7"].inputs.positive, ["2", 0]);
    eq(doc.nodes["3"].title, "negative");
    const h = new Graph(defs());
    eq(h.load(doc).format, "kiln");
    eq(h.toKiln(), doc);
  }],

  ["graph: API format out, and in with an automatic left-to-right layout", () => {
    const g = img2img();
    const api = g.toApi();
    eq(api["7"].inputs.latent_image, ["6", 0]);
    eq(api["3"]._meta, { title: "negative" });
    ok(!("ui" in api["1"]));
    const x = (id) => g.node(id).pos[0];
    ok(x("1") < x("5") && x("5") < x("6") && x("6") < x("7") && x("7") < x("8") && x("8") < x("9"), "columns follow the data flow");
    const ys = ["2", "3"].map((id) => g.node(id).pos[1]);
    ok(ys[0] !== ys[1] && x("2") === x("3"), "nodes of one column are stacked");
    const h = new Graph(defs());
    h.load({ prompt: api });
    eq(h.toApi(), api, "a /prompt body loads too");
  }],

  ["graph: list values are wrapped, links are not", () => {
    const g = new Graph(defs());
    g.load({ version: 1, nodes: { "1": { type: "SaveImage", inputs: { images: ["9", 0], filename_prefix: { __value__: ["a", "b"] } }, ui: { pos: [0, 0] } } } });
    eq(g.node("1").values.filename_prefix, ["a", "b"]);
    eq(g.toKiln().nodes["1"].inputs, { images: ["9", 0], filename_prefix: { __value__: ["a", "b"] } });
  }],

  ["graph: deleting nodes drops their links and the parameters naming them", () => {
    const g = new Graph(defs());
    g.load({ version: 1, params: { seed: ["6.seed", "7.seed"], strength: "6.strength", steps: "7.steps" }, nodes: img2img().toKiln().nodes });
    g.removeNodes(["6"]);
    ok(!g.node("6"));
    ok(!g.node("7").links.latent_image, "the link from the deleted node is gone");
    eq(g.params, { seed: ["7.seed"], steps: "7.steps" });
  }],

  ["history: undo and redo restore the graph exactly", () => {
    const g = img2img();
    const h = new History(g);
    const s0 = JSON.stringify(g.toKiln());
    g.setValue("6", "strength", 0.8); h.commit();
    const s1 = JSON.stringify(g.toKiln());
    g.removeNodes(["2"]); h.commit();
    const s2 = JSON.stringify(g.toKiln());
    ok(!h.commit(), "no change, no step");
    ok(h.undo()); eq(JSON.stringify(g.toKiln()), s1);
    ok(h.undo()); eq(JSON.stringify(g.toKiln()), s0);
    ok(!h.undo(), "nothing left to undo");
    ok(h.redo()); ok(h.redo()); eq(JSON.stringify(g.toKiln()), s2);
    ok(!h.redo());
    h.undo(); g.moveBy(["1"], 5, 5); h.commit();
    ok(!h.canRedo, "a new edit clears the redo list");
  }],

  ["clipboard: links inside the copy are remapped, outside links kept only in the same graph", () => {
    const g = img2img();
    const clip = JSON.parse(JSON.stringify(g.copy(["5", "6"])));
    const ids = g.paste(clip, [500, 500]);
    eq(ids, ["10", "11"]);
    eq(g.node("11").links.latent, ["10", 0], "internal link follows the copies");
    eq(g.node("10").links.vae, ["1", 2], "link from a node outside the copy is kept here");
    eq([0, 1].map((k) => Math.min(...ids.map((id) => g.node(id).pos[k]))), [500, 500], "the copy's top-left lands where asked");
    const other = new Graph(defs());
    other.addNode("CheckpointLoaderSimple"); // id 1 exists there too, but is another node
    const ids2 = other.paste(clip);
    ok(!other.node(ids2[0]).links.vae, "no links into another workflow's nodes");
    eq(other.node(ids2[1]).links.latent, [ids2[0], 0]);
    eq(g.duplicate(["9"]).length, 1);
    throws(() => g.paste({ nodes: {} }), /clipboard/);
  }],

  ["seed rules: fixed, increment, randomize; linked seeds untouched", () => {
    const g = img2img();
    g.setControl("7", "seed", "increment");
    g.setControl("6", "seed", "randomize");
    eq(g.applyControls(() => 0.5).sort(), ["6", "7"]);
    eq(g.node("7").values.seed, 8);
    eq(g.node("6").values.seed, 2 ** 31);
    g.setControl("6", "seed", "fixed");
    eq(g.applyControls(), ["7"]);
    eq(g.node("6").values.seed, 2 ** 31);
  }],

  ["widgets: numbers are clamped and snapped to the step", () => {
    const d = defs().get("KSampler").inputs;
    const cfg = d.find((i) => i.name === "cfg"), steps = d.find((i) => i.name === "steps"), den = d.find((i) => i.name === "denoise");
    eq(normalizeNumber(cfg, 7.04), 7);
    eq(normalizeNumber(cfg, 7.06), 7.1);
    eq(normalizeNumber(cfg, 1000), 100);
    eq(normalizeNumber(steps, 0), 1);
    eq(normalizeNumber(steps, "12.6"), 13);
    eq(normalizeNumber(den, 0.333), 0.33);
    eq(normalizeNumber(den, -1), 0);
    eq(normalizeNumber(steps, "abc"), 20);
  }],

  ["layout: explicit positions are kept, missing ones computed", () => {
    const g = new Graph(defs());
    g.load({ version: 1, nodes: { "1": { type: "VAEDecode", inputs: {}, ui: { pos: [5, 6] } } } });
    eq(g.node("1").pos, [5, 6]);
    autoLayout(g);
    eq(g.node("1").pos, [40, 40]);
  }],

  ["a converted editor file's seed modes (ui.controls, from the server's converter) load with it", () => {
    // The server's /api/convert/comfyui output for a KSampler saved with [123, "randomize", ...]
    // (tests/test_workflow_ui.py proves the conversion; this proves the editor keeps the mode).
    const doc = { version: 1, nodes: {
      "3": { type: "KSampler", inputs: { seed: 123, steps: 12, cfg: 6.5, sampler_name: "euler", scheduler: "karras", denoise: 0.9 },
             ui: { pos: [300, 40], controls: { seed: "randomize" } } } } };
    const g = new Graph(defs());
    g.load(doc);
    eq(g.node("3").ui.controls.seed, "randomize");
    eq(g.node("3").pos, [300, 40]);
  }],

  ["PNG text chunks: tEXt, zTXt and iTXt, Kiln's key first", async () => {
    const enc = new TextEncoder();
    const u32 = (n) => [(n >>> 24) & 255, (n >>> 16) & 255, (n >>> 8) & 255, n & 255];
    const chunk = (type, data) => [...u32(data.length), ...enc.encode(type), ...data, 0, 0, 0, 0];
    const deflate = async (bytes) => new Uint8Array(await new Response(new Blob([bytes]).stream().pipeThrough(new CompressionStream("deflate"))).arrayBuffer());
    const kiln = JSON.stringify({ version: 1, nodes: { "1": { type: "VAEDecode", inputs: {} } } });
    const prompt = JSON.stringify(IMG2IMG_API);
    const bytes = new Uint8Array([137, 80, 78, 71, 13, 10, 26, 10,
      ...chunk("IHDR", new Uint8Array(13)),
      ...chunk("tEXt", [...enc.encode("prompt"), 0, ...enc.encode(prompt)]),
      ...chunk("zTXt", [...enc.encode("kiln_workflow"), 0, 0, ...(await deflate(enc.encode(kiln)))]),
      ...chunk("iTXt", [...enc.encode("note"), 0, 0, 0, 0, 0, ...enc.encode("caf\u00e9")]),
      ...chunk("IEND", [])]);
    const text = await readPngText(bytes.buffer);
    eq(Object.keys(text).sort(), ["kiln_workflow", "note", "prompt"]);
    eq(text.note, "caf\u00e9");
    eq(workflowFromPngText(text), { kind: "kiln", doc: JSON.parse(kiln) });
    delete text.kiln_workflow;
    eq(workflowFromPngText(text).kind, "comfyui-api");
    eq(await readPngText(new Uint8Array([1, 2, 3]).buffer), null);
  }],

  ["validation errors: Kiln's list and ComfyUI's node_errors", () => {
    const kiln = validationErrors({ error: { message: "x" }, errors: [{ type: "required_input_missing", node_id: "7", input_name: "positive", message: "missing" }] });
    eq(kiln.map((e) => [e.node_id, e.input_name]), [["7", "positive"]]);
    const comfy = validationErrors({ error: { message: "x" }, node_errors: { "3": { class_type: "KSampler", errors: [{ message: "too big", extra_info: { input_name: "steps" } }] } } });
    eq(comfy.map((e) => [e.node_id, e.input_name, e.message]), [["3", "steps", "too big"]]);
  }],
  ["choices: values this server lacks are found, open, linked and empty lists left alone", () => {
    const d = defs();
    d.set("Empty", parseNodeDefs({ Empty: N("Empty", "x", [I("pick", "COMBO", { choices: [] })], []) }).get("Empty"));
    d.set("Numbered", parseNodeDefs({ Numbered: N("Numbered", "x", [I("multiple_of", "COMBO", { choices: ["1", "8"] })], []) }).get("Numbered"));
    const g = new Graph(d);
    const api = JSON.parse(JSON.stringify(IMG2IMG_API));
    api["1"].inputs.ckpt_name = "v1-5-pruned-emaonly.safetensors";
    api["4"].inputs.image = "not-uploaded-yet.png";       // open choices: the server decides
    api["7"].inputs.scheduler = "exotic";
    api["7"]._meta = { title: "my sampler" };
    api["10"] = { class_type: "Empty", inputs: { pick: "anything" } };   // nothing to switch to
    api["11"] = { class_type: "Numbered", inputs: { multiple_of: 8 } };   // 8 is "8" to the server
    g.load(api);
    const before = JSON.stringify(g.toKiln());
    const subs = unavailableChoices(g);
    eq(subs, [
      { id: "1", type: "CheckpointLoaderSimple", label: "CheckpointLoaderSimple", input: "ckpt_name",
        value: "v1-5-pruned-emaonly.safetensors", replacement: "tiny.safetensors" },
      { id: "7", type: "KSampler", label: "my sampler", input: "scheduler", value: "exotic", replacement: "normal" },
    ]);
    eq(JSON.stringify(g.toKiln()), before, "finding changes nothing");
    eq(unavailableChoices(g, ["7"]).map((s) => s.id), ["7"], "limited to the ids asked about");
    eq(describeSubstitution(subs[0]),
      "CheckpointLoaderSimple #1: ckpt_name 'v1-5-pruned-emaonly.safetensors' is not available here; using 'tiny.safetensors'");
    // A linked input is never judged by its stale literal.
    g.node("1").values.ckpt_name = "v1-5-pruned-emaonly.safetensors";
    g.node("1").links.ckpt_name = ["2", 0];
    eq(unavailableChoices(g, ["1"]), []);
  }],
  ["choices: the substitution is part of the load's undo step and is announced once", () => {
    const g = img2img();
    const h = new History(g);
    const original = g.snapshot();
    const api = JSON.parse(JSON.stringify(IMG2IMG_API));
    api["1"].inputs.ckpt_name = "elsewhere.safetensors";
    api["2"].inputs.text = "another workflow";
    g.load(api);
    const events = [];
    g.addEventListener("change", (e) => events.push(e.detail));
    const subs = unavailableChoices(g);
    applySubstitutions(g, subs);
    ok(h.commit(), "the load and its substitution are recorded");
    eq(events, [{ kind: "value", ids: ["1"] }]);
    eq(g.toKiln().nodes["1"].inputs.ckpt_name, "tiny.safetensors");
    eq(unavailableChoices(g), [], "nothing left to substitute");
    ok(h.undo() && g.snapshot() === original, "one undo returns to the graph before the load");
    ok(!h.canUndo);
    ok(h.redo() && g.toKiln().nodes["1"].inputs.ckpt_name === "tiny.safetensors");
  }],
];
