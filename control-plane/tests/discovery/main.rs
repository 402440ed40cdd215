//! Discovery sources against protocol-faithful FAKES of Consul and of the Kubernetes API
//! server (no real registry can run in CI; each module says what its fake imitates and what it
//! leaves out). One test binary; every test path contains "discovery", so
//! `cargo test -p graylane-control-plane discovery` runs these and the unit tests.

mod discovery_consul;
mod discovery_envoy;
mod discovery_kube;
mod discovery_nginx;

use std::time::Duration;

/// User + system CPU seconds of this process so far (Linux `/proc/self/stat`, 100 Hz ticks).
pub(crate) fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14 and 15 of the file (utime, stime) are 11 and 12 after the command name.
    (ticks(11) + ticks(12)) / 100.0
}

/// Resident set size of this process in MiB (`/proc/self/status`).
pub(crate) fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

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
        rss_mib()
    );
}
