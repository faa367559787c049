// The workspace's shell: who is signed in, the navigation their permissions allow, and a hash router
// that renders one view at a time into <main>.
//
// Views are functions (ctx) -> optional cleanup.  Leaving a view runs its cleanup (an event stream, a
// WebRTC session) before the next one renders; each view gives the page a title and an <h1> that takes
// the focus, so a screen reader user hears where they are.  When the session ends (a 401 anywhere)
// the current view is torn down and cleared, and the sign-in form says why: nothing of the old session
// stays on the page.  Signing out reloads the page, so nothing stays in memory either.
//
// Test hook: window.workspace = {ready, me, view, errors}.

import { api, explain, onSessionEnded, SessionEnded } from "./api.js";
import { h, field, message, announce } from "./dom.js";
import * as agent from "./agent.js";
import * as callView from "./call.js";
import * as admin from "./admin.js";

const view = document.getElementById("view");
const nav = document.getElementById("nav");
const who = document.getElementById("who");
const whoText = document.getElementById("who-text");
const hook = { ready: false, me: null, view: null, errors: [] };
window.workspace = hook;

const ROUTES = [
  // [pattern, view, permission needed, nav label]
  [/^\/accounts$/, agent.accounts, "accounts.read", "Accounts"],
  [/^\/accounts\/([0-9a-f-]{36})$/, agent.account, "accounts.read"],
  [/^\/calls$/, agent.calls, "calls.read", "Calls"],
  [/^\/calls\/([A-Za-z0-9:_\-.]{1,256})$/, callView.call, "calls.read"],
  [/^\/admin\/users$/, admin.users, "users.read", "Users"],
  [/^\/admin\/keys$/, admin.keys, "api_keys.read", "Keys and tokens"],
  [/^\/admin\/billing$/, admin.billing, "billing.read", "Billing"],
  [/^\/admin\/audit$/, admin.audit, "audit.read", "Audit log"],
  [/^\/admin\/import$/, admin.importer, "accounts.import", "Import accounts"],
];
const NAV_PATHS = { Accounts: "/accounts", Calls: "/calls", Users: "/admin/users", "Keys and tokens": "/admin/keys",
  Billing: "/admin/billing", "Audit log": "/admin/audit", "Import accounts": "/admin/import" };

let me = null;
let cleanup = null;
let rendering = 0;

function can(action) {
  return Boolean(me && me.permissions.includes(action));
}

function go(path) {
  if (location.hash === `#${path}`) route();
  else location.hash = path;
}

function teardown() {
  if (cleanup) {
    try {
      cleanup();
    } catch (err) {
      hook.errors.push(String(err));
    }
  }
  cleanup = null;
}

function setTitle(text) {
  document.title = `${text} · Switchboard`;
}

function renderNav(current) {
  const links = ROUTES.filter((r) => r[3] && can(r[2])).map((r) => {
    const path = NAV_PATHS[r[3]];
    const active = current === path || current.startsWith(`${path}/`);
    return h("li", {}, h("a", { href: `#${path}`, text: r[3], "aria-current": active ? "page" : null }));
  });
  nav.replaceChildren(h("ul", {}, links));
  nav.hidden = false;
}

async function route() {
  const raw = location.hash.slice(1);
  if (raw && !raw.startsWith("/")) return; // an in-page anchor (the skip link)
  const [path, search] = (raw || "/accounts").split("?");
  if (!me) return;
  teardown();
  const token = ++rendering;
  const found = ROUTES.find((r) => r[0].test(path));
  renderNav(path);
  view.replaceChildren();
  if (!found || !can(found[2])) {
    setTitle("Not found");
    view.append(h("h1", { tabindex: "-1", text: found ? "Not allowed" : "Page not found" }),
      message(found ? "Your role does not allow this page." : "There is no such page.", "error"),
      h("p", {}, h("a", { href: "#/accounts", text: "Back to the accounts" })));
    view.querySelector("h1").focus();
    return;
  }
  const ctx = {
    me, can, go, root: view, params: new URLSearchParams(search || ""), match: path.match(found[0]),
    title: (text) => {
      setTitle(text);
      const h1 = h("h1", { tabindex: "-1", text });
      view.prepend(h1);
      h1.focus();
    },
    current: () => token === rendering, // false once the user has moved on
  };
  hook.view = path;
  try {
    cleanup = (await found[1](ctx)) || null;
  } catch (err) {
    if (err instanceof SessionEnded || token !== rendering) return;
    hook.errors.push(explain(err));
    view.append(message(`Could not load this page: ${explain(err)}`, "error"));
  }
}

// ---- signing in and out -------------------------------------------------------------------------

function signedOut(text, kind = "info") {
  teardown();
  me = null;
  hook.me = null;
  nav.hidden = true;
  nav.replaceChildren();
  who.hidden = true;
  whoText.textContent = "";
  setTitle("Sign in");
  const email = h("input", { type: "email", name: "email", autocomplete: "username", required: true });
  const password = h("input", { type: "password", name: "password", autocomplete: "current-password",
    required: true });
  const status = h("div", { id: "signin-status" });
  const button = h("button", { type: "submit", text: "Sign in" });
  const form = h("form", { class: "grid", "aria-labelledby": "signin-title" },
    field("E-mail address", email), field("Password", password), h("div", {}, button));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    status.replaceChildren();
    button.disabled = true;
    try {
      await api("POST", "/api/auth/login", { email: email.value.trim(), password: password.value },
        { anonymous: true });
      password.value = "";
      await start();
    } catch (err) {
      password.value = "";
      password.setAttribute("aria-invalid", "true");
      status.replaceChildren(message(`Sign-in failed: ${explain(err)}`, "error"));
      password.focus();
    } finally {
      button.disabled = false;
    }
  });
  view.replaceChildren(h("h1", { id: "signin-title", tabindex: "-1", text: "Sign in" }),
    text ? message(text, kind) : null, form, status);
  email.focus();
  hook.ready = true;
}

async function start() {
  let data;
  try {
    data = await api("GET", "/api/auth/me", undefined, { anonymous: true });
  } catch (err) {
    if (err.status === 401) {
      signedOut(location.hash === "#/signed-out" ? "You have signed out." : "");
      return;
    }
    signedOut(`Cannot reach the server: ${explain(err)}`, "error");
    return;
  }
  me = data;
  hook.me = { email: data.user ? data.user.email : null, role: data.role, org: data.org.name };
  const name = data.user ? data.user.display_name || data.user.email : "API key";
  whoText.textContent = `${name} (${data.role}) · ${data.org.name}`;
  who.hidden = false;
  announce(`Signed in as ${name}.`);
  if (!location.hash || location.hash === "#/signed-out") location.replace("#/accounts"); // routes on hashchange
  else await route();
  hook.ready = true;
}

document.getElementById("sign-out").addEventListener("click", async () => {
  teardown();
  try {
    await api("POST", "/api/auth/logout", {}, { anonymous: true });
  } catch {
    // the page forgets the session whatever the server said
  }
  me = null; // nothing routes any more: the page reloads clean
  location.replace("/app#/signed-out");
  location.reload();
});

onSessionEnded((text) => {
  if (me) signedOut(text, "error");
});
window.addEventListener("hashchange", () => {
  route();
});
window.addEventListener("pagehide", teardown);
start();
