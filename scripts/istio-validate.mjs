#!/usr/bin/env node
// Validates Istio resources against Istio's CRD schemas, two ways, with what scripts/setup
// installs into .tools/node:
//  1. the @kubernetes-models/istio validators (generated from Istio's CRDs: types, enums,
//     required fields, patterns);
//  2. TypeScript's excess-property check against the same package's type declarations, for
//     unknown fields (the CRDs leave them to the API server's pruning, so the validators
//     accept a misspelt `failStratgy`; `kubectl apply` in strict mode does not).
// stdin: JSON [{"id": "...", "doc": {...}}, ...]; stdout: JSON [{"id", "errors": [...]}].
// Called by scripts/validate_manifests.py.
import fs from "node:fs";
import path from "node:path";
import { createRequire } from "node:module";
import { pathToFileURL } from "node:url";

const tools = process.env.GRAYLANE_NODE_TOOLS;
if (!tools) {
  console.error("istio-validate: GRAYLANE_NODE_TOOLS (the .tools/node directory) is not set");
  process.exit(2);
}
const require = createRequire(path.join(tools, "package.json"));
const ts = require("typescript");

const input = JSON.parse(fs.readFileSync(0, "utf8"));
const results = input.map(({ id }) => ({ id, errors: [] }));

// apiVersion "networking.istio.io/v1" + kind "VirtualService" -> module path in the package.
function modulePath(doc) {
  const [group, version] = String(doc.apiVersion ?? "").split("/");
  if (!group || !version || !/^[A-Za-z]+$/.test(doc.kind ?? "")) return null;
  return `@kubernetes-models/istio/${group}/${version}/${doc.kind}`;
}

// 1. Schema validators.
for (const [i, { doc }] of input.entries()) {
  const mod = modulePath(doc);
  const file = mod && path.join(tools, "node_modules", mod + ".js");
  if (!file || !fs.existsSync(file)) {
    results[i].errors.push(`no Istio schema for ${doc.apiVersion} ${doc.kind}`);
    continue;
  }
  const exported = await import(pathToFileURL(file).href);
  const Model = exported[doc.kind];
  try {
    new Model(doc).validate();
  } catch (e) {
    results[i].errors.push(String(e.message ?? e));
  }
}

// 2. Unknown fields: one `const dN: IKind = <doc>;` a line, type-checked with tsc.
// Inside .tools/node, so that its node_modules resolve; .mts: an ES module, like the package.
const dir = fs.mkdtempSync(path.join(tools, "check-"));
const file = path.join(dir, "docs.mts");
const lines = [];
const lineOf = new Map();
for (const [i, { doc }] of input.entries()) {
  const mod = modulePath(doc);
  if (!mod || results[i].errors.some((e) => e.startsWith("no Istio schema"))) continue;
  lines.push(`import type { I${doc.kind} as T${i} } from "${mod}";`);
}
for (const [i, { doc }] of input.entries()) {
  if (results[i].errors.some((e) => e.startsWith("no Istio schema"))) continue;
  lineOf.set(lines.length, i);
  lines.push(`export const d${i}: T${i} = ${JSON.stringify(doc)};`);
}
fs.writeFileSync(file, lines.join("\n") + "\n");
const program = ts.createProgram([file], {
  noEmit: true,
  strict: true,
  skipLibCheck: true,
  module: ts.ModuleKind.NodeNext,
  moduleResolution: ts.ModuleResolutionKind.NodeNext,
  types: [],
});
for (const d of ts.getPreEmitDiagnostics(program)) {
  const msg = ts.flattenDiagnosticMessageText(d.messageText, "\n");
  if (d.file && path.resolve(d.file.fileName) === path.resolve(file) && d.start !== undefined) {
    const { line } = d.file.getLineAndCharacterOfPosition(d.start);
    const i = lineOf.get(line);
    if (i !== undefined) {
      // "Object literal may only specify known properties, and '"x"' does not exist in type ..."
      const short = msg.split("\n")[0].replace(/ in type '[\s\S]*$/, "");
      results[i].errors.push(`TypeScript: ${short}`);
      continue;
    }
  }
  console.error(`istio-validate: ${msg}`);
  process.exitCode = 2;
}
fs.rmSync(dir, { recursive: true, force: true });
process.stdout.write(JSON.stringify(results));
