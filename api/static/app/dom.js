// Building the page without innerHTML: every text the server sends becomes a text node, never markup.

export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "text") el.textContent = value;
    else if (key === "on") for (const [name, fn] of Object.entries(value)) el.addEventListener(name, fn);
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key in el && !key.startsWith("aria-") && key !== "list" && key !== "for") el[key] = value;
    else el.setAttribute(key, value === true ? "" : String(value));
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

let fieldIds = 0;

// A labelled control: <div class="field"><label for=id>label</label>control<p hint></div>.
export function field(label, control, hint = null) {
  if (!control.id) control.id = `f${++fieldIds}`;
  const parts = [h("label", { for: control.id, text: label }), control];
  if (hint) {
    const hintEl = h("p", { class: "hint", id: `${control.id}-hint`, text: hint });
    control.setAttribute("aria-describedby", hintEl.id);
    parts.push(hintEl);
  }
  return h("div", { class: control.type === "checkbox" ? "check" : "field" },
    control.type === "checkbox" ? [control, parts[0], parts.slice(2)] : parts);
}

export function select(name, options, value = "") {
  return h("select", { name },
    options.map(([v, label]) => h("option", { value: v, text: label, selected: v === value })));
}

// A message in the page; errors are alerts (announced at once), others polite.
export function message(text, kind = "info") {
  return h("p", { class: `message ${kind}`, role: kind === "error" ? "alert" : "status", text });
}

export function announce(text) {
  const region = document.getElementById("announce");
  region.textContent = "";
  setTimeout(() => { region.textContent = text; }, 50);
}

// A data table: columns are [header, (row) => cell content, {num}].
export function table(caption, columns, rows) {
  return h("table", {},
    h("caption", { text: caption }),
    h("thead", {}, h("tr", {}, columns.map(([title, , opts]) =>
      h("th", { scope: "col", class: opts && opts.num ? "num" : null, text: title })))),
    h("tbody", {}, rows.map((row) => h("tr", {}, columns.map(([, cell, opts]) =>
      h("td", { class: opts && opts.num ? "num" : null }, cell(row)))))));
}

export function money(cents, currency) {
  try {
    return new Intl.NumberFormat(undefined, { style: "currency", currency }).format(cents / 100);
  } catch {
    return `${(cents / 100).toFixed(2)} ${currency}`;
  }
}

export function when(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? iso : d.toLocaleString();
}

export function duration(startIso, endIso) {
  if (!startIso || !endIso) return "—";
  const s = Math.max(0, Math.round((new Date(endIso) - new Date(startIso)) / 1000));
  return `${Math.floor(s / 60)} min ${s % 60} s`;
}

// Transcript text with redaction markers shown as such: "[REDACTED:card]" becomes a marked span
// that says what was removed, in words and not by colour alone.
const MARKER = /\[REDACTED:(ssn|card|dob|email|phone|number)\]/gi;
const KINDS = { ssn: "social security number", card: "card number", dob: "date of birth", email: "e-mail address",
  phone: "phone number", number: "number" };

export function redactedText(text) {
  const out = [];
  let last = 0;
  for (const m of String(text || "").matchAll(MARKER)) {
    out.push(text.slice(last, m.index));
    const kind = m[1].toLowerCase();
    out.push(h("span", { class: "redacted", title: `${KINDS[kind]} removed`, dataset: { redacted: kind } },
      h("span", { "aria-hidden": "true", text: m[0] }), h("span", { class: "sr-only", text: `(${KINDS[kind]} removed)` })));
    last = m.index + m[0].length;
  }
  out.push(String(text || "").slice(last));
  return out;
}
