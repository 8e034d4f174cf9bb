// The public HTTP API, as the page uses it: same origin, relative URLs (so a path prefix works),
// the API key from session storage (this tab only), and problem documents turned into sentences.

const KEY_SLOT = "stride.apiKey";

export class ApiError extends Error {
  constructor(kind, message, status = 0, problem = null) {
    super(message);
    this.kind = kind; // "auth" | "problem" | "network" | "aborted" | "bad-response"
    this.status = status;
    this.problem = problem;
  }
}

export function getKey() {
  return sessionStorage.getItem(KEY_SLOT) || "";
}

export function setKey(key) {
  if (key) sessionStorage.setItem(KEY_SLOT, key);
  else sessionStorage.removeItem(KEY_SLOT);
}

// What a user should read for a problem document: its detail, the fields it names, its request id.
export function describeProblem(status, problem) {
  if (status === 401) return "Wrong or missing API key.";
  if (!problem || typeof problem !== "object") return `The service answered HTTP ${status}.`;
  let text = `${problem.title || "Error"} (${status}): ${problem.detail || "no detail given"}`;
  if (Array.isArray(problem.errors) && problem.errors.length) {
    const fields = problem.errors.map((e) => `${(e.loc || []).join(".")}: ${e.msg || e.type || ""}`);
    text += ` [${fields.join("; ")}]`;
  }
  if (status === 503) text += " The service is busy or not ready; try again shortly.";
  if (status === 504) text += " The query ran past the service's deadline.";
  return text;
}

export async function call(method, path, body = undefined, signal = undefined) {
  const headers = { accept: "application/json" };
  const key = getKey();
  if (key) headers.authorization = `Bearer ${key}`;
  if (body !== undefined) headers["content-type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "same-origin", cache: "no-store",
    });
  } catch (err) {
    if (err && err.name === "AbortError") throw new ApiError("aborted", "Cancelled.");
    throw new ApiError("network", "Cannot reach the service: it is stopped, restarting or unreachable.");
  }
  let data = null;
  const text = await response.text();
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (response.ok) {
    if (data === null) throw new ApiError("bad-response", `The service answered ${response.status} without JSON.`);
    return { data, requestId: response.headers.get("x-request-id") };
  }
  const kind = response.status === 401 ? "auth" : "problem";
  throw new ApiError(kind, describeProblem(response.status, data), response.status, data);
}

// Readiness from /readyz (an open path): "ready", "starting", "draining" or "down".
export async function readiness() {
  try {
    const r = await fetch("readyz", { cache: "no-store" });
    if (r.ok) return { state: "ready", detail: "ready" };
    const body = await r.json().catch(() => null);
    return { state: "not-ready", detail: (body && body.detail) || `HTTP ${r.status}` };
  } catch {
    return { state: "down", detail: "unreachable" };
  }
}

// The request as a shell command, with the key as a variable, never inlined.
export function curlFor(path, body, origin, needsKey) {
  const q = (s) => `'${s.replace(/'/g, "'\\''")}'`;
  const parts = [`curl -s ${q(new URL(path, origin).href)}`, "-H 'content-type: application/json'"];
  if (needsKey) parts.push('-H "Authorization: Bearer $STRIDE_API_KEY"');
  parts.push(`-d ${q(JSON.stringify(body))}`);
  return parts.join(" ");
}
