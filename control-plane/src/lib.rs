//! graylane's control plane: owns the strategy, pushes it live to every filter, syncs
//! endpoints from Consul and Kubernetes, records every operation.
//!
//! ```text
//!  graylane.yaml ──watch──┐                       ┌── admin API (axum) ── CLI
//!  admin API ── Command ──┼──▶ writer task ──▶ watch<Arc<Snapshot>> ──┼── feed (long-poll) ── filters
//!  discovery ── Event  ───┘      │ SQLite (versions, ops)             └── /metrics
//! ```

pub mod api;
pub mod cli;
pub mod client;
pub mod config;
pub mod cookie;
pub mod diff;
pub mod discovery;
pub mod edit;
pub mod endpoints;
pub mod install;
pub mod instances;
pub mod merge;
pub mod mesh;
pub mod metrics;
pub mod plugin;
pub mod preview;
pub mod release;
pub mod render;
pub mod serve;
pub mod snapshot;
pub mod store;
pub mod supervisor;
pub mod tls;
pub mod top;
pub mod traffic;
pub mod writer;
pub mod xds;
