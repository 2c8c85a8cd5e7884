// The one way the page talks to the node. Every write carries the session's CSRF token and a JSON body;
// 401 sends the user back to the sign-in view, 403 shows a visible refusal (the server decides, always).

import { h } from "./dom.js";

export const session = { user: null, csrf: null, auth: null };

const RANK = { viewer: 0, operator: 1, admin: 2 };

export function allows(needed) {
  return !!session.user && (RANK[session.user.role] ?? -1) >= RANK[needed];
}

export class ApiError extends Error {
  constructor(status, detail) {
    super(typeof detail === "string" ? detail : errorText(detail) || `HTTP ${status}`);
    this.status = status;
    this.detail = detail;
  }

  /** 422 field errors as [{loc: [...], msg}] (empty for other errors). */
  get fieldErrors() {
    return Array.isArray(this.detail) ? this.detail : [];
  }
}

function errorText(detail) {
  if (Array.isArray(detail)) return detail.map((e) => `${(e.loc || []).join(".")}: ${e.msg}`).join("; ");
  return detail ? JSON.stringify(detail) : "";
}

const WRITE_METHODS = new Set(["POST", "PUT", "PATCH", "DELETE"]);

/** api("GET", "/api/jobs", null, {query}) -> parsed JSON (or text for non-JSON answers). */
export async function api(method, path, body = null, { query = null, quiet401 = false } = {}) {
  let url = path;
  if (query) {
    const params = new URLSearchParams();
    for (const [k, v] of Object.entries(query)) if (v !== "" && v !== null && v !== undefined) params.set(k, v);
    const qs = params.toString();
    if (qs) url += (url.includes("?") ? "&" : "?") + qs;
  }
  const headers = { Accept: "application/json" };
  const init = { method, headers, credentials: "same-origin", cache: "no-store" };
  if (WRITE_METHODS.has(method)) {
    headers["Content-Type"] = "application/json";
    if (session.csrf) headers["X-CSRF-Token"] = session.csrf;
    init.body = JSON.stringify(body ?? {});
  }
  let resp;
  try {
    resp = await fetch(url, init);
  } catch (exc) {
    throw new ApiError(0, `the node did not answer (${exc.message})`);
  }
  const type = resp.headers.get("Content-Type") || "";
  const data = resp.status === 204 ? null : type.includes("json") ? await resp.json().catch(() => null) : await resp.text();
  if (resp.ok) return data;
  const detail = data && typeof data === "object" && "detail" in data ? data.detail : data;
  const error = new ApiError(resp.status, detail);
  if (resp.status === 401 && !quiet401) {
    window.dispatchEvent(new CustomEvent("ainode:unauthorized"));
  } else if (resp.status === 403) {
    window.dispatchEvent(new CustomEvent("ainode:refused", { detail: error.message }));
  } else if (resp.status === 429) {
    const wait = resp.headers.get("Retry-After");
    error.message = `${error.message}${wait ? ` (try again in ${wait} s)` : ""}`;
  }
  throw error;
}

export const get = (path, query) => api("GET", path, null, { query });
export const post = (path, body, query) => api("POST", path, body, { query });
export const put = (path, body) => api("PUT", path, body);
export const patch = (path, body) => api("PATCH", path, body);
export const del = (path, query) => api("DELETE", path, null, { query });

/**
 * A button for a write. Disabled, with a title saying which role it needs, when the signed-in role may
 * not use it (the server refuses anyway: this only spares the user a pointless click).
 */
export function writeButton(label, needed, onclick, props = {}) {
  const permitted = allows(needed);
  const cls = props.class || "";
  return h(
    "button",
    {
      ...props,
      class: cls,
      type: "button",
      disabled: !permitted || props.disabled,
      title: permitted ? props.title : `needs role ${needed}`,
      dataset: { needs: needed, ...(props.dataset || {}) },
      onclick: async (ev) => {
        const btn = ev.currentTarget;
        btn.disabled = true;
        try {
          await onclick(ev);
        } catch (exc) {
          if (!(exc instanceof ApiError) || ![401, 403].includes(exc.status)) notify(exc.message, "error");
        } finally {
          if (btn.isConnected) btn.disabled = !allows(needed) || !!props.disabled;
        }
      },
    },
    label,
  );
}

/** A short message in the notice area under the header: kind is info, ok, error or refused. */
export function notify(text, kind = "info") {
  window.dispatchEvent(new CustomEvent("ainode:notice", { detail: { text, kind } }));
}
