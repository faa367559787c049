// Renders /api/openapi.json as a plain reference page: no framework, no CDN, no inline script (CSP).
"use strict";

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function resolve(doc, schema, depth) {
  // Inline $refs a few levels deep so each operation reads on its own.
  if (depth > 6 || schema === null || typeof schema !== "object") return schema;
  if (Array.isArray(schema)) return schema.map((s) => resolve(doc, s, depth + 1));
  if (schema.$ref) {
    const name = schema.$ref.split("/").pop();
    return resolve(doc, doc.components.schemas[name] || {}, depth + 1);
  }
  const out = {};
  for (const [k, v] of Object.entries(schema)) out[k] = resolve(doc, v, depth + 1);
  return out;
}

function json(doc, schema) {
  return el("pre", {}, JSON.stringify(resolve(doc, schema, 0), null, 2));
}

function operation(doc, path, method, op) {
  const id = op.operationId;
  const sec = el("section", { class: "op", id });
  sec.append(el("h3", {}, el("span", { class: `method ${method}` }, method.toUpperCase()),
    el("code", { class: "path" }, path), " ", op.summary || ""));
  const who = op["x-roles"] ? `roles: ${op["x-roles"].join(", ")} (${op["x-permission"]})` : `access: ${op["x-permission"]}`;
  sec.append(el("div", { class: "roles" }, who));
  if (op.description) sec.append(el("p", {}, op.description));
  if (op.parameters && op.parameters.length) {
    const t = el("table", {}, el("tr", {}, el("th", {}, "parameter"), el("th", {}, "in"), el("th", {}, "required"), el("th", {}, "schema")));
    for (const p of op.parameters) {
      t.append(el("tr", {}, el("td", {}, el("code", {}, p.name)), el("td", {}, p.in), el("td", {}, p.required ? "yes" : ""),
        el("td", {}, el("code", {}, JSON.stringify(resolve(doc, p.schema, 0))))));
    }
    sec.append(t);
  }
  if (op.requestBody) {
    const [type, body] = Object.entries(op.requestBody.content)[0];  // application/json, or the CSV import's text/csv
    sec.append(el("details", {}, el("summary", {}, `request body (${type})`), json(doc, body.schema)));
  }
  const rt = el("table", {}, el("tr", {}, el("th", {}, "status"), el("th", {}, "meaning")));
  for (const [status, r] of Object.entries(op.responses || {})) rt.append(el("tr", {}, el("td", {}, status), el("td", {}, r.description)));
  sec.append(rt);
  const ok = Object.entries(op.responses || {}).find(([s, r]) => s.startsWith("2") && r.content);
  if (ok) sec.append(el("details", {}, el("summary", {}, `response ${ok[0]}`), json(doc, ok[1].content["application/json"].schema)));
  return sec;
}

async function main() {
  const resp = await fetch("/api/openapi.json", { credentials: "same-origin" });
  const doc = await resp.json();
  const intro = document.getElementById("intro");
  intro.textContent = doc.info.description;
  const toc = document.getElementById("toc");
  const ops = document.getElementById("ops");
  for (const [path, methods] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(methods)) {
      toc.append(el("a", { href: `#${op.operationId}` }, `${method.toUpperCase()} ${path}`));
      ops.append(operation(doc, path, method, op));
    }
  }
  document.body.dataset.state = "rendered";
}

main().catch((err) => {
  document.getElementById("intro").textContent = `Could not load the document: ${err}`;
  document.body.dataset.state = "failed";
});
