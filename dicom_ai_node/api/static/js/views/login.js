// Sign-in view. When no user exists yet the page says how to create the first admin on the server: the
// page itself never creates accounts without one.

import { ApiError, api, get } from "../api.js";
import { h, replace } from "../dom.js";

export async function renderLogin(root, nodeInfo, onSignedIn) {
  const error = h("p.form-error", { test: "login-error", role: "alert", hidden: true });
  const username = h("input", { id: "login-username", name: "username", autocomplete: "username", required: true, test: "login-username" });
  const password = h("input", { id: "login-password", name: "password", type: "password", autocomplete: "current-password", required: true, test: "login-password" });
  const submit = h("button.primary", { type: "submit", test: "login-submit" }, "Sign in");
  const hint = h("div.setup-hint", { test: "no-users-hint", hidden: true });

  const form = h(
    "form.login-card",
    {
      test: "login-form",
      onsubmit: async (ev) => {
        ev.preventDefault();
        error.hidden = true;
        submit.disabled = true;
        try {
          const me = await api("POST", "/api/auth/login", { username: username.value.trim(), password: password.value }, { quiet401: true });
          password.value = "";
          await onSignedIn(me);
        } catch (exc) {
          error.textContent = exc instanceof ApiError && exc.status === 401 ? "Wrong user name or password." : exc.message;
          error.hidden = false;
          password.select();
        } finally {
          submit.disabled = false;
        }
      },
    },
    h("h1", "Sign in"),
    h("p.muted", nodeInfo.ae_title ? `dicom-ai-node ${nodeInfo.ae_title}` : "dicom-ai-node", nodeInfo.version ? ` · v${nodeInfo.version}` : ""),
    hint,
    h("label", { for: "login-username" }, "User name"),
    username,
    h("label", { for: "login-password" }, "Password"),
    password,
    error,
    submit,
  );
  replace(root, h("div.login-screen", { test: "login-view" }, form));
  username.focus();

  try {
    const status = await get("/api/auth/status");
    if (status && status.users_exist === false) {
      replace(
        hint,
        h("strong", "No user exists yet."),
        " On the server run: ",
        h("code", { test: "no-users-command" }, "dicom-ai-node users add NAME --role admin"),
      );
      hint.hidden = false;
    }
    if (status && status.tls === false && location.hostname !== "127.0.0.1" && location.hostname !== "localhost") {
      form.append(h("p.warn-text", "This connection is not encrypted (no TLS): passwords cross the network in clear text."));
    }
  } catch {
    /* the form still works without the status */
  }
}
