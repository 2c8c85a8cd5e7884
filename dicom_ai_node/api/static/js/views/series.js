// #/series and #/series/UID: received series (by UID, modality, description, counts: never patient data).

import { get } from "../api.js";
import { debounce, empty, facts, fmtTime, h, replace, select, shortUid, statusBadge, table, when } from "../dom.js";
import { autoRefresh, field, pageHeader, setQuery } from "../ui.js";
import { jobRow } from "./jobs.js";

const STATUSES = ["", "receiving", "routing", "routed", "unmatched", "failed"];
const PAGE = 100;

export async function renderSeriesList(main, query) {
  const state = { status: query.get("status") || "", modality: query.get("modality") || "" };
  let offset = 0;
  const body = h("tbody");
  const summary = h("span.muted", { test: "series-total" });
  const onFilter = () => {
    offset = 0;
    setQuery("/series", state);
    refresher.tick();
  };
  const statusSel = select(STATUSES, state.status, { test: "filter-status", onchange: (ev) => { state.status = ev.target.value; onFilter(); } });
  const modality = h("input.short", { value: state.modality, placeholder: "CT, MR…", test: "filter-modality", oninput: debounce((ev) => { state.modality = ev.target.value.trim().toUpperCase(); onFilter(); }, 300) });
  const pager = h("div.pager");

  const load = async () => {
    const res = await get("/api/series", { ...state, limit: PAGE, offset });
    const items = res.items || res;
    const total = res.total ?? items.length;
    replace(
      body,
      items.length
        ? items.map((s) =>
            h("tr.clickable", { test: "series-row", dataset: { uid: s.series_instance_uid }, onclick: () => (location.hash = `#/series/${encodeURIComponent(s.series_instance_uid)}`) },
              h("td", shortUid(s.series_instance_uid, 28)),
              h("td", s.modality || ""),
              h("td", s.series_description || ""),
              h("td.num", String(s.instance_count ?? "")),
              h("td", statusBadge(s.status)),
              h("td", s.route_note || ""),
              h("td", s.calling_ae || ""),
              h("td.time", when(s.last_received_at))))
        : empty("No series match these filters.", 8),
    );
    summary.textContent = total ? `${offset + 1}–${offset + items.length} of ${total}` : "0 series";
    replace(
      pager,
      h("button", { type: "button", disabled: offset === 0, onclick: () => { offset = Math.max(0, offset - PAGE); refresher.tick(); } }, "‹ Newer"),
      h("button", { type: "button", disabled: offset + items.length >= total, onclick: () => { offset += PAGE; refresher.tick(); } }, "Older ›"),
    );
  };
  const refresher = autoRefresh(load, 3000);
  replace(
    main,
    pageHeader("Series", refresher.stamp),
    h("div.filters", field("Status", statusSel), field("Modality", modality)),
    h("div.table-tools", summary, pager),
    h("div.table-wrap", h("table.grid", { test: "series-table" },
      h("thead", h("tr", ["Series Instance UID", "Modality", "Description", "Instances", "Status", "Routing", "Calling AE", "Last received"].map((c) => h("th", c)))),
      body)),
  );
  await refresher.first;
  return refresher.stop;
}

export async function renderSeries(main, uid) {
  const s = await get(`/api/series/${encodeURIComponent(uid)}`);
  replace(
    main,
    pageHeader("Series", h("a.button", { href: "#/series" }, "← All series"), h("a.button", { href: `#/jobs?series_instance_uid=${encodeURIComponent(uid)}` }, "Jobs of this series")),
    h("div.two-col",
      h("section.panel", h("h2", "Series"), facts([
        ["Series Instance UID", h("code", s.series_instance_uid)],
        ["Study Instance UID", h("code", s.study_instance_uid || "")],
        ["Modality", s.modality],
        ["Body part", s.body_part_examined],
        ["Description", s.series_description],
        ["Instances", String(s.instance_count)],
        ["Status", statusBadge(s.status)],
        ["Routing", s.route_note],
        ["Calling AE", s.calling_ae],
        ["First received", fmtTime(s.first_received_at)],
        ["Last received", fmtTime(s.last_received_at)],
        ["Routed", fmtTime(s.routed_at)],
      ], "series-facts")),
      h("section.panel", h("h2", "Results"), table(["Kind", "SOP Class", "Series Instance UID", "Job", "Created"],
        (s.results || []).length ? s.results.map((r) => h("tr", h("td", r.kind), h("td", h("code", r.sop_class_uid)), h("td", shortUid(r.series_instance_uid, 24)), h("td", h("a", { href: `#/jobs/${r.job_id}` }, String(r.job_id))), h("td.time", when(r.created_at)))) : empty("No results yet.", 5)))),
    h("section.panel", h("h2", "Jobs"), table(["ID", "Kind", "Status", "Series", "Rule", "Model", "Destination", "Attempts", "Created", "Updated", "Last error"],
      (s.jobs || []).length ? s.jobs.map((j) => jobRow(j)) : empty("No jobs.", 11))),
  );
}
