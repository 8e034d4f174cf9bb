// The batch tab: JSONL in (pasted or uploaded), POST /v1/attribute/batch in chunks of the service's
// max_batch_queries, one table row per query, and the rows back out as JSONL or CSV.

import { ApiError, call } from "./api.js";
import { el, fmt } from "./render.js";

const $ = (id) => document.getElementById(id);

export class InputError extends Error {}

// Lines of JSONL into queries; a bad line is named by its number, and nothing is sent.
export function parseJsonl(text) {
  const rows = [];
  text.split(/\r?\n/).forEach((line, i) => {
    if (!line.trim()) return;
    let obj;
    try {
      obj = JSON.parse(line);
    } catch {
      throw new InputError(`line ${i + 1}: not valid JSON`);
    }
    if (!obj || typeof obj !== "object" || Array.isArray(obj)) throw new InputError(`line ${i + 1}: not a JSON object`);
    if (typeof obj.prompt !== "string" || !obj.prompt) throw new InputError(`line ${i + 1}: "prompt" must be a non-empty string`);
    if (obj.completion !== undefined && obj.completion !== null && typeof obj.completion !== "string") {
      throw new InputError(`line ${i + 1}: "completion" must be a string`);
    }
    rows.push({ line: i + 1, id: obj.id === undefined ? null : String(obj.id), prompt: obj.prompt,
      completion: obj.completion || null });
  });
  if (!rows.length) throw new InputError("no queries: paste or upload one JSON object a line");
  return rows;
}

function output(row, result) {
  const brief = (s) => ({ rank: s.rank, id: s.id, index: s.index, score: s.score });
  return { line: row.line, id: row.id, prompt: row.prompt, completion: row.completion, loss: result.loss,
    cached: result.cached, proponents: result.proponents.map(brief), opponents: result.opponents.map(brief),
    diagnostics: result.diagnostics, request_id: result.request_id };
}

function csvCell(v) {
  const s = v === null || v === undefined ? "" : String(v);
  return /[",\r\n]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
}

export function toCsv(rows, k) {
  const head = ["line", "id", "prompt", "completion", "loss", "cached"];
  for (let i = 1; i <= k; i++) head.push(`proponent_${i}_id`, `proponent_${i}_score`);
  const lines = [head.join(",")];
  for (const r of rows) {
    const cells = [r.line, r.id, r.prompt, r.completion, r.loss, r.cached];
    for (let i = 0; i < k; i++) cells.push(r.proponents[i] ? r.proponents[i].id : "", r.proponents[i] ? r.proponents[i].score : "");
    lines.push(cells.map(csvCell).join(","));
  }
  return `${lines.join("\r\n")}\r\n`;
}

function download(name, type, text) {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const a = el("a", { href: url, download: name });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

// The service names a bad query by its place in the request ("queries[2]: ..." or loc queries.2);
// say which line of the input that was.
function inputLine(err, part) {
  if (!(err instanceof ApiError) || !err.problem) return err;
  const where = /queries\[(\d+)\]/.exec(err.problem.detail || "") ||
    /^queries\.(\d+)/.exec(((err.problem.errors || [])[0]?.loc || []).slice(1).join("."));
  if (where && part[Number(where[1])]) err.message = `line ${part[Number(where[1])].line}: ${err.message}`;
  return err;
}

export function setupBatch({ withProgress, showError, onAuthError, state }) {
  let results = [];
  let k = 3;

  function render() {
    const body = $("batch-table").tBodies[0];
    body.replaceChildren(...results.map((r) => el("tr", {},
      el("td", { text: r.id || r.line }),
      el("td", { class: "clip", text: r.prompt }),
      el("td", { text: r.completion || "" }),
      el("td", { class: "num", text: fmt(r.loss, 4) }),
      el("td", {}, ...r.proponents.map((s) => el("span", { class: "chip", title: `score ${s.score}` },
        el("span", { text: s.id }), el("span", { class: "muted", text: ` ${fmt(s.score, 3)}` })))),
      el("td", { text: r.cached ? "yes" : "no" }))));
    $("batch-title").textContent = `${results.length} ${results.length === 1 ? "query" : "queries"}`;
    $("batch-result").hidden = false;
  }

  $("batch-file").addEventListener("change", async () => {
    const file = $("batch-file").files[0];
    if (file) $("batch-input").value = await file.text();
  });

  $("batch-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    $("batch-error").hidden = true;
    let rows;
    try {
      rows = parseJsonl($("batch-input").value);
    } catch (err) {
      if (!(err instanceof InputError)) throw err;
      showError($("batch-error"), new ApiError("problem", err.message));
      return;
    }
    k = Number($("batch-k").value) || 3;
    const chunk = (state.info && state.info.limits && state.info.limits.max_batch_queries) || 64;
    const done = [];
    let finished = 0;
    try {
      await withProgress({ run: $("batch-run"), cancel: $("batch-cancel"), box: $("batch-progress"),
        label: () => `${finished} of ${rows.length} queries ·` }, async (signal) => {
        for (let i = 0; i < rows.length; i += chunk) {
          const part = rows.slice(i, i + chunk);
          const queries = part.map((r) => ({ prompt: r.prompt, completion: r.completion, top_k: k, include_text: false }));
          const { data } = await call("POST", "v1/attribute/batch", { queries }, signal).catch((err) => {
            throw inputLine(err, part);
          });
          data.results.forEach((res, j) => done.push(output(part[j], res)));
          finished = done.length;
        }
      });
    } catch (err) {
      if (!(err instanceof ApiError)) throw err;
      if (err.kind === "auth") onAuthError();
      showError($("batch-error"), err);
    }
    if (done.length) {
      results = done;
      render();
    }
  });

  $("download-jsonl").addEventListener("click", () => download("stride-batch.jsonl", "application/x-ndjson",
    results.map((r) => JSON.stringify(r)).join("\n") + "\n"));
  $("download-csv").addEventListener("click", () => download("stride-batch.csv", "text/csv", toCsv(results, k)));
}
