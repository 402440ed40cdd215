#!/usr/bin/env -S node --no-warnings
// Cargo runner for wasm32-wasip1 test binaries (CARGO_TARGET_WASM32_WASIP1_RUNNER):
//   scripts/wasm-runner.mjs <file.wasm> [libtest args...]
// Runs the module under Node's built-in WASI (node:wasi, preview1) and exits with its exit code.
//
// Why Node and not wasmtime: Node is already on the machine (and the setup script installs it
// from Debian when it is missing); wasmtime would be one more binary to download and pin.
// Node's WASI is marked experimental; --no-warnings keeps its banner out of the test output.
import { readFile } from 'node:fs/promises';
import { WASI } from 'node:wasi';
import { argv, env, exit, cwd } from 'node:process';
import { basename } from 'node:path';

const [file, ...args] = argv.slice(2);
if (!file) {
  console.error('usage: wasm-runner.mjs <file.wasm> [args...]');
  exit(2);
}

const wasi = new WASI({
  version: 'preview1',
  args: [basename(file), ...args],
  env,
  // The tests read nothing at run time except, possibly, files next to the crate (proptest
  // regression files); the working directory and / are enough.
  preopens: { '/': '/', '.': cwd() },
  returnOnExit: true,
});

let code;
try {
  const module = await WebAssembly.compile(await readFile(file));
  const instance = await WebAssembly.instantiate(module, wasi.getImportObject());
  code = wasi.start(instance);
} catch (err) {
  // A panic under wasm32-wasip1 aborts (panic=abort) and surfaces as a trap; the panic
  // message was already printed above. WASM_RUNNER_STACK=1 adds the wasm stack.
  const detail = env.WASM_RUNNER_STACK && err && err.stack ? err.stack : String(err);
  console.error(`wasm-runner: ${basename(file)}: ${detail}`);
  code = 101;
}
exit(code ?? 0);
