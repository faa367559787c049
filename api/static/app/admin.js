// An admin's views: users and roles, API keys and media tokens (each secret shown once), billing
// (plan, status, usage; subscribe or change plan), the audit log with its filters, and the CSV
// import of accounts with its per-row errors.

import { api, explain, query, newKey } from "./api.js";
import { h, field, select, message, table, when, announce } from "./dom.js";

const ROLES = [["agent", "Agent"], ["viewer", "Viewer"], ["admin", "Admin"], ["owner", "Owner"]];

function roleOptions(me) {
  return me.role === "owner" ? ROLES : ROLES.filter(([r]) => r !== "owner");
}

// A form whose submit runs `action`; the status area says what happened.
function actionForm(label, controls, buttonText, action) {
  const button = h("button", { type: "submit", text: buttonText });
  const status = h("div", { role: "status" });
  const form = h("form", { class: "grid", "aria-label": label }, controls, h("div", {}, button));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    button.disabled = true;
    status.replaceChildren();
    try {
      await action(status);
    } catch (err) {
      status.replaceChildren(message(explain(err), "error"));
    } finally {
      button.disabled = false;
    }
  });
  return [form, status];
}

function secretBox(label, value) {
  const out = h("output", { class: "secret", "aria-label": label, text: value });
  return h("div", { class: "message ok", role: "status" },
    h("p", { text: `${label}: copy it now, it is not shown again.` }), out);
}

// ---- users --------------------------------------------------------------------------------------

export async function users(ctx) {
  ctx.title("Users");
  const list = h("div", { id: "users" });
  async function load() {
    const page = await api("GET", "/api/users?limit=200");
    if (!ctx.current()) return;
    const writable = ctx.can("users.write");
    list.replaceChildren(table("Users of the organisation", [
      ["Name", (u) => u.display_name || "—"],
      ["E-mail", (u) => u.email],
      ["Role", (u) => (writable && (ctx.me.role === "owner" || u.role !== "owner") && ctx.me.user && u.id !== ctx.me.user.id
        ? roleSelect(u) : u.role)],
      ["Active", (u) => (u.active ? "yes" : "no")],
      ["Last sign-in", (u) => when(u.last_login_at)],
    ], page.items));
  }
  function roleSelect(u) {
    const s = select("role", roleOptions(ctx.me), u.role);
    s.setAttribute("aria-label", `Role of ${u.email}`);
    s.addEventListener("change", async () => {
      try {
        await api("PATCH", `/api/users/${u.id}`, { role: s.value });
        announce(`${u.email} is now ${s.value}.`);
      } catch (err) {
        s.value = u.role;
        list.prepend(message(`The role was not changed: ${explain(err)}`, "error"));
      }
    });
    return s;
  }
  if (ctx.can("users.write")) {
    const email = h("input", { type: "email", name: "email", required: true, autocomplete: "off" });
    const name = h("input", { type: "text", name: "display_name", maxlength: 100 });
    const role = select("role", roleOptions(ctx.me), "agent");
    const [form, status] = actionForm("Add a user", [field("E-mail address", email), field("Name", name),
      field("Role", role)], "Add user", async (out) => {
      const made = await api("POST", "/api/users", { email: email.value.trim(), display_name: name.value.trim(),
        role: role.value }, { idempotencyKey: newKey() });
      out.replaceChildren(made.password ? secretBox(`Password for ${made.user.email}`, made.password)
        : message(`${made.user.email} was added.`, "ok"));
      email.value = "";
      name.value = "";
      await load();
    });
    ctx.root.append(h("h2", { text: "Add a user" }), form, status);
  }
  ctx.root.append(h("h2", { text: "All users" }), list);
  await load();
  return null;
}

// ---- keys and tokens ----------------------------------------------------------------------------

export async function keys(ctx) {
  ctx.title("Keys and tokens");
  const keyList = h("div", { id: "api-keys" });
  const tokenList = h("div", { id: "media-tokens" });
  const writable = ctx.can("api_keys.write");

  function revokeButton(kind, item, reload) {
    if (!writable || item.revoked_at) return item.revoked_at ? `revoked ${when(item.revoked_at)}` : "—";
    const b = h("button", { type: "button", class: "secondary", text: "Revoke", "aria-label": `Revoke ${item.name}` });
    b.addEventListener("click", async () => {
      if (!window.confirm(`Revoke “${item.name}”? Whatever uses it stops working.`)) return;
      b.disabled = true;
      try {
        await api("DELETE", `/api/${kind}/${item.id}`);
        announce(`${item.name} was revoked.`);
        await reload();
      } catch (err) {
        b.disabled = false;
        b.after(message(explain(err), "error"));
      }
    });
    return b;
  }
  async function loadKeys() {
    const page = await api("GET", "/api/api-keys?limit=200");
    if (!ctx.current()) return;
    keyList.replaceChildren(table("API keys", [
      ["Name", (k) => k.name], ["Starts with", (k) => k.prefix], ["Role", (k) => k.role],
      ["Created", (k) => when(k.created_at)], ["Last used", (k) => when(k.last_used_at)],
      ["", (k) => revokeButton("api-keys", k, loadKeys)]], page.items));
  }
  async function loadTokens() {
    const page = await api("GET", "/api/media-tokens?limit=200");
    if (!ctx.current()) return;
    tokenList.replaceChildren(table("Media stream tokens (Telnyx's stream_auth_token)", [
      ["Name", (t) => t.name], ["Starts with", (t) => t.prefix], ["Created", (t) => when(t.created_at)],
      ["Last used", (t) => when(t.last_used_at)], ["", (t) => revokeButton("media-tokens", t, loadTokens)]], page.items));
  }
  ctx.root.append(h("h2", { text: "API keys" }));
  if (writable) {
    const name = h("input", { type: "text", name: "name", required: true, maxlength: 100 });
    const role = select("role", roleOptions(ctx.me).filter(([r]) => r !== "owner"), "viewer");
    const [form, status] = actionForm("New API key", [field("Key name", name), field("Key role", role)], "Create key",
      async (out) => {
        const made = await api("POST", "/api/api-keys", { name: name.value.trim(), role: role.value },
          { idempotencyKey: newKey() });
        out.replaceChildren(secretBox(`API key “${made.api_key.name}”`, made.key));
        name.value = "";
        await loadKeys();
      });
    ctx.root.append(form, status);
  }
  ctx.root.append(keyList, h("h2", { text: "Media stream tokens" }));
  if (ctx.can("media_tokens.write")) {
    const name = h("input", { type: "text", name: "name", required: true, maxlength: 100 });
    const [form, status] = actionForm("New media stream token", [field("Token name", name)], "Create token",
      async (out) => {
        const made = await api("POST", "/api/media-tokens", { name: name.value.trim() }, { idempotencyKey: newKey() });
        out.replaceChildren(secretBox(`Media token “${made.media_token.name}”`, made.token));
        name.value = "";
        await loadTokens();
      });
    ctx.root.append(form, status);
  }
  ctx.root.append(tokenList);
  await Promise.all([loadKeys(), loadTokens()]);
  return null;
}

// ---- billing ------------------------------------------------------------------------------------

export async function billing(ctx) {
  ctx.title("Billing");
  const box = h("div", { id: "billing" });
  ctx.root.append(box);
  async function load() {
    const b = await api("GET", "/api/billing");
    if (!ctx.current()) return;
    const used = b.usage.minutes;
    box.replaceChildren(h("dl", { class: "facts" },
      h("dt", { text: "Plan" }), h("dd", { id: "plan", text: b.plan }),
      h("dt", { text: "Subscription" }), h("dd", { id: "subscription-status", text: b.status || "none (free plan)" }),
      h("dt", { text: "In good standing" }), h("dd", { text: b.in_good_standing ? "yes" : "no: new calls are refused until it is paid" }),
      h("dt", { text: `Minutes since ${b.usage.period_start}` }),
      h("dd", { id: "usage", text: `${used} of ${b.usage.included_minutes} included` })));
    if (!b.in_good_standing) box.append(message("The subscription is past due: calls cannot be placed.", "error"));
    if (ctx.can("billing.write") && b.plans.length) {
      const plan = select("plan", b.plans.map((p) => [p.name,
        `${p.name}: ${p.included_minutes} minutes included${p.metered ? ", more billed per minute" : ""}`]),
      b.plans.some((p) => p.name === b.plan) ? b.plan : b.plans[0].name);
      const verb = b.status && !["canceled", "incomplete_expired"].includes(b.status) ? "Change plan" : "Subscribe";
      const [form, status] = actionForm(verb, [field("Plan", plan)], verb, async (out) => {
        await api("POST", "/api/billing/subscribe", { plan: plan.value }, { idempotencyKey: newKey() });
        await load();
        box.append(message(`Now on the ${plan.value} plan.`, "ok"));
      });
      box.append(h("h2", { text: verb }), form, status);
    } else if (!b.plans.length) {
      box.append(h("p", { class: "hint", text: "No plans are configured on this server." }));
    }
  }
  await load();
  return null;
}

// ---- audit log ----------------------------------------------------------------------------------

function isoOrEmpty(local) {
  if (!local) return "";
  const d = new Date(local);
  return Number.isNaN(d.getTime()) ? null : d.toISOString();
}

export async function audit(ctx) {
  ctx.title("Audit log");
  const p = ctx.params;
  const action = h("input", { type: "text", name: "action", value: p.get("action") || "", maxlength: 200 });
  const type = h("input", { type: "text", name: "resource_type", value: p.get("resource_type") || "", maxlength: 200 });
  const resource = h("input", { type: "text", name: "resource_id", value: p.get("resource_id") || "", maxlength: 200 });
  const since = h("input", { type: "datetime-local", name: "since" });
  const until = h("input", { type: "datetime-local", name: "until" });
  const problem = h("div");
  const form = h("form", { class: "grid", role: "search", "aria-label": "Filter the audit log" },
    field("Action", action, "For example call.placed"), field("Resource type", type), field("Resource id", resource),
    field("From", since), field("Until", until), h("div", {}, h("button", { type: "submit", text: "Show entries" })));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const from = isoOrEmpty(since.value);
    const to = isoOrEmpty(until.value);
    if (from === null || to === null) {
      problem.replaceChildren(message("Dates must be valid.", "error"));
      return;
    }
    ctx.go(`/admin/audit${query({ action: action.value.trim(), resource_type: type.value.trim(),
      resource_id: resource.value.trim(), since: from, until: to })}`);
  });
  const rows = h("div", { id: "audit-entries" });
  const more = h("button", { type: "button", class: "secondary", text: "Show older entries", hidden: true });
  ctx.root.append(form, problem, rows, more);
  const filters = Object.fromEntries(["action", "resource_type", "resource_id", "since", "until"]
    .map((k) => [k, p.get(k)]));
  let cursor = null;
  const items = [];
  async function load() {
    const page = await api("GET", `/api/audit${query({ ...filters, limit: 100, cursor })}`);
    if (!ctx.current()) return;
    items.push(...page.items);
    cursor = page.next_cursor;
    more.hidden = !cursor;
    rows.replaceChildren(items.length ? table(`${items.length} entries, newest first`, [
      ["When", (e) => when(e.created_at)], ["Action", (e) => e.action],
      ["By", (e) => `${e.actor_type}${e.actor_id ? ` ${e.actor_id.slice(0, 8)}` : ""}`],
      ["Resource", (e) => `${e.resource_type}${e.resource_id ? ` ${e.resource_id}` : ""}`],
      ["Change", (e) => (e.new_value ? JSON.stringify(e.new_value).slice(0, 160) : "—")],
    ], items) : h("p", { text: "No entries match these filters." }));
  }
  more.addEventListener("click", () => load().catch((err) => rows.append(message(explain(err), "error"))));
  await load();
  return null;
}

// ---- import -------------------------------------------------------------------------------------

export async function importer(ctx) {
  ctx.title("Import accounts");
  const file = h("input", { type: "file", name: "file", accept: ".csv,text/csv", required: true });
  const result = h("div", { id: "import-result" });
  const [form] = actionForm("Upload a CSV file", [field("CSV file", file,
    "Columns: external_ref, debtor_name, phones (; between numbers), balance, currency, status, consent, do_not_call. "
    + "At most 50 MiB. Importing the same file again changes nothing.")], "Import", async () => {
    const chosen = file.files[0];
    if (!chosen) throw new Error("Choose a CSV file first.");
    result.replaceChildren(message(`Importing ${chosen.name}…`));
    const job = await api("POST", "/api/accounts/import", chosen, { contentType: "text/csv" });
    showJob(job);
    await loadJobs();
  });
  function showJob(job) {
    const parts = [message(`Import ${job.status}: ${job.rows_ok} of ${job.rows_total} rows imported `
      + `(${job.rows_inserted} new, ${job.rows_updated} updated), ${job.rows_failed} refused.`,
    job.rows_failed || job.status !== "done" ? "error" : "ok")];
    if (job.failure) parts.push(message(job.failure, "error"));
    if (job.errors.length) {
      parts.push(table(`Refused rows${job.errors_truncated ? " (the first ones)" : ""}`, [
        ["Line", (e) => String(e.line), { num: true }], ["Reason", (e) => e.reason || ""],
      ], job.errors));
    }
    result.replaceChildren(...parts);
    result.querySelector("p").focus?.();
  }
  const jobs = h("div", { id: "import-jobs" });
  async function loadJobs() {
    const page = await api("GET", "/api/imports?limit=20");
    if (!ctx.current()) return;
    jobs.replaceChildren(page.items.length ? table("Recent imports", [
      ["Started", (j) => when(j.created_at)], ["Status", (j) => j.status],
      ["Rows", (j) => `${j.rows_ok} of ${j.rows_total}`, { num: true }], ["Refused", (j) => String(j.rows_failed), { num: true }],
    ], page.items) : h("p", { text: "No imports yet." }));
  }
  ctx.root.append(form, result, h("h2", { text: "Recent imports" }), jobs);
  await loadJobs();
  return null;
}
