// Socket types: which output may feed which input, and how each type looks.
// Mirrors engine/types.py so the editor refuses exactly what the server would.

export const ANY = "*";
export const COMBO = "COMBO";
export const WIDGET_TYPES = new Set(["INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", "COLOR"]);

function alternatives(type) {
  return new Set(String(type).split(",").map((s) => s.trim()).filter(Boolean));
}

/** Can an output of `outputType` feed an input of `inputType`? */
export function compatible(outputType, inputType) {
  if (outputType === ANY || inputType === ANY) return true;
  if (inputType === COMBO) return outputType === COMBO || outputType === "STRING";
  const outs = alternatives(outputType);
  for (const t of alternatives(inputType)) if (outs.has(t)) return true;
  return false;
}

const COLOURS = {
  IMAGE: "#64b5f6", MASK: "#81c784", LATENT: "#ff80ab", MODEL: "#b39ddb", CLIP: "#ffd54f",
  VAE: "#ff7043", CONDITIONING: "#ffa726", INT: "#4dd0e1", FLOAT: "#aed581", STRING: "#a1887f",
  BOOLEAN: "#90a4ae", COMBO: "#9575cd", "*": "#bdbdbd",
};

/** A stable colour per type; unknown third-party types get a hue from their name. */
export function typeColour(type) {
  if (COLOURS[type]) return COLOURS[type];
  let h = 0;
  for (const ch of String(type)) h = (h * 31 + ch.charCodeAt(0)) % 360;
  return `hsl(${h}, 55%, 62%)`;
}
