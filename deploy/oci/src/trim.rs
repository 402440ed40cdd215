//! Removes the Proxy-Wasm callbacks a filter never implements from its module's exports.
//!
//! graylane's own filter no longer exports them (it has its own entry points,
//! filter/src/abi.rs); `make wasm` and the OCI build still run this, as a guard (`--check`
//! fails on a module that exports one), and the bench uses it on its SDK-built baseline.
//!
//! Envoy (proxy-wasm-cpp-host) calls an HTTP callback only when the module exports it, and each
//! call is a host-to-VM entry. The Rust SDK (proxy-wasm) exports every callback of the ABI, so
//! a filter that implements none of the body, trailer and `on_done` callbacks still pays for
//! Envoy entering the VM on each of them, on every request: measured under callgrind in Envoy
//! 1.40 (make bench), about 5,300 instructions of a request's 200,000. Without the export, the
//! host does what the SDK's default would have done (continue; `on_done` true).
//!
//! Only exports are removed, never functions: no index in the module moves, and every other
//! section is copied byte for byte. wasmparser and wasm-encoder (Bytecode Alliance, the
//! libraries wasm-tools is built on) read and write the sections, rather than hand-written
//! LEB128 and section framing.

use wasm_encoder::{ExportKind, ExportSection, Module, RawSection};
use wasmparser::{ExternalKind, Parser, Payload};

/// The callbacks graylane's filter never implements that Envoy would otherwise call per
/// request (or per body chunk), with the SDK doing nothing in them.
pub const UNUSED_HTTP_CALLBACKS: [&str; 5] = [
    "proxy_on_request_body",
    "proxy_on_request_trailers",
    "proxy_on_response_body",
    "proxy_on_response_trailers",
    "proxy_on_done",
];

#[derive(Debug, thiserror::Error)]
pub enum TrimError {
    #[error("not a WebAssembly module: {0}")]
    Parse(#[from] wasmparser::BinaryReaderError),
    #[error("a section runs past the end of the module")]
    Truncated,
    #[error("a WebAssembly component, not a core module: only a Proxy-Wasm module can be trimmed")]
    Component,
}

/// `wasm` without the exports named in `names`; also which of them it had.
pub fn trim_exports(wasm: &[u8], names: &[&str]) -> Result<(Vec<u8>, Vec<String>), TrimError> {
    let mut out = Module::new();
    let mut removed = Vec::new();
    for payload in Parser::new(0).parse_all(wasm) {
        let payload = payload?;
        match &payload {
            Payload::Version { encoding, .. } => {
                if *encoding != wasmparser::Encoding::Module {
                    return Err(TrimError::Component);
                }
            }
            Payload::ExportSection(reader) => {
                let mut exports = ExportSection::new();
                for export in reader.clone() {
                    let export = export?;
                    if names.contains(&export.name) {
                        removed.push(export.name.to_string());
                        continue;
                    }
                    let kind = match export.kind {
                        ExternalKind::Func | ExternalKind::FuncExact => ExportKind::Func,
                        ExternalKind::Table => ExportKind::Table,
                        ExternalKind::Memory => ExportKind::Memory,
                        ExternalKind::Global => ExportKind::Global,
                        ExternalKind::Tag => ExportKind::Tag,
                    };
                    exports.export(export.name, kind, export.index);
                }
                out.section(&exports);
            }
            _ => {
                // Every other section as it is (the code section arrives whole here; its
                // entries, which come after, are inside that range).
                if let Some((id, range)) = payload.as_section() {
                    let data = usize::try_from(range.start)
                        .ok()
                        .zip(usize::try_from(range.end).ok())
                        .and_then(|(start, end)| wasm.get(start..end))
                        .ok_or(TrimError::Truncated)?;
                    out.section(&RawSection { id, data });
                }
            }
        }
    }
    let out = out.finish();
    // What is written must be a module Envoy will load: validated before it replaces anything.
    wasmparser::Validator::new().validate_all(&out)?;
    Ok((out, removed))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A module with a memory, three functions and their exports (hand-assembled: the
    /// smallest module that has what the filter's has).
    fn module() -> Vec<u8> {
        use wasm_encoder::{
            CodeSection, Function, FunctionSection, MemorySection, MemoryType, TypeSection,
        };
        let mut m = Module::new();
        let mut types = TypeSection::new();
        types.ty().function([], [wasm_encoder::ValType::I32]);
        m.section(&types);
        let mut funcs = FunctionSection::new();
        for _ in 0..3 {
            funcs.function(0);
        }
        m.section(&funcs);
        let mut mem = MemorySection::new();
        mem.memory(MemoryType {
            minimum: 1,
            maximum: None,
            memory64: false,
            shared: false,
            page_size_log2: None,
        });
        m.section(&mem);
        let mut ex = ExportSection::new();
        ex.export("memory", ExportKind::Memory, 0);
        ex.export("proxy_on_request_headers", ExportKind::Func, 0);
        ex.export("proxy_on_response_body", ExportKind::Func, 1);
        ex.export("proxy_on_done", ExportKind::Func, 2);
        m.section(&ex);
        let mut code = CodeSection::new();
        for i in 0..3 {
            let mut f = Function::new([]);
            f.instructions().i32_const(i).end();
            code.function(&f);
        }
        m.section(&code);
        m.finish()
    }

    fn exports(wasm: &[u8]) -> Vec<(String, u32)> {
        let mut out = Vec::new();
        for p in Parser::new(0).parse_all(wasm) {
            if let Payload::ExportSection(r) = p.unwrap() {
                for e in r {
                    let e = e.unwrap();
                    out.push((e.name.to_string(), e.index));
                }
            }
        }
        out
    }

    #[test]
    fn removes_exactly_the_named_exports_and_keeps_the_rest_valid() {
        let (trimmed, removed) = trim_exports(&module(), &UNUSED_HTTP_CALLBACKS).unwrap();
        assert_eq!(removed, ["proxy_on_response_body", "proxy_on_done"]);
        assert_eq!(
            exports(&trimmed),
            [
                ("memory".to_string(), 0),
                ("proxy_on_request_headers".to_string(), 0)
            ]
        );
        // Still a valid module, with the functions themselves in place.
        wasmparser::Validator::new().validate_all(&trimmed).unwrap();
        // Again: nothing more to remove, the same bytes.
        let (again, removed) = trim_exports(&trimmed, &UNUSED_HTTP_CALLBACKS).unwrap();
        assert!(removed.is_empty());
        assert_eq!(again, trimmed);
    }

    #[test]
    fn refuses_what_is_not_a_module() {
        let err = trim_exports(b"\0asm\x01\0\0", &UNUSED_HTTP_CALLBACKS);
        assert!(matches!(err, Err(TrimError::Parse(_))), "{err:?}");
        let err = trim_exports(b"not wasm at all", &UNUSED_HTTP_CALLBACKS);
        assert!(matches!(err, Err(TrimError::Parse(_))), "{err:?}");
    }
}
