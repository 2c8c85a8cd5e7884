// #/jobs/ID: one job: status, attempts, last error, payload summary, results, the stage timeline
// (received → verified) and related jobs, with retry / rerun / cancel.

import { get, notify, post, writeButton } from "../api.js";
import { empty, facts, fmtDuration, fmtTime, h, replace, shortUid, statusBadge, table } from "../dom.js";
import { autoRefresh, pageHeader } from "../ui.js";
import { jobField, jobRow } from "./jobs.js";

export const STAGES = ["received", "complete", "routed", "inferred", "encoded", "delivered", "verified"];
const STATUS_MARK = { done: "✓", running: "…", pending: "○", failed: "✕", skipped: "–" };

function detailText(detail) {
  if (detail === null || detail === undefined || detail === "") return "";
  if (typeof detail !== "object") return String(detail);
  return Object.entries(detail)
    .filter(([, v]) => v !== null && v !== "" && v !== undefined)
    .map(([k, v]) => `${k}: ${typeof v === "object" ? JSON.stringify(v) : v}`)
    .join(" · ");
}

export function timeline(steps) {
  if (!steps || !steps.length) return h("p.muted", { test: "timeline-empty" }, "No timeline for this job.");
  const ordered = [...steps].sort((a, b) => STAGES.indexOf(a.stage) - STAGES.indexOf(b.stage));
  return h(
    "ol.timeline",
    { test: "timeline" },
    ordered.map((s) =>
      h(
        `li.step.step-${s.status}`,
        { test: `timeline-${s.stage}`, dataset: { stage: s.stage, status: s.status } },
        h("div.step-mark", { "aria-hidden": "true" }, STATUS_MARK[s.status] || "?"),
        h("div.step-name", s.stage),
        h("div.step-status", s.status),
        h("div.step-at", s.at ? fmtTime(s.at).slice(11) : ""),
        h("div.step-dur", s.duration_s !== null && s.duration_s !== undefined ? `+${fmtDuration(s.duration_s)}` : ""),
        h("div.step-detail", { title: detailText(s.detail) }, detailText(s.detail)),
      ),
    ),
  );
}

function payloadSummary(payload) {
  const rows = Object.entries(payload || {}).map(([key, value]) => {
    let shown;
    if (Array.isArray(value)) shown = value.length > 3 || value.some((v) => typeof v === "object") ? `${value.length} item(s)` : value.join(", ");
    else if (value && typeof value === "object") shown = JSON.stringify(value);
    else if (typeof value === "string" && /_uid$/.test(key)) shown = h("code", value);
    else shown = String(value);
    return [key, shown];
  });
  return rows.length ? facts(rows, "payload") : h("p.muted", "Empty payload.");
}

function resultSummary(result) {
  if (!result) return null;
  const rows = Object.entries(result)
    .filter(([, v]) => v !== null && v !== undefined)
    .map(([k, v]) => [k, Array.isArray(v) ? `${v.length} item(s)` : typeof v === "object" ? JSON.stringify(v) : String(v)]);
  return facts(rows, "job-result");
}

export async function renderJob(main, id) {
  const top = h("div");
  const actions = h("div.actions", { test: "job-actions" });
  const left = h("div.col");
  const right = h("div.col");
  const tl = h("section.panel", { test: "timeline-panel" });
  const related = h("section.panel");

  const act = (verb, label, allowed, title) =>
    writeButton(label, "operator", async () => {
      const res = await post(`/api/jobs/${id}/${verb}`, {});
      if (verb === "rerun" && res && res.id && res.id !== id) {
        notify(`Re-run queued as job ${res.id}.`, "ok");
        location.hash = `#/jobs/${res.id}`;
        return;
      }
      notify(`Job ${id}: ${verb} done.`, "ok");
      await refresher.tick();
    }, { test: `job-${verb}`, disabled: !allowed, title });

  const load = async () => {
    const job = await get(`/api/jobs/${id}`);
    replace(
      top,
      h("div.job-title", h("span.kind", job.kind), statusBadge(job.status, "job-status"),
        job.result && job.result.verified === true ? h("span.verified", { test: "job-verified" }, "✓ delivered, verified") : null),
    );
    replace(
      actions,
      act("retry", "Retry", ["dead", "failed"].includes(job.status), "run it again now (dead or failed jobs)"),
      act("rerun", "Re-run", ["succeeded", "dead"].includes(job.status), "queue a new job with the same payload"),
      act("cancel", "Cancel", ["queued", "failed"].includes(job.status), "stop it before it runs"),
    );
    replace(
      tl,
      h("h2", "Timeline"),
      timeline(job.timeline),
    );
    replace(
      left,
      h("section.panel", h("h2", "Status"), facts([
        ["Status", statusBadge(job.status)],
        ["Attempts", `${job.attempts} of ${job.max_attempts}`],
        ["Series", shortUid(jobField(job, "series_instance_uid"), 40)],
        ["Rule", jobField(job, "rule_id") ? h("a", { href: `#/rules/${encodeURIComponent(jobField(job, "rule_id"))}` }, `${jobField(job, "rule_id")}${job.payload?.rule_version ? " v" + job.payload.rule_version : ""}`) : ""],
        ["Model", jobField(job, "model") || ""],
        ["Destination", jobField(job, "destination") || (job.payload?.destinations || []).join(", ")],
        ["Created", fmtTime(job.created_at)],
        ["Scheduled", fmtTime(job.scheduled_at)],
        ["Started", fmtTime(job.started_at)],
        ["Finished", fmtTime(job.finished_at)],
        ["Worker", job.worker_id || ""],
      ], "job-facts")),
      h("section.panel", h("h2", "Last error"), job.last_error ? h("pre.error-text", { test: "job-last-error" }, job.last_error) : h("p.muted", { test: "job-last-error" }, "None.")),
    );
    replace(
      right,
      h("section.panel", h("h2", "Payload"), payloadSummary(job.payload)),
      job.result ? h("section.panel", h("h2", "Outcome"), resultSummary(job.result)) : null,
      h("section.panel", h("h2", "Results"), table(
        ["Kind", "SOP Class", "Series Instance UID", "Created"],
        (job.results || []).length
          ? job.results.map((r) => h("tr", h("td", r.kind), h("td", h("code", r.sop_class_uid)), h("td", shortUid(r.series_instance_uid, 30)), h("td.nowrap", fmtTime(r.created_at))))
          : empty("No result objects.", 4),
        { test: "job-results" },
      )),
    );
    replace(
      related,
      h("h2", "Related jobs"),
      table(
        ["ID", "Kind", "Status", "Series", "Rule", "Model", "Destination", "Attempts", "Created", "Updated", "Last error"],
        (job.related || []).length ? job.related.map((j) => jobRow(j)) : empty("None.", 11),
        { test: "related-jobs" },
      ),
    );
  };

  const refresher = autoRefresh(load, 3000);
  replace(
    main,
    pageHeader(`Job ${id}`, refresher.stamp, h("a.button", { href: "#/jobs" }, "← All jobs")),
    h("div.job-head", top, actions),
    tl,
    h("div.two-col", left, right),
    related,
  );
  await refresher.first;
  return refresher.stop;
}
