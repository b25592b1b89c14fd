// The one way the console talks to the server: same origin, the key as a bearer header
// (from sessionStorage, never a URL or a cookie), errors read from the OpenAI error shape.

const KEY_STORAGE = "locopilot.key";

export function storedKey() {
  return sessionStorage.getItem(KEY_STORAGE);
}

export function storeKey(key) {
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
}

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(response.status, message);
}

/** fetch() of a path on this server; throws ApiError for an error status not in ``accept``.
 * ``body`` is sent as JSON, ``form`` (a FormData) as multipart. */
export async function api(path, { method = "GET", body, form, headers = {}, signal, accept = [] } = {}) {
  const sent = { ...headers };
  const key = storedKey();
  if (key) sent.Authorization = `Bearer ${key}`;
  if (body !== undefined) sent["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers: sent,
    body: form !== undefined ? form : body === undefined ? undefined : JSON.stringify(body),
    signal,
    credentials: "omit",
    cache: "no-store",
    referrerPolicy: "no-referrer",
  });
  if (!response.ok && !accept.includes(response.status)) throw await errorOf(response);
  return response;
}

export async function getJson(path, options) {
  return (await api(path, options)).json();
}

/** The server-sent events of a response: {event, data} with data parsed as JSON ("[DONE]" ends). */
export async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value.replace(/\r\n/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let event = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) event = line.slice(6).trim();
          else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
        }
        if (!data.length) continue;
        const text = data.join("\n");
        if (text === "[DONE]") return;
        yield { event, data: JSON.parse(text) };
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}
