// The effective configuration, read only; secrets come masked from the server.

import { getJson } from "./api.js";
import { h, table } from "./dom.js";

export async function settingsPage(root) {
  root.append(h("h2", {}, "Settings"), h("p", {}, "Set by environment variables when the server starts; read only here."));
  try {
    const found = await getJson("/v1/locopilot/settings");
    const rows = found.data.map((s) => [h("code", {}, s.variable), h("code", {}, s.value), s.value === s.default ? "" : "changed", s.description]);
    root.append(h("div", { id: "settings-list" }, table("Effective configuration", ["Variable", "Value", "", "What it does"], rows)));
  } catch (error) {
    root.append(h("p", { class: "error" }, `The settings could not be read: ${error.message}`));
  }
}
