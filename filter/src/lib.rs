//! graylane's Proxy-Wasm HTTP filter: a thin adapter around `graylane-strategy`.
//!
//! ```text
//!  root context (one per worker VM, root.rs)        http context (one per request, http.rs)
//!  ├─ on_configure: plugin config -> Compiled        extract the headers the strategy reads
//!  ├─ on_tick / on_http_call_response:                 -> decide(&Compiled, &Health, &RequestView)
//!  │   follower.rs (sans host calls): lease, poll,     -> set route + lane header
//!  │   backoff, install; shared data carries one       -> count per cluster / reason (in the VM)
//!  │   worker's fetch to the others (and a preview's   -> a preview's candidate on 1 in `every`:
//!  │   candidate, decided beside the live strategy)       the same request decided again, only
//!  │                                                      the pair live -> candidate counted
//!  │                                                  signed cookies: verdicts.rs, verified
//!  │                                                  once per VM (bounded cache)
//!  ├─ metrics.rs (defined once, flushed on the tick)
//!  └─ report.rs: each worker publishes its traffic
//!      counts (shared data); the lease holder sends
//!      them to the control plane every report_ms
//! ```
//!
//! Serving several services (no `service` in the configuration), the root keeps one follower
//! and reporter per service (catalog.rs lists them when serving all), and a request first
//! reads its `:authority`, mapped to a service by destination.rs; other destinations are left
//! alone.
//!
//! The entry points Envoy calls are the filter's own (abi.rs), and so are its host calls
//! (host.rs): no SDK dispatcher, so Envoy enters the VM only for the callbacks graylane uses, and
//! a request that is neither reported nor given a reason header leaves no state in the VM.
//!
//! Nothing here unwraps a host result or the configuration: on any failure the request
//! keeps the stable route and a counter is incremented.

// The entry points (abi.rs) exist only on wasm32; natively (clippy, unit tests) the contexts
// they would construct are unused.
#![cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]

#[cfg(target_arch = "wasm32")]
mod abi;
mod catalog;
mod config;
pub mod destination;
pub mod feed;
mod follower;
mod host;
mod http;
mod metrics;
mod report;
mod root;
#[cfg(test)]
mod shared_fake;
pub mod verdicts;

pub use config::{ControlPlane, PluginConfig, Serves, Services};
pub use feed::{parse_reply, FeedResponse};
