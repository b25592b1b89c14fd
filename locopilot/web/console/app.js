// The console's entry point: who is signed in (GET /v1/locopilot/me), the pages that key
// may see, and hash navigation between them.

import { ApiError, getJson, storeKey, storedKey } from "./api.js";
import { chatPage } from "./chat.js";
import { clear, h, table } from "./dom.js";
import { auditPage, keysPage } from "./keys.js";
import { modelsPage } from "./models.js";
import { referencePage } from "./reference.js";
import { settingsPage } from "./settings.js";
import { trafficPage } from "./traffic.js";
import { trainingPage } from "./training.js";

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const who = document.getElementById("who");
const signOut = document.getElementById("signout");

/** Each page, the scope it needs and how it is drawn. */
const PAGES = [
  { id: "chat", title: "Chat", scope: "inference", draw: (root) => chatPage(root) },
  { id: "models", title: "Models", scope: "models", draw: (root) => modelsPage(root, { canManage: true }) },
  { id: "training", title: "Training", scope: "training", draw: (root) => trainingPage(root) },
  { id: "traffic", title: "Traffic", scope: "admin", draw: (root) => trafficPage(root) },
  { id: "keys", title: "Keys", scope: "admin", draw: (root) => keysPage(root) },
  { id: "audit", title: "Audit", scope: "admin", draw: (root) => auditPage(root) },
  { id: "settings", title: "Settings", scope: "admin", draw: (root) => settingsPage(root) },
  { id: "usage", title: "My usage", scope: null, draw: (root) => usagePage(root) },
  { id: "reference", title: "API", scope: null, draw: (root) => referencePage(root) },
];

let principal = null;

async function usagePage(root) {
  root.append(h("h2", {}, "My usage"));
  let me;
  try {
    me = await getJson("/v1/locopilot/me");
  } catch (error) {
    root.append(h("p", { class: "error" }, `Usage could not be read: ${error.message}`));
    return;
  }
  const rows = me.usage_last_day.map((u) => [u.model, String(u.requests), String(u.errors), String(u.tokens_in), String(u.tokens_out)]);
  root.append(
    h("p", {}, me.open ? "This server needs no API key (loopback, none created)." : `Signed in as ${me.name} with scopes: ${me.scopes.join(", ")}.`),
    h("div", { id: "usage-list" }, table("Requests over the last day", ["Model", "Requests", "Errors", "Tokens in", "Tokens out"], rows)),
  );
}

function allowed(page) {
  return principal && (page.scope === null || principal.scopes.includes(page.scope));
}

function show() {
  const wanted = location.hash.replace(/^#\/?/, "") || "chat";
  const visible = PAGES.filter(allowed);
  const page = visible.find((p) => p.id === wanted) || visible[0];
  for (const link of nav.querySelectorAll("a")) {
    if (link.dataset.page === page.id) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  clear(main);
  document.title = `${page.title} · locopilot`;
  const root = h("div", { class: `page page-${page.id}` });
  main.append(root);
  page.draw(root);
}

function signInForm(message) {
  const key = h("input", { id: "signin-key", type: "password", autocomplete: "off", required: true, spellcheck: "false" });
  const problem = h("p", { class: "error", role: "alert", id: "signin-error" }, message || "");
  const form = h(
    "form",
    { class: "panel signin", "aria-label": "Sign in" },
    h("h2", {}, "Sign in"),
    h("p", {}, "Enter an API key. It is kept in this tab only and sent to this server as a bearer header."),
    h("label", { for: "signin-key" }, "API key"),
    key,
    h("div", { class: "buttons" }, h("button", { type: "submit", id: "signin-submit" }, "Sign in")),
    problem,
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    storeKey(key.value.trim());
    start();
  });
  clear(nav);
  clear(main).append(form);
  who.textContent = "";
  signOut.hidden = true;
  key.focus();
}

/** The server did not answer (offline, stopped): say so, keep the key, offer to ask again. */
function unreachable(error) {
  const again = h("button", { type: "button", id: "start-again" }, "Try again");
  again.addEventListener("click", start);
  clear(nav);
  clear(main).append(
    h("div", { class: "panel signin" }, h("p", { class: "error", role: "alert", id: "start-error" }, `The server could not be asked: ${error.message}`), again),
  );
}

async function start() {
  try {
    principal = await getJson("/v1/locopilot/me");
  } catch (error) {
    principal = null;
    if (error instanceof ApiError && error.status === 401) {
      const hadKey = Boolean(storedKey());
      storeKey(null);
      signInForm(hadKey ? error.message : "");
    } else {
      unreachable(error);
    }
    return;
  }
  clear(nav);
  for (const page of PAGES.filter(allowed)) nav.append(h("a", { href: `#/${page.id}`, "data-page": page.id }, page.title));
  who.textContent = principal.open ? "no key needed (loopback)" : `${principal.name}`;
  signOut.hidden = principal.open;
  show();
}

signOut.addEventListener("click", () => {
  storeKey(null);
  principal = null;
  location.hash = "";
  signInForm("");
});
window.addEventListener("hashchange", () => principal && show());
if ("serviceWorker" in navigator) {
  // Installable, and the shell opens offline; refused (blocked, or an insecure origin): no matter.
  navigator.serviceWorker.register("/console/sw.js", { scope: "/" }).catch(() => {});
}
start();
