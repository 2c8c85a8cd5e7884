// #/jobs/ID: one job: status, attempts, last error, payload summary, results, the stage timeline
// (received → verified) and related jobs, with retry / rerun / cancel.

import { get, notify, post, writeButton } from "../api.js";
import { empty, facts, fmtClock, fmtDuration, fmtTime, h, replace, shortUid, statusBadge, table, when } from "../dom.js";
import { autoRefresh, pageHeader } from "../ui.js";
import { pullProgress } from "./pacs.js";
import { jobField, jobRow } from "./jobs.js";

export const STAGES = ["received", "complete", "routed", "inferred", "encoded", "delivered", "verified"];
const STATUS_MARK = { done: "✓", running: "…", pending: "○", failed: "✕", skipped: "–" };

const ISO_TIME = /^\d{4}-\d\d-\d\dT\d\d:\d\d/;

/** A time in a detail: the clock only when it is today (the timeline's own times are), else date and time. */
function clockOf(iso) {
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return String(iso);
  return d.toDateString() === new Date().toDateString() ? fmtClock(d) : fmtTime(iso);
}

const plural = (n, word) => `${n} ${word}${Number(n) === 1 ? "" : "s"}`;

/** Any other detail value, in words: times as hh:mm:ss, yes/no for booleans, lists joined. */
function detailValue(value) {
  if (typeof value === "boolean") return value ? "yes" : "no";
  if (typeof value === "string" && ISO_TIME.test(value)) return clockOf(value);
  if (Array.isArray(value)) return value.join(", ");
  if (value && typeof value === "object") return Object.entries(value).map(([k, v]) => `${k} ${detailValue(v)}`).join(", ");
  return String(value);
}

/**
 * A timeline step's detail as short phrases ("12 instances", "first at 08:12:50", "rule x v2",
 * "to pacs", "attempt 2"); the error, when there is one, comes last. Keys the page does not know are
 * still shown, as "key value".
 */
export function stepDetail(detail, status) {
  if (detail === null || detail === undefined || detail === "") return [];
  if (typeof detail !== "object") return [String(detail)];
  const d = Object.fromEntries(Object.entries(detail).filter(([, v]) => v !== null && v !== undefined && v !== ""));
  const parts = [];
  const take = (key) => {
    const v = d[key];
    delete d[key];
    return v;
  };
  const instances = take("instances");
  if (instances !== undefined) parts.push(plural(instances, "instance"));
  const first = take("first_received_at");
  if (first !== undefined) parts.push(`first at ${clockOf(first)}`);
  const rule = take("rule_id");
  const ruleVersion = take("rule_version");
  if (rule !== undefined) parts.push(`rule ${rule}${ruleVersion !== undefined ? ` v${ruleVersion}` : ""}`);
  const model = take("model");
  const device = take("device");
  if (model !== undefined) parts.push(device !== undefined ? `${model} on ${device}` : model);
  else if (device !== undefined) parts.push(`on ${device}`);
  const destination = take("destination");
  const verified = take("verified");
  const verifyError = take("verify_error");
  // "verified" is the delivery's read-back; the step's own status says whether it counts.
  if (verified === true && status === "done") parts.push(`${destination || "the destination"} holds every object`);
  else if (destination !== undefined) parts.push(`to ${destination}`);
  // Stored, but the destination offers no query to read back with.
  if (verifyError !== undefined) parts.push(`not verified: ${verifyError}`);
  const jobId = take("job_id");
  if (jobId !== undefined) parts.push(`job ${jobId}`);
  const attempts = take("attempts");
  if (attempts !== undefined && Number(attempts) > 1) parts.push(plural(attempts, "attempt"));
  const reason = take("reason");
  if (reason !== undefined) parts.push(String(reason));
  const error = take("error");
  for (const [key, value] of Object.entries(d)) parts.push(`${key.replace(/_/g, " ")} ${detailValue(value)}`);
  if (error !== undefined) parts.push(String(error));
  return parts;
}

function stepDetailNode(step) {
  const parts = stepDetail(step.detail, step.status);
  // Short phrases never break inside ("12 instances" stays whole); an error text wraps as it must.
  return h("div.step-detail", { title: parts.join(" · ") },
    parts.map((p, i) => [i ? " · " : "", h(p.length <= 24 ? "span.part" : "span", p)]));
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
        stepDetailNode(s),
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

/** One outcome value in words: timings as durations, volumes with their unit, lists counted. */
function resultValue(key, value) {
  if (Array.isArray(value)) return value.length > 3 || value.some((v) => typeof v === "object") ? `${value.length} item(s)` : value.join(", ");
  if (typeof value === "boolean") return value ? "yes" : "no";
  if (typeof value === "string" && ISO_TIME.test(value)) return fmtTime(value);
  if (!value || typeof value !== "object") return String(value);
  const unit = key.endsWith("_cm3") ? " cm³" : "";
  return Object.entries(value)
    .map(([k, v]) => {
      if (key === "timings" && typeof v === "number") return `${k.replace(/_s$/, "")} ${fmtDuration(v)}`;
      if (typeof v === "number") return `${k} ${Number.isInteger(v) ? v : v.toFixed(1)}${unit}`;
      return `${k} ${typeof v === "object" ? JSON.stringify(v) : v}`;
    })
    .join(" · ");
}

function resultSummary(result) {
  if (!result) return null;
  const rows = Object.entries(result)
    .filter(([, v]) => v !== null && v !== undefined)
    .map(([k, v]) => [k, resultValue(k, v)]);
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
        job.result && job.result.verified === true ? h("span.verified", { test: "job-verified" }, "✓ delivered, verified") : null,
        job.result && job.result.verified === false && job.result.verify_error
          ? h("span.unverified", { test: "job-unverified" }, `delivered, not verified: ${job.result.verify_error}`)
          : null,
        pullProgress(job)),
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
          ? job.results.map((r) => h("tr", h("td", r.kind), h("td", h("code", r.sop_class_uid)), h("td", shortUid(r.series_instance_uid, 30)), h("td.time", when(r.created_at))))
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
