//! graylane's nginx adapter: the strategy crate's own `decide` behind a small C ABI that
//! LuaJIT's FFI calls from `set_by_lua` and `balancer_by_lua` (Debian's nginx has the Lua
//! module but no Proxy-Wasm; njs has no WebAssembly). One decision model, not a second
//! implementation in Lua.
//!
//! ```text
//!  nginx worker ───────────────────────────────────────────────────────────────────────────┐
//!  set_by_lua: nginx's header list ─▶ graylane_decide_request ─▶ $graylane_route, _lane    │
//!  balancer_by_lua: cluster ─▶ its endpoints (described; graylane_peer while draining)     │
//!                                    ▲ RwLock<Arc<Snapshot>>                              │
//!  feed thread (ureq long-poll) ─────┘ strategy, health, endpoints                        │
//!  ────────────────────────────────────────────────────────────────────────────────────────┘
//! ```
//!
//! If the control plane is unreachable the last good snapshot stays; if the library cannot
//! decide, the Lua side sends the request to the stable cluster, never to gray.

pub mod config;
pub mod feed;
pub mod router;

// The C ABI reads pointers LuaJIT hands over: the one place this crate needs `unsafe`.
#[allow(unsafe_code)]
pub mod ffi;

pub use config::Config;
pub use feed::{read_reply, Reply};
pub use router::{Outcome, Router, Snapshot};
