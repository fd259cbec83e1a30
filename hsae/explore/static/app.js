// hsae explore: the feature forest, a panel per feature, search by index and by token.
// Data arrive as scripts calling HSAE_LOAD(key, value) (fetch() of file:// is refused), loaded
// on demand. Data only ever reach the page through textContent / createElement, never as HTML.
"use strict";

const PAGE = 100;          // rows rendered per list before a "show more" button
const RESULTS = 50;        // search hits shown per kind
const HOT = [255, 136, 0]; // highlight colour; its alpha is activation / max activation

const cache = new Map();   // key -> value handed to HSAE_LOAD
const waiting = new Map(); // key -> {promise, resolve, reject}
let F = null;              // the forest: sizes, parents, freq, labels, children, roots ...

window.HSAE_LOAD = (key, value) => {
  cache.set(key, value);
  const w = waiting.get(key);
  if (w) w.resolve(value);
};

function load(key) {
  if (cache.has(key)) return Promise.resolve(cache.get(key));
  if (waiting.has(key)) return waiting.get(key).promise;
  const w = {};
  w.promise = new Promise((resolve, reject) => { w.resolve = resolve; w.reject = reject; });
  waiting.set(key, w);
  const script = document.createElement("script");
  script.src = `data/${key}.js`;
  script.onerror = () => { waiting.delete(key); w.reject(new Error(`cannot load data/${key}.js`)); };
  script.onload = () => script.remove();
  document.head.appendChild(script);
  return w.promise;
}

// ---------------------------------------------------------------- small DOM helpers

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props || {})) {
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "hidden") node.hidden = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) {
    if (child == null) continue;
    node.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
  }
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
  return node;
}

const fid = (l, i) => `${l}:${i}`;
const pct = (f) => (f === 0 ? "0" : (100 * f).toPrecision(3)) + "%";
const fmt = (x) => (Math.abs(x) >= 100 ? x.toFixed(0) : x.toPrecision(3));
const labelOf = (l, i) => (F.labels[fid(l, i)] || null);

function showError(message) {
  const box = document.getElementById("error");
  box.textContent = message;
  box.hidden = false;
}

// ---------------------------------------------------------------- the forest model

function prepare(forest) {
  const L = forest.sizes.length;
  const children = forest.sizes.map((n) => new Array(n));
  const roots = [];
  for (let l = 0; l < L; l++) {
    const parents = forest.parents[l];
    for (let i = 0; i < forest.sizes[l]; i++) {
      const p = l === 0 ? -1 : parents[i];
      if (p < 0) roots.push([l, i]);
      else (children[l - 1][p] || (children[l - 1][p] = [])).push(i);
    }
  }
  // Descendant counts, finest level first: O(features).
  const desc = forest.sizes.map((n) => new Int32Array(n));
  for (let l = L - 1; l > 0; l--) {
    for (let i = 0; i < forest.sizes[l]; i++) {
      const p = forest.parents[l][i];
      if (p >= 0) desc[l - 1][p] += 1 + desc[l][i];
    }
  }
  const byCover = (a, b) =>
    forest.freq[b[0]][b[1]] - forest.freq[a[0]][a[1]] ||
    desc[b[0]][b[1]] - desc[a[0]][a[1]] || a[0] - b[0] || a[1] - b[1];
  roots.sort(byCover);
  for (let l = 0; l < L - 1; l++) {
    for (const list of children[l]) {
      if (list) list.sort((x, y) => forest.freq[l + 1][y] - forest.freq[l + 1][x] || x - y);
    }
  }
  const offsets = [0];
  for (const n of forest.sizes) offsets.push(offsets[offsets.length - 1] + n);
  return { ...forest, children, desc, roots, offsets };
}

const kids = (l, i) => (l + 1 < F.sizes.length && F.children[l][i]) || [];

// ---------------------------------------------------------------- forest view (lazy)

const rows = new Map(); // "l:i" -> rendered <li>

function featureLink(l, i, extra) {
  const label = labelOf(l, i);
  return el("a", { href: `#f=${fid(l, i)}`, class: "feat", "data-id": fid(l, i) },
    el("span", { class: "fid", text: fid(l, i) }),
    label ? el("span", { class: "label", text: label[0] }) : null,
    extra || null);
}

function nodeRow(l, i) {
  const children = kids(l, i);
  const li = el("li", { class: "node", "data-id": fid(l, i) });
  const toggle = children.length
    ? el("button", { class: "toggle", "aria-expanded": "false", title: "expand", text: "▸",
        onclick: () => setExpanded(li, l, i, toggle.getAttribute("aria-expanded") !== "true") })
    : el("span", { class: "toggle leaf", text: "·" });
  const count = children.length
    ? el("span", { class: "count", text: `${children.length} ch · ${F.desc[l][i]} desc` }) : null;
  const bar = el("span", { class: "bar" });
  bar.style.width = `${Math.min(100, Math.sqrt(F.freq[l][i]) * 100)}%`;
  li.appendChild(el("div", { class: "row" }, toggle, featureLink(l, i),
    el("span", { class: "freq", text: pct(F.freq[l][i]) }, bar), count));
  rows.set(fid(l, i), li);
  return li;
}

function setExpanded(li, l, i, open) {
  const toggle = li.querySelector(":scope > .row > .toggle");
  let list = li.querySelector(":scope > ul");
  if (open && !list) {
    list = el("ul", { class: "children" });
    li.appendChild(list);
    pagedList(list, kids(l, i).map((c) => [l + 1, c]));
  }
  if (list) list.hidden = !open;
  toggle.setAttribute("aria-expanded", String(open));
  toggle.textContent = open ? "▾" : "▸";
}

// Render items [level, index] PAGE at a time; list.ensure(k) renders up to item k.
function pagedList(list, items) {
  let shown = 0;
  let more = null;
  const render = (upto) => {
    if (more) more.remove();
    const stop = Math.min(items.length, upto);
    for (; shown < stop; shown++) list.appendChild(nodeRow(items[shown][0], items[shown][1]));
    if (shown < items.length) {
      more = el("li", { class: "more" }, el("button", {
        text: `show ${Math.min(PAGE, items.length - shown)} more of ${items.length - shown}`,
        onclick: () => render(shown + PAGE) }));
      list.appendChild(more);
    }
  };
  list.ensure = (k) => { if (k >= shown) render(Math.ceil((k + 1) / PAGE) * PAGE); };
  list.items = items;
  render(PAGE);
}

function renderForest() {
  const forest = document.getElementById("forest");
  pagedList(forest, F.roots);
  const total = F.sizes.reduce((a, b) => a + b, 0);
  document.getElementById("forest-info").textContent =
    `${F.roots.length} roots, ${total} features in ${F.sizes.length} levels ` +
    `(${F.sizes.join(", ")}); roots ordered by frequency`;
}

// Expand the path from the feature's root down to it and scroll it into view.
function reveal(l, i) {
  const path = [[l, i]];
  while (path[0][0] > 0 && F.parents[path[0][0]][path[0][1]] >= 0) {
    const [cl, ci] = path[0];
    path.unshift([cl - 1, F.parents[cl][ci]]);
  }
  let list = document.getElementById("forest");
  for (let k = 0; k < path.length; k++) {
    const [pl, pi] = path[k];
    list.ensure(list.items.findIndex(([a, b]) => a === pl && b === pi));
    const li = rows.get(fid(pl, pi));
    if (!li) return;
    if (k === path.length - 1) {
      for (const old of document.querySelectorAll(".node.selected")) old.classList.remove("selected");
      li.classList.add("selected");
      li.scrollIntoView({ block: "nearest" });
      return;
    }
    setExpanded(li, pl, pi, true);
    list = li.querySelector(":scope > ul");
  }
}

// ---------------------------------------------------------------- feature panel

function histogram(counts, max) {
  const W = 320, H = 90, pad = 18;
  const top = Math.max(1, ...counts);
  const box = svg("svg", { width: W, height: H + pad, class: "hist", role: "img" });
  const title = svg("title");
  title.textContent = "activation histogram (activations > 0)";
  box.appendChild(title);
  const w = W / counts.length;
  counts.forEach((c, b) => {
    const h = c ? Math.max(1, (H * c) / top) : 0;
    const bar = svg("rect", { x: b * w, y: H - h, width: Math.max(1, w - 1), height: h });
    const tip = svg("title");
    tip.textContent = `${fmt((b * max) / counts.length)}–${fmt(((b + 1) * max) / counts.length)}: ${c}`;
    bar.appendChild(tip);
    box.appendChild(bar);
  });
  const axis = (x, anchor, text) => {
    const t = svg("text", { x, y: H + 13, "text-anchor": anchor });
    t.textContent = text;
    return t;
  };
  box.appendChild(axis(0, "start", "0"));
  box.appendChild(axis(W, "end", fmt(max)));
  box.appendChild(axis(W / 2, "middle", `peak bin ${top}`));
  return box;
}

// One kind of contexts ({ids, at, act}, as hsae.explore.site._contexts) as rows of tokens
// whose background alpha is activation / max.
function contextRows(part, vocab, window, max) {
  const acts = part.ids.map((row) => new Float64Array(row.length));
  part.at.forEach((at, k) => { acts[Math.floor(at / window)][at % window] = part.act[k]; });
  const out = [];
  part.ids.forEach((row, c) => {
    if (!row.length) return;
    const peak = Math.max(0, ...acts[c]);
    const text = el("span", { class: "text" });
    row.forEach((t, k) => {
      if (t < 0) return;
      const span = el("span", { class: "tok", text: vocab[t] });
      const a = acts[c][k];
      if (a > 0) {
        span.classList.add("hot");
        span.dataset.act = String(a);
        span.title = `activation ${fmt(a)}`;
        span.style.backgroundColor = `rgba(${HOT.join(", ")}, ${Math.min(1, a / max).toFixed(3)})`;
      }
      text.appendChild(span);
    });
    out.push(el("div", { class: "ctx" }, el("span", { class: "peak", text: fmt(peak) }), text));
  });
  return out;
}

function contextBlock(title, part, chunk, max, kind) {
  const block = el("div", { class: `contexts ${kind}` }, el("h3", { text: title }));
  const lines = contextRows(part, chunk.vocab, chunk.window, max);
  if (!lines.length) block.appendChild(el("p", { class: "hint", text: "none stored" }));
  for (const line of lines) block.appendChild(line);
  return block;
}

function linkList(items, l) {
  const box = el("div", { class: "links" });
  const add = (upto) => {
    box.textContent = "";
    for (const c of items.slice(0, upto)) box.appendChild(featureLink(l, c, el("span", { class: "freq", text: pct(F.freq[l][c]) })));
    if (items.length > upto) {
      box.appendChild(el("button", { text: `all ${items.length}`, onclick: () => add(items.length) }));
    }
  };
  add(PAGE);
  return box;
}

let opened = 0; // only the latest request may fill the panel

async function openFeature(l, i) {
  const ticket = ++opened;
  const panel = document.getElementById("panel");
  const chunkKey = `f/${l}_${Math.floor(i / F.chunk)}`;
  let chunk;
  try {
    chunk = await load(chunkKey);
  } catch (err) {
    showError(err.message);
    return;
  }
  if (ticket !== opened) return;
  const d = chunk.features[i % F.chunk];
  const max = Math.max(d.max, ...d.top.act, ...d.sample.act) || 1;
  const label = labelOf(l, i);
  const p = l > 0 ? F.parents[l][i] : -1;
  const children = kids(l, i);
  const stats = el("dl", { class: "stats" },
    el("dt", { text: "level" }), el("dd", { text: String(l) }),
    el("dt", { text: "index" }), el("dd", { text: String(i) }),
    el("dt", { text: "frequency" }), el("dd", { text: `${pct(F.freq[l][i])} of tokens` }),
    el("dt", { text: "max activation" }), el("dd", { text: fmt(d.max) }),
    el("dt", { text: "parent" }), el("dd", {}, p >= 0 ? featureLink(l - 1, p) : "none (a root)"),
    el("dt", { text: "descendants" }), el("dd", { text: String(l + 1 < F.sizes.length ? F.desc[l][i] : 0) }));
  panel.textContent = "";
  panel.appendChild(el("h2", { id: "feature-title", text: `Feature ${fid(l, i)}` }));
  if (label) {
    const score = label[1] == null ? "" : ` (judge score ${fmt(label[1])})`;
    panel.appendChild(el("p", { class: "judge" }, el("span", { class: "label", text: label[0] }), score));
  }
  panel.appendChild(stats);
  panel.appendChild(el("h3", { text: `children (${children.length})` }));
  panel.appendChild(children.length ? linkList(children, l + 1) : el("p", { class: "hint", text: "none" }));
  panel.appendChild(el("h3", { text: "activation histogram" }));
  panel.appendChild(d.hist.length ? histogram(d.hist, d.hmax) : el("p", { class: "hint", text: "never fired" }));
  panel.appendChild(contextBlock("top contexts", d.top, chunk, max, "top"));
  panel.appendChild(contextBlock("sampled contexts", d.sample, chunk, max, "sample"));
  panel.scrollTop = 0;
  reveal(l, i);
}

// ---------------------------------------------------------------- search

// FNV-1a of the UTF-8 bytes, as hsae.explore.site.shard_of.
function shardOf(key, n) {
  let h = 0x811c9dc5;
  for (const byte of new TextEncoder().encode(key)) h = Math.imul(h ^ byte, 0x01000193) >>> 0;
  return h % n;
}

function parseFeature(text) {
  const m = text.trim().match(/^(?:l(?:evel)?\s*)?(\d+)\s*(?:[:/#.,]|\s)\s*#?\s*(\d+)$/i);
  if (m) {
    const l = Number(m[1]), i = Number(m[2]);
    return l < F.sizes.length && i < F.sizes[l] ? [[l, i]] : [];
  }
  if (/^#?\d+$/.test(text.trim())) {
    const i = Number(text.trim().replace("#", ""));
    return F.sizes.map((n, l) => [l, i]).filter(([l, k]) => k < F.sizes[l]);
  }
  return [];
}

function resultList(kind, title, hits, total) {
  const box = el("div", { class: `hits ${kind}` }, el("h3", { text: `${title}: ${total}` }));
  for (const [l, i] of hits) {
    box.appendChild(el("div", { class: "hit" }, featureLink(l, i, el("span", { class: "freq", text: pct(F.freq[l][i]) }))));
  }
  if (total > hits.length) box.appendChild(el("p", { class: "hint", text: `first ${hits.length} shown` }));
  return box;
}

let searched = 0;

async function search(text) {
  const ticket = ++searched;
  const results = document.getElementById("results");
  delete results.dataset.query; // set again once these results are shown
  const query = text.trim();
  if (!query) { results.hidden = true; return; }
  const features = parseFeature(query);
  const key = query.toLowerCase();
  let ids = [];
  try {
    const shard = await load(`t/${shardOf(key, F.shards)}`);
    ids = shard[key] || [];
  } catch (err) {
    showError(err.message);
  }
  if (ticket !== searched) return;
  const toFeature = (g) => {
    let l = 0;
    while (g >= F.offsets[l + 1]) l++;
    return [l, g - F.offsets[l]];
  };
  results.textContent = "";
  results.appendChild(el("div", { class: "results-head" },
    el("span", { text: `results for “${query}”` }),
    el("button", { text: "clear", onclick: () => { results.hidden = true; } })));
  if (features.length) results.appendChild(resultList("features", "feature", features, features.length));
  results.appendChild(resultList("tokens", "token in top contexts", ids.slice(0, RESULTS).map(toFeature), ids.length));
  results.hidden = false;
  results.dataset.query = text;
}

// ---------------------------------------------------------------- start

function route() {
  const m = location.hash.match(/^#f=(\d+):(\d+)$/);
  if (!m) return;
  const l = Number(m[1]), i = Number(m[2]);
  if (l < F.sizes.length && i < F.sizes[l]) openFeature(l, i);
}

async function start() {
  try {
    F = prepare(await load("forest"));
  } catch (err) {
    showError(`${err.message}: is this an hsae explore site?`);
    return;
  }
  const m = F.meta || {};
  const parts = [m.model && `model ${m.model}`, m.layer != null && `layer ${m.layer}`,
    m.text && `text ${m.text}`, m.n_tokens && `${m.n_tokens} tokens`].filter(Boolean);
  document.getElementById("source").textContent = parts.join(" · ");
  renderForest();
  const input = document.getElementById("search");
  let timer = null;
  input.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(() => search(input.value), 250); });
  document.getElementById("search-form").addEventListener("submit", (e) => {
    e.preventDefault();
    clearTimeout(timer);
    search(input.value);
  });
  window.addEventListener("hashchange", route);
  route();
  document.body.dataset.ready = "true";
}

start();
