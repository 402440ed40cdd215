//! Discovery sources against protocol-faithful FAKES of Consul and of the Kubernetes API
//! server (no real registry can run in CI; each module says what its fake imitates and what it
//! leaves out). One test binary; every test path contains "discovery", so
//! `cargo test -p graylane-control-plane discovery` runs these and the unit tests.

mod discovery_consul;
mod discovery_kube;
