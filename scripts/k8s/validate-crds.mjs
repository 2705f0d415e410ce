// Validates prometheus-operator objects (ServiceMonitor, PrometheusRule, PodMonitor) in
// rendered manifests against the models of @kubernetes-models/prometheus-operator, which are
// generated from the operator's CRD schemas:
//   1. the package's own validator: types, required fields, enums, duration patterns;
//   2. unknown fields, which the CRD schemas (and so that validator) let through but the API
//      server rejects with strict field validation (`kubectl apply` warns, a typo is lost):
//      every key must be a property of the model's class, read from its .d.ts, recursively.
//
// usage: node validate-crds.mjs [--expect Kind,Kind] FILE.yaml...
// Prints one line per object; exits 1 when any object fails or an expected kind is missing.
import fs from "node:fs";
import path from "node:path";
import { createRequire } from "node:module";
import yaml from "js-yaml";
import * as v1 from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";

const require = createRequire(import.meta.url);
const pkgDir = (name) => path.dirname(require.resolve(`${name}/package.json`));
const v1Dir = path.join(pkgDir("@kubernetes-models/prometheus-operator"), "monitoring.coreos.com/v1");

// --- property tables from the .d.ts files ---------------------------------------------
const classCache = new Map();

function resolveImport(fromFile, spec) {
  if (spec.startsWith(".")) return path.resolve(path.dirname(fromFile), spec.replace(/\.js$/, ".d.ts"));
  const m = spec.match(/^(@[^/]+\/[^/]+)\/(.*)$/);
  if (!m) return null;
  return path.join(pkgDir(m[1]), m[2].replace(/\.js$/, "") + ".d.ts");
}

// Returns { props: Map(name -> {type, map}) } for the class declared in file, or null when the
// file declares no class (a type alias such as Duration = string).
function classOf(file) {
  if (classCache.has(file)) return classCache.get(file);
  let result = null;
  if (file && fs.existsSync(file)) {
    const src = fs.readFileSync(file, "utf8");
    const imports = new Map();
    for (const m of src.matchAll(/^import \{ ([^}]+) \} from "([^"]+)";$/gm)) {
      for (const name of m[1].split(",").map((s) => s.trim())) imports.set(name, m[2]);
    }
    const lines = src.split("\n");
    const start = lines.findIndex((l) => /^export declare class \w+/.test(l));
    if (start >= 0) {
      const props = new Map();
      for (let i = start + 1; i < lines.length && lines[i] !== "}"; i++) {
        const m = lines[i].match(/^ {4}"?([A-Za-z0-9_$.-]+)"?\??: (.*)$/);
        if (!m || lines[i].startsWith("    static ")) continue;
        let type = m[2].replace(/;$/, "");
        let map = false;
        if (type === "{") {
          // Inline object type: a string map ([key: string]) or an anonymous shape (unchecked).
          let body = "";
          while (++i < lines.length && !/^ {4}\};?$/.test(lines[i])) body += lines[i];
          map = /\[key: string\]/.test(body);
          type = null;
        }
        props.set(m[1], { type, map, imports, file });
      }
      result = { props };
    }
  }
  classCache.set(file, result);
  return result;
}

function typeFile(prop) {
  let t = prop.type;
  if (!t) return { file: null, array: false };
  let array = false;
  const arr = t.match(/^Array<(.*)>$/);
  if (arr) { t = arr[1]; array = true; }
  const spec = prop.imports.get(t);
  return { file: spec ? resolveImport(prop.file, spec) : null, array };
}

function unknownFields(value, cls, at, out) {
  if (!cls || value === null || typeof value !== "object" || Array.isArray(value)) return;
  for (const [key, child] of Object.entries(value)) {
    const prop = cls.props.get(key);
    if (!prop) { out.push(`${at}.${key}: unknown field`); continue; }
    if (prop.map) continue;
    const { file, array } = typeFile(prop);
    const sub = classOf(file);
    if (!sub) continue;
    if (array && Array.isArray(child)) child.forEach((c, i) => unknownFields(c, sub, `${at}.${key}[${i}]`, out));
    else unknownFields(child, sub, `${at}.${key}`, out);
  }
}

// --- main -----------------------------------------------------------------------------
const KINDS = ["ServiceMonitor", "PrometheusRule", "PodMonitor"];
const args = process.argv.slice(2);
let expect = [];
if (args[0] === "--expect") { expect = args[1].split(",").filter(Boolean); args.splice(0, 2); }
if (args.length === 0) { console.error("usage: validate-crds.mjs [--expect Kind,...] FILE..."); process.exit(2); }

let failed = 0;
const seen = new Set();
for (const file of args) {
  for (const doc of yaml.loadAll(fs.readFileSync(file, "utf8"))) {
    if (!doc || typeof doc !== "object" || !String(doc.apiVersion || "").startsWith("monitoring.coreos.com/")) continue;
    const name = `${file}: ${doc.kind}/${doc.metadata?.name}`;
    if (doc.apiVersion !== "monitoring.coreos.com/v1" || !KINDS.includes(doc.kind)) {
      console.log(`ERROR ${name}: no model for ${doc.apiVersion} ${doc.kind}`); failed++; continue;
    }
    seen.add(doc.kind);
    const problems = [];
    try { new v1[doc.kind](doc).validate(); } catch (e) { problems.push(String(e.message || e)); }
    unknownFields(doc, classOf(path.join(v1Dir, `${doc.kind}.d.ts`)), doc.kind, problems);
    if (problems.length) { failed++; for (const p of problems) console.log(`ERROR ${name}: ${p}`); }
    else console.log(`OK ${name}`);
  }
}
for (const k of expect) if (!seen.has(k)) { console.log(`ERROR no ${k} found in ${args.join(" ")}`); failed++; }
process.exit(failed ? 1 : 0);
