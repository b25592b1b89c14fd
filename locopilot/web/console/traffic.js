// Traffic over the last hour by provider and model, and the providers' health, asked again
// every few seconds while the page is shown (not while the tab is hidden).

import { getJson } from "./api.js";
import { clear, count, h, table } from "./dom.js";
import { barChart } from "./charts.js";

const REFRESH_MS = 5000;

function sum(a, b) {
  return a.map((value, i) => (value || 0) + (b[i] || 0));
}

function total(values) {
  return values.reduce((acc, v) => acc + (v || 0), 0);
}

function ms(value) {
  return value === null || value === undefined ? "–" : `${Math.round(value)} ms`;
}

export async function trafficPage(root) {
  const totals = h("p", { id: "traffic-totals" });
  const charts = h("div", { id: "traffic-charts" });
  const health = h("div", { id: "traffic-health" });
  // Not a live region: a screen reader would read it out every few seconds. Failures are.
  const updated = h("p", { id: "traffic-updated" });
  const problem = h("p", { class: "error", role: "alert", id: "traffic-error" });
  const refreshButton = h("button", { type: "button" }, "Refresh now");
  root.append(
    h("h2", {}, "Traffic"),
    h("div", { class: "buttons" }, refreshButton, updated),
    problem,
    totals,
    charts,
    h("h2", {}, "Providers"),
    health,
  );

  function say(node, text) {
    if (node.textContent !== text) node.textContent = text;
  }

  function drawTraffic(traffic) {
    const series = traffic.series;
    const zero = series.length ? series[0].requests.map(() => 0) : [];
    const requests = series.reduce((acc, s) => sum(acc, s.requests), zero);
    const errors = series.reduce((acc, s) => sum(acc, s.errors), zero);
    const tokens = series.reduce((acc, s) => sum(acc, s.tokens_out), zero);
    totals.dataset.requests = String(total(requests));
    totals.dataset.errors = String(total(errors));
    say(totals, `Last hour: ${count(total(requests), "request")}, ${count(total(errors), "error")}, ${count(total(tokens), "token")} generated.`);
    clear(charts);
    if (!series.length) {
      charts.append(h("p", {}, "No requests in the last hour."));
      return;
    }
    charts.append(h("div", { class: "charts" }, barChart("Requests, all models", requests), barChart("Errors, all models", errors)));
    for (const s of series) {
      charts.append(
        h(
          "section",
          { class: "series", "aria-label": `${s.provider} ${s.model}`, "data-requests": String(total(s.requests)) },
          // "-": the request failed before a provider was recorded for it.
          h("h3", {}, s.provider === "-" ? `${s.model}, no provider recorded` : `${s.model} via ${s.provider}`),
          h("p", {}, `${count(total(s.requests), "request")}, ${count(total(s.errors), "error")}, ${count(total(s.tokens_out), "token")}; latency p50 ${ms(s.latency_p50_ms)}, p95 ${ms(s.latency_p95_ms)}`),
          h(
            "div",
            { class: "charts" },
            barChart("Requests", s.requests),
            barChart("Errors", s.errors),
            barChart("Tokens generated", s.tokens_out),
            barChart("Tokens/s", s.tokens_per_second, { unit: " tok/s", summed: false }),
          ),
        ),
      );
    }
  }

  function drawHealth(engine) {
    clear(health).append(
      h("p", {}, `Engine: ${engine.engine.detail}; llama.cpp ${engine.engine.llama_cpp_version || "?"}; loaded: ${engine.engine.loaded_models.join(", ") || "none"}`),
      table(
        "Providers",
        ["Provider", "Locality", "Priority", "Circuit breaker", "Failures", "In flight", "Probe", "First byte", "Last error"],
        engine.providers.map((p) => [p.name, p.locality, String(p.priority), p.circuit, String(p.consecutive_failures), String(p.in_flight), ms(p.probe_ms), ms(p.ttfb_ms), p.last_error || ""]),
      ),
    );
  }

  async function refresh() {
    // Readiness answers 503 with the same body when something is wrong: that is worth showing.
    const [traffic, engine] = await Promise.allSettled([
      getJson("/v1/locopilot/traffic"),
      getJson("/v1/engine/health", { accept: [503] }),
    ]);
    if (traffic.status === "fulfilled") drawTraffic(traffic.value);
    if (engine.status === "fulfilled") drawHealth(engine.value);
    const failed = [traffic, engine].filter((r) => r.status === "rejected").map((r) => r.reason.message);
    say(problem, failed.length ? `Could not be read: ${failed.join("; ")}` : "");
    say(updated, `Updated ${new Date().toLocaleTimeString()}; again every ${REFRESH_MS / 1000} s while shown.`);
  }

  refreshButton.addEventListener("click", refresh);
  await refresh();
  const timer = setInterval(() => {
    if (!root.isConnected) clearInterval(timer);
    else if (!document.hidden) refresh();
  }, REFRESH_MS);
}
