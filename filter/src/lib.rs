//! graylane's Proxy-Wasm HTTP filter: a thin adapter around `graylane-strategy`.
//!
//! ```text
//!  root context (one per worker VM)                 http context (one per request)
//!  ├─ on_configure: plugin config -> Compiled        extract headers (one host call)
//!  ├─ on_tick: live feed from the control plane        -> decide(&Compiled, &RequestView)
//!  │   (one worker polls; shared data + CAS carries     -> set route + lane header
//!  │    the result to the others)                       -> count per cluster / reason
//!  └─ metrics (defined once, by name)
//! ```
//!
//! Nothing here unwraps a host result or the configuration: on any failure the request
//! keeps the stable route and a counter is incremented.

// The host entry point below exists only on wasm32; natively (clippy, unit tests) the contexts
// it would construct are unused.
#![cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]

mod config;
mod feed;
mod http;
mod metrics;
mod root;

pub use config::{ControlPlane, PluginConfig};
pub use feed::FeedResponse;

#[cfg(target_arch = "wasm32")]
proxy_wasm::main! {{
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn proxy_wasm::traits::RootContext> {
        Box::new(root::Root::new())
    });
}}
