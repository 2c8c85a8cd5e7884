// #/audit: who did what (admin only), with filters and CSV/JSON export of the same selection.

import { get } from "../api.js";
import { dateToIso, debounce, empty, fmtTime, h, replace } from "../dom.js";
import { field, pageHeader, setQuery } from "../ui.js";

const PAGE = 100;

/**
 * An event's detail: short values inline as "key: value"; multi-line text (a rule diff) folded away
 * under its name, so one rule change does not fill the screen.
 */
function detailCell(detail) {
  const entries = Object.entries(detail || {}).filter(([, v]) => v !== null && v !== undefined && v !== "");
  const inline = [];
  const folded = [];
  for (const [key, value] of entries) {
    const text = typeof value === "object" ? JSON.stringify(value) : String(value);
    if (text.includes("\n")) folded.push(h("details", h("summary", `${key} (${text.trimEnd().split("\n").length} lines)`), h("pre", text)));
    else inline.push(h("div", h("span.muted", `${key}: `), text));
  }
  return [...inline, ...folded];
}

export async function renderAudit(main, query) {
  const state = { action: query.get("action") || "", actor: query.get("actor") || "", since: query.get("since") || "", until: query.get("until") || "" };
  const body = h("tbody");
  const exports = h("span.exports");
  let beforeId = null;
  const stack = [];
  const pager = h("div.pager");

  const params = () => ({ action: state.action, actor: state.actor, since: dateToIso(state.since), until: dateToIso(state.until, true) });
  const exportLink = (format) => {
    const q = new URLSearchParams(Object.entries({ ...params(), format }).filter(([, v]) => v));
    return h("a.button", { href: `/api/audit/export?${q}`, download: `audit.${format}`, test: `audit-export-${format}` }, `Export ${format.toUpperCase()}`);
  };
  const load = async () => {
    const rows = await get("/api/audit", { ...params(), limit: PAGE, before_id: beforeId });
    replace(body, rows.length ? rows.map((e) => h("tr", { test: "audit-row", class: e.outcome === "ok" ? "" : "bad-row" },
      h("td.nowrap", fmtTime(e.at)), h("td", e.actor), h("td", e.source), h("td", h("code", e.action)), h("td", e.target || ""),
      h("td", e.outcome), h("td.detail", detailCell(e.detail)))) : empty("No audit events match.", 7));
    replace(exports, exportLink("csv"), exportLink("json"));
    replace(pager,
      h("button", { type: "button", disabled: !stack.length, onclick: () => { beforeId = stack.pop() ?? null; load(); } }, "‹ Newer"),
      h("button", { type: "button", disabled: rows.length < PAGE, onclick: () => { stack.push(beforeId); beforeId = rows[rows.length - 1].id; load(); } }, "Older ›"));
  };
  const onFilter = () => { beforeId = null; stack.length = 0; setQuery("/audit", state); load(); };
  const text = (key, placeholder) => h("input", { value: state[key], placeholder, test: `audit-filter-${key}`, oninput: debounce((ev) => { state[key] = ev.target.value.trim(); onFilter(); }, 300) });
  const date = (key) => h("input", { type: "date", value: state[key], test: `audit-filter-${key}`, onchange: (ev) => { state[key] = ev.target.value; onFilter(); } });
  replace(
    main,
    pageHeader("Audit log", exports),
    h("div.filters", field("Action", text("action", "e.g. rule. or auth.login")), field("Actor", text("actor", "user name")), field("From", date("since")), field("To", date("until"))),
    h("div.table-tools", h("span.muted", "Newest first. The log is append-only."), pager),
    h("div.table-wrap", h("table.grid", { test: "audit-table" }, h("thead", h("tr", ["When", "Actor", "Source", "Action", "Target", "Outcome", "Detail"].map((c) => h("th", c)))), body)),
  );
  await load();
}
