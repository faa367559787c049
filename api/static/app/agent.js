// An agent's views: the accounts to work (a campaign's, filtered), an account with its calls and the
// Call form, and the organisation's calls.

import { api, explain, query, newKey } from "./api.js";
import { h, field, select, message, table, money, when, duration } from "./dom.js";

const STATUSES = [["", "Any status"], ["open", "Open"], ["promised", "Promised"], ["paid", "Paid"],
  ["disputed", "Disputed"], ["closed", "Closed"]];
const LANGUAGES = [["es", "Spanish"], ["en", "English"]];
const PAGE = 50;

function units(cents) {
  return cents === null || cents === undefined || cents === "" ? "" : String(Number(cents) / 100);
}

function cents(value) {
  const v = String(value || "").trim();
  if (!v) return "";
  const n = Math.round(Number(v) * 100);
  return Number.isFinite(n) && n >= 0 ? String(n) : null;
}

// ---- accounts -----------------------------------------------------------------------------------

export async function accounts(ctx) {
  ctx.title("Accounts");
  const p = ctx.params;
  const campaigns = await api("GET", "/api/campaigns?limit=200");
  if (!ctx.current()) return null;
  const campaign = select("campaign", [["", "All accounts"],
    ...campaigns.items.map((c) => [c.id, `${c.name} (${c.status}, ${c.contacts} accounts)`])], p.get("campaign") || "");
  const name = h("input", { type: "search", name: "name", value: p.get("name") || "", maxlength: 100 });
  const status = select("status", STATUSES, p.get("status") || "");
  const min = h("input", { type: "number", name: "min", min: 0, step: "0.01", inputmode: "decimal",
    value: units(p.get("balance_min")) });
  const max = h("input", { type: "number", name: "max", min: 0, step: "0.01", inputmode: "decimal",
    value: units(p.get("balance_max")) });
  const problem = h("div");
  const form = h("form", { class: "grid", role: "search", "aria-label": "Filter accounts" },
    field("Campaign", campaign), field("Debtor name", name, "Any part of the name"), field("Status", status),
    field("Balance at least", min), field("Balance at most", max),
    h("div", {}, h("button", { type: "submit", text: "Show accounts" })));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const lo = cents(min.value);
    const hi = cents(max.value);
    if (lo === null || hi === null) {
      problem.replaceChildren(message("Balances are amounts of at least 0, like 120.50.", "error"));
      (lo === null ? min : max).focus();
      return;
    }
    ctx.go(`/accounts${query({ campaign: campaign.value, name: name.value.trim(), status: status.value,
      balance_min: lo, balance_max: hi })}`);
  });
  const results = h("div", { id: "account-results" });
  ctx.root.append(form, problem, results);

  const filters = { campaign_id: p.get("campaign"), name: p.get("name"), status: p.get("status"),
    balance_min: p.get("balance_min"), balance_max: p.get("balance_max"), limit: PAGE };
  let cursor = null;
  let shown = 0;
  const rows = h("tbody");
  const more = h("button", { type: "button", class: "secondary", text: "Show more accounts", hidden: true });
  const count = h("p", { class: "hint", role: "status" });
  const canCall = ctx.can("calls.place");
  const columns = [
    ["Debtor", (a) => h("a", { href: `#/accounts/${a.id}`, text: a.debtor_name })],
    ["Reference", (a) => a.external_ref],
    ["Balance", (a) => money(a.balance_cents, a.currency), { num: true }],
    ["Status", (a) => a.status],
    ["Calling", (a) => (a.do_not_call ? h("span", { class: "badge dnc", text: "Do not call" })
      : canCall ? h("a", { href: `#/accounts/${a.id}?call=1`, text: "Call…", "aria-label": `Call ${a.debtor_name}…` })
        : "—")],
  ];
  const tbl = table("Accounts matching the filters", columns, []);
  tbl.querySelector("tbody").replaceWith(rows);
  results.append(count, tbl, more);

  async function load() {
    more.disabled = true;
    const page = await api("GET", `/api/accounts${query({ ...filters, cursor })}`);
    if (!ctx.current()) return;
    for (const a of page.items) {
      rows.append(h("tr", { dataset: { account: a.id, dnc: String(a.do_not_call) } },
        columns.map(([, cell, opts]) => h("td", { class: opts && opts.num ? "num" : null }, cell(a)))));
    }
    shown += page.items.length;
    cursor = page.next_cursor;
    more.hidden = !cursor;
    more.disabled = false;
    count.textContent = shown ? `${shown} account${shown === 1 ? "" : "s"} shown${cursor ? ", more available" : ""}.`
      : "No account matches these filters.";
  }
  more.addEventListener("click", () => load().catch((err) => results.append(message(explain(err), "error"))));
  await load();
  return null;
}

// ---- one account --------------------------------------------------------------------------------

function lastDigits(phone) {
  return phone ? `ending ${phone.slice(-4)}` : "none";
}

export async function account(ctx) {
  const id = ctx.match[1];
  let a;
  try {
    a = await api("GET", `/api/accounts/${id}`);
  } catch (err) {
    if (err.status === 404) {
      ctx.title("Account not found");
      ctx.root.append(message("There is no such account in your organisation.", "error"),
        h("p", {}, h("a", { href: "#/accounts", text: "Back to the accounts" })));
      return null;
    }
    throw err;
  }
  if (!ctx.current()) return null;
  ctx.title(a.debtor_name);
  ctx.root.append(h("p", {}, h("a", { href: "#/accounts", text: "← All accounts" })),
    h("dl", { class: "facts" },
      h("dt", { text: "Reference" }), h("dd", { text: a.external_ref }),
      h("dt", { text: "Balance" }), h("dd", { id: "balance", text: money(a.balance_cents, a.currency) }),
      h("dt", { text: "Status" }), h("dd", { text: a.status }),
      h("dt", { text: "Phone numbers" }), h("dd", { text: a.phones.map(lastDigits).join(", ") || "none" }),
      h("dt", { text: "Consent recorded" }), h("dd", { text: a.consent ? "yes" : "no" }),
      h("dt", { text: "Do not call" }), h("dd", {},
        a.do_not_call ? h("span", { class: "badge dnc", text: "Do not call" }) : "no")));

  if (ctx.can("calls.place")) {
    ctx.root.append(h("h2", { text: "Call" }));
    if (a.do_not_call) {
      ctx.root.append(message("This account is marked do not call: it cannot be called.", "info"));
    } else if (!a.phones.length) {
      ctx.root.append(message("This account has no phone number.", "info"));
    } else {
      const translate = h("input", { type: "checkbox", name: "translate" });
      const language = select("target_language", LANGUAGES, "es");
      language.disabled = true;
      translate.addEventListener("change", () => { language.disabled = !translate.checked; });
      const button = h("button", { type: "submit", text: `Call ${a.debtor_name}` });
      const status = h("div");
      const form = h("form", { class: "grid", "aria-label": "Place a call" },
        field("Translate this call", translate), field("Debtor's language", language, "Used when translating"),
        h("div", {}, button));
      const key = newKey(); // one call per press, even when the answer is lost and the agent retries
      form.addEventListener("submit", async (ev) => {
        ev.preventDefault();
        button.disabled = true;
        status.replaceChildren(message("Placing the call…"));
        try {
          const body = { account_id: a.id, translate: translate.checked };
          if (translate.checked) body.target_language = language.value;
          const placed = await api("POST", "/api/voice/call", body, { idempotencyKey: key });
          ctx.go(`/calls/${placed.call_id}`); // call ids are [A-Za-z0-9:_.-]: safe in the hash as they are
        } catch (err) {
          status.replaceChildren(message(`The call was not placed: ${explain(err)}`, "error"));
          button.disabled = false;
        }
      });
      ctx.root.append(form, status);
      if (ctx.params.get("call") === "1") button.focus(); // came from "Call…" in the list
    }
  }

  ctx.root.append(h("h2", { text: "Calls" }));
  const calls = await api("GET", `/api/calls${query({ account_id: a.id, limit: 50 })}`);
  if (!ctx.current()) return null;
  ctx.root.append(calls.items.length ? callTable("Calls to this account, newest first", calls.items)
    : h("p", { text: "No calls yet." }));
  ctx.root.append(h("h2", { text: "Payments" }),
    h("p", { class: "hint", text: "Payments by the debtor are not recorded in Switchboard." }));
  return null;
}

function callTable(caption, items) {
  return table(caption, [
    ["Placed", (c) => h("a", { href: `#/calls/${c.call_id}`, text: when(c.created_at) })],
    ["To", (c) => (c.to_number ? `…${c.to_number.slice(-4)}` : "—")],
    ["Status", (c) => c.status],
    ["Duration", (c) => duration(c.started_at, c.ended_at)],
    ["Ended because", (c) => c.end_reason || "—"],
  ], items);
}

// ---- calls --------------------------------------------------------------------------------------

export async function calls(ctx) {
  ctx.title("Calls");
  const page = await api("GET", "/api/calls?limit=100");
  if (!ctx.current()) return null;
  ctx.root.append(page.items.length ? callTable("The organisation's calls, newest first", page.items)
    : h("p", { text: "No calls yet." }));
  return null;
}
