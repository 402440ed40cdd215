//! Discovery sources against protocol-faithful FAKES of Consul and of the Kubernetes API
//! server (`graylane_e2e::fakes`: no real registry can run in CI; each fake says what it
//! imitates and what it leaves out). One test binary; every test path contains "discovery",
//! so `cargo test -p graylane-control-plane discovery` runs these and the unit tests. The same
//! sources feeding a real Envoy or nginx are tested in `tests/tests/discovery/`.

mod discovery_consul;
mod discovery_kube;

use std::time::Duration;

/// Prints one benchmark line.
pub(crate) fn report(
    name: &str,
    changes: usize,
    latencies: &mut [Duration],
    cpu: f64,
    wall: Duration,
) {
    latencies.sort();
    let pct = |p: f64| {
        let i = ((latencies.len() as f64 - 1.0) * p).round() as usize;
        latencies.get(i).copied().unwrap_or_default()
    };
    println!(
        "discovery bench {name}: {changes} changes, {} delivered; registry change -> event \
         p50 {:.2?} p99 {:.2?} max {:.2?}; process CPU {:.2}s over {:.1}s ({:.0}% of one core); RSS {:.0} MiB",
        latencies.len(),
        pct(0.5),
        pct(0.99),
        pct(1.0),
        cpu,
        wall.as_secs_f64(),
        100.0 * cpu / wall.as_secs_f64(),
        graylane_e2e::rss_mib()
    );
}
