// A small Markdown renderer for model answers that builds DOM nodes and never parses HTML:
// whatever the model writes, tags included, ends up as text. Covers what chat models use:
// fenced code blocks, headings, lists, block quotes, paragraphs, and inline code, bold,
// italic and http(s) links.

import { h } from "./dom.js";

const FENCE = /^\s*(```+|~~~+)\s*([\w+#.-]*)\s*$/;
const HEADING = /^(#{1,6})\s+(.*)$/;
const BULLET = /^\s*[-*+]\s+(.*)$/;
const NUMBERED = /^\s*\d{1,9}[.)]\s+(.*)$/;
const QUOTE = /^\s*>\s?(.*)$/;
// Underscore emphasis is left out: identifiers like __init__ and window.__x are common in answers.
const INLINE = /(`+)([\s\S]+?)\1|\*\*([^*]+?)\*\*|\*([^*\s][^*]*?)\*|\[([^\]]+)\]\((https?:\/\/[^\s)]+)\)/g;

function inline(text) {
  const nodes = [];
  let last = 0;
  for (const match of text.matchAll(INLINE)) {
    if (match.index > last) nodes.push(text.slice(last, match.index));
    const [, , code, bold, italic, label, url] = match;
    if (code !== undefined) nodes.push(h("code", {}, code));
    else if (bold !== undefined) nodes.push(h("strong", {}, inline(bold)));
    else if (italic !== undefined) nodes.push(h("em", {}, inline(italic)));
    else nodes.push(h("a", { href: url, rel: "noopener noreferrer nofollow", target: "_blank" }, label));
    last = match.index + match[0].length;
  }
  if (last < text.length) nodes.push(text.slice(last));
  return nodes;
}

function codeBlock(language, lines) {
  const code = h("code", language ? { "data-language": language } : {}, lines.join("\n"));
  const copy = h("button", { type: "button", class: "copy", "aria-label": "Copy code" }, "Copy");
  copy.addEventListener("click", () => {
    navigator.clipboard.writeText(code.textContent).then(
      () => (copy.textContent = "Copied"),
      () => (copy.textContent = "Copy failed"),
    );
  });
  return h("div", { class: "code" }, h("div", { class: "code-bar" }, h("span", {}, language || "text"), copy), h("pre", {}, code));
}

/** The nodes of ``text`` rendered as Markdown, in a document fragment. */
export function renderMarkdown(text) {
  const out = document.createDocumentFragment();
  const lines = text.split("\n");
  let paragraph = [];
  let list = null;
  const flushParagraph = () => {
    if (paragraph.length) out.append(h("p", {}, inline(paragraph.join("\n"))));
    paragraph = [];
  };
  const flushList = () => {
    if (list) out.append(list);
    list = null;
  };
  for (let i = 0; i < lines.length; i += 1) {
    const line = lines[i];
    const fence = FENCE.exec(line);
    if (fence) {
      flushParagraph();
      flushList();
      const body = [];
      i += 1;
      while (i < lines.length && !lines[i].trim().startsWith(fence[1])) {
        body.push(lines[i]);
        i += 1;
      }
      out.append(codeBlock(fence[2], body));
      continue;
    }
    let match;
    if (!line.trim()) {
      flushParagraph();
      flushList();
    } else if ((match = HEADING.exec(line))) {
      flushParagraph();
      flushList();
      out.append(h(`h${Math.min(6, match[1].length + 2)}`, {}, inline(match[2])));
    } else if ((match = BULLET.exec(line)) || (match = NUMBERED.exec(line))) {
      flushParagraph();
      const tag = BULLET.test(line) ? "ul" : "ol";
      if (!list || list.tagName.toLowerCase() !== tag) {
        flushList();
        list = h(tag, {});
      }
      list.append(h("li", {}, inline(match[1])));
    } else if ((match = QUOTE.exec(line))) {
      flushParagraph();
      flushList();
      out.append(h("blockquote", {}, inline(match[1])));
    } else {
      flushList();
      paragraph.push(line);
    }
  }
  flushParagraph();
  flushList();
  return out;
}
