// Building the page from DOM nodes only. Text always goes in as text nodes (textContent),
// never as HTML: nothing a model, a key name or an error message says can become markup.

const SVG_NS = "http://www.w3.org/2000/svg";

function fill(node, attrs, children) {
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      node.addEventListener(name.slice(2), value);
    } else if (name === "dataset") {
      Object.assign(node.dataset, value);
    } else {
      node.setAttribute(name, value === true ? "" : String(value));
    }
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** An HTML element: h("button", {type: "button", onclick: f}, "Send"). */
export function h(tag, attrs, ...children) {
  return fill(document.createElement(tag), attrs, children);
}

/** An SVG element, for the charts. */
export function svg(tag, attrs, ...children) {
  return fill(document.createElementNS(SVG_NS, tag), attrs, children);
}

export function clear(node) {
  while (node.firstChild) node.firstChild.remove();
  return node;
}

export function formatBytes(bytes) {
  if (bytes === null || bytes === undefined) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return `${value.toFixed(unit === 0 ? 0 : 1)} ${units[unit]}`;
}

/** "1 request", "2 requests". */
export function count(n, word) {
  return `${n} ${word}${n === 1 ? "" : "s"}`;
}

export function formatTime(seconds) {
  if (!seconds) return "–";
  return new Date(seconds * 1000).toLocaleString();
}

let captions = 0;

/** A table with a caption, header cells and rows of cells (strings or nodes).
 *
 * On a phone each row is drawn as a card, each cell under its column's name (``data-label``);
 * the roles are spelled out because a table drawn with ``display: block`` loses them in some
 * browsers. The table sits in a region that scrolls sideways when it is still wider than the
 * screen, rather than the page; the region takes focus, so that it scrolls from the keyboard. */
export function table(caption, headers, rows) {
  captions += 1;
  const id = `caption-${captions}`;
  const body = rows.length
    ? rows.map((cells) => h("tr", { role: "row" }, cells.map((cell, i) => h("td", { role: "cell", "data-label": headers[i] || null }, cell))))
    : h("tr", { role: "row" }, h("td", { role: "cell", colspan: headers.length }, "None."));
  return h(
    "div",
    { class: "scroll", role: "region", "aria-labelledby": id, tabindex: 0 },
    h(
      "table",
      { role: "table" },
      h("caption", { id }, caption),
      h("thead", { role: "rowgroup" }, h("tr", { role: "row" }, headers.map((name) => h("th", { scope: "col", role: "columnheader" }, name)))),
      h("tbody", { role: "rowgroup" }, body),
    ),
  );
}
