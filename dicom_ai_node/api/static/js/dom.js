// Small DOM helpers. Everything is built with createElement + textContent: no innerHTML, so no value from
// the server can ever become markup. No style attributes (the CSP forbids them): classes only.

/** h("tag.class1.class2", {attr: value, onclick: fn, dataTest: "x"}, ...children) */
export function h(spec, props, ...children) {
  const [tag, ...classes] = spec.split(".");
  const el = document.createElement(tag || "div");
  if (classes.length) el.className = classes.join(" ");
  if (props && (typeof props !== "object" || props instanceof Node || Array.isArray(props))) {
    children.unshift(props);
    props = null;
  }
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") {
      el.addEventListener(key.slice(2).toLowerCase(), value);
    } else if (key === "class") {
      el.className = [el.className, value].filter(Boolean).join(" ");
    } else if (key === "test") {
      el.dataset.test = value;
    } else if (key === "dataset") {
      Object.assign(el.dataset, value);
    } else if (key === "value" || key === "checked" || key === "selected" || key === "disabled") {
      el[key] = value;
    } else if (key === "style") {
      throw new Error("style attributes are blocked by the CSP; use a class");
    } else {
      el.setAttribute(key, value === true ? "" : String(value));
    }
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function clear(el) {
  while (el.firstChild) el.removeChild(el.firstChild);
  return el;
}

export function replace(el, ...children) {
  clear(el);
  return append(el, children);
}

// -- formatting -------------------------------------------------------------------------------------

const pad = (n) => String(n).padStart(2, "0");

/** "2026-12-03 08:12:52" in the browser's local time; "" for null. */
export function fmtTime(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return String(iso);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${fmtClock(d)}`;
}

export function fmtClock(d = new Date()) {
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

/**
 * A compact time for table cells: "08:12:52" today, "2026-12-02 08:12" on other days (it may wrap
 * between date and time when the table is narrow); the full local time is in the tooltip. "" for null.
 */
export function when(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return String(iso);
  const today = d.toDateString() === new Date().toDateString();
  const text = today
    ? fmtClock(d)
    : `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}`;
  return h("time.when", { datetime: d.toISOString(), title: fmtTime(iso) }, text);
}

/** 0.42 -> "0.42 s", 75 -> "1 min 15 s", 4000 -> "1 h 6 min". */
export function fmtDuration(s) {
  if (s === null || s === undefined || Number.isNaN(Number(s))) return "";
  s = Number(s);
  if (s < 10) return `${s.toFixed(2)} s`;
  if (s < 60) return `${s.toFixed(1)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}

/** Long DICOM UIDs: keep the tail, which is what differs between series; the full UID is in the title. */
export function shortUid(uid, keep = 18) {
  if (!uid) return h("span.muted", "—");
  const text = uid.length > keep + 1 ? "…" + uid.slice(-keep) : uid;
  return h("code.uid", { title: uid }, text);
}

export function statusBadge(status, test) {
  return h(`span.badge.status-${status || "unknown"}`, { test: test || "status", dataset: { status } }, status || "?");
}

export function empty(text, cols) {
  return h("tr.empty", h("td", { colspan: cols }, text));
}

/** A table with a header row; rows is an array of <tr>. */
export function table(headers, rows, props = {}) {
  return h(
    "table.grid",
    props,
    h("thead", h("tr", headers.map((c) => h("th", c)))),
    h("tbody", rows),
  );
}

/** Definition list from [label, value] pairs (values may be nodes). */
export function facts(pairs, test) {
  return h(
    "dl.facts",
    { test },
    pairs.filter(Boolean).map(([label, value]) => [h("dt", label), h("dd", value === "" || value == null ? "—" : value)]),
  );
}

/** <select> with options [[value, label]] or plain strings; the current value is selected. */
export function select(options, current, props = {}) {
  return h(
    "select",
    props,
    options.map((o) => {
      const [value, label] = Array.isArray(o) ? o : [o, o === "" ? "all" : o];
      return h("option", { value, selected: String(value) === String(current ?? "") }, label);
    }),
  );
}

export function debounce(fn, ms) {
  let timer = null;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}

/** Date input value ("2026-12-03") -> ISO string at local midnight (or end of day). */
export function dateToIso(value, endOfDay = false) {
  if (!value) return "";
  const [y, m, d] = value.split("-").map(Number);
  const date = endOfDay ? new Date(y, m - 1, d, 23, 59, 59, 999) : new Date(y, m - 1, d);
  return date.toISOString();
}
