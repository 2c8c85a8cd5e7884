// #/rules: the routing rules, highest priority first, with enable toggles, priority moves (each one saves
// a new version), delete, "new rule" and YAML import/export.

import { ApiError, allows, del, get, notify, post, put, writeButton } from "../api.js";
import { empty, h, replace, when } from "../dom.js";
import { forgetCatalogs, pageHeader } from "../ui.js";

export function describeCondition(c) {
  const op = ["equals", "in", "regex", "range", "present"].find((k) => k in c && c[k] !== null && c[k] !== undefined);
  let text;
  if (op === "equals") text = `${c.attribute} = ${c.equals}`;
  else if (op === "in") text = `${c.attribute} in [${c.in.join(", ")}]`;
  else if (op === "regex") text = `${c.attribute} ~ /${c.regex}/`;
  else if (op === "range") {
    const { min, max } = c.range;
    text = min !== undefined && max !== undefined ? `${c.attribute} ${min}–${max}` : min !== undefined ? `${c.attribute} ≥ ${min}` : max !== undefined ? `${c.attribute} ≤ ${max}` : `${c.attribute} any number`;
  }
  else if (op === "present") text = `${c.attribute} ${c.present ? "present" : "absent"}`;
  else text = c.attribute;
  if (c.if_missing === "match") text += " (or missing)";
  if (c.case_sensitive) text += " (case-sensitive)";
  return text;
}

async function save(rule, comment) {
  const res = await put(`/api/rules/${encodeURIComponent(rule.id)}`, { rule, comment, expected_version: rule.version });
  forgetCatalogs();
  return res;
}

export async function renderRules(main) {
  const body = h("tbody");
  const load = async () => {
    const items = await get("/api/rules");
    const rules = items.map((it) => ({ ...it, rule: it.rule || it }));
    rules.sort((a, b) => (b.rule.action.priority - a.rule.action.priority) || a.rule.id.localeCompare(b.rule.id));
    replace(
      body,
      rules.length
        ? rules.map((it, i) => {
            const r = it.rule;
            const move = async (priority, verb) => {
              await save({ ...r, action: { ...r.action, priority } }, `priority ${verb} to ${priority} (admin page)`);
              notify(`${r.id}: priority ${priority}.`, "ok");
              await load();
            };
            return h(
              `tr${r.enabled ? "" : ".disabled-rule"}`,
              { test: `rule-row-${r.id}`, dataset: { ruleId: r.id } },
              h("td.priority",
                h("span.prio", { test: "rule-priority" }, String(r.action.priority)),
                writeButton("▲", "admin", () => move(rules[i - 1].rule.action.priority + 1, "raised"), { class: "icon", test: `rule-up-${r.id}`, disabled: i === 0, title: "raise the priority (saves a new version)", "aria-label": `raise ${r.id}` }),
                writeButton("▼", "admin", () => move(rules[i + 1].rule.action.priority - 1, "lowered"), { class: "icon", test: `rule-down-${r.id}`, disabled: i === rules.length - 1, title: "lower the priority (saves a new version)", "aria-label": `lower ${r.id}` })),
              h("td.rule-name",
                h("a", { href: `#/rules/${encodeURIComponent(r.id)}`, test: `rule-link-${r.id}` }, h("strong", r.id)),
                h("span.rule-v", { test: "rule-list-version" }, `v${r.version}`),
                h("div.muted.small", r.description || "")),
              h("td", h("label.toggle", { title: allows("admin") ? (r.enabled ? "disable (saves a new version)" : "enable (saves a new version)") : "needs role admin" },
                h("input", {
                  type: "checkbox", checked: r.enabled, disabled: !allows("admin"), test: `rule-enabled-${r.id}`, dataset: { needs: "admin" },
                  onchange: async (ev) => {
                    const cb = ev.target;
                    cb.disabled = true;
                    try {
                      await save({ ...r, enabled: cb.checked }, `${cb.checked ? "enabled" : "disabled"} (admin page)`);
                      notify(`${r.id} ${cb.checked ? "enabled" : "disabled"}.`, "ok");
                    } catch (exc) {
                      cb.checked = !cb.checked;
                      if (!(exc instanceof ApiError) || exc.status !== 403) notify(exc.message, "error");
                    }
                    await load();
                  },
                }),
                h("span", r.enabled ? "on" : "off"))),
              h("td.conditions", r.conditions.map((c) => h("div", describeCondition(c)))),
              h("td.action", h("div.nowrap", r.action.model), h("div.muted.small", `→ ${r.action.destinations.join(", ")}`)),
              h("td.last-change", when(it.updated_at), it.updated_by ? h("span.muted", ` ${it.updated_by}`) : null,
                it.comment ? h("div.muted.clamp", { title: it.comment }, `“${it.comment}”`) : null),
              h("td.row-actions",
                h("a.button", { href: `#/rules/${encodeURIComponent(r.id)}`, test: `rule-edit-${r.id}` }, allows("admin") ? "Edit" : "View"),
                writeButton("Delete", "admin", async () => {
                  const comment = prompt(`Delete rule ${r.id}? It stops routing at once; its history stays.\nComment for the history:`, "");
                  if (comment === null) return;
                  await del(`/api/rules/${encodeURIComponent(r.id)}`, { expected_version: r.version, comment });
                  forgetCatalogs();
                  notify(`${r.id} deleted.`, "ok");
                  await load();
                }, { class: "danger", test: `rule-delete-${r.id}` })),
            );
          })
        : empty("No routing rules: nothing is routed to a model.", 7),
    );
  };

  const importPanel = h("section.panel.import", { hidden: true, test: "import-panel" });
  const yamlText = h("textarea.code", { rows: 10, test: "import-yaml", placeholder: "rules:\n  - id: ...", spellcheck: "false" });
  const importErrors = h("ul.field-errors", { test: "import-errors" });
  const comment = h("input", { placeholder: "why (kept in the history)", test: "import-comment" });
  const replaceAll = h("input", { type: "checkbox", test: "import-replace" });
  replace(
    importPanel,
    h("h2", "Import rules from YAML"),
    h("p.muted", "Only rules whose content differs get a new version. With “replace”, rules missing from the file are deleted."),
    h("input", { type: "file", accept: ".yaml,.yml,text/yaml", onchange: async (ev) => { const f = ev.target.files[0]; if (f) yamlText.value = await f.text(); } }),
    yamlText,
    h("div.form-row", h("label.field", h("span.label", "Comment"), comment), h("label.check", replaceAll, " replace (delete rules not in the file)")),
    importErrors,
    h("div.actions",
      writeButton("Import", "admin", async () => {
        replace(importErrors);
        try {
          const res = await post("/api/rules/import", { yaml: yamlText.value, comment: comment.value, replace: replaceAll.checked });
          notify(`Imported: ${res.length} rule(s) changed.`, "ok");
          forgetCatalogs();
          importPanel.hidden = true;
          await load();
        } catch (exc) {
          if (exc instanceof ApiError && exc.status === 422) {
            replace(importErrors, exc.fieldErrors.length ? exc.fieldErrors.map((e) => h("li", `${(e.loc || []).join(".")}: ${e.msg}`)) : h("li", exc.message));
          } else throw exc;
        }
      }, { class: "primary", test: "import-submit" }),
      h("button", { type: "button", onclick: () => (importPanel.hidden = true) }, "Close")),
  );

  replace(
    main,
    pageHeader("Routing rules",
      writeButton("New rule", "admin", () => (location.hash = "#/rules/new"), { class: "primary", test: "new-rule" }),
      writeButton("Import YAML", "admin", () => { importPanel.hidden = !importPanel.hidden; }, { test: "import-rules" }),
      h("a.button", { href: "/api/rules/export", download: "rules.yaml", test: "export-rules" }, "Export YAML")),
    h("p.muted", "Every enabled rule whose conditions all hold sends a completed series to its model; higher priority runs first. Each change saves a new version."),
    importPanel,
    h("div.table-wrap", h("table.grid.rules", { test: "rules-table" },
      h("thead", h("tr", ["Priority", "Rule", "Enabled", "Conditions", "Model → destinations", "Last change", ""].map((c) => h("th", c)))),
      body)),
  );
  await load();
}
