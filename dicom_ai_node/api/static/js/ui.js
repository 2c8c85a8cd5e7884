// Pieces several views share: auto-refresh with an "updated hh:mm:ss" stamp, filter query helpers, and
// the catalogues (rules, models, destinations) that fill select boxes.

import { ApiError, get } from "./api.js";
import { fmtClock, h } from "./dom.js";

/**
 * Call `load` now and every `ms` while the view is shown; returns {stamp, stop}. The stamp shows when the
 * data was last fetched, or that the last fetch failed (the old data stays on screen).
 */
export function autoRefresh(load, ms = 3000) {
  const stamp = h("span.updated", { test: "updated" }, "loading…");
  let timer = null;
  let stopped = false;
  let busy = null;
  let again = false;
  const tick = async () => {
    if (stopped) return;
    if (busy) {
      // A filter changed while a fetch was running: fetch once more when it ends, with the new filter.
      again = true;
      return busy;
    }
    let done;
    busy = new Promise((resolve) => (done = resolve));
    try {
      await load();
      stamp.textContent = `updated ${fmtClock()}`;
      stamp.classList.remove("stale");
    } catch (exc) {
      if (exc instanceof ApiError && exc.status === 401) return stop();
      stamp.textContent = `update failed ${fmtClock()}: ${exc.message}`;
      stamp.classList.add("stale");
    } finally {
      busy = null;
      done();
    }
    if (again) {
      again = false;
      await tick();
    }
  };
  const stop = () => {
    stopped = true;
    clearInterval(timer);
  };
  timer = setInterval(tick, ms);
  return { stamp, stop, tick, first: tick() };
}

/** Replace the hash query without adding a history entry for every keystroke in a filter. */
export function setQuery(path, values) {
  const params = new URLSearchParams();
  for (const [k, v] of Object.entries(values)) if (v !== "" && v !== null && v !== undefined) params.set(k, v);
  const qs = params.toString();
  history.replaceState(null, "", `#${path}${qs ? "?" + qs : ""}`);
}

let catalogCache = null;
let catalogAt = 0;

/** {rules: [rule ids], models: [names], destinations: [names]}; cached for 30 s. */
export async function catalogs() {
  if (catalogCache && Date.now() - catalogAt < 30000) return catalogCache;
  const [rules, models, destinations] = await Promise.all([
    get("/api/rules").catch(() => []),
    get("/api/models").catch(() => []),
    get("/api/destinations").catch(() => []),
  ]);
  catalogCache = {
    rules: (rules || []).map((r) => (r.rule || r).id),
    models: (models || []).map((m) => m.name),
    destinations: (destinations || []).map((d) => d.name),
  };
  catalogAt = Date.now();
  return catalogCache;
}

export function forgetCatalogs() {
  catalogCache = null;
}

export function field(label, input, props = {}) {
  return h("label.field", props, h("span.label", label), input);
}

export function pageHeader(title, ...extra) {
  return h("div.page-head", h("h1", title), h("div.page-tools", extra));
}
