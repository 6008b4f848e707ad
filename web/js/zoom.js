// One wheel-zoom rule for the canvas, the result viewer and the mask painter.
//
// The zoom follows the size of the wheel event, not just its sign: a mouse notch
// (about 100 px, or 3 lines in Firefox) zooms by about 14 %, a trackpad's stream of
// small deltas zooms smoothly in proportion, and a trackpad pinch — which browsers
// report as a wheel event with ctrlKey set and small pixel deltas — gets a larger
// gain so it keeps up with the fingers. Each event is capped so a fast flick or a
// page-mode delta never jumps the view.

const LINE_PX = 16;   // deltaMode 1: one line
const PAGE_PX = 800;  // deltaMode 2: one page
const WHEEL_GAIN = 0.0015, PINCH_GAIN = 0.01;
const WHEEL_CAP = 100, PINCH_CAP = 50;

/** The wheel delta in pixels, whatever unit the device reported. */
export function wheelPixels(e) {
  return e.deltaY * (e.deltaMode === 1 ? LINE_PX : e.deltaMode === 2 ? PAGE_PX : 1);
}

/** The factor to multiply the zoom by for one wheel event (> 1 zooms in). */
export function wheelZoomFactor(e) {
  const px = wheelPixels(e);
  const pinch = !!e.ctrlKey;
  const cap = pinch ? PINCH_CAP : WHEEL_CAP;
  return Math.exp(-Math.max(-cap, Math.min(cap, px)) * (pinch ? PINCH_GAIN : WHEEL_GAIN));
}
