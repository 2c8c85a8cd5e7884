// #/rules/new and #/rules/ID: the rule form. Errors from the server (422 or /api/rules/validate) are shown
// next to the field they name; "Dry-run" and "Replay" try the unsaved draft; the history shows who
// changed what, the diff between any two versions, and rolls back.

import { ApiError, allows, get, notify, post, put, writeButton } from "../api.js";
import { debounce, empty, h, replace, select, shortUid, table, when } from "../dom.js";
import { catalogs, forgetCatalogs, pageHeader } from "../ui.js";

// Mirrors dicom_ai_node.domain.rules.MATCHABLE_ATTRIBUTES (the server validates anyway).
export const ATTRIBUTES = [
  "Modality", "BodyPartExamined", "SeriesDescription", "SOPClassUID", "CallingAETitle", "NumberOfInstances",
  "SliceThickness", "ProtocolName", "StudyDescription", "Manufacturer", "ManufacturerModelName", "ImageType",
  "MagneticFieldStrength", "ContrastBolusAgent",
];
const OPERATORS = [["equals", "equals"], ["in", "one of"], ["regex", "regex"], ["range", "in range"], ["present", "present"]];

const BLANK_RULE = {
  id: "", version: 1, description: "", enabled: true,
  conditions: [{ attribute: "Modality", equals: "" }],
  action: { model: "", destinations: [], priority: 0 },
};

function operatorOf(c) {
  return ["equals", "in", "regex", "range", "present"].find((k) => c[k] !== undefined && c[k] !== null) || "equals";
}

/** Strip the request-body prefixes FastAPI and the API put in front of the rule's own field path. */
export function ruleLoc(loc) {
  const parts = [...(loc || [])];
  while (parts.length && ["body", "rule"].includes(String(parts[0]))) parts.shift();
  return parts.join(".");
}

export async function renderRuleEditor(main, ruleId, query) {
  const isNew = ruleId === null;
  const [cat, loaded] = await Promise.all([catalogs(), isNew ? null : get(`/api/rules/${encodeURIComponent(ruleId)}`)]);
  const history = loaded ? loaded.history || [] : [];
  // A deleted rule keeps its history: the form shows its last content and saving re-creates it.
  const deleted = !!loaded && !loaded.rule;
  const current = loaded
    ? loaded.rule
      ? loaded.rule.rule
      : { ...(history.find((v) => !v.deleted) || { rule: BLANK_RULE }).rule, id: ruleId }
    : structuredClone(BLANK_RULE);
  const admin = allows("admin");
  const reload = () => renderRuleEditor(main, ruleId, query);

  // -- the form -----------------------------------------------------------------------------------
  const fieldBox = (loc, label, input, hint) =>
    h("div.fieldbox", { dataset: { loc } },
      h("label", { for: input.id }, label),
      input,
      hint ? h("div.hint", hint) : null,
      h("div.field-error", { test: `error-${loc}`, role: "alert" }));

  const idInput = h("input", { id: "rule-id", value: current.id, readonly: !isNew, test: "rule-id", placeholder: "e.g. ct-chest-lungs", autocomplete: "off" });
  const descInput = h("input.wide", { id: "rule-description", value: current.description || "", test: "rule-description" });
  const enabledInput = h("input", { id: "rule-enabled", type: "checkbox", checked: current.enabled !== false, test: "rule-enabled" });

  const condBody = h("div.conditions-list", { test: "conditions" });
  const condErrorsBox = h("div.fieldbox.list-errors", { dataset: { loc: "conditions" } }, h("div.field-error", { test: "error-conditions" }));

  function conditionRow(c) {
    const row = h("div.cond-row", { test: "condition-row" });
    const attrOptions = ATTRIBUTES.includes(c.attribute) || !c.attribute ? ATTRIBUTES : [...ATTRIBUTES, [c.attribute, `${c.attribute} (unknown)`]];
    const attr = select(attrOptions, c.attribute, { test: "cond-attribute", "aria-label": "attribute" });
    const op = select(OPERATORS, operatorOf(c), { test: "cond-operator", "aria-label": "operator" });
    const valueBox = h("div.cond-value");
    const caseSensitive = h("input", { type: "checkbox", checked: !!c.case_sensitive, test: "cond-case" });
    const ifMissing = select([["no_match", "absent → no match"], ["match", "absent → match"]], c.if_missing || "no_match", { test: "cond-if-missing", "aria-label": "when the attribute is missing", title: "when the series lacks the attribute (or it is empty)" });
    let inputs = {};

    const drawValue = (operator, source) => {
      inputs = {};
      const v = source[operator];
      if (operator === "range") {
        inputs.min = h("input.num", { type: "number", step: "any", placeholder: "min", value: v?.min ?? "", test: "cond-min", "aria-label": "minimum" });
        inputs.max = h("input.num", { type: "number", step: "any", placeholder: "max", value: v?.max ?? "", test: "cond-max", "aria-label": "maximum" });
        replace(valueBox, inputs.min, h("span.muted", " to "), inputs.max);
      } else if (operator === "present") {
        inputs.present = select([["true", "yes (has a value)"], ["false", "no (missing or empty)"]], v === false ? "false" : "true", { test: "cond-value", "aria-label": "value" });
        replace(valueBox, inputs.present);
      } else {
        const text = operator === "in" ? (v || []).join(", ") : v ?? "";
        const placeholder = { equals: "value", in: "values, comma separated", regex: "regular expression, e.g. chest|thorax" }[operator];
        inputs.text = h("input.value", { value: text, placeholder, test: "cond-value", "aria-label": "value", spellcheck: "false" });
        replace(valueBox, inputs.text);
      }
      valueWrap.dataset.loc = `${locPrefix()}.${operator}`;
      caseSensitive.disabled = operator === "range" || operator === "present";
      ifMissing.disabled = operator === "present";
    };
    const locPrefix = () => `conditions.${[...condBody.children].indexOf(row)}`;
    const valueError = h("div.field-error.row-error");
    const valueWrap = h("div.fieldbox.inline", valueBox);
    valueWrap.errorSlot = valueError;
    op.addEventListener("change", () => { drawValue(op.value, {}); changed(); });

    row.collect = () => {
      const out = { attribute: attr.value };
      const operator = op.value;
      if (operator === "range") {
        const range = {};
        if (inputs.min.value !== "") range.min = Number(inputs.min.value);
        if (inputs.max.value !== "") range.max = Number(inputs.max.value);
        out.range = range;
      } else if (operator === "present") {
        out.present = inputs.present.value === "true";
      } else if (operator === "in") {
        out.in = inputs.text.value.split(",").map((s) => s.trim()).filter(Boolean);
      } else {
        out[operator] = inputs.text.value;
      }
      if (caseSensitive.checked && !caseSensitive.disabled) out.case_sensitive = true;
      if (ifMissing.value === "match" && !ifMissing.disabled) out.if_missing = "match";
      return out;
    };
    row.relabel = () => {
      const prefix = locPrefix();
      attrBox.dataset.loc = `${prefix}.attribute`;
      row.dataset.loc = prefix;
      valueWrap.dataset.loc = `${prefix}.${op.value}`;
      attrError.dataset.test = `error-${prefix}.attribute`;
      valueError.dataset.test = `error-${prefix}.value`;
      rowError.dataset.test = `error-${prefix}`;
    };
    const attrError = h("div.field-error.row-error");
    const attrBox = h("div.fieldbox.inline", attr);
    attrBox.errorSlot = attrError;
    const rowError = h("div.field-error.row-error");
    row.classList.add("fieldbox");
    append(row, [
      attrBox,
      h("div.op", op),
      valueWrap,
      h("label.check.small", { title: "compare letter case exactly (off: CT = ct)" }, caseSensitive, " match case"),
      h("div.op", ifMissing),
      h("button.icon.remove", { type: "button", title: "remove this condition", test: "cond-remove", onclick: () => { row.remove(); relabelRows(); changed(); } }, "✕"),
      attrError,
      valueError,
      rowError,
    ]);
    drawValue(operatorOf(c), c);
    return row;
  }
  const append = (el, kids) => kids.forEach((k) => el.append(k));
  const relabelRows = () => [...condBody.children].forEach((r) => r.relabel());
  for (const c of current.conditions || []) condBody.append(conditionRow(c));
  relabelRows();

  const modelOptions = [["", "— choose a model —"], ...cat.models];
  if (current.action.model && !cat.models.includes(current.action.model)) modelOptions.push([current.action.model, `${current.action.model} (unknown)`]);
  const modelSel = select(modelOptions, current.action.model, { id: "rule-model", test: "rule-model" });
  const destNames = [...new Set([...cat.destinations, ...(current.action.destinations || [])])];
  const destBox = h("div.checklist", { id: "rule-destinations", test: "rule-destinations" },
    destNames.length ? destNames.map((d) => h("label.check", h("input", { type: "checkbox", value: d, checked: (current.action.destinations || []).includes(d), test: `dest-${d}` }), " ", d, cat.destinations.includes(d) ? null : h("span.muted", " (unknown)")))
      : h("span.muted", "No destinations are configured."));
  const priorityInput = h("input.num", { id: "rule-priority", type: "number", step: "1", value: current.action.priority ?? 0, test: "rule-priority" });
  const quietInput = h("input.num", { id: "rule-quiet", type: "number", step: "any", min: "0", value: current.action.quiet_period_s ?? "", placeholder: "node default", test: "rule-quiet" });
  const commentInput = h("input.wide", { id: "rule-comment", placeholder: "why this change (kept in the history)", test: "rule-comment" });
  const formErrors = h("ul.field-errors", { test: "form-errors", role: "alert" });
  const validity = h("span.validity", { test: "validation-state" });

  function collect() {
    const action = {
      model: modelSel.value,
      destinations: [...destBox.querySelectorAll("input:checked")].map((i) => i.value),
      priority: priorityInput.value === "" ? 0 : Number(priorityInput.value),
    };
    if (quietInput.value !== "") action.quiet_period_s = Number(quietInput.value);
    return {
      id: idInput.value.trim(),
      version: current.version || 1,
      description: descInput.value,
      enabled: enabledInput.checked,
      conditions: [...condBody.children].map((r) => r.collect()),
      action,
    };
  }

  /** Put each error next to the field its loc names (longest matching data-loc), the rest in a list. */
  function showErrors(errors) {
    for (const el of form.querySelectorAll(".field-error")) el.textContent = "";
    for (const el of form.querySelectorAll(".has-error")) el.classList.remove("has-error");
    replace(formErrors);
    const boxes = [...form.querySelectorAll("[data-loc]")];
    for (const err of errors || []) {
      const key = ruleLoc(err.loc);
      let best = null;
      for (const box of boxes) {
        const loc = box.dataset.loc;
        if ((key === loc || key.startsWith(loc + ".")) && (!best || loc.length > best.dataset.loc.length)) best = box;
      }
      const slot = best && (best.errorSlot || [...best.children].find((c) => c.classList.contains("field-error")));
      if (slot) {
        slot.textContent = slot.textContent ? `${slot.textContent}; ${err.msg}` : err.msg;
        best.classList.add("has-error");
      } else {
        formErrors.append(h("li", key ? `${key}: ${err.msg}` : err.msg));
      }
    }
    const n = (errors || []).length;
    validity.textContent = n ? `${n} problem${n > 1 ? "s" : ""}` : "✓ valid";
    validity.className = `validity ${n ? "bad" : "good"}`;
    validity.dataset.state = n ? "invalid" : "valid";
  }

  const validate = async () => {
    try {
      const res = await post("/api/rules/validate", { rule: collect() });
      showErrors(res.errors || []);
      return res.ok;
    } catch (exc) {
      if (exc instanceof ApiError && exc.status === 422) showErrors(exc.fieldErrors);
      return false;
    }
  };
  const changed = debounce(validate, 350);

  const saveBtn = writeButton(isNew ? "Create rule" : deleted ? "Re-create rule" : "Save new version", "admin", async () => {
    const rule = collect();
    try {
      const res = isNew || deleted
        ? await post("/api/rules", { rule, comment: commentInput.value })
        : await put(`/api/rules/${encodeURIComponent(ruleId)}`, { rule, comment: commentInput.value, expected_version: current.version });
      forgetCatalogs();
      const saved = res.rule_id || rule.id;
      notify(`Saved ${saved} v${res.version ?? ""}.`, "ok");
      if (isNew) location.hash = `#/rules/${encodeURIComponent(saved)}`;
      else await reload();
    } catch (exc) {
      if (exc instanceof ApiError && exc.status === 422) {
        showErrors(exc.fieldErrors.length ? exc.fieldErrors : [{ loc: [], msg: exc.message }]);
        notify("Not saved: fix the fields marked in red.", "error");
      } else if (exc instanceof ApiError && exc.status === 409) {
        notify(`Not saved: ${exc.message}. Reload to see the current version.`, "error");
      } else throw exc;
    }
  }, { class: "primary", test: "rule-save" });

  const form = h(
    "form.rule-form",
    { test: "rule-form", onsubmit: (ev) => ev.preventDefault(), oninput: () => changed(), onchange: () => changed() },
    h("section.panel",
      h("h2", "Rule"),
      h("div.form-grid",
        fieldBox("id", "Rule id", idInput, isNew ? "lower case letters, digits, . _ -" : "the id cannot change"),
        fieldBox("description", "Description", descInput),
        h("div.fieldbox", { dataset: { loc: "enabled" } }, h("label.check", enabledInput, " Enabled (routes series now)"), h("div.field-error", { test: "error-enabled" })))),
    h("section.panel",
      h("h2", "Conditions ", h("span.muted.small", "— all must hold")),
      condErrorsBox,
      condBody,
      h("button", { type: "button", test: "add-condition", onclick: () => { const r = conditionRow({ attribute: "Modality", equals: "" }); condBody.append(r); relabelRows(); changed(); } }, "+ Add condition")),
    h("section.panel",
      h("h2", "Action"),
      h("div.form-grid",
        fieldBox("action.model", "Model", modelSel),
        h("div.fieldbox", { dataset: { loc: "action.destinations" } }, h("label", "Destinations"), destBox, h("div.field-error", { test: "error-action.destinations" })),
        fieldBox("action.priority", "Priority", priorityInput, "higher runs first"),
        fieldBox("action.quiet_period_s", "Quiet period (s)", quietInput, "wait this long after the last instance"))),
    h("section.panel.save-bar",
      h("div.fieldbox.grow", { dataset: { loc: "comment" } }, h("label", { for: "rule-comment" }, "Comment"), commentInput, h("div.field-error")),
      h("div.save-actions", validity, saveBtn, h("a.button", { href: "#/rules" }, "Cancel")),
      formErrors),
  );

  // -- dry-run and replay (of the unsaved draft) ---------------------------------------------------
  const recent = await get("/api/series", { limit: 20 }).catch(() => ({ items: [] }));
  const recentItems = recent.items || recent || [];
  const dryInput = h("textarea.code", { rows: 3, test: "dryrun-input", spellcheck: "false", placeholder: 'Series Instance UID, or attributes as JSON: {"Modality": "CT", "NumberOfInstances": 60}' });
  const recentSel = select([["", "— pick a recent series —"], ...recentItems.map((s) => [s.series_instance_uid, `${s.modality || "?"} · ${s.series_description || "(no description)"} · ${s.instance_count} inst · …${s.series_instance_uid.slice(-10)}`])], "", {
    test: "dryrun-recent", onchange: (ev) => { if (ev.target.value) dryInput.value = ev.target.value; },
  });
  const dryOut = h("div.dry-output", { test: "dryrun-result" });
  const replayLimit = h("input.num", { type: "number", min: "1", max: "500", value: "50", test: "replay-limit" });
  const replayOut = h("div.replay-output", { test: "replay-result" });

  const tryDraft = async (fn) => {
    try {
      await fn();
    } catch (exc) {
      if (exc instanceof ApiError && exc.status === 422) {
        showErrors(exc.fieldErrors);
        notify("The draft has errors: fix the fields marked in red first.", "error");
      } else if (!(exc instanceof ApiError) || ![401, 403].includes(exc.status)) notify(exc.message, "error");
    }
  };
  const dryRun = () => tryDraft(async () => {
    const text = dryInput.value.trim();
    if (!text) return notify("Give a Series Instance UID or attributes as JSON.", "info");
    const body = { rule: collect() };
    if (text.startsWith("{")) {
      try {
        body.attributes = JSON.parse(text);
      } catch (exc) {
        return notify(`The attributes are not valid JSON: ${exc.message}`, "error");
      }
    } else body.series_instance_uid = text;
    const res = await post("/api/rules/dry-run", body);
    replace(dryOut, res.map((m) => h(`div.match.${m.matched ? "yes" : "no"}`, { test: "dryrun-match", dataset: { matched: String(m.matched) } },
      h("div.match-head", h("strong", m.matched ? "MATCH" : "no match"), ` ${m.rule_id || "(draft)"}${m.rule_version ? " v" + m.rule_version : ""} → ${m.model} → ${(m.destinations || []).join(", ")}`),
      table(["", "Condition", "Value in the series"], (m.conditions || []).map((c) => h("tr", { class: c.matched ? "ok" : "fail" },
        h("td.mark", c.matched ? "✓" : "✕"), h("td.wrap", c.condition), h("td.wrap", h("code", c.value === null || c.value === undefined ? "(missing)" : JSON.stringify(c.value)))))))));
  });
  const replay = () => tryDraft(async () => {
    const res = await post("/api/rules/replay", { rule: collect(), limit: Number(replayLimit.value) || 50 });
    replace(replayOut,
      h("p.replay-summary", { test: "replay-summary" }, h("strong", `Would match ${res.matched} of the last ${res.series_checked} series.`)),
      // Five columns at most: the table sits in the narrow right-hand column of the editor.
      table(["", "Series", "Received", "Also matched by"],
        res.items.length ? res.items.map((it) => h("tr", { class: it.matched ? "ok" : "fail", test: "replay-row", dataset: { matched: String(it.matched) } },
          h("td.mark", it.matched ? "✓" : "✕"),
          h("td.wrap", h("div", [it.modality, it.instance_count != null ? `${it.instance_count} images` : null].filter(Boolean).join(" · "), " ", shortUid(it.series_instance_uid, 14)),
            it.series_description ? h("div.muted.small", it.series_description) : null),
          h("td.time", when(it.last_received_at)), h("td.wrap", (it.other_rules || []).join(", ") || h("span.muted", "none"))))
          : empty("No series received yet.", 4)));
  });

  const tryPanel = h("section.panel.try", { test: "try-panel" },
    h("h2", "Try the draft before saving"),
    h("div.two-col",
      h("div", h("h3", "Dry-run"), h("p.muted.small", "Does the draft match one series? Shows each condition with the value it saw."),
        recentSel, dryInput, h("button", { type: "button", test: "dryrun-run", onclick: dryRun }, "Dry-run"), dryOut),
      h("div", h("h3", "Replay"), h("p.muted.small", "Which of the last N received series would the draft match, and which saved rules match them too?"),
        h("label.field", h("span.label", "Last N series"), replayLimit), h("button", { type: "button", test: "replay-run", onclick: replay }, "Replay"), replayOut)));

  // -- history, diff, rollback ----------------------------------------------------------------------
  let historyPanel = null;
  if (!isNew) {
    const picked = [];
    const diffOut = h("div.diff-wrap", { test: "diff-panel" });
    const showDiff = async () => {
      if (picked.length !== 2) return notify("Pick two versions to compare.", "info");
      const [a, b] = [...picked].sort((x, y) => x - y);
      const res = await get(`/api/rules/${encodeURIComponent(ruleId)}/diff`, { from: a, to: b });
      const lines = (res.diff || "").split("\n");
      replace(diffOut,
        h("h3", `v${a} → v${b}`),
        (res.diff || "").trim()
          ? h("pre.diff", { test: "diff" }, lines.map((line) => {
              const cls = line.startsWith("+++") || line.startsWith("---") ? "file" : line.startsWith("@@") ? "hunk" : line.startsWith("+") ? "add" : line.startsWith("-") ? "del" : "ctx";
              return h(`span.line.${cls}`, line + "\n");
            }))
          : h("p.muted", { test: "diff" }, "The two versions have the same content."));
    };
    const rows = history.map((v) => {
      const cb = h("input", { type: "checkbox", test: `pick-version-${v.version}`, "aria-label": `compare version ${v.version}`, onchange: (ev) => {
        if (ev.target.checked) {
          picked.push(v.version);
          if (picked.length > 2) {
            const dropped = picked.shift();
            const other = historyPanel.querySelector(`[data-test=pick-version-${dropped}]`);
            if (other) other.checked = false;
          }
          if (picked.length === 2) showDiff();
        } else picked.splice(picked.indexOf(v.version), 1);
      } });
      const isCurrent = v.version === current.version && !v.deleted;
      return h("tr", { test: `version-row-${v.version}` },
        h("td.check", cb),
        h("td.num", `v${v.version}`, isCurrent ? h("span.badge.current", " current") : null),
        h("td", v.change || (v.deleted ? "delete" : "")),
        h("td", v.created_by || ""),
        h("td.time", when(v.created_at)),
        h("td.wrap", v.comment || ""),
        h("td", isCurrent || v.deleted ? null : writeButton("Roll back to this version", "admin", async () => {
          const comment = prompt(`Roll ${ruleId} back to the content of v${v.version}? This saves a new version.\nComment:`, `roll back to v${v.version}`);
          if (comment === null) return;
          const res = await post(`/api/rules/${encodeURIComponent(ruleId)}/rollback`, { version: v.version, comment });
          forgetCatalogs();
          notify(`Rolled back: ${ruleId} is now v${res.version} (content of v${v.version}).`, "ok");
          await reload();
        }, { test: `rollback-${v.version}`, class: "small" })));
    });
    historyPanel = h("section.panel", { test: "history" },
      h("h2", "History"),
      h("p.muted.small", "Tick any two versions to see what changed between them."),
      table(["Compare", "Version", "Change", "By", "When", "Comment", ""], rows.length ? rows : empty("No history.", 7), { test: "history-table" }),
      h("button", { type: "button", test: "show-diff", onclick: showDiff }, "Show diff"),
      diffOut);
  }

  replace(
    main,
    pageHeader(isNew ? "New rule" : `Rule ${ruleId}`, !isNew ? h("span.muted", { test: "rule-version" }, `v${current.version}`) : null, h("a.button", { href: "#/rules" }, "← All rules")),
    deleted ? h("p.notice.notice-error.inline", { test: "deleted-note" }, "This rule is deleted: it routes nothing. Saving re-creates it with the content below.") : null,
    !admin ? h("p.notice.notice-info.inline", { test: "read-only-note" }, "Read only: changing rules needs role admin. You can still dry-run and replay drafts.") : null,
    h("div.editor-layout", form, h("div.side", tryPanel)),
    historyPanel,
  );
  if (!isNew) validate();
}
