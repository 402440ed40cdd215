//! The empty Proxy-Wasm filter: a root context and an HTTP context that do nothing, so that
//! `make bench` can tell the cost of graylane's work from the cost of having a Wasm VM on the
//! request path at all.
#![cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;

struct Root;
struct Http;

impl Context for Root {}
impl Context for Http {}
impl HttpContext for Http {}

impl RootContext for Root {
    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http))
    }
    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

#[cfg(target_arch = "wasm32")]
proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root) });
}}
