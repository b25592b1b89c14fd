// Keys (create with the secret shown once, list with usage, revoke) and the audit log.

import { api, getJson } from "./api.js";
import { clear, count, formatTime, h, table } from "./dom.js";

const SCOPES = ["inference", "models", "training", "admin"];

export async function keysPage(root) {
  const status = h("p", { role: "status", id: "keys-status" });
  const listing = h("div", { id: "keys-list" });
  const secretBox = h("div", { id: "key-secret", class: "panel", hidden: true });

  const name = h("input", { id: "key-name", required: true, pattern: "[A-Za-z0-9][A-Za-z0-9._@+\\-]{0,63}" });
  const scopes = SCOPES.map((scope) => h("input", { type: "checkbox", id: `key-scope-${scope}`, value: scope, checked: scope === "inference" }));
  const privacy = h("select", { id: "key-privacy" }, h("option", { value: "" }, "none"), ["local_only", "local_preferred", "any"].map((v) => h("option", { value: v }, v)));
  const expires = h("input", { id: "key-expires", placeholder: "30d, 12h or an ISO date" });
  const rpm = h("input", { id: "key-rpm", type: "number", min: 1, placeholder: "server default" });
  const tpm = h("input", { id: "key-tpm", type: "number", min: 1, placeholder: "server default" });
  const form = h(
    "form",
    { class: "panel", "aria-label": "Create a key" },
    h("h3", {}, "Create a key"),
    h(
      "div",
      { class: "grid" },
      h("label", { for: "key-name" }, "Name"),
      name,
      h("span", {}, "Scopes"),
      h("fieldset", { class: "scopes" }, h("legend", { class: "visually-hidden" }, "Scopes"), scopes.map((box) => h("label", {}, box, ` ${box.value}`))),
      h("label", { for: "key-privacy" }, "Privacy pin"),
      privacy,
      h("label", { for: "key-expires" }, "Expires"),
      expires,
      h("label", { for: "key-rpm" }, "Requests per minute"),
      rpm,
      h("label", { for: "key-tpm" }, "Tokens per minute"),
      tpm,
    ),
    h("div", { class: "buttons" }, h("button", { type: "submit", id: "key-create" }, "Create")),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = { name: name.value.trim(), scopes: scopes.filter((b) => b.checked).map((b) => b.value) };
    if (privacy.value) body.privacy = privacy.value;
    if (expires.value.trim()) body.expires = expires.value.trim();
    if (rpm.value) body.rpm = Number(rpm.value);
    if (tpm.value) body.tpm = Number(tpm.value);
    try {
      const created = await getJson("/v1/admin/keys", { method: "POST", body });
      showSecret(created);
      form.reset();
      status.textContent = `Created ${created.name}.`;
    } catch (error) {
      status.textContent = `The key was not created: ${error.message}`;
    }
    await refresh();
  });

  function showSecret(created) {
    const secret = h("code", { id: "key-secret-value" }, created.secret);
    const copy = h("button", { type: "button", id: "key-copy" }, "Copy");
    copy.addEventListener("click", () =>
      navigator.clipboard.writeText(created.secret).then(
        () => (copy.textContent = "Copied"),
        () => (copy.textContent = "Copy failed: select the key instead"),
      ),
    );
    const done = h("button", { type: "button" }, "I have saved it");
    done.addEventListener("click", () => {
      clear(secretBox);
      secretBox.hidden = true;
    });
    clear(secretBox).append(h("p", {}, `The secret of ${created.name}, shown this once:`), h("p", {}, secret, " ", copy), done);
    secretBox.hidden = false;
  }

  async function revoke(key) {
    if (!confirm(`Revoke the key ${key.name}? Requests with it fail from now on.`)) return;
    try {
      await api(`/v1/admin/keys/${encodeURIComponent(key.id)}`, { method: "DELETE" });
      status.textContent = `Revoked ${key.name}.`;
    } catch (error) {
      status.textContent = `The key was not revoked: ${error.message}`;
    }
    await refresh();
  }

  async function refresh() {
    try {
      const [keys, usage] = await Promise.all([getJson("/v1/admin/keys"), getJson("/v1/locopilot/usage")]);
      const used = new Map();
      for (const row of usage.data) {
        const total = used.get(row.key_id) || { requests: 0, tokens: 0 };
        total.requests += row.requests;
        total.tokens += row.tokens_in + row.tokens_out;
        used.set(row.key_id, total);
      }
      const rows = keys.data.map((key) => {
        const total = used.get(key.id) || { requests: 0, tokens: 0 };
        return [
          h("strong", {}, key.name),
          key.prefix + "…",
          key.scopes.join(", "),
          key.state,
          key.privacy || "",
          [key.rpm ? `${key.rpm}/min` : "", key.tpm ? `${key.tpm} tokens/min` : ""].filter(Boolean).join(", ") || "default",
          `${count(total.requests, "request")}, ${count(total.tokens, "token")}`,
          formatTime(key.created_at),
          formatTime(key.last_used_at),
          key.state === "active" ? h("button", { type: "button", class: "danger", "aria-label": `Revoke ${key.name}`, onclick: () => revoke(key) }, "Revoke") : "",
        ];
      });
      clear(listing).append(table("API keys (usage over the last day)", ["Name", "Prefix", "Scopes", "State", "Privacy", "Quota", "Usage", "Created", "Last used", ""], rows));
    } catch (error) {
      status.textContent = `Keys could not be listed: ${error.message}`;
    }
  }

  root.append(h("h2", {}, "API keys"), status, secretBox, form, listing);
  await refresh();
}

export async function auditPage(root) {
  const filter = h("input", { id: "audit-event", placeholder: "auth_failed, forbidden, key_created…" });
  const listing = h("div", { id: "audit-list" });
  const form = h("form", { class: "buttons", "aria-label": "Filter the audit log" }, h("label", { for: "audit-event" }, "Event"), filter, h("button", { type: "submit" }, "Filter"));
  async function refresh() {
    const query = new URLSearchParams({ limit: "200" });
    if (filter.value.trim()) query.set("event", filter.value.trim());
    try {
      const found = await getJson(`/v1/admin/audit?${query}`);
      const rows = found.data.map((e) => [formatTime(e.created_at), e.event, e.key_id || "", `${e.method || ""} ${e.path || ""}`, e.status ? String(e.status) : "", e.client || "", e.detail ? JSON.stringify(e.detail) : ""]);
      clear(listing).append(table("Audit events, newest first", ["When", "Event", "Key", "Request", "Status", "Client", "Detail"], rows));
    } catch (error) {
      clear(listing).append(h("p", { class: "error" }, `The audit log could not be read: ${error.message}`));
    }
  }
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    refresh();
  });
  root.append(h("h2", {}, "Audit log"), form, listing);
  await refresh();
}
