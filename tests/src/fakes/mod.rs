//! Protocol-faithful FAKES of the registries graylane discovers endpoints from, for tests: no
//! Consul or Kubernetes API server can run in this project's CI. Each serves real HTTP on
//! 127.0.0.1 port 0 (axum), so the code under test uses its real clients (`reqwest`,
//! `kube::Client`); each module says what its fake imitates and what it leaves out.
//!
//! Used by the control plane's discovery tests and by the end-to-end tests (a real Envoy or
//! nginx fed by the control plane). Start them on a tokio runtime: from a blocking test,
//! `graylane_e2e::runtime().block_on(Consul::start())`.

pub mod consul;
pub mod kube;

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `m`, also after a panic elsewhere (a fake's state stays readable for the report).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
