// Chat: model picker, privacy, system prompt, sampling, streaming with a stop button,
// Markdown answers, token counts and speed per reply; conversations in localStorage.

import { api, events, getJson } from "./api.js";
import { clear, h } from "./dom.js";
import { renderMarkdown } from "./markdown.js";

const STORE = "locopilot.conversations";
const SETTINGS = "locopilot.chat-settings";

function loadConversations() {
  try {
    const list = JSON.parse(localStorage.getItem(STORE) || "[]");
    return Array.isArray(list) ? list : [];
  } catch {
    return [];
  }
}

function saveConversations(list) {
  localStorage.setItem(STORE, JSON.stringify(list.slice(0, 100)));
}

function newConversation() {
  return { id: crypto.randomUUID(), title: "New chat", messages: [], updated: Date.now() };
}

function statsText(stats) {
  if (!stats) return "";
  const parts = [];
  if (stats.prompt_tokens !== undefined) parts.push(`${stats.prompt_tokens} prompt tokens`);
  if (stats.completion_tokens !== undefined) parts.push(`${stats.completion_tokens} completion tokens`);
  if (stats.tokens_per_second) parts.push(`${stats.tokens_per_second.toFixed(1)} tokens/s`);
  if (stats.provider) parts.push(`via ${stats.provider}`);
  if (stats.model) parts.push(stats.model);
  if (stats.stopped) parts.push("stopped");
  return parts.join(" · ");
}

function messageNode(message) {
  const body = h("div", { class: "body" });
  if (message.role === "assistant") body.append(renderMarkdown(message.content));
  else body.append(h("p", { class: "plain" }, message.content));
  const node = h(
    "article",
    { class: `message ${message.role}`, "aria-label": message.role === "user" ? "You" : "Assistant" },
    h("div", { class: "role" }, message.role === "user" ? "You" : "Assistant"),
    body,
    h("div", { class: "stats" }, statsText(message.stats)),
  );
  if (message.error) node.append(h("p", { class: "error", role: "alert" }, message.error));
  return node;
}

export async function chatPage(root) {
  const settings = { privacy: "", system: "", temperature: "0.7", max_tokens: "512", model: "" };
  try {
    Object.assign(settings, JSON.parse(localStorage.getItem(SETTINGS) || "{}"));
  } catch {
    // keep the defaults
  }
  let conversations = loadConversations();
  let current = conversations[0] || newConversation();
  let controller = null;

  const modelSelect = h("select", { id: "chat-model", name: "model" });
  const privacy = h(
    "select",
    { id: "chat-privacy", name: "privacy" },
    h("option", { value: "" }, "server default"),
    ["local_only", "local_preferred", "any"].map((v) => h("option", { value: v }, v)),
  );
  const system = h("textarea", { id: "chat-system", rows: 3, placeholder: "You are a helpful assistant." });
  const temperature = h("input", { id: "chat-temperature", type: "number", min: 0, max: 2, step: 0.1 });
  const maxTokens = h("input", { id: "chat-max-tokens", type: "number", min: 1, max: 131072, step: 1 });
  privacy.value = settings.privacy;
  system.value = settings.system;
  temperature.value = settings.temperature;
  maxTokens.value = settings.max_tokens;

  const list = h("ul", { class: "conversations", "aria-label": "Conversations" });
  const log = h("div", { class: "log", "aria-live": "polite", id: "chat-log" });
  const prompt = h("textarea", { id: "chat-prompt", rows: 3, placeholder: "Ask something (Enter sends, Shift+Enter: new line)" });
  const send = h("button", { type: "submit", id: "chat-send" }, "Send");
  const stop = h("button", { type: "button", id: "chat-stop", disabled: true }, "Stop");
  const problem = h("p", { class: "error", role: "alert", id: "chat-error" });

  function remember() {
    Object.assign(settings, {
      privacy: privacy.value,
      system: system.value,
      temperature: temperature.value,
      max_tokens: maxTokens.value,
      model: modelSelect.value,
    });
    localStorage.setItem(SETTINGS, JSON.stringify(settings));
  }
  for (const control of [modelSelect, privacy, system, temperature, maxTokens]) control.addEventListener("change", remember);

  function persist() {
    current.updated = Date.now();
    conversations = [current, ...conversations.filter((c) => c.id !== current.id)];
    saveConversations(conversations);
    drawList();
  }

  function drawList() {
    clear(list);
    for (const conversation of conversations) {
      const open = h("button", { type: "button", class: conversation.id === current.id ? "current" : "" }, conversation.title);
      open.addEventListener("click", () => {
        current = conversation;
        drawList();
        drawLog();
      });
      const remove = h("button", { type: "button", class: "small", "aria-label": `Delete conversation ${conversation.title}` }, "×");
      remove.addEventListener("click", () => {
        conversations = conversations.filter((c) => c.id !== conversation.id);
        saveConversations(conversations);
        if (current.id === conversation.id) current = conversations[0] || newConversation();
        drawList();
        drawLog();
      });
      list.append(h("li", {}, open, remove));
    }
  }

  function drawLog() {
    clear(log);
    for (const message of current.messages) log.append(messageNode(message));
    log.scrollTop = log.scrollHeight;
  }

  async function ask(event) {
    event.preventDefault();
    const text = prompt.value.trim();
    if (!text || controller) return;
    problem.textContent = "";
    remember();
    if (!current.messages.length) current.title = text.slice(0, 60);
    current.messages.push({ role: "user", content: text });
    prompt.value = "";
    const reply = { role: "assistant", content: "", stats: {} };
    current.messages.push(reply);
    drawLog();
    const replyNode = log.lastElementChild;
    const body = replyNode.querySelector(".body");
    const statsLine = replyNode.querySelector(".stats");

    const messages = [];
    if (system.value.trim()) messages.push({ role: "system", content: system.value });
    for (const m of current.messages.slice(0, -1)) messages.push({ role: m.role, content: m.content });
    const request = { model: modelSelect.value, messages, stream: true, stream_options: { include_usage: true } };
    if (temperature.value !== "") request.temperature = Number(temperature.value);
    if (maxTokens.value !== "") request.max_tokens = Number(maxTokens.value);
    const headers = privacy.value ? { "X-Routing-Privacy": privacy.value } : {};

    controller = new AbortController();
    send.disabled = true;
    stop.disabled = false;
    replyNode.setAttribute("aria-busy", "true");
    let firstTokenAt = null;
    let pending = false;
    const redraw = () => {
      pending = false;
      clear(body).append(renderMarkdown(reply.content));
      log.scrollTop = log.scrollHeight;
    };
    try {
      const response = await api("/v1/chat/completions", { method: "POST", body: request, headers, signal: controller.signal });
      reply.stats.provider = response.headers.get("X-Locopilot-Provider") || undefined;
      for await (const { event, data } of events(response)) {
        if (event === "error" || data.error) throw new Error(data.error ? data.error.message : "The stream failed.");
        if (data.model) reply.stats.model = data.model;
        const delta = data.choices && data.choices[0] && data.choices[0].delta;
        if (delta && delta.content) {
          if (firstTokenAt === null) firstTokenAt = performance.now();
          reply.content += delta.content;
          if (!pending) {
            pending = true;
            requestAnimationFrame(redraw);
          }
        }
        if (data.usage) {
          reply.stats.prompt_tokens = data.usage.prompt_tokens;
          reply.stats.completion_tokens = data.usage.completion_tokens;
        }
      }
      if (firstTokenAt !== null && reply.stats.completion_tokens > 1) {
        const seconds = (performance.now() - firstTokenAt) / 1000;
        if (seconds > 0) reply.stats.tokens_per_second = (reply.stats.completion_tokens - 1) / seconds;
      }
    } catch (error) {
      if (error.name === "AbortError") reply.stats.stopped = true;
      else {
        reply.error = error.message;
        problem.textContent = error.message;
      }
    } finally {
      controller = null;
      send.disabled = false;
      stop.disabled = true;
      replyNode.removeAttribute("aria-busy");
      persist();
      drawLog();
      prompt.focus();
    }
  }

  stop.addEventListener("click", () => controller && controller.abort());
  prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  const form = h("form", { class: "composer", "aria-label": "Message" }, h("label", { for: "chat-prompt", class: "visually-hidden" }, "Message"), prompt, h("div", { class: "buttons" }, send, stop));
  form.addEventListener("submit", ask);
  const fresh = h("button", { type: "button", id: "chat-new" }, "New chat");
  fresh.addEventListener("click", () => {
    current = newConversation();
    drawList();
    drawLog();
    prompt.focus();
  });

  root.append(
    h(
      "div",
      { class: "chat" },
      h("aside", { class: "sidebar" }, fresh, list),
      h(
        "section",
        { class: "conversation", "aria-label": "Conversation" },
        h(
          "details",
          // Open where there is room; on a phone the conversation comes first.
          { class: "settings", open: !matchMedia("(max-width: 700px)").matches },
          h("summary", {}, "Model and settings"),
          h(
            "div",
            { class: "grid" },
            h("label", { for: "chat-model" }, "Model"),
            modelSelect,
            h("label", { for: "chat-privacy" }, "Privacy"),
            privacy,
            h("label", { for: "chat-temperature" }, "Temperature"),
            temperature,
            h("label", { for: "chat-max-tokens" }, "Max tokens"),
            maxTokens,
            h("label", { for: "chat-system" }, "System prompt"),
            system,
          ),
        ),
        log,
        problem,
        form,
      ),
    ),
  );
  drawList();
  drawLog();

  try {
    const models = await getJson("/v1/models");
    for (const card of models.data) {
      const where = [card.provider, card.locality].filter(Boolean).join(", ");
      modelSelect.append(h("option", { value: card.id }, where ? `${card.id} (${where})` : card.id));
    }
    if (settings.model && models.data.some((card) => card.id === settings.model)) modelSelect.value = settings.model;
  } catch (error) {
    problem.textContent = `Models could not be listed: ${error.message}`;
  }
}
