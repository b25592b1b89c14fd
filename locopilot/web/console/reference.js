// The API reference: the server's OpenAPI schema (GET /openapi/openapi.json, any key) drawn
// as a list of operations; Litestar's viewer pages are not served (they load from CDNs).

import { getJson } from "./api.js";
import { h } from "./dom.js";

const METHODS = ["get", "post", "put", "patch", "delete", "head"];

function schemaName(content) {
  for (const media of Object.values(content || {})) {
    const ref = media.schema && (media.schema.$ref || (media.schema.items && media.schema.items.$ref));
    if (ref) return ref.split("/").pop();
  }
  return "";
}

export async function referencePage(root) {
  root.append(h("h2", {}, "API reference"));
  let schema;
  try {
    schema = await getJson("/openapi/openapi.json");
  } catch (error) {
    root.append(h("p", { class: "error" }, `The schema could not be read: ${error.message}`));
    return;
  }
  const filter = h("input", { id: "reference-filter", type: "search", placeholder: "/v1/chat, models, keys…" });
  const list = h("div", { id: "reference-list" });
  root.append(
    h("p", {}, `${schema.info.title} ${schema.info.version}. The schema itself: GET /openapi/openapi.json (or .yaml) with a key.`),
    h("div", { class: "buttons" }, h("label", { for: "reference-filter" }, "Filter"), filter),
    list,
  );
  const operations = [];
  for (const [path, item] of Object.entries(schema.paths).sort()) {
    for (const method of METHODS) {
      const op = item[method];
      if (!op) continue;
      const body = op.requestBody ? schemaName(op.requestBody.content) : "";
      const answers = Object.entries(op.responses || {}).map(([code, r]) => `${code} ${r.description || ""}`.trim());
      const node = h(
        "details",
        { class: "operation" },
        h("summary", {}, h("code", { class: `method ${method}` }, method.toUpperCase()), " ", h("code", {}, path), " ", op.summary || ""),
        op.description ? h("p", { class: "plain" }, op.description) : null,
        (op.parameters || []).length
          ? h("p", {}, "Parameters: ", op.parameters.map((p) => `${p.name} (${p.in}${p.required ? ", required" : ""})`).join(", "))
          : null,
        body ? h("p", {}, `Request body: ${body}`) : null,
        h("ul", {}, answers.map((text) => h("li", {}, text))),
      );
      operations.push({ text: `${method} ${path} ${op.summary || ""}`.toLowerCase(), node });
      list.append(node);
    }
  }
  filter.addEventListener("input", () => {
    const wanted = filter.value.trim().toLowerCase();
    for (const { text, node } of operations) node.hidden = Boolean(wanted) && !text.includes(wanted);
  });
}
