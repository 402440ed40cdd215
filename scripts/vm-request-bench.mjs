#!/usr/bin/env -S node --no-warnings
// make bench (BENCH_ONLY=vm): what a Proxy-Wasm filter's own code costs a request under V8,
// free of Envoy. The filter's callbacks run in Node (V8, as in Envoy) with every host call
// answered by a stub: configure once, then for each request create the context, request
// headers (the tenant header answered with a random tenant), response headers, log, done, delete.
//   scripts/vm-request-bench.mjs <filter.wasm> <mode> [ids]
// mode `noop` or `headers`: the bench's noop filter configured so; anything else: graylane
// with 100,000 ids (or [ids]), 1,000 intervals and a 5 % tenant percentage.
import { readFile } from 'node:fs/promises';
import { WASI } from 'node:wasi';
const [file, mode, nIds] = process.argv.slice(2);
let cfg;
if (mode === 'headers' || mode === 'noop') cfg = Buffer.from(mode);
else {
  const ids = []; for (let i = 0; i < Number(nIds || 100000); i++) ids.push(i * 7);
  const iv = []; for (let i = 0; i < 1000; i++) iv.push([3000000 + i * 1000, 3000000 + i * 1000 + 99]);
  cfg = Buffer.from(JSON.stringify({service: "bench", strategy: {"route-strategy": {
    "A": {"status": "Y", "id": {"ids": ids, "interval": iv}, "percent": {"value": 5, "by": "tenant"}},
    "B": {"status": "G", "id": {"all": true}}}}}));
}
let inst; let tenant = 0; let hostCalls = 0;
const mem = () => inst.exports.memory.buffer;
function give(bytes, pp, sp) {
  const p = inst.exports.proxy_on_memory_allocate(bytes.length);
  new Uint8Array(mem(), p, bytes.length).set(bytes);
  const dv = new DataView(mem()); dv.setUint32(pp, p, true); dv.setUint32(sp, bytes.length, true);
}
const env = new Proxy({}, { get: (_, name) => {
  if (name === 'proxy_get_buffer_bytes') return (type, start, len, pp, sp) => {
    const k = Math.min(len, cfg.length - start); give(cfg.subarray(start, start + k), pp, sp); return 0; };
  if (name === 'proxy_get_header_map_value') return (t, kp, kl, pp, sp) => {
    hostCalls++;
    const key = Buffer.from(mem(), kp, kl).toString();
    if (key === 'x-tenant-id') { give(Buffer.from(String(tenant)), pp, sp); return 0; }
    return 1; /* NotFound */ };
  if (name === 'proxy_log') return () => 0;
  if (name === 'proxy_get_log_level') return (pp) => { new DataView(mem()).setUint32(pp, 3, true); return 0; };
  return (...a) => { hostCalls++; return 0; };
} });
const wasi = new WASI({ version: 'preview1', returnOnExit: true });
const module = await WebAssembly.compile(await readFile(file));
const imports = wasi.getImportObject(); imports.env = env;
inst = await WebAssembly.instantiate(module, imports);
wasi.initialize(inst);
const x = inst.exports;
x.proxy_on_context_create(1, 0);
if (!x.proxy_on_configure(1, cfg.length)) throw new Error('configure failed');
let rng = 12345;
function one(id) {
  rng = (rng * 1103515245 + 12345) % 2147483648; tenant = rng % 5000000;
  x.proxy_on_context_create(id, 1);
  x.proxy_on_request_headers(id, 5, 1);
  x.proxy_on_response_headers(id, 3, 1);
  x.proxy_on_log(id);
  // As Envoy does: a callback the module does not export is not called (graylane's .wasm
  // exports neither on_done nor on_delete: filter/src/abi.rs).
  if (x.proxy_on_done) x.proxy_on_done(id);
  if (x.proxy_on_delete) x.proxy_on_delete(id);
}
for (let i = 0; i < 200000; i++) one(2 + i);
const N = Number(process.env.VM_BENCH_REQUESTS || 1000000); hostCalls = 0;
const t0 = process.hrtime.bigint();
for (let i = 0; i < N; i++) one(300000 + i);
const ns = Number(process.hrtime.bigint() - t0) / N;
console.log(JSON.stringify({ mode, ns_per_request: Math.round(ns), host_calls: hostCalls / N }));
