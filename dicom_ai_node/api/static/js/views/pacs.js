// #/pacs: process studies a PACS already holds. Pick a source, query it (C-FIND / QIDO-RS: the answers
// carry no patient data), and queue a pull of one study or of the selected ones; the pulls below show
// their progress ("retrieved 34 of 48 instances") and link to their jobs.

import { get, notify, post, writeButton } from "../api.js";
import { empty, h, replace, select, shortUid, statusBadge, when } from "../dom.js";
import { autoRefresh, field, pageHeader } from "../ui.js";

const RECENT_PULLS = 10;

function fmtDate(value) {
  return /^\d{8}$/.test(value || "") ? `${value.slice(0, 4)}-${value.slice(4, 6)}-${value.slice(6)}` : value || "";
}

/** "retrieved 34 of 48 instances (series 1 of 2)" from a pull job's progress or result. */
export function pullProgressText(result) {
  const p = (result && (result.progress || result)) || null;
  if (!p || p.retrieved === undefined) return "";
  const of = p.expected !== null && p.expected !== undefined ? ` of ${p.expected}` : "";
  const series = p.series_total ? ` (series ${p.series_done} of ${p.series_total})` : "";
  return `retrieved ${p.retrieved}${of} instances${series}${p.method ? ` over ${p.method}` : ""}`;
}

export function pullProgress(job) {
  if (job.kind !== "pull") return null;
  const p = (job.result && (job.result.progress || job.result)) || {};
  const text = pullProgressText(job.result) || (job.status === "queued" ? "waiting for a worker" : "");
  return h(
    "span.pull-progress",
    { test: `pull-progress-${job.id}` },
    p.expected ? h("progress", { max: p.expected, value: Math.min(p.retrieved || 0, p.expected) }) : null,
    h("span", text),
  );
}

export async function renderPacs(main) {
  const sources = await get("/api/sources");
  if (!sources.length) {
    replace(main, pageHeader("PACS"), h("p.muted", { test: "no-sources" }, "No sources are configured (node.yaml `sources`)."));
    return;
  }
  const state = { source: sources[0].name, matches: [] };
  const selected = new Set();
  const input = (key, props = {}) => h("input", { name: key, test: `pacs-${key}`, ...props });
  const inputs = {
    patient_id: input("patient_id", { placeholder: "exact ID", autocomplete: "off" }),
    date_from: input("date_from", { type: "date" }),
    date_to: input("date_to", { type: "date" }),
    modality: input("modality", { placeholder: "CT", size: 6 }),
    accession_number: input("accession_number", { placeholder: "accession" }),
    study_description: input("study_description", { placeholder: "e.g. CHEST*" }),
  };
  const sourceSelect = select(sources.map((s) => [s.name, `${s.name} (${s.type === "dicomweb" ? "QIDO/WADO-RS" : "C-" + s.retrieve.toUpperCase()})`]), state.source, {
    test: "pacs-source",
    onchange: (ev) => (state.source = ev.target.value),
  });
  const body = h("tbody");
  const summary = h("span.muted", { test: "pacs-summary" });
  const pullsBody = h("tbody");

  const queuePull = async (studyUid) => {
    const job = await post("/api/pull", { source: state.source, study_instance_uid: studyUid });
    return job;
  };
  const processOne = (m) =>
    writeButton("Process", "operator", async () => {
      const job = await queuePull(m.study_instance_uid);
      notify(`Pull of study ${shortUid(m.study_instance_uid)} queued as job ${job.id}.`, "ok");
      await refresher.tick();
    }, { test: `process-${m.study_instance_uid}`, title: "retrieve the study and process it like a received one" });

  const renderMatches = () => {
    replace(
      body,
      state.matches.length
        ? state.matches.map((m) =>
            h("tr", { test: `study-${m.study_instance_uid}` },
              h("td.check", h("input", { type: "checkbox", "aria-label": "select study", checked: selected.has(m.study_instance_uid), onchange: (ev) => (ev.target.checked ? selected.add(m.study_instance_uid) : selected.delete(m.study_instance_uid)) })),
              h("td.time", fmtDate(m.study_date)),
              h("td", (m.modalities || []).join(", ")),
              h("td.num", m.number_of_series ?? "?"),
              h("td.num", m.number_of_instances ?? "?"),
              h("td.name", m.accession_number || ""),
              h("td.name", m.study_description || ""),
              h("td", h("code", { title: m.study_instance_uid }, shortUid(m.study_instance_uid, 28))),
              h("td", processOne(m))))
        : empty("No studies: search with the filters above.", 9),
    );
  };

  const search = writeButton("Search", "operator", async () => {
    const filters = {};
    for (const [key, el] of Object.entries(inputs)) {
      const value = el.value.trim();
      if (value) filters[key] = key === "modality" ? value.toUpperCase() : value;
    }
    summary.textContent = "searching…";
    try {
      state.matches = await post(`/api/sources/${encodeURIComponent(state.source)}/find`, filters);
    } catch (exc) {
      summary.textContent = "";
      throw exc;
    }
    selected.clear();
    summary.textContent = `${state.matches.length} studies at ${state.source}`;
    renderMatches();
  }, { test: "pacs-search", class: "primary" });

  const processSelected = writeButton("Process selected", "operator", async () => {
    if (!selected.size) return notify("Select studies first.", "info");
    const ids = [];
    for (const uid of selected) ids.push((await queuePull(uid)).id);
    notify(`Queued ${ids.length} pull(s): jobs ${ids.join(", ")}.`, "ok");
    selected.clear();
    renderMatches();
    await refresher.tick();
  }, { test: "process-selected" });

  const loadPulls = async () => {
    const page = await get("/api/jobs", { kind: "pull", limit: RECENT_PULLS });
    // Progress is in each job's result (older APIs list jobs without it: fetched one by one then).
    const details = await Promise.all(page.items.map((j) => ("result" in j ? j : get(`/api/jobs/${j.id}`))));
    replace(
      pullsBody,
      details.length
        ? details.map((j) =>
            h("tr", { test: `pull-job-${j.id}` },
              h("td.num", h("a", { href: `#/jobs/${j.id}` }, String(j.id))),
              h("td.nowrap", statusBadge(j.status)),
              h("td.name", j.payload?.source || ""),
              h("td", h("code", shortUid(j.payload?.study_instance_uid || "", 28))),
              h("td", pullProgress(j)),
              h("td.time", when(j.updated_at)),
              h("td.error-cell", { title: j.last_error || "" }, j.last_error ? h("div.clamp", j.last_error) : "")))
        : empty("No pulls yet.", 7),
    );
  };
  const refresher = autoRefresh(loadPulls, 2000);

  renderMatches();
  replace(
    main,
    pageHeader("PACS", refresher.stamp),
    h("form.filters", { test: "pacs-form", onsubmit: (ev) => { ev.preventDefault(); search.click(); } },
      field("Source", sourceSelect),
      field("Patient ID", inputs.patient_id),
      field("Date from", inputs.date_from),
      field("Date to", inputs.date_to),
      field("Modality", inputs.modality),
      field("Accession", inputs.accession_number),
      field("Description", inputs.study_description),
      h("div.field-actions", search, processSelected, summary)),
    h("div.table-wrap.spaced", h("table.grid", { test: "pacs-results" },
      h("thead", h("tr", ["", "Date", "Modalities", "Series", "Images", "Accession", "Description", "Study Instance UID", ""].map((c) => h("th", c)))),
      body)),
    h("section.panel", h("h2", "Pulls"), h("table.grid", { test: "pacs-pulls" },
      h("thead", h("tr", ["Job", "Status", "Source", "Study", "Progress", "Updated", "Last error"].map((c) => h("th", c)))),
      pullsBody)),
  );
  return () => refresher.stop();
}
