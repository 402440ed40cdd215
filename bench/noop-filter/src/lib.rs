//! The baselines of `make bench`, one Proxy-Wasm filter with two modes chosen by its plugin
//! configuration:
//!
//! - anything but `headers` (b): an empty filter, a root context and an HTTP context that do
//!   nothing, so that the cost of graylane's work can be told from the cost of having a Wasm
//!   VM on the request path at all;
//! - `headers` (e): reads `x-tenant-id` and writes the two headers graylane writes
//!   (`x-graylane-cluster`, `x-graylane-lane`), A for a tenant id ending in 0 and B otherwise
//!   (the same one-in-ten split as the bench's strategy), without deciding anything else: the
//!   floor of any filter that routes with `cluster_header` and tells the next hop its lane;
//! - `headers+status` (u): the same, and reads each response's `:status` (as graylane's traffic
//!   reports must, to count responses by class) and nothing else: what that one read costs.
//!
//! In either mode a request carrying `x-noop-trap` makes the VM trap (a panic aborts in
//! wasm32): the end-to-end tests use it to fail the VM and check the shipped configs'
//! `failure_policy` and header stripping with no filter running.
#![cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, MapType};

struct Root {
    headers: bool,
    status: bool,
}
struct Http {
    headers: bool,
    status: bool,
}

impl Context for Root {}
impl Context for Http {}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let Ok(Some(_)) =
            hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, "x-noop-trap")
        {
            panic!("x-noop-trap: the VM traps");
        }
        if self.headers {
            // One tenant in ten to A (its id ends in 0), as graylane's bench strategy sends
            // about a tenth of the load to A: both Envoys then serve the same split between
            // the two clusters, and the difference is graylane's deciding alone.
            let tenant = hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, "x-tenant-id");
            let to_a = matches!(&tenant, Ok(Some(t)) if t.last() == Some(&b'0'));
            let (cluster, lane): (&[u8], &[u8]) = if to_a {
                (b"A", b"gray")
            } else {
                (b"B", b"prod")
            };
            let _ = hostcalls::set_map_value_bytes(
                MapType::HttpRequestHeaders,
                "x-graylane-cluster",
                Some(cluster),
            );
            let _ = hostcalls::set_map_value_bytes(
                MapType::HttpRequestHeaders,
                "x-graylane-lane",
                Some(lane),
            );
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if self.status {
            let status = hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, ":status");
            // Used, so that the read is not optimised away.
            if matches!(status, Ok(Some(s)) if s.first() == Some(&b'5')) {
                let _ = hostcalls::log(proxy_wasm::types::LogLevel::Trace, "noop: a 5xx");
            }
        }
        Action::Continue
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        let config = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, size)
            .ok()
            .flatten()
            .unwrap_or_default();
        let mode = config.trim_ascii();
        self.headers = mode == b"headers" || mode == b"headers+status";
        self.status = mode == b"headers+status";
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http {
            headers: self.headers,
            status: self.status,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

#[cfg(target_arch = "wasm32")]
proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root {
            headers: false,
            status: false,
        })
    });
}}
