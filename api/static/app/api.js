// The REST API, as this same-origin page speaks it: the HttpOnly session cookie authenticates every
// request; the page holds no token.  A 401 means the session is over (expired, revoked, signed out
// elsewhere): the shell is told once and returns to the sign-in form.

export class SessionEnded extends Error {}

export class ApiError extends Error {
  constructor(status, code, message, details) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details || [];
  }
}

let ended = () => {};

export function onSessionEnded(handler) {
  ended = handler;
}

export async function api(method, path, body, opts = {}) {
  const init = { method, credentials: "same-origin", headers: {}, signal: opts.signal };
  if (body instanceof Blob) {
    init.body = body;
    init.headers["Content-Type"] = opts.contentType || "application/octet-stream";
  } else if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  if (opts.idempotencyKey) init.headers["Idempotency-Key"] = opts.idempotencyKey;
  const resp = await fetch(path, init);
  if (resp.status === 401 && !opts.anonymous) {
    ended("Your session has expired. Sign in again to continue.");
    throw new SessionEnded("session ended");
  }
  let payload = null;
  if (resp.status !== 204) {
    try {
      payload = await resp.json();
    } catch {
      payload = null;
    }
  }
  if (!resp.ok) {
    const e = payload && typeof payload.error === "object" ? payload.error : {};
    throw new ApiError(resp.status, e.code || "error", e.message || resp.statusText || "request failed", e.details);
  }
  return payload ? payload.data : null;
}

// What the user may read about a failure: the server's words, and the field problems it named.
export function explain(err) {
  if (err instanceof ApiError) {
    const fields = (err.details || []).filter((d) => d && d.field).map((d) => `${d.field}: ${d.message}`);
    return fields.length ? `${err.message} (${fields.join("; ")})` : err.message;
  }
  return err && err.message ? err.message : String(err);
}

export function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== null && v !== undefined && v !== "") q.set(k, v);
  const s = q.toString();
  return s ? `?${s}` : "";
}

export function newKey() {
  return crypto.randomUUID();
}
