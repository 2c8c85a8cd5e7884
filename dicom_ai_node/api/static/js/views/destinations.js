// #/destinations: where results go, with a "Test" button (C-ECHO for DIMSE, a QIDO-RS query for
// DICOMweb) and each destination's recent deliveries.

import { get, post, writeButton } from "../api.js";
import { empty, fmtDuration, h, replace, statusBadge, table, when } from "../dom.js";
import { pageHeader } from "../ui.js";

const COUNTS = ["succeeded", "queued", "failed", "dead"];

function optionsText(options) {
  return Object.entries(options || {})
    .filter(([, v]) => v !== null && v !== undefined)
    .map(([k, v]) => `${k}: ${typeof v === "object" ? JSON.stringify(v) : v}`)
    .join(" · ");
}

export async function renderDestinations(main) {
  const items = await get("/api/destinations");
  const rows = items.map((d) => {
    const result = h("td.probe-result", { test: `probe-result-${d.name}`, "aria-live": "polite" }, h("span.muted", "not tested"));
    const test = writeButton("Test", "operator", async () => {
      replace(result, h("span.muted", "testing…"));
      const res = await post(`/api/destinations/${encodeURIComponent(d.name)}/test`, {});
      replace(result, h(`span.${res.ok ? "good" : "bad"}`, { dataset: { ok: String(res.ok) } }, res.ok ? "✓ reachable" : "✕ failed"), ` ${res.detail} (${fmtDuration(res.elapsed_s)})`);
    }, { test: `test-${d.name}`, title: d.type === "dicomweb" ? "QIDO-RS query" : "C-ECHO" });
    return h("tr", { test: `destination-${d.name}` },
      h("td", h("strong", d.name)),
      h("td", d.type),
      h("td", h("code", d.address || ""), h("div.muted.small", optionsText(d.options))),
      h("td.counts", COUNTS.map((k) => h(`span.count.status-${k}`, { title: `${k} deliveries` }, `${k} ${d.counts?.[k] ?? 0}`))),
      h("td", test),
      result);
  });
  const recent = items.map((d) =>
    h("section.panel", { test: `recent-${d.name}` },
      h("h2", `Recent deliveries to ${d.name}`),
      table(["Job", "Status", "Finished", "Verified", "Error"],
        (d.recent || []).length ? d.recent.map((r) => h("tr",
          h("td", h("a", { href: `#/jobs/${r.job_id}` }, String(r.job_id))),
          h("td", statusBadge(r.status)),
          h("td.time", when(r.finished_at)),
          h(
            "td",
            r.verified === true
              ? h("span.good", "✓ verified")
              : r.status === "succeeded" && r.error
                ? h("span.unverified", { title: r.error }, "not verified")
                : "—",
          ),
          h("td.error-cell", { title: r.error || "" }, r.error ? h("div.clamp", r.error) : ""))) : empty("No deliveries yet.", 5))));
  replace(
    main,
    pageHeader("Destinations"),
    items.length
      ? [h("div.table-wrap.spaced", table(["Name", "Type", "Address", "Deliveries", "", "Last test"], rows, { test: "destinations-table" })), recent]
      : h("p.muted", "No destinations are configured."),
  );
}
