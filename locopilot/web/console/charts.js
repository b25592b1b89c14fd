// Bar charts drawn as SVG nodes: one bar per bucket, an axis line and the peak labelled.

import { h, svg } from "./dom.js";

/** A labelled bar chart of ``values`` (nulls drawn as gaps). */
export function barChart(title, values, { unit = "", width = 360, height = 90 } = {}) {
  const peak = Math.max(0, ...values.filter((v) => v !== null && v !== undefined));
  const step = width / Math.max(1, values.length);
  const bars = values.map((value, index) => {
    if (!value) return null;
    const tall = peak ? (value / peak) * (height - 14) : 0;
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
      svg("text", { x: 2, y: 10, class: "peak" }, `peak ${Number.isInteger(peak) ? peak : peak.toFixed(1)}${unit}`),
      bars,
    ),
    h("figcaption", {}, `${title} (total ${Number.isInteger(total) ? total : total.toFixed(1)}), last hour by minute`),
  );
}
