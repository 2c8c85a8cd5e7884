// dicom-ai-node admin page: boot, header, notices and the hash router. Plain ES modules, no build step.

import { ApiError, allows, api, get, session } from "./js/api.js";
import { h, replace } from "./js/dom.js";
import { renderLogin } from "./js/views/login.js";
import { renderJobs } from "./js/views/jobs.js";
import { renderJob } from "./js/views/job.js";
import { renderSeriesList, renderSeries } from "./js/views/series.js";
import { renderRules } from "./js/views/rules.js";
import { renderRuleEditor } from "./js/views/rule-editor.js";
import { renderDestinations } from "./js/views/destinations.js";
import { renderPacs } from "./js/views/pacs.js";
import { renderModels } from "./js/views/models.js";
import { renderAudit } from "./js/views/audit.js";
import { renderUsers } from "./js/views/users.js";

const NAV = [
  ["jobs", "Jobs"],
  ["series", "Series"],
  ["rules", "Rules"],
  ["destinations", "Destinations"],
  ["pacs", "PACS"],
  ["models", "Models"],
  ["audit", "Audit", "admin"],
  ["users", "Users", "admin"],
];

// [pattern, view]: the first match wins; groups are passed to the view as params.
const ROUTES = [
  [/^\/jobs\/(\d+)$/, (el, m, q) => renderJob(el, Number(m[1]), q)],
  [/^\/jobs$/, (el, m, q) => renderJobs(el, q)],
  [/^\/series\/(.+)$/, (el, m, q) => renderSeries(el, decodeURIComponent(m[1]), q)],
  [/^\/series$/, (el, m, q) => renderSeriesList(el, q)],
  [/^\/rules\/new$/, (el, m, q) => renderRuleEditor(el, null, q)],
  [/^\/rules\/(.+)$/, (el, m, q) => renderRuleEditor(el, decodeURIComponent(m[1]), q)],
  [/^\/rules$/, (el, m, q) => renderRules(el, q)],
  [/^\/destinations$/, (el, m, q) => renderDestinations(el, q)],
  [/^\/pacs$/, (el, m, q) => renderPacs(el, q)],
  [/^\/models$/, (el, m, q) => renderModels(el, q)],
  [/^\/audit$/, (el, m, q) => renderAudit(el, q)],
  [/^\/users$/, (el, m, q) => renderUsers(el, q)],
];

const root = document.getElementById("app");
let nodeInfo = {};
let cleanup = null;
let renderToken = 0;

function parseHash() {
  const raw = location.hash.replace(/^#/, "") || "/jobs";
  const [path, qs] = raw.split("?");
  return { path, query: new URLSearchParams(qs || "") };
}

function header() {
  const { path } = parseHash();
  const section = path.split("/")[1];
  const user = session.user;
  return h(
    "header.topbar",
    { test: "header" },
    h(
      "div.brand",
      h("span.logo", "◆"),
      h("span.name", "dicom-ai-node"),
      h("span.version", { test: "node-version" }, nodeInfo.version ? `v${nodeInfo.version}` : ""),
      nodeInfo.ae_title ? h("span.version.ae", { test: "node-name", title: nodeInfo.dicom_port ? `DICOM port ${nodeInfo.dicom_port}` : "" }, `AE ${nodeInfo.ae_title}`) : null,
    ),
    h(
      "nav.mainnav",
      NAV.filter(([, , needs]) => !needs || allows(needs)).map(([key, label]) =>
        h("a", { href: `#/${key}`, class: key === section ? "active" : "", test: `nav-${key}` }, label),
      ),
    ),
    h(
      "div.who",
      h("span.user", { test: "current-user" }, user.username),
      h(`span.role.role-${user.role}`, { test: "current-role" }, user.role),
      h("button.link", { type: "button", test: "sign-out", onclick: signOut }, "Sign out"),
    ),
  );
}

function noticeArea() {
  return h("div.notices", { id: "notices", test: "notices", "aria-live": "polite" });
}

function showNotice(text, kind) {
  const area = document.getElementById("notices");
  if (!area) return;
  const note = h(
    `div.notice.notice-${kind}`,
    { test: kind === "refused" ? "refusal" : `notice-${kind}`, role: kind === "error" || kind === "refused" ? "alert" : "status" },
    h("span", kind === "refused" ? `Refused: ${text}` : text),
    h("button.close", { type: "button", title: "Dismiss", onclick: () => note.remove() }, "×"),
  );
  area.append(note);
  if (kind === "ok" || kind === "info") setTimeout(() => note.remove(), 6000);
}

async function route() {
  const token = ++renderToken;
  if (cleanup) {
    try {
      cleanup();
    } catch {
      /* a view's cleanup must never block navigation */
    }
    cleanup = null;
  }
  if (!session.user) {
    renderLogin(root, nodeInfo, onSignedIn);
    return;
  }
  const { path, query } = parseHash();
  const main = h("main.content", { id: "view", test: "view" });
  replace(root, header(), noticeArea(), main);
  const hit = ROUTES.find(([re]) => re.test(path));
  if (!hit) {
    replace(main, h("h1", "Not found"), h("p", `No page at #${path}. `, h("a", { href: "#/jobs" }, "Go to the jobs.")));
    return;
  }
  try {
    const result = await hit[1](main, path.match(hit[0]), query);
    if (token === renderToken) cleanup = typeof result === "function" ? result : null;
    else if (typeof result === "function") result();
  } catch (exc) {
    if (exc instanceof ApiError && exc.status === 401) return;
    if (token !== renderToken) return;
    replace(
      main,
      h("div.panel.error-panel", { test: "view-error" }, h("h2", exc instanceof ApiError && exc.status === 403 ? "Not allowed" : "Could not load this page"), h("p", exc.message)),
    );
  }
}

async function onSignedIn(me) {
  if (me.node) nodeInfo = { ...nodeInfo, ...me.node };
  session.user = me.user;
  session.csrf = me.csrf_token;
  session.auth = me.auth || "session";
  const back = sessionStorage.getItem("ainode:return");
  sessionStorage.removeItem("ainode:return");
  if (back && back !== location.hash) location.hash = back;
  else route();
}

async function signOut() {
  try {
    await api("POST", "/api/auth/logout", {}, { quiet401: true });
  } catch {
    /* already signed out on the server: fine */
  }
  session.user = null;
  session.csrf = null;
  location.hash = "#/jobs";
  route();
}

window.addEventListener("ainode:unauthorized", () => {
  if (!session.user) return;
  session.user = null;
  session.csrf = null;
  if (location.hash) sessionStorage.setItem("ainode:return", location.hash);
  route();
});
window.addEventListener("ainode:refused", (ev) => showNotice(ev.detail, "refused"));
window.addEventListener("ainode:notice", (ev) => showNotice(ev.detail.text, ev.detail.kind));
window.addEventListener("hashchange", route);

async function boot() {
  try {
    nodeInfo = await get("/healthz");
  } catch {
    nodeInfo = {};
  }
  try {
    const me = await api("GET", "/api/auth/me", null, { quiet401: true });
    if (me.node) nodeInfo = { ...nodeInfo, ...me.node };
    session.user = me.user;
    session.csrf = me.csrf_token;
    session.auth = me.auth;
  } catch {
    session.user = null;
  }
  if (!location.hash) history.replaceState(null, "", "#/jobs");
  route();
}

boot();
