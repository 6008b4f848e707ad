// A LoadImage value as the server's file routes name it. Values are paths inside
// the input folder ("photo.png", "clipspace/clipspace-mask-1.png"), and may carry
// ComfyUI's folder annotation ("... [input]", "[output]", "[temp]"), which its
// mask editor writes; the server reads the same forms (engine/paths.py).

const FOLDERS = ["input", "output", "temp"];

/** "sub/dir/name.png [input]" -> {filename: "name.png", subfolder: "sub/dir", type: "input"} */
export function split(value) {
  let text = String(value), type = "input";
  for (const kind of FOLDERS) {
    if (text.endsWith(` [${kind}]`)) { text = text.slice(0, -(kind.length + 3)); type = kind; break; }
  }
  const i = text.lastIndexOf("/");
  return { filename: i >= 0 ? text.slice(i + 1) : text, subfolder: i >= 0 ? text.slice(0, i) : "", type };
}
