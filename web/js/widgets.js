// Widgets for literal inputs. Each returns {el, set(value)} and reports edits
// through onChange(value, final): `final` is false while a gesture is still going
// (dragging a number, moving a slider) and true when it ends, which is when the
// editor records an undo step.

import { isSlider } from "./schema.js";

function decimalsOf(x) {
  if (!Number.isFinite(x)) return 0;
  const s = String(x);
  if (s.includes("e-")) return parseInt(s.split("e-")[1], 10);
  return s.includes(".") ? s.split(".")[1].length : 0;
}

/** Clamp to [min, max] and snap to the step grid (from min), as the server will check. */
export function normalizeNumber(def, value) {
  let v = Number(value);
  if (!Number.isFinite(v)) v = Number(def.default ?? def.min ?? 0);
  const isInt = def.type === "INT";
  const step = def.step || (isInt ? 1 : 0);
  if (step > 0) {
    const base = def.min !== undefined && Number.isFinite(def.min) ? def.min : 0;
    v = base + Math.round((v - base) / step) * step;
  }
  if (def.min !== undefined && v < def.min) v = def.min;
  if (def.max !== undefined && v > def.max) v = def.max;
  if (isInt) v = Math.round(v);
  else v = Number(v.toFixed(Math.max(decimalsOf(step || 0.01), decimalsOf(def.round || 0), 2)));
  return v;
}

function stepOf(def) { return def.step || (def.type === "INT" ? 1 : 0.01); }

function formatNumber(def, v) {
  if (def.type === "INT") return String(v);
  const d = Math.max(decimalsOf(stepOf(def)), decimalsOf(def.round || 0));
  return Number(v).toFixed(Math.min(d || 2, 6));
}

function el(tag, cls, attrs = {}) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

/** Number field: drag sideways to scrub, arrows or ArrowUp/Down to step, or type. */
function numberWidget(def, value, onChange) {
  const root = el("div", "w-number");
  const dec = el("button", "w-step dec", { type: "button", tabindex: "-1", "aria-label": `decrease ${def.name}` });
  dec.textContent = "\u25C2";
  const input = el("input", "w-num-input", { type: "text", inputmode: "decimal", spellcheck: "false" });
  const inc = el("button", "w-step inc", { type: "button", tabindex: "-1", "aria-label": `increase ${def.name}` });
  inc.textContent = "\u25B8";
  root.append(dec, input, inc);
  let current = normalizeNumber(def, value);
  const show = () => { input.value = formatNumber(def, current); };
  const setTo = (v, final) => {
    const n = normalizeNumber(def, v);
    const changed = n !== current;
    current = n; show();
    if (changed || final) onChange(current, final);
  };
  show();
  const stepBy = (k) => setTo(current + k * stepOf(def), true);
  dec.addEventListener("click", () => stepBy(-1));
  inc.addEventListener("click", () => stepBy(1));
  input.addEventListener("keydown", (e) => {
    if (e.key === "ArrowUp" || e.key === "ArrowDown") {
      e.preventDefault();
      stepBy((e.key === "ArrowUp" ? 1 : -1) * (e.shiftKey ? 10 : 1));
    } else if (e.key === "Enter") { input.blur(); }
    else if (e.key === "Escape") { show(); input.blur(); }
  });
  input.addEventListener("change", () => setTo(input.value, true));
  // Scrub: a horizontal drag that starts on the field changes the value; a click edits it.
  input.addEventListener("pointerdown", (e) => {
    if (e.button !== 0 || document.activeElement === input) return;
    const startX = e.clientX, start = current;
    let dragging = false;
    e.preventDefault();
    input.setPointerCapture(e.pointerId);
    const move = (m) => {
      const dx = m.clientX - startX;
      if (!dragging && Math.abs(dx) < 4) return;
      dragging = true;
      root.classList.add("scrubbing");
      setTo(start + Math.round(dx / 6) * stepOf(def) * (m.shiftKey ? 10 : 1), false);
    };
    const up = () => {
      input.removeEventListener("pointermove", move);
      input.removeEventListener("pointerup", up);
      input.removeEventListener("pointercancel", up);
      root.classList.remove("scrubbing");
      if (dragging) onChange(current, true);
      else { input.focus(); input.select(); }
    };
    input.addEventListener("pointermove", move);
    input.addEventListener("pointerup", up);
    input.addEventListener("pointercancel", up);
  });
  return { el: root, set(v) { if (document.activeElement !== input) { current = normalizeNumber(def, v); show(); } } };
}

/** 0..1 values (strength, denoise): a slider with the exact number beside it. */
function sliderWidget(def, value, onChange) {
  const root = el("div", "w-slider");
  const range = el("input", "w-range", { type: "range", min: def.min ?? 0, max: def.max ?? 1, step: stepOf(def),
    "aria-label": def.name });
  const box = el("input", "w-num-input w-slider-value", { type: "text", inputmode: "decimal" });
  root.append(range, box);
  let current = normalizeNumber(def, value);
  const show = () => { range.value = String(current); box.value = formatNumber(def, current); };
  show();
  range.addEventListener("input", () => { current = normalizeNumber(def, range.value); box.value = formatNumber(def, current); onChange(current, false); });
  range.addEventListener("change", () => { current = normalizeNumber(def, range.value); show(); onChange(current, true); });
  box.addEventListener("change", () => { current = normalizeNumber(def, box.value); show(); onChange(current, true); });
  box.addEventListener("keydown", (e) => {
    if (e.key === "Enter") box.blur();
    if (e.key === "ArrowUp" || e.key === "ArrowDown") {
      e.preventDefault();
      current = normalizeNumber(def, current + (e.key === "ArrowUp" ? 1 : -1) * stepOf(def));
      show(); onChange(current, true);
    }
  });
  return { el: root, set(v) { if (![range, box].includes(document.activeElement)) { current = normalizeNumber(def, v); show(); } } };
}

function comboWidget(def, value, onChange) {
  const select = el("select", "w-select", { "aria-label": def.name });
  const fill = (v) => {
    const options = [...(def.choices || [])];
    if (v !== undefined && v !== null && v !== "" && !options.includes(String(v))) options.unshift(String(v));
    select.replaceChildren(...options.map((o) => { const opt = el("option"); opt.value = o; opt.textContent = o; return opt; }));
    select.value = v === undefined || v === null ? "" : String(v);
    select.classList.toggle("missing", !!v && !(def.choices || []).includes(String(v)) && !def.openChoices);
  };
  fill(value);
  select.addEventListener("change", () => { fill(select.value); onChange(select.value, true); });
  return { el: select, set(v) { if (document.activeElement !== select) fill(v); } };
}

function textWidget(def, value, onChange) {
  const input = def.multiline
    ? el("textarea", "w-text multiline", { rows: "4", spellcheck: "false", "aria-label": def.name })
    : el("input", "w-text", { type: "text", "aria-label": def.name });
  input.value = value ?? "";
  input.addEventListener("input", () => onChange(input.value, false));
  input.addEventListener("change", () => onChange(input.value, true));
  return { el: input, set(v) { if (document.activeElement !== input) input.value = v ?? ""; } };
}

function boolWidget(def, value, onChange) {
  const input = el("input", "w-bool", { type: "checkbox", "aria-label": def.name });
  input.checked = !!value;
  input.addEventListener("change", () => onChange(input.checked, true));
  return { el: input, set(v) { input.checked = !!v; } };
}

export const CONTROL_MODES = ["fixed", "increment", "decrement", "randomize"];

/** The seed's after-run rule, shown under the seed number. */
export function controlWidget(mode, onChange) {
  const select = el("select", "w-select w-control", { "aria-label": "after each run" });
  for (const m of CONTROL_MODES) {
    const opt = el("option"); opt.value = m; opt.textContent = `after run: ${m}`; select.append(opt);
  }
  select.value = mode || "fixed";
  select.addEventListener("change", () => onChange(select.value));
  return { el: select, set(v) { select.value = v || "fixed"; } };
}

/** The widget for one input definition. */
export function createWidget(def, value, onChange) {
  switch (def.type) {
    case "INT": case "FLOAT": return isSlider(def) ? sliderWidget(def, value, onChange) : numberWidget(def, value, onChange);
    case "BOOLEAN": return boolWidget(def, value, onChange);
    case "COMBO": return comboWidget(def, value, onChange);
    default: return textWidget(def, value, onChange);
  }
}
