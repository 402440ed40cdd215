//! graylane's end-to-end harness: a real Envoy started from a config template on free loopback
//! ports, the real `graylane_filter.wasm`, a real nginx running `libgraylane_nginx.so`, and
//! real upstream HTTP servers that say which version answered.
//!
//! ```text
//!   test ──get()──▶ Envoy listener :0 ──[graylane.wasm]──cluster_header──▶ Upstream "A" | "B"
//!                   Envoy admin :0  (/ready, /listeners, /stats)
//! ```
//!
//! `fakes` has protocol-faithful fakes of the registries discovery reads (Consul, the Kubernetes
//! API server), shared by the control plane's tests and these.
//!
//! Everything is blocking from a test's point of view (plain `#[test]`): the upstream servers
//! and the HTTP client run on one shared background tokio runtime. Envoy and the servers stop
//! when dropped, also when the test panics; Envoy's log is printed then.
//!
//! ```no_run
//! use graylane_e2e::{count_by_body, Envoy, EnvoyConfig, Upstream};
//! let (a, b) = (Upstream::start("A"), Upstream::start("B"));
//! let config = EnvoyConfig::new().cluster("A", a.port()).cluster("B", b.port()).render();
//! let envoy = Envoy::start(&config, 2).unwrap();
//! let counts = count_by_body(envoy.port("ingress"), "/", &[("x-graylane-cluster", "B")], 100);
//! assert_eq!(counts.get("B"), Some(&100));
//! ```

// This crate only runs under tests: a panic is how a test fails, so `expect` with a message
// is the right tool here (never in the product crates).
#![allow(clippy::expect_used)]

mod client;
mod config;
mod control_plane;
mod envoy;
pub mod fakes;
mod nginx;
pub mod pki;
mod runtime;
mod upstream;
mod usage;

pub use client::{
    count_by_body, count_by_body_with, count_replies, fetch, get, get_all, Headers, Reply, Req,
};
pub use config::{render, EnvoyConfig};
pub use control_plane::{free_port, graylane_bin, ControlPlane};
pub use envoy::{envoy_bin, noop_wasm_path, repo_root, wasm_path, Envoy};
pub use nginx::{
    nginx_bin, nginx_lib, nginx_lua_dir, nginx_module, nginx_via, render_nginx, Nginx, Via,
};
pub use runtime::{runtime, wait_until};
pub use upstream::Upstream;
pub use usage::{cpu_seconds, rss_mib};
