// /docs: the API reference rendered from /openapi.json, with no external script or stylesheet
// (FastAPI's Swagger UI loads from a CDN and is blank offline). Text goes through textContent.
"use strict";

const $ = (id) => document.getElementById(id);

function element(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = text;
  if (className) node.className = className;
  return node;
}

function resolve(spec, schema) {
  let seen = 0;
  while (schema && schema.$ref && seen++ < 10) {
    schema = schema.$ref.replace(/^#\//, "").split("/").reduce((node, key) => (node || {})[key], spec);
  }
  return schema || {};
}

// "integer, 1-100", "string (file)", "string or null" ...
function describeType(spec, schema) {
  schema = resolve(spec, schema);
  const variants = schema.anyOf || schema.oneOf;
  let text = variants
    ? variants.map((v) => describeType(spec, v)).join(" or ")
    : schema.format === "binary" || schema.contentMediaType ? "file" : schema.type || (schema.title ? schema.title : "object");
  if (schema.type === "array" && schema.items) text = `array of ${describeType(spec, schema.items)}`;
  const low = schema.minimum ?? schema.exclusiveMinimum, high = schema.maximum ?? schema.exclusiveMaximum;
  if (low !== undefined || high !== undefined) text += `, ${low ?? ""}–${high ?? ""}`;
  if (schema.maxLength !== undefined) text += `, at most ${schema.maxLength} characters`;
  return text;
}

function parameterRows(spec, operation) {
  const rows = (operation.parameters || []).map((p) => ({
    name: p.name, where: p.in, required: Boolean(p.required), type: describeType(spec, p.schema),
    description: p.description || (p.schema && p.schema.description) || "",
  }));
  const content = (operation.requestBody && operation.requestBody.content) || {};
  for (const [mime, body] of Object.entries(content)) {
    const schema = resolve(spec, body.schema);
    const required = new Set(schema.required || []);
    for (const [name, field] of Object.entries(schema.properties || {})) {
      const resolved = resolve(spec, field);
      const defaultText = resolved.default === undefined ? "" : ` (default ${JSON.stringify(resolved.default)})`;
      rows.push({
        name, where: mime === "multipart/form-data" ? "form" : mime, required: required.has(name),
        type: describeType(spec, field), description: (resolved.description || "") + defaultText,
      });
    }
  }
  return rows;
}

function table(headings, rows) {
  const node = element("table");
  const head = element("tr");
  for (const heading of headings) head.append(element("th", heading));
  node.append(head);
  for (const row of rows) {
    const line = element("tr");
    for (const cell of row) line.append(element("td", cell));
    node.append(line);
  }
  return node;
}

function endpoint(spec, path, method, operation) {
  const section = element("section", undefined, "endpoint");
  section.id = `${method}-${path}`;
  section.dataset.method = method.toUpperCase();
  section.dataset.path = path;
  const title = element("h3");
  title.append(element("span", method.toUpperCase(), `method ${method}`), element("span", path, "path"));
  if (operation.security && operation.security.length) {
    title.append(element("span", "API key", "auth"));
  }
  section.append(title, element("p", operation.summary || ""));
  if (operation.description) section.append(element("p", operation.description, "muted"));
  const rows = parameterRows(spec, operation);
  if (rows.length) {
    section.append(element("h4", "Parameters"));
    section.append(table(["name", "in", "type", "required", "description"],
      rows.map((r) => [r.name, r.where, r.type, r.required ? "yes" : "no", r.description])));
  }
  const responses = Object.entries(operation.responses || {}).map(([code, response]) => {
    const kinds = Object.keys(response.content || {}).join(", ");
    const schema = Object.values(response.content || {})[0];
    const name = schema && schema.schema && schema.schema.$ref ? schema.schema.$ref.split("/").pop() : "";
    return [code, response.description || "", [kinds, name].filter(Boolean).join(" · ")];
  });
  section.append(element("h4", "Responses"), table(["status", "meaning", "body"], responses));
  return section;
}

function authNote(spec) {
  const schemes = Object.values((spec.components || {}).securitySchemes || {});
  if (!schemes.length) return "";
  const ways = schemes.map((s) => s.description || (s.scheme ? `Authorization: ${s.scheme}` : s.name));
  return `Endpoints marked "API key" need the server's key when it has one, sent as ${ways.join(" or ")}.`;
}

async function main() {
  try {
    const response = await fetch("/openapi.json");
    if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
    const spec = await response.json();
    document.title = `${spec.info.title} ${spec.info.version} API`;
    $("title").textContent = `${spec.info.title} ${spec.info.version} API`;
    $("description").textContent = spec.info.description || "";
    $("auth").textContent = authNote(spec);
    const sections = [];
    for (const [path, operations] of Object.entries(spec.paths || {})) {
      for (const [method, operation] of Object.entries(operations)) {
        sections.push(endpoint(spec, path, method, operation));
      }
    }
    $("endpoints").replaceChildren(...sections);
    $("status").textContent = `${sections.length} endpoints`;
  } catch (error) {
    $("status").textContent = `could not load /openapi.json: ${error.message}`;
    $("status").className = "error";
  }
}

main();
