// #/models: the model manifests (version, licence, provenance) and whether each weights file's sha256
// was verified.

import { get } from "../api.js";
import { facts, h, replace } from "../dom.js";
import { pageHeader } from "../ui.js";

const list = (v) => (Array.isArray(v) ? v.join(", ") : v ?? "");

export async function renderModels(main) {
  const models = await get("/api/models");
  replace(
    main,
    pageHeader("Models"),
    models.length
      ? h("div.model-grid", models.map((m) => {
          const weights = m.weights || [];
          const allOk = weights.length > 0 && weights.every((w) => w.verified === true);
          const anyBad = weights.some((w) => w.verified === false);
          return h("section.panel.model", { test: `model-${m.name}` },
            h("div.dest-head", h("h2", m.name, h("span.muted.small", ` v${m.version}`)),
              h(`span.badge.${anyBad ? "status-dead" : allOk ? "status-succeeded" : "status-queued"}`, { test: "weights-state" },
                anyBad ? "sha256 MISMATCH" : allOk ? "sha256 verified" : weights.length ? "not verified" : "no weights file")),
            facts([
              ["Task", m.task], ["Format", m.format], ["Modalities", list(m.modalities)], ["Body parts", list(m.body_parts)],
              ["Licence", m.licence], ["Provenance", m.provenance], ["Intended use", m.intended_use], ["Limits", m.limits], ["Source", m.source],
            ]),
            weights.length ? h("table.grid.compact", h("thead", h("tr", ["Weights file", "sha256", ""].map((c) => h("th", c)))),
              h("tbody", weights.map((w) => h("tr", h("td", w.file), h("td", h("code.uid", { title: w.sha256 }, (w.sha256 || "").slice(0, 16) + "…")),
                h("td", w.verified === true ? h("span.good", "✓ verified") : w.verified === false ? h("span.bad", "✕ mismatch") : h("span.muted", "not checked")))))) : null);
        }))
      : h("p.muted", "No models are installed."),
  );
}
