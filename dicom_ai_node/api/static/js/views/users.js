// #/users (admin): accounts (add, role, disable) and API tokens (create: the secret is shown once; revoke).

import { ApiError, get, notify, patch, post, session, writeButton } from "../api.js";
import { empty, fmtTime, h, replace, select, table } from "../dom.js";
import { field, pageHeader } from "../ui.js";

// sender: STOW-RS senders (store instances, read nothing; give them a token, not a page sign-in).
const ROLES = ["sender", "viewer", "operator", "admin"];

export async function renderUsers(main) {
  const usersBox = h("div");
  const tokensBox = h("div");
  const secretBox = h("div.secret-box", { hidden: true, test: "token-secret-box" });

  const loadUsers = async () => {
    const users = await get("/api/users");
    const rows = users.map((u) => {
      const self = u.username === session.user.username;
      const roleSel = select(ROLES, u.role, { test: `user-role-${u.username}`, disabled: self, title: self ? "you cannot change your own role" : "" });
      roleSel.addEventListener("change", async () => {
        try {
          await patch(`/api/users/${encodeURIComponent(u.username)}`, { role: roleSel.value });
          notify(`${u.username} is now ${roleSel.value}.`, "ok");
        } catch (exc) {
          roleSel.value = u.role;
          if (!(exc instanceof ApiError) || exc.status !== 403) notify(exc.message, "error");
        }
      });
      return h("tr", { test: `user-row-${u.username}`, class: u.disabled ? "disabled-rule" : "" },
        h("td", h("strong", u.username), self ? h("span.muted", " (you)") : null),
        h("td", roleSel),
        h("td", u.disabled ? h("span.bad", "disabled") : "active"),
        h("td.nowrap", fmtTime(u.created_at)),
        h("td.nowrap", fmtTime(u.last_login_at) || "never"),
        h("td", writeButton(u.disabled ? "Enable" : "Disable", "admin", async () => {
          if (!u.disabled && !confirm(`Disable ${u.username}? Their sessions end and their tokens stop working.`)) return;
          await patch(`/api/users/${encodeURIComponent(u.username)}`, { disabled: !u.disabled });
          await loadUsers();
        }, { test: `user-toggle-${u.username}`, disabled: self, class: u.disabled ? "" : "danger" })));
    });
    replace(usersBox, table(["User", "Role", "State", "Created", "Last sign-in", ""], rows.length ? rows : empty("No users.", 6), { test: "users-table" }));
    return users;
  };

  const loadTokens = async () => {
    const tokens = await get("/api/tokens");
    replace(tokensBox, table(["ID", "Name", "User", "Role", "Prefix", "Created", "Expires", "Last used", "State", ""],
      tokens.length ? tokens.map((t) => h("tr", { test: `token-row-${t.id}`, class: t.revoked_at ? "disabled-rule" : "" },
        h("td.num", String(t.id)), h("td", t.name), h("td", t.username), h("td", t.role), h("td", h("code", `${t.token_prefix}…`)),
        h("td.nowrap", fmtTime(t.created_at)), h("td.nowrap", fmtTime(t.expires_at) || "never"), h("td.nowrap", fmtTime(t.last_used_at) || "never"),
        h("td", t.revoked_at ? h("span.bad", `revoked ${fmtTime(t.revoked_at)}`) : "active"),
        h("td", t.revoked_at ? null : writeButton("Revoke", "admin", async () => {
          if (!confirm(`Revoke token ${t.name} (${t.token_prefix}…)? Clients using it get 401 at once.`)) return;
          await post(`/api/tokens/${t.id}/revoke`, {});
          notify(`Token ${t.name} revoked.`, "ok");
          await loadTokens();
        }, { class: "danger", test: `token-revoke-${t.id}` })))) : empty("No API tokens.", 10),
      { test: "tokens-table" }));
  };

  // add user
  const newName = h("input", { test: "new-user-name", autocomplete: "off", placeholder: "user name" });
  const newRole = select(ROLES, "viewer", { test: "new-user-role" });
  const newPass = h("input", { type: "password", test: "new-user-password", autocomplete: "new-password", placeholder: "at least 12 characters" });
  const addUser = writeButton("Add user", "admin", async () => {
    await post("/api/users", { username: newName.value.trim(), role: newRole.value, password: newPass.value });
    notify(`User ${newName.value.trim()} added.`, "ok");
    newName.value = newPass.value = "";
    const users = await loadUsers();
    fillTokenUsers(users);
  }, { class: "primary", test: "add-user" });

  // create token
  const tokUser = select([], "", { test: "new-token-user" });
  const tokName = h("input", { test: "new-token-name", placeholder: "e.g. monitoring", autocomplete: "off" });
  const tokRole = select([["", "the user's role"], ...ROLES], "", { test: "new-token-role" });
  const tokDays = h("input.num", { type: "number", min: "1", placeholder: "never", test: "new-token-days" });
  const fillTokenUsers = (users) => replace(tokUser, users.filter((u) => !u.disabled).map((u) => h("option", { value: u.username, selected: u.username === session.user.username }, u.username)));
  const createToken = writeButton("Create token", "admin", async () => {
    const body = { username: tokUser.value, name: tokName.value.trim() };
    if (tokRole.value) body.role = tokRole.value;
    if (tokDays.value) body.expires_days = Number(tokDays.value);
    const res = await post("/api/tokens", body);
    const secret = h("input.secret", { readonly: true, value: res.secret, test: "token-secret", "aria-label": "token secret", onfocus: (ev) => ev.target.select() });
    replace(secretBox,
      h("strong", `Token “${res.token.name}” created. Copy the secret now: it is shown only once.`),
      h("div.copy-row", secret, h("button", { type: "button", test: "copy-secret", onclick: async (ev) => {
        secret.select();
        try {
          await navigator.clipboard.writeText(res.secret);
        } catch {
          document.execCommand("copy");
        }
        ev.target.textContent = "Copied";
      } }, "Copy"), h("button", { type: "button", onclick: () => { secretBox.hidden = true; replace(secretBox); } }, "Done")),
      h("p.muted.small", "Use it as: Authorization: Bearer <secret>"));
    secretBox.hidden = false;
    tokName.value = "";
    await loadTokens();
  }, { class: "primary", test: "create-token" });

  replace(
    main,
    pageHeader("Users and API tokens"),
    h("section.panel", h("h2", "Users"), usersBox,
      h("div.filters.add-form", { test: "add-user-form" }, field("User name", newName), field("Role", newRole), field("Password", newPass), addUser)),
    h("section.panel", h("h2", "API tokens"), secretBox, tokensBox,
      h("div.filters.add-form", { test: "create-token-form" }, field("For user", tokUser), field("Name", tokName), field("Role", tokRole), field("Expires in days", tokDays), createToken)),
  );
  const users = await loadUsers();
  fillTokenUsers(users);
  await loadTokens();
}
