// Traffic over the last hour by provider and model, and the providers' health.

import { getJson } from "./api.js";
import { clear, h, table } from "./dom.js";
import { barChart } from "./charts.js";

const REFRESH_MS = 10000;

function sum(a, b) {
  return a.map((value, i) => (value || 0) + (b[i] || 0));
}

export async function trafficPage(root) {
  const charts = h("div", { id: "traffic-charts" });
  const health = h("div", { id: "traffic-health" });
  const status = h("p", { role: "status" });
  const refreshButton = h("button", { type: "button" }, "Refresh");
  root.append(h("h2", {}, "Traffic"), h("div", { class: "buttons" }, refreshButton), status, charts, h("h2", {}, "Providers"), health);

  async function refresh() {
    try {
      const [traffic, engine] = await Promise.all([
        getJson("/v1/locopilot/traffic"),
        getJson("/v1/engine/health").catch((error) => ({ error })),
      ]);
      clear(charts);
      const series = traffic.series;
      if (series.length) {
        const zero = series[0].requests.map(() => 0);
        const requests = series.reduce((acc, s) => sum(acc, s.requests), zero);
        const errors = series.reduce((acc, s) => sum(acc, s.errors), zero);
        charts.append(h("div", { class: "charts" }, barChart("Requests, all models", requests), barChart("Errors, all models", errors)));
      }
      for (const s of series) {
        charts.append(
          h(
            "section",
            { class: "series", "aria-label": `${s.provider} ${s.model}` },
            h("h3", {}, `${s.model} via ${s.provider}`),
            h("p", {}, `latency p50 ${s.latency_p50_ms ?? "–"} ms, p95 ${s.latency_p95_ms ?? "–"} ms`),
            h("div", { class: "charts" }, barChart("Requests", s.requests), barChart("Errors", s.errors), barChart("Tokens/s", s.tokens_per_second, { unit: " tok/s" })),
          ),
        );
      }
      if (!series.length) charts.append(h("p", {}, "No requests in the last hour."));
      clear(health);
      if (engine.error) health.append(h("p", { class: "error" }, `Health could not be read: ${engine.error.message}`));
      else {
        health.append(
          h("p", {}, `Engine: ${engine.engine.detail}; llama.cpp ${engine.engine.llama_cpp_version || "?"}; loaded: ${engine.engine.loaded_models.join(", ") || "none"}`),
          table(
            "Providers",
            ["Provider", "Locality", "Priority", "Circuit", "Failures", "Probe ms", "First byte ms", "Last error"],
            engine.providers.map((p) => [p.name, p.locality, String(p.priority), p.circuit, String(p.consecutive_failures), p.probe_ms ?? "–", p.ttfb_ms ?? "–", p.last_error || ""]),
          ),
        );
      }
      status.textContent = `Updated ${new Date().toLocaleTimeString()}.`;
    } catch (error) {
      status.textContent = `Traffic could not be read: ${error.message}`;
    }
  }

  refreshButton.addEventListener("click", refresh);
  await refresh();
  const timer = setInterval(() => {
    if (!root.isConnected) clearInterval(timer);
    else refresh();
  }, REFRESH_MS);
}
