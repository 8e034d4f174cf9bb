// The dashboard: one query form whose request lives in the URL hash, the answer as two ranked lists,
// the store it came from, a batch tab and a local history. Public API only (see api.js).

import { ApiError, call, curlFor, getKey, readiness, setKey } from "./api.js";
import { setupBatch } from "./batch.js";
import { definitionList, el, fmt, highlighted, ms, queryWords, rankedList } from "./render.js";

const $ = (id) => document.getElementById(id);
const HISTORY_SLOT = "stride.history";
const HISTORY_MAX = 20;

const state = { info: null, needsKey: false, pending: null, words: new Set() };

// --- status, key, info -------------------------------------------------------------------------

function setStatus(kind, text) {
  $("status").dataset.state = kind;
  $("status-text").textContent = text;
}

function banner(text) {
  $("banner").textContent = text || "";
  $("banner").hidden = !text;
}

function askForKey(reason) {
  $("key-reason").textContent = reason;
  $("key-input").value = "";
  if (!$("key-dialog").open) $("key-dialog").showModal();
  $("key-input").focus();
}

// Any call that meets a 401 comes here: the page says so in words and asks again.
function onAuthError() {
  state.needsKey = true;
  $("key-button").hidden = false;
  setStatus("auth", getKey() ? "wrong API key" : "API key needed");
  askForKey(getKey() ? "Wrong or missing API key: the service refused the one in use." :
    "This service needs an API key (STRIDE_API_KEYS is set).");
}

async function loadInfo() {
  const ready = await readiness();
  if (ready.state !== "ready") {
    setStatus(ready.state === "down" ? "down" : "starting",
      ready.state === "down" ? "service unreachable" : `not ready: ${ready.detail}`);
    banner(ready.state === "down" ? "Cannot reach the service; retrying every 3 s." :
      ready.detail === "draining" ? "The service is shutting down (draining); retrying every 3 s." :
        `The service is not ready yet (${ready.detail}): the model and store are still loading. Retrying every 3 s.`);
    setTimeout(loadInfo, 3000);
    return;
  }
  banner("");
  watchReadiness();
  try {
    const { data } = await call("GET", "v1/info");
    state.info = data;
    state.needsKey = Boolean(data.auth);
    $("key-button").hidden = !state.needsKey;
    setStatus("ready", `ready · ${data.device}`);
    showInfo(data);
    const limit = data.limits && data.limits.max_top_k;
    if (limit) for (const id of ["top-k", "batch-k"]) $(id).max = String(limit);
    const linked = state.pending;
    state.pending = null;
    if (linked) submit(linked, { push: false }); // a permalink runs once the service can answer it
  } catch (err) {
    if (err instanceof ApiError && err.kind === "auth") onAuthError();
    else setStatus("down", err.message);
  }
}

// Once ready, look again every 10 s, so a service that went away is reported before the next query.
let watching = false;
function watchReadiness() {
  if (watching) return;
  watching = true;
  const timer = setInterval(async () => {
    if ((await readiness()).state !== "ready") {
      clearInterval(timer);
      watching = false;
      loadInfo();
    }
  }, 10000);
}

function showInfo(info) {
  const st = info.store || {};
  const shapes = st.shapes || {};
  const model = info.model || {};
  // ``name`` since the service stopped exposing server paths; ``path`` from older servers
  const name = model.name || (model.path || "").split(/[\\/]/).filter(Boolean).pop() || "?";
  const created = st.created ? String(st.created).replace("T", " ").replace(/\.\d+/, "") : "?";
  definitionList($("info-list"), [
    ["model", `${name} · ${(model.sha256 || "").slice(0, 12)}`, `sha256 ${model.sha256}`],
    ["corpus", `${(st.num_examples ?? shapes.num_examples ?? "?").toLocaleString()} examples`, st.corpus_sha256],
    ["K subsets", String(st.num_subsets ?? shapes.num_subsets ?? "?")],
    ["rank", String(shapes.rank ?? "?")],
    ["fit", String(st.fit ?? "?")],
    ["built", created],
    ["store version", String(st.version ?? "?"), `format ${st.format_version}, code ${st.code_version}`],
    ["cache", info.cache && info.cache.enabled ? (info.cache.breaker_open ? "Redis (breaker open)" : "Redis") : "off"],
    ["stride", (info.version && info.version.stride) || "?"],
  ]);
  $("info").hidden = false;
}

// --- the query ----------------------------------------------------------------------------------

function formBody() {
  const body = { prompt: $("prompt").value, top_k: Number($("top-k").value) || 5 };
  const completion = $("completion").value;
  if (completion) body.completion = completion;
  return body;
}

function hashFor(body) {
  const p = new URLSearchParams({ prompt: body.prompt });
  if (body.completion) p.set("completion", body.completion);
  p.set("top_k", String(body.top_k));
  return `#${p.toString()}`;
}

function fillForm(body) {
  $("prompt").value = body.prompt || "";
  $("completion").value = body.completion || "";
  $("top-k").value = String(body.top_k || 5);
}

function fromHash() {
  const p = new URLSearchParams(location.hash.slice(1));
  const prompt = p.get("prompt");
  if (!prompt) return null;
  const body = { prompt, top_k: Number(p.get("top_k")) || 5 };
  if (p.get("completion")) body.completion = p.get("completion");
  return body;
}

function showCurl(body) {
  $("curl").textContent = curlFor("v1/attribute", body, document.baseURI, state.needsKey);
  $("curl").hidden = false;
  $("copy-curl").disabled = false;
  $("permalink").href = hashFor(body);
}

function showError(box, err) {
  box.replaceChildren(el("strong", { text: err.kind === "auth" ? "Wrong or missing API key" : "Error" }),
    document.createTextNode(` ${err.message}`));
  if (err.problem && err.problem.request_id) {
    box.append(el("span", { class: "muted", text: ` (request ${err.problem.request_id})` }));
  }
  box.hidden = false;
}

function progress(box, text, on) {
  box.hidden = !on;
  box.querySelector("span").textContent = text;
}

// Runs ``task(signal)`` with a visible elapsed-time counter and a working Cancel button.
async function withProgress(ui, task) {
  const controller = new AbortController();
  const started = performance.now();
  ui.run.disabled = true;
  ui.cancel.hidden = false;
  ui.cancel.onclick = () => controller.abort();
  const tick = () => progress(ui.box, `${ui.label()} ${((performance.now() - started) / 1000).toFixed(1)} s`, true);
  tick();
  const timer = setInterval(tick, 100);
  try {
    return await task(controller.signal);
  } finally {
    clearInterval(timer);
    progress(ui.box, "", false);
    ui.run.disabled = false;
    ui.cancel.hidden = true;
  }
}

async function submit(body, { push = true } = {}) {
  $("error").hidden = true;
  if (!body.prompt) {
    showError($("error"), new ApiError("problem", "Type a prompt first."));
    return;
  }
  if (push && location.hash !== hashFor(body)) history.pushState(null, "", hashFor(body));
  showCurl(body);
  $("result").setAttribute("aria-busy", "true");
  try {
    const { data } = await withProgress(
      { run: $("submit"), cancel: $("cancel"), box: $("progress"), label: () => "attributing…" },
      (signal) => call("POST", "v1/attribute", body, signal));
    showAnswer(body, data);
    remember(body, data);
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
    if (err.kind === "auth") {
      state.pending = body; // runs again once a key is given
      onAuthError();
    }
    showError($("error"), err);
  } finally {
    $("result").removeAttribute("aria-busy");
  }
}

function showAnswer(body, data) {
  state.words = queryWords(body.prompt, body.completion);
  const all = [...data.proponents, ...data.opponents].map((s) => Math.abs(s.score));
  const scale = Math.max(1e-12, ...all);
  rankedList($("proponents"), data.proponents, scale, state.words, openExample);
  rankedList($("opponents"), data.opponents, scale, state.words, openExample);

  const d = data.diagnostics || {};
  const t = data.timing_ms || {};
  const total = t.total || 0;
  const segments = el("div", { class: "timebar", title: "forward / measure / solve, of the batch that computed it" });
  for (const part of ["forward", "measure", "solve"]) {
    const seg = el("span", { class: `seg ${part}`, title: `${part} ${ms(t[part])}` });
    seg.style.width = `${total ? (100 * (t[part] || 0)) / total : 0}%`;
    segments.append(seg);
  }
  const badge = data.cached ? el("span", { class: "badge cached", text: "from cache" })
    : el("span", { class: "badge fresh", text: "computed" });
  const conv = d.converged ? el("span", { class: "ok", text: "converged" }) : el("span", { class: "warn", text: "not converged" });
  $("summary").replaceChildren(
    el("div", { class: "stat big" }, el("span", { class: "label", text: "loss" }), el("span", { id: "loss", text: fmt(data.loss, 4) })),
    el("div", { class: "stat" }, el("span", { class: "label", text: "answer" }), badge),
    el("div", { class: "stat" }, el("span", { class: "label", text: "solver" }), conv,
      el("span", { text: ` ${d.iterations} iterations · gap ${fmt(d.gap)} · ${d.nonzeros} nonzeros` })),
    el("div", { class: "stat wide" }, el("span", { class: "label", text: "time" }),
      el("span", { text: `total ${ms(t.total)} = forward ${ms(t.forward)} + measure ${ms(t.measure)} + solve ${ms(t.solve)}` }),
      segments),
    tokenStrip(data.tokens),
    el("div", { class: "stat muted small" }, `request ${data.request_id} · store ${data.store ? data.store.version : "?"}`),
  );
  const warnings = Array.isArray(data.warnings) ? data.warnings : [];
  $("warnings").replaceChildren(...warnings.map((w) => el("div", { class: "warning",
    text: typeof w === "string" ? w : `${w.code ? `${w.code}: ` : ""}${w.detail || JSON.stringify(w)}` })));
  $("warnings").hidden = !warnings.length;
  $("result").hidden = false;
}

// Each scored token with its loss, shaded in five steps of the largest: where the loss comes from.
function tokenStrip(tokens) {
  if (!Array.isArray(tokens) || !tokens.length) return null;
  const top = Math.max(1e-12, ...tokens.map((t) => t.loss));
  return el("div", { class: "stat wide" }, el("span", { class: "label", text: "token loss" }),
    el("span", { class: "tokens" }, ...tokens.map((t) => el("span", {
      class: `tok l${Math.min(4, Math.floor((5 * t.loss) / top))}${t.scored ? "" : " unscored"}`,
      title: `loss ${fmt(t.loss, 4)}${t.scored ? "" : " (outside the span)"}`, text: t.text }))));
}

// --- examples -----------------------------------------------------------------------------------

async function openExample(id) {
  const dialog = $("example-dialog");
  $("example-title").textContent = id;
  $("example-meta").textContent = "loading…";
  $("example-text").replaceChildren();
  if (!dialog.open) dialog.showModal();
  try {
    const { data } = await call("GET", `v1/examples/${encodeURIComponent(id)}`);
    $("example-title").textContent = data.id;
    $("example-meta").textContent = `index ${data.index} · ${data.num_chars} characters · store ${data.store_version}`;
    $("example-text").replaceChildren(highlighted(data.text, state.words));
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
    if (err.kind === "auth") {
      dialog.close();
      onAuthError();
      return;
    }
    $("example-meta").textContent = err.message;
  }
}

// --- history (this browser only) -----------------------------------------------------------------

function loadHistory() {
  try {
    const items = JSON.parse(localStorage.getItem(HISTORY_SLOT) || "[]");
    return Array.isArray(items) ? items : [];
  } catch {
    return [];
  }
}

function remember(body, data) {
  const top = data.proponents[0];
  const entry = { ...body, at: new Date().toISOString(), top: top ? top.id : null };
  const same = (h) => h.prompt === body.prompt && (h.completion || "") === (body.completion || "") && h.top_k === body.top_k;
  const items = [entry, ...loadHistory().filter((h) => !same(h))].slice(0, HISTORY_MAX);
  localStorage.setItem(HISTORY_SLOT, JSON.stringify(items));
  renderHistory();
}

function renderHistory() {
  const items = loadHistory();
  $("history-list").replaceChildren(...items.map((h) => {
    const b = el("button", { type: "button", class: "link", title: h.at },
      el("span", { class: "q", text: `${h.prompt}${h.completion || ""}` }),
      el("span", { class: "muted small", text: h.top ? ` → ${h.top}` : "" }));
    b.addEventListener("click", () => {
      const body = { prompt: h.prompt, top_k: h.top_k || 5 };
      if (h.completion) body.completion = h.completion;
      fillForm(body);
      submit(body);
    });
    return el("li", {}, b);
  }));
  $("history-empty").hidden = items.length > 0;
}

// --- wiring ---------------------------------------------------------------------------------------

function selectTab(name) {
  for (const t of ["query", "batch"]) {
    $(`tab-${t}`).setAttribute("aria-selected", String(t === name));
    $(`panel-${t}`).hidden = t !== name;
  }
}

function wire() {
  $("query-form").addEventListener("submit", (e) => {
    e.preventDefault();
    submit(formBody());
  });
  for (const id of ["prompt", "completion", "top-k"]) {
    $(id).addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        $("query-form").requestSubmit();
      }
    });
  }
  $("copy-curl").addEventListener("click", async () => {
    const text = $("curl").textContent;
    try {
      await navigator.clipboard.writeText(text);
      $("copied").textContent = "copied";
    } catch {
      // no clipboard permission: select the command so Ctrl+C copies it
      getSelection().selectAllChildren($("curl"));
      $("copied").textContent = "selected: press Ctrl+C";
    }
    $("copied").hidden = false;
    setTimeout(() => { $("copied").hidden = true; }, 2000);
  });
  $("history-clear").addEventListener("click", () => {
    localStorage.removeItem(HISTORY_SLOT);
    renderHistory();
  });
  $("open-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const id = $("open-id").value.trim();
    if (id) openExample(id);
  });
  $("example-dialog").addEventListener("click", (e) => {
    if (e.target === $("example-dialog")) $("example-dialog").close(); // a click on the backdrop
  });
  $("key-button").addEventListener("click", () => askForKey("API key for this tab:"));
  $("key-form").addEventListener("submit", (e) => {
    const save = e.submitter && e.submitter.value === "save";
    if (save) {
      setKey($("key-input").value.trim());
      loadInfo();
    }
  });
  $("tab-query").addEventListener("click", () => selectTab("query"));
  $("tab-batch").addEventListener("click", () => selectTab("batch"));
  window.addEventListener("popstate", () => {
    const body = fromHash();
    if (body) {
      fillForm(body);
      submit(body, { push: false });
    }
  });
  setupBatch({ withProgress, showError, onAuthError, state });
}

wire();
renderHistory();
state.pending = fromHash();
if (state.pending) fillForm(state.pending);
loadInfo();
