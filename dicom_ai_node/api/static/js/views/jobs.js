// #/jobs: the queue with filters, auto-refresh, and the dead-letter view (status dead + replay selected).

import { get, notify, post, writeButton } from "../api.js";
import { dateToIso, debounce, empty, h, replace, select, shortUid, statusBadge, when } from "../dom.js";
import { autoRefresh, catalogs, field, pageHeader, setQuery } from "../ui.js";

const STATUSES = ["", "queued", "running", "succeeded", "failed", "dead", "cancelled"];
const KINDS = ["", "infer", "deliver", "pull"];
const PAGE = 100;
const FILTER_KEYS = ["status", "kind", "modality", "rule_id", "model", "since", "until", "series_instance_uid"];

export const jobField = (job, key) => job[key] ?? job.payload?.[key] ?? null;

export function jobRow(job, { selectable = false, selected = null, onToggle = null } = {}) {
  const verified = job.result && job.result.verified === true;
  const unverified = job.result && job.result.verified === false && job.result.verify_error;
  const open = () => (location.hash = `#/jobs/${job.id}`);
  return h(
    "tr.clickable",
    { test: `job-row-${job.id}`, dataset: { jobId: job.id, status: job.status, kind: job.kind }, onclick: (ev) => {
      if (ev.target.closest("input,a,button")) return;
      open();
    } },
    selectable
      ? h("td.check", h("input", { type: "checkbox", test: `select-job-${job.id}`, "aria-label": `select job ${job.id}`, checked: selected?.has(job.id), onchange: (ev) => onToggle(job.id, ev.target.checked) }))
      : null,
    h("td.num", h("a", { href: `#/jobs/${job.id}` }, String(job.id))),
    h("td.nowrap", job.kind),
    h("td.nowrap", statusBadge(job.status), verified ? h("span.verified", { title: "the destination holds every object (read-back)" }, "✓ verified") : null,
      unverified ? h("span.unverified", { title: `delivered, not verified: ${job.result.verify_error}` }, "not verified") : null),
    h("td", shortUid(jobField(job, "series_instance_uid"))),
    h("td.name", jobField(job, "rule_id") || ""),
    h("td.name", jobField(job, "model") || ""),
    h("td.name", jobField(job, "destination") || ""),
    h("td.num", `${job.attempts}/${job.max_attempts}`),
    h("td.time", when(job.created_at)),
    h("td.time", when(job.updated_at)),
    // The error takes the width left over and shows two lines at most; the full text is in the tooltip.
    h("td.error-cell", { title: job.last_error || "" }, job.last_error ? h("div.clamp", job.last_error) : ""),
  );
}

export async function renderJobs(main, query) {
  const state = Object.fromEntries(FILTER_KEYS.map((k) => [k, query.get(k) || ""]));
  let offset = Number(query.get("offset") || 0);
  const selected = new Set();
  const dead = () => state.status === "dead";

  const body = h("tbody");
  const summary = h("span.muted", { test: "jobs-total" });
  const pager = h("div.pager");
  const replayBtn = writeButton("Replay selected", "operator", async () => {
    if (!selected.size) return notify("Select dead jobs to replay first.", "info");
    const res = await post("/api/dead-letter/replay", { job_ids: [...selected] });
    notify(`Replayed ${res.replayed.length} job(s)${res.skipped.length ? `, skipped ${res.skipped.join(", ")}` : ""}.`, "ok");
    selected.clear();
    await refresher.tick();
  }, { test: "replay-selected", class: "primary" });

  const onFilter = () => {
    offset = 0;
    setQuery("/jobs", { ...state });
    selected.clear();
    syncDead();
    refresher.tick();
  };
  const input = (key, el) => {
    el.addEventListener(el.tagName === "SELECT" || el.type === "date" ? "change" : "input", key === "modality" ? debounce(() => { state[key] = el.value.trim().toUpperCase(); onFilter(); }, 300) : () => { state[key] = el.value; onFilter(); });
    el.dataset.test = `filter-${key}`;
    return el;
  };
  const dayOf = (iso) => (iso ? iso.slice(0, 10) : "");
  const statusSel = input("status", select(STATUSES, state.status));
  // The catalogues fill in after the table shows: a slow manifest check must not hold the page up.
  const ruleSel = input("rule_id", select([...new Set(["", state.rule_id])], state.rule_id));
  const modelSel = input("model", select([...new Set(["", state.model])], state.model));
  catalogs().then((cat) => {
    replace(ruleSel, [...select([...new Set(["", ...cat.rules, state.rule_id])], state.rule_id).children]);
    replace(modelSel, [...select([...new Set(["", ...cat.models, state.model])], state.model).children]);
    ruleSel.value = state.rule_id;
    modelSel.value = state.model;
  });
  const filters = h(
    "div.filters",
    { test: "job-filters" },
    field("Status", statusSel),
    field("Kind", input("kind", select(KINDS, state.kind))),
    field("Modality", input("modality", h("input.short", { value: state.modality, placeholder: "CT, MR…" }))),
    field("Rule", ruleSel),
    field("Model", modelSel),
    field("From", input("since", h("input", { type: "date", value: state.since }))),
    field("To", input("until", h("input", { type: "date", value: state.until }))),
    state.series_instance_uid ? h("span.chip", { test: "filter-series" }, "series ", shortUid(state.series_instance_uid)) : null,
    h("button.link", { type: "button", test: "filter-reset", onclick: () => { Object.keys(state).forEach((k) => (state[k] = "")); location.hash = "#/jobs"; } }, "Reset"),
  );

  const tabs = h("div.tabs");
  const syncDead = () => {
    replace(
      tabs,
      h("a", { href: "#/jobs", class: dead() ? "" : "active", test: "tab-all-jobs" }, "All jobs"),
      h("a", { href: "#/jobs?status=dead", class: dead() ? "active" : "", test: "tab-dead-letter" }, "Dead letter"),
    );
    replaceBtn.hidden = !dead();
    statusSel.value = state.status;
  };
  const replaceBtn = h("span.dead-tools", replayBtn);

  const headers = () => [dead() ? h("input", { type: "checkbox", test: "select-all", "aria-label": "select all", onchange: (ev) => {
    for (const cb of body.querySelectorAll("input[type=checkbox]")) {
      cb.checked = ev.target.checked;
      const id = Number(cb.closest("tr").dataset.jobId);
      ev.target.checked ? selected.add(id) : selected.delete(id);
    }
  } }) : null, "ID", "Kind", "Status", "Series", "Rule", "Model", "Destination", "Attempts", "Created", "Updated", "Last error"].filter((c) => c !== null);
  const thead = h("thead");
  const grid = h("table.grid.jobs", { test: "jobs-table" }, thead, body);

  const load = async () => {
    const q = { ...state, since: dateToIso(state.since), until: dateToIso(state.until, true), limit: PAGE, offset };
    const res = await get("/api/jobs", q);
    const items = res.items || res;
    const total = res.total ?? items.length;
    replace(thead, h("tr", headers().map((c) => h("th", c))));
    replace(
      body,
      items.length
        ? items.map((j) => jobRow(j, { selectable: dead(), selected, onToggle: (id, on) => (on ? selected.add(id) : selected.delete(id)) }))
        : empty(dead() ? "The dead-letter queue is empty." : "No jobs match these filters.", 12),
    );
    summary.textContent = total ? `${offset + 1}–${offset + items.length} of ${total}` : "0 jobs";
    replace(
      pager,
      h("button", { type: "button", disabled: offset === 0, onclick: () => { offset = Math.max(0, offset - PAGE); refresher.tick(); } }, "‹ Newer"),
      h("button", { type: "button", disabled: offset + items.length >= total, onclick: () => { offset += PAGE; refresher.tick(); } }, "Older ›"),
    );
  };
  const refresher = autoRefresh(load, 3000);
  syncDead();
  replace(
    main,
    pageHeader("Jobs", refresher.stamp),
    tabs,
    filters,
    h("div.table-tools", summary, replaceBtn, pager),
    h("div.table-wrap", grid),
  );
  await refresher.first;
  return refresher.stop;
}
