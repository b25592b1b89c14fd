// Charts drawn as SVG nodes: bars per bucket (numbers in the caption) and a line of points.

import { h, svg } from "./dom.js";

function round(value) {
  return Number.isInteger(value) ? value : value.toFixed(1);
}

/** A labelled bar chart of ``values`` (nulls drawn as gaps). */
/** ``summed``: whether a total means anything (requests do; a rate does not). */
export function barChart(title, values, { unit = "", summed = true, width = 360, height = 90 } = {}) {
  const peak = Math.max(0, ...values.filter((v) => v !== null && v !== undefined));
  const step = width / Math.max(1, values.length);
  const bars = values.map((value, index) => {
    if (!value) return null;
    const tall = peak ? (value / peak) * (height - 4) : 0;
    return svg(
      "rect",
      { x: (index * step).toFixed(2), y: (height - tall).toFixed(2), width: Math.max(1, step - 1).toFixed(2), height: tall.toFixed(2), class: "bar" },
      svg("title", {}, `${value}${unit}`),
    );
  });
  const total = values.reduce((sum, v) => sum + (v || 0), 0);
  return h(
    "figure",
    { class: "chart" },
    svg(
      "svg",
      { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": `${title}: peak ${peak}${unit}`, preserveAspectRatio: "none" },
      svg("line", { x1: 0, y1: height - 0.5, x2: width, y2: height - 0.5, class: "axis" }),
      bars,
    ),
    // The numbers in the caption, not the drawing: the drawing stretches to its box.
    h("figcaption", {}, `${title} (${summed ? `total ${round(total)}, ` : ""}peak ${round(peak)}${unit}), last hour by minute`),
  );
}

/** A line chart of ``points`` ([x, y] pairs, x ascending), redrawn whole on each call. */
export function lineChart(title, points, { width = 480, height = 160 } = {}) {
  const pad = 24;
  const xs = points.map((p) => p[0]);
  const ys = points.map((p) => p[1]);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  const [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  const sx = (x) => pad + ((x - x0) / (x1 - x0 || 1)) * (width - 2 * pad);
  const sy = (y) => height - pad - ((y - y0) / (y1 - y0 || 1)) * (height - 2 * pad);
  const path = points.map(([x, y], i) => `${i ? "L" : "M"}${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" ");
  const last = points[points.length - 1];
  return h(
    "figure",
    { class: "chart line" },
    svg(
      "svg",
      { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": points.length ? `${title}: ${points.length} points, last ${last[1].toFixed(4)}` : `${title}: no points yet` },
      svg("line", { x1: pad, y1: height - pad + 0.5, x2: width - pad, y2: height - pad + 0.5, class: "axis" }),
      svg("line", { x1: pad - 0.5, y1: pad, x2: pad - 0.5, y2: height - pad, class: "axis" }),
      points.length ? svg("text", { x: 2, y: pad - 6, class: "peak" }, `max ${y1.toFixed(3)}`) : null,
      points.length ? svg("text", { x: 2, y: height - 6, class: "peak" }, `min ${y0.toFixed(3)}`) : null,
      points.length ? svg("path", { d: path, class: "curve" }) : null,
      points.map(([x, y]) => svg("circle", { cx: sx(x).toFixed(1), cy: sy(y).toFixed(1), r: 2.5, class: "point" }, svg("title", {}, `step ${x}: ${y.toFixed(4)}`))),
    ),
    h("figcaption", {}, title),
  );
}
