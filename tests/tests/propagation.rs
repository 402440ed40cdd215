//! Benchmark (run by `make bench`, ignored by `make test`): from an admin API write to every
//! Envoy worker routing by it, over 50 changes, with 1 and 4 workers. "Every worker" is read
//! from the filter's own counter: each VM counts the snapshots it installs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use graylane_e2e::{fetch, free_port, runtime, ControlPlane, Envoy, EnvoyConfig, Upstream};
use serde_json::json;

const TOKEN: &str = "bench-write-token";

fn put(port: u16, path: &str, body: &str) -> u16 {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let req = format!(
        "PUT {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

fn installed(envoy: &Envoy) -> u64 {
    let url = format!(
        "http://127.0.0.1:{}/stats?filter=snapshot_installed",
        envoy.admin_port()
    );
    let (_, body, _) = runtime().block_on(fetch::<&str, &str>(&url, &[])).unwrap();
    body.lines()
        .filter_map(|l| l.split_once(": "))
        .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
        .sum()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn measure(workers: u32) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = dir.path().join("graylane.yaml");
    std::fs::write(
        &cfg,
        format!(
            "listen: 127.0.0.1:{port}\ndata_dir: data\ntokens: [{{name: bench, token: {TOKEN}, role: write}}]\n\
             services:\n  web:\n    route-strategy:\n      A: {{status: Y, id: {{ids: [1, 2, 3]}}}}\n      B: {{status: G, id: {{all: true}}}}\n"
        ),
    )
    .unwrap();
    let _cp = ControlPlane::start(&cfg, port);
    let (a, b) = (Upstream::start("A"), Upstream::start("B"));
    let plugin = json!({"service": "web", "control_plane": {"cluster": "graylane_cp"}});
    let envoy = Envoy::start(
        &EnvoyConfig::new()
            .graylane(&plugin)
            .fallback("B")
            .cluster("A", a.port())
            .cluster("B", b.port())
            .cluster("graylane_cp", port)
            .render(),
        workers,
    )
    .unwrap();
    // Every VM (workers + the main thread's) has installed the first version.
    let vms = u64::from(workers) + 1;
    let start = Instant::now();
    while installed(&envoy) < vms {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "first snapshot never installed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut took = Vec::new();
    for i in 0..50 {
        let before = installed(&envoy);
        let state = if i % 2 == 0 { "R" } else { "Y" };
        let t0 = Instant::now();
        let code = put(
            port,
            "/v1/services/web/clusters/A/state",
            &format!("{{\"state\": \"{state}\"}}"),
        );
        assert_eq!(code, 200);
        while installed(&envoy) < before + vms {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "change {i} never reached every VM"
            );
            std::thread::sleep(Duration::from_micros(500));
        }
        took.push(t0.elapsed());
    }
    took.sort();
    println!(
        "propagation: API write -> every Envoy worker (default tick 100 ms), {workers} worker(s), 50 changes = p50 {:.1} ms, p99 {:.1} ms",
        percentile(&took, 0.5).as_secs_f64() * 1e3,
        percentile(&took, 0.99).as_secs_f64() * 1e3
    );
}

#[test]
#[ignore = "benchmark: run by make bench"]
fn propagation_latency() {
    measure(1);
    measure(4);
}
