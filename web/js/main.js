// Entry point: start the editor and expose a small hook for tests and the console.
import { App } from "./app.js";

const app = new App();
// "kiln-interactive" marks when the canvas takes edits (bench/editor_bench.py reads it).
const ready = app.start().then(() => performance.mark("kiln-interactive"));

window.kiln = {
  app,
  ready,
  get graph() { return app.graph; },
  get view() { return app.view; },
  /** Client coordinates of a socket centre: kind "in" with an input name, "out" with an output index. */
  socketPos: (id, kind, key) => app.view.socketPoint(id, kind, key),
  /** Client coordinates of the middle of a node's title bar. */
  titlePos: (id) => { const v = app.view.views.get(String(id)); return v ? app.view.centerOf(v.titleEl) : null; },
  nodeEl: (id) => app.view.views.get(String(id))?.el || null,
  toKiln: () => app.graph.toKiln(),
};
