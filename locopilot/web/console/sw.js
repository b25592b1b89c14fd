// The console's service worker: it keeps the shell (the page and the files in SHELL) so that
// the console opens, and can be installed, when the server is out of reach. It never stores
// or answers an API call: those go to the network untouched.

const CACHE = "locopilot-console-v1";
// Every file of the console (tests/test_console.py checks this list against the folder).
const SHELL = [
  "/console/api.js",
  "/console/app.js",
  "/console/charts.js",
  "/console/chat.js",
  "/console/dom.js",
  "/console/icon.svg",
  "/console/index.html",
  "/console/keys.js",
  "/console/manifest.json",
  "/console/markdown.js",
  "/console/models.js",
  "/console/reference.js",
  "/console/settings.js",
  "/console/style.css",
  "/console/training.js",
  "/console/traffic.js",
];
const PAGE = "/";

self.addEventListener("install", (event) => {
  const page = new Request(PAGE, { headers: { Accept: "text/html" } });
  event.waitUntil(caches.open(CACHE).then((cache) => cache.addAll([page, ...SHELL])));
  self.skipWaiting();
});

self.addEventListener("activate", (event) => {
  event.waitUntil(
    caches
      .keys()
      .then((names) => Promise.all(names.filter((name) => name !== CACHE).map((name) => caches.delete(name))))
      .then(() => self.clients.claim()),
  );
});

function shellKey(request) {
  const url = new URL(request.url);
  if (request.method !== "GET" || url.origin !== self.location.origin) return null;
  if (url.pathname === PAGE && request.mode === "navigate") return PAGE;
  if (url.pathname.startsWith("/console/") && url.search === "") return url.pathname;
  return null;
}

// Network first (a newer server's files win), the cached shell when the network fails.
self.addEventListener("fetch", (event) => {
  const key = shellKey(event.request);
  if (key === null) return;
  event.respondWith(
    fetch(event.request).then(
      (response) => {
        if (response.ok) {
          const copy = response.clone();
          event.waitUntil(caches.open(CACHE).then((cache) => cache.put(key, copy)));
        }
        return response;
      },
      () => caches.match(key, { ignoreVary: true, ignoreSearch: true }).then((found) => found || Response.error()),
    ),
  );
});
