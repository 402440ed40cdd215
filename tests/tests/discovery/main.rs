//! Discovery end to end: the control plane (in-process, as `graylane serve` composes it) takes
//! endpoints from the fake Consul or the fake Kubernetes API server (`graylane_e2e::fakes`) and
//! serves them to a real data plane: Envoy over ADS (`envoy`), nginx through the feed
//! (`nginx`). Every wait is on a condition, never a fixed time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod control_plane;
mod envoy;
mod nginx;
mod tls;
