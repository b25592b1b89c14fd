// Models: every routed model with its size, quantization, context and loaded state; pull
// with live progress, load, unload and delete for the embedded engine's models.

import { api, events, getJson } from "./api.js";
import { clear, formatBytes, h, table } from "./dom.js";

export async function modelsPage(root, { canManage }) {
  const status = h("p", { role: "status", id: "models-status" });
  const listing = h("div", { id: "models-list" });

  async function act(label, path, method = "POST") {
    status.textContent = `${label}…`;
    let outcome;
    try {
      await api(path, { method });
      outcome = `${label}: done.`;
    } catch (error) {
      outcome = `${label} failed: ${error.message}`;
    }
    // Said once the list shows it: "done" with the old row still there would be a lie.
    const listed = await refresh();
    status.textContent = listed ? outcome : `${outcome} ${status.textContent}`;
  }

  function actions(card) {
    if (!canManage || card.provider !== "embedded") return "";
    const id = encodeURIComponent(card.id);
    const buttons = [];
    if (card.loaded) buttons.push(h("button", { type: "button", onclick: () => act(`Unload ${card.id}`, `/v1/locopilot/models/${id}/unload`) }, "Unload"));
    else buttons.push(h("button", { type: "button", onclick: () => act(`Load ${card.id}`, `/v1/locopilot/models/${id}/load`) }, "Load"));
    buttons.push(
      h(
        "button",
        {
          type: "button",
          class: "danger",
          onclick: () => {
            if (confirm(`Delete the model ${card.id} and its file?`)) act(`Delete ${card.id}`, `/v1/locopilot/models/${id}`, "DELETE");
          },
        },
        "Delete",
      ),
    );
    return h("div", { class: "row-actions" }, buttons);
  }

  async function refresh() {
    try {
      const models = await getJson("/v1/models");
      const rows = models.data.map((card) => [
        h("strong", {}, card.id),
        `${card.provider} (${card.locality})`,
        formatBytes(card.size_bytes),
        card.quantization || "–",
        card.context_length ? String(card.context_length) : "–",
        card.provider === "embedded" ? (card.loaded ? "loaded" : "not loaded") : "upstream",
        card.lineage ? `fine-tuned from ${card.lineage.base_model || "?"}` : card.source || "",
        actions(card),
      ]);
      clear(listing).append(table("Models", ["Model", "Provider", "Size", "Quantization", "Context", "State", "Origin", ""], rows));
      return true;
    } catch (error) {
      status.textContent = `Models could not be listed: ${error.message}`;
      return false;
    }
  }

  root.append(h("h2", {}, "Models"), status, listing);
  if (canManage) root.append(pullForm(refresh));
  await refresh();
}

function pullForm(refresh) {
  const ref = h("input", { id: "pull-ref", required: true, placeholder: "hf.co/OWNER/REPO:Q4_K_M, an Ollama name, or a URL" });
  const name = h("input", { id: "pull-name", placeholder: "(from the reference)" });
  const bar = h("progress", { id: "pull-progress", max: 1, value: 0, "aria-label": "Pull progress" });
  const line = h("p", { role: "status", id: "pull-status" });
  const start = h("button", { type: "submit" }, "Pull");
  const cancel = h("button", { type: "button", disabled: true }, "Cancel");
  let controller = null;
  cancel.addEventListener("click", () => controller && controller.abort());
  const form = h(
    "form",
    { class: "panel", "aria-label": "Pull a model" },
    h("h3", {}, "Pull a model"),
    h("div", { class: "grid" }, h("label", { for: "pull-ref" }, "Reference"), ref, h("label", { for: "pull-name" }, "Local name"), name),
    h("div", { class: "buttons" }, start, cancel),
    bar,
    line,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    controller = new AbortController();
    start.disabled = true;
    cancel.disabled = false;
    bar.value = 0;
    line.textContent = "Starting…";
    const body = { model: ref.value.trim(), stream: true };
    if (name.value.trim()) body.name = name.value.trim();
    try {
      const response = await api("/v1/locopilot/models/pull", { method: "POST", body, signal: controller.signal });
      for await (const { event, data } of events(response)) {
        if (event === "error") throw new Error(data.error ? data.error.message : "The pull failed.");
        if (event === "model") {
          line.textContent = `Pulled ${data.id}.`;
          bar.value = 1;
          continue;
        }
        let text = data.status;
        if (data.total) {
          bar.max = data.total;
          bar.value = data.completed || 0;
          text += ` — ${formatBytes(data.completed || 0)} of ${formatBytes(data.total)}`;
          if (data.bytes_per_second) text += ` at ${formatBytes(data.bytes_per_second)}/s`;
          if (data.eta_seconds) text += `, ${Math.ceil(data.eta_seconds)} s left`;
        }
        line.textContent = text;
      }
    } catch (error) {
      line.textContent = error.name === "AbortError" ? "Cancelled." : `Pull failed: ${error.message}`;
    } finally {
      controller = null;
      start.disabled = false;
      cancel.disabled = true;
      await refresh();
    }
  });
  return form;
}
