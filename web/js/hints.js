// Inputs that another node makes irrelevant, said on the node itself. Kiln's
// image-to-image has two strength-like knobs side by side: AddNoise's strength
// (diffusers' and A1111's rule) and KSampler's denoise (ComfyUI's rule, kept for
// ComfyUI workflows). When the sampler's latent comes from AddNoise, denoise is
// ignored (nodes/sampling.py says so when it runs); the editor says so before.

/** [node type, input, feeding input, feeding node type, why] */
const RULES = [
  ["KSampler", "denoise", "latent_image", "AddNoise",
    "not used here: AddNoise's strength sets how much of the image changes (denoise is for latents that did not pass through AddNoise, as in ComfyUI workflows)"],
];

/** {input name: reason} for the inputs of node `id` that do nothing in this graph. */
export function inactiveInputs(graph, id) {
  const n = graph.node(id);
  const out = {};
  if (!n) return out;
  for (const [type, input, via, source, why] of RULES) {
    if (n.type !== type || n.links[input]) continue;
    const from = n.links[via] && graph.node(n.links[via][0]);
    if (from && from.type === source && !from.ui.mode) out[input] = `${why.replace("AddNoise's", `AddNoise #${from.id}'s`)}`;
  }
  return out;
}
