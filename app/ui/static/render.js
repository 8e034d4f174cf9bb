// DOM building. Every string from the service goes in through textContent (never innerHTML), so a
// training document holding "<script>" shows those characters and runs nothing.

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = String(v);
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

// Words too common to be worth highlighting as "shared with the query".
const STOP = new Set(("a an and are as at be by for from has have he her his in is it its of on or she " +
  "that the their them they this to was were which with").split(" "));
const WORD = /[\p{L}\p{N}]+/gu;

export function queryWords(...texts) {
  const words = new Set();
  for (const t of texts) {
    for (const m of (t || "").matchAll(WORD)) {
      const w = m[0].toLowerCase();
      if (w.length > 1 && !STOP.has(w)) words.add(w);
    }
  }
  return words;
}

// ``text`` as text nodes, with the words in ``words`` wrapped in <mark>.
export function highlighted(text, words) {
  const frag = document.createDocumentFragment();
  let last = 0;
  for (const m of text.matchAll(WORD)) {
    if (!words.has(m[0].toLowerCase())) continue;
    if (m.index > last) frag.append(document.createTextNode(text.slice(last, m.index)));
    frag.append(el("mark", { text: m[0] }));
    last = m.index + m[0].length;
  }
  if (last < text.length) frag.append(document.createTextNode(text.slice(last)));
  return frag;
}

export function fmt(x, digits = 3) {
  if (typeof x !== "number" || !Number.isFinite(x)) return String(x);
  if (x !== 0 && (Math.abs(x) < 1e-3 || Math.abs(x) >= 1e5)) return x.toExponential(2);
  return x.toFixed(digits);
}

export function ms(x) {
  return typeof x === "number" ? `${x < 10 ? x.toFixed(1) : Math.round(x)} ms` : "–";
}

// One ranked list: rank, id, a bar scaled to the largest |score| in the answer, the score, the text.
export function rankedList(ol, items, scale, words, onOpen) {
  ol.replaceChildren();
  if (!items.length) {
    ol.append(el("li", { class: "empty muted", text: "none: the sparse solve kept no example on this side" }));
    return;
  }
  for (const s of items) {
    const fill = el("span", { class: "fill" });
    fill.style.width = `${Math.max(2, (100 * Math.abs(s.score)) / scale).toFixed(1)}%`;
    const open = el("button", { type: "button", class: "link example-open", title: "open the full example",
      dataset: { id: s.id } }, s.id);
    open.addEventListener("click", () => onOpen(s.id));
    const text = el("div", { class: "snippet" });
    if (typeof s.text === "string") text.append(highlighted(s.text, words));
    else text.append(el("span", { class: "muted", text: "(text not included)" }));
    ol.append(el("li", { class: "item", dataset: { id: s.id } },
      el("div", { class: "item-head" },
        el("span", { class: "rank", text: `#${s.rank}` }), open,
        el("span", { class: "index muted", text: `index ${s.index}` }),
        el("span", { class: "score", text: fmt(s.score, 4) })),
      el("div", { class: "scorebar" }, fill),
      text));
  }
}

export function definitionList(dl, pairs) {
  dl.replaceChildren();
  for (const [k, v, title] of pairs) {
    dl.append(el("div", { class: "pair", title }, el("dt", { text: k }), el("dd", { text: v })));
  }
}
