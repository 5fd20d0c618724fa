"use strict";
// metarec's page. Every value from the server reaches the DOM as text (textContent or an
// attribute), never as markup: a title cannot run script. The token lives in this variable only.

const state = {
  token: null,
  model: null,
  answers: new Map(), // item id -> {item, label, answer}
  previous: { adapted: null, plain: null }, // the last list shown in each mode: id -> rank
  suggestions: [],
  shown: null, // search results, when a search replaced the suggestions
  seq: 0,
};
const K = 10;
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "class") node.className = value;
    else node.setAttribute(name, value);
  }
  node.append(...children); // strings become text nodes
  return node;
}

function say(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

function describeError(data) {
  const d = data && data.detail;
  if (Array.isArray(d)) return d.map((e) => `${(e.loc || []).join(".")}: ${e.msg}`).join("; ");
  return String(d || "request failed");
}

async function api(path, body) {
  const init = { headers: {} };
  if (state.token) init.headers.Authorization = `Bearer ${state.token}`;
  if (body !== undefined) {
    init.method = "POST";
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const res = await fetch(path, init);
  if (res.status === 401) {
    $("token-form").hidden = false;
    $("token").focus();
    throw new Error("This server needs its API token: enter it above.");
  }
  const data = await res.json();
  if (!res.ok) throw new Error(describeError(data));
  return data;
}

const implicit = () => state.model.feedback === "implicit";

function choices() {
  // [label, the answer's fields]: the rating scale's whole steps, or the model's events
  if (implicit()) {
    const w = state.model.event_weights || {};
    const names = Object.keys(w).sort((a, b) => w[a] - w[b]);
    return names.length ? names.map((n) => [n, { event: n }]) : [["like", { value: 1 }]];
  }
  const [lo, hi] = state.model.rating_range;
  const values = [];
  for (let v = Math.ceil(lo); v <= hi; v += 1) values.push(v);
  return (values.length >= 2 ? values : [lo, hi]).map((v) => [String(v), { rating: v }]);
}

function details(item) {
  const bits = [];
  if (item.year) bits.push(String(item.year));
  if (item.genres && item.genres.length) bits.push(item.genres.join(", "));
  return bits.join(" · ");
}

function card(item) {
  const given = state.answers.get(String(item.item));
  const row = el("div", { class: "choices", role: "group", "aria-label": `Your answer for ${item.title}` });
  for (const [label, fields] of choices()) {
    const name = implicit() ? `${label}: ${item.title}` : `Rate ${item.title}: ${label}`;
    const pressed = given !== undefined && given.label === label;
    const button = el("button", { type: "button", "aria-label": name, "aria-pressed": String(pressed) }, label);
    button.addEventListener("click", () => answer(item, label, fields));
    row.append(button);
  }
  return el("li", {}, el("div", { class: "title" }, item.title), el("div", { class: "meta" }, details(item)), row);
}

function showAsk(items) {
  $("ask").replaceChildren(...items.map(card));
}

function showGiven() {
  const rows = [...state.answers.values()].map((a) => {
    const remove = el("button", { type: "button", "aria-label": `Remove your answer for ${a.item.title}` }, "Remove");
    remove.addEventListener("click", () => {
      state.answers.delete(String(a.item.item));
      changed();
    });
    return el("li", {}, el("span", {}, `${a.item.title}: ${a.label}`), remove);
  });
  $("given").replaceChildren(...rows);
  $("count").textContent = `(${state.answers.size})`;
}

function answer(item, label, fields) {
  state.answers.set(String(item.item), { item, label, answer: fields });
  changed();
}

function changed() {
  showGiven();
  showAsk(state.shown || state.suggestions);
  refresh();
}

function reasons(because) {
  // one line: "Because you liked X (+0.40), you rated Y 2 (+0.12)"
  const [lo, hi] = state.model.rating_range;
  const parts = because.map((b) => {
    const a = state.answers.get(String(b.item));
    const liked = implicit() || !a || a.answer.rating >= (lo + hi) / 2;
    const what = liked ? `you liked ${b.title}` : `you rated ${b.title} ${a.label}`;
    return el("span", { class: "reason" }, `${what} (+${b.contribution.toFixed(2)})`);
  });
  const line = el("p", { class: "because" }, "Because ");
  parts.forEach((part, n) => line.append(...(n ? [", ", part] : [part])));
  return line;
}

function movement(id, rank, before) {
  if (before === null) return el("span", { class: "move same" }, "");
  if (!before.has(id)) return el("span", { class: "move new", title: "new in the list" }, "new");
  const d = before.get(id) - rank;
  if (d > 0) return el("span", { class: "move up", "aria-label": `up ${d}` }, `▲ ${d}`);
  if (d < 0) return el("span", { class: "move down", "aria-label": `down ${-d}` }, `▼ ${-d}`);
  return el("span", { class: "move same", "aria-label": "same place" }, "=");
}

function showList(items, mode) {
  const before = state.previous[mode];
  const ranks = new Map();
  let fresh = 0;
  const rows = items.map((item, r) => {
    const id = String(item.item);
    ranks.set(id, r + 1);
    if (before !== null && !before.has(id)) fresh += 1;
    const body = el("div", {}, el("div", { class: "title" }, item.title), el("div", { class: "meta" }, details(item)));
    if (item.because && item.because.length) body.append(reasons(item.because));
    return el("li", {}, el("span", { class: "rank" }, String(r + 1)), body, movement(id, r + 1, before));
  });
  $("recs").replaceChildren(...rows);
  state.previous[mode] = ranks;
  return fresh;
}

async function refresh() {
  const seq = (state.seq += 1);
  const plain = $("plain").checked;
  const support = [...state.answers.values()];
  const field = implicit() ? "events" : "ratings";
  const body = plain
    ? { [field]: [], k: K + support.length }
    : { [field]: support.map((a) => ({ item: a.item.item, ...a.answer })), k: K, explain: true };
  say(plain ? "Loading the starting point…" : "Adapting…");
  try {
    const data = await api("/v1/recommend", body);
    if (seq !== state.seq) return; // a newer answer's list is on its way
    let items = data.items;
    if (plain) {
      const seen = new Set(support.map((a) => String(a.item.item)));
      items = items.filter((x) => !seen.has(String(x.item))).slice(0, K);
    }
    const fresh = showList(items, plain ? "plain" : "adapted");
    if (plain) say("Without adaptation: the meta-learned starting point every new user gets.");
    else say(`Adapted to ${data.adapted_on} answer${data.adapted_on === 1 ? "" : "s"}: ${fresh} new in the list.`);
    document.body.dataset.ready = String(seq); // for tests: this list is on screen
  } catch (e) {
    if (seq === state.seq) say(e.message, true);
  }
}

async function search(q) {
  if (!q.trim()) {
    state.shown = null;
    showAsk(state.suggestions);
    return;
  }
  try {
    const found = await api(`/v1/items?${new URLSearchParams({ q, n: "8" })}`);
    state.shown = found.items;
    showAsk(found.items);
    say(found.items.length ? `${found.items.length} found.` : "Nothing found.");
  } catch (e) {
    say(e.message, true);
  }
}

async function start() {
  try {
    state.model = await api("/v1/model");
    $("token-form").hidden = true;
    const m = state.model;
    $("model").textContent = `${m.label} · ${m.algorithm} · adapts in ${m.inner_steps} steps · ${m.items} items`;
    const onboarding = await api(`/v1/onboarding?n=12`);
    $("rule").textContent = onboarding.rule;
    state.suggestions = onboarding.items;
    showAsk(state.suggestions);
    showGiven();
    await refresh();
  } catch (e) {
    say(e.message, true);
  }
}

$("token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  state.token = $("token").value;
  start();
});
$("search-form").addEventListener("submit", (e) => {
  e.preventDefault();
  search($("q").value);
});
$("plain").addEventListener("change", refresh);
$("reset").addEventListener("click", () => {
  state.answers.clear();
  state.previous = { adapted: null, plain: null };
  changed();
});
start();
