//! Issue 15 end to end, live: the real control plane (`graylane serve`, its CLI) feeding a
//! real nginx of 3 workers through `libgraylane_nginx.so`. A state change through the CLI
//! reaches every worker; with the control plane stopped nginx keeps routing by its last
//! strategy; restarted, updates resume. The propagation benchmark (`make bench`) is here too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use graylane_e2e::{free_port, get_all, ControlPlane, Nginx, Req, Upstream};

const WRITE: &str = "write-token-e2e";
const READ: &str = "read-token-e2e";

fn config(port: u16, data: &std::path::Path) -> String {
    format!(
        r#"listen: 127.0.0.1:{port}
data_dir: {data}
tokens:
  - {{name: ops, token: {WRITE}, role: write}}
  - {{name: viewer, token: {READ}, role: read}}
services:
  web:
    route-strategy:
      A:
        status: Y
        id:
          all: false
          ids: [1, 2, 3]
          interval: [[1,100], [600,10000]]
      B:
        status: G
        id:
          all: true
"#,
        data = data.display()
    )
}

fn ok(out: &std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "CLI failed: {}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// nginx for service web following the control plane on `cp_port`, no strategy of its own.
fn nginx(cp_port: u16, a: &Upstream, b: &Upstream, workers: u32) -> Nginx {
    let args = [
        "--control-plane".to_string(),
        format!("http://127.0.0.1:{cp_port}"),
        "--wait-ms".into(),
        "5000".into(),
        "--reason-header".into(),
        "x-graylane-reason".into(),
        "--endpoint".into(),
        format!("A=127.0.0.1:{}", a.port()),
        "--endpoint".into(),
        format!("B=127.0.0.1:{}", b.port()),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Nginx::graylane("web", &args, workers).unwrap()
}

/// Each worker's status as first seen at version `v`, by pid, once every worker has shown it,
/// and how long that took. Panics after `within`.
fn statuses_at(n: &Nginx, v: u64, within: Duration) -> (Duration, HashMap<u64, serde_json::Value>) {
    let start = Instant::now();
    let workers = n.workers();
    let mut at: HashMap<u64, serde_json::Value> = HashMap::new();
    loop {
        let s = n.status()["web"].clone();
        if s["version"].as_u64() == Some(v) {
            at.entry(s["pid"].as_u64().unwrap()).or_insert(s);
        }
        if workers.iter().all(|w| at.contains_key(&u64::from(*w))) {
            return (start.elapsed(), at);
        }
        assert!(
            start.elapsed() < within,
            "not every worker reached version {v} within {within:?}: {:?} of {workers:?}",
            at.keys().collect::<Vec<_>>()
        );
    }
}

/// How long until every worker of `n` holds version `v`.
fn wait_version(n: &Nginx, v: u64, within: Duration) -> Duration {
    statuses_at(n, v, within).0
}

/// When the last of `n`'s workers installed version `v` (microseconds since the Unix epoch,
/// from each worker's status page), once every worker holds it.
fn installed_at(n: &Nginx, v: u64, within: Duration) -> u64 {
    statuses_at(n, v, within)
        .1
        .values()
        .map(|s| s["installed_unix_micros"].as_u64().unwrap())
        .max()
        .unwrap()
}

fn unix_micros() -> u64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    u64::try_from(d.as_micros()).unwrap()
}

/// Where `n` requests for `tenant` went, each on a new connection (so every worker answers).
fn routes(n: &Nginx, tenant: &str, count: usize) -> HashMap<String, usize> {
    let replies = get_all(
        n.port(),
        (0..count)
            .map(|_| {
                Req::new("/")
                    .header("x-tenant-id", tenant)
                    .header("connection", "close")
            })
            .collect(),
    );
    graylane_e2e::count_replies(&replies)
}

fn version_of(cli_out: &str) -> u64 {
    cli_out
        .split_whitespace()
        .skip_while(|w| *w != "version")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no version in {cli_out:?}"))
}

#[test]
fn cli_change_reaches_every_nginx_worker_which_keep_routing_without_the_control_plane() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg_path = dir.path().join("graylane.yaml");
    std::fs::write(&cfg_path, config(port, &dir.path().join("data"))).unwrap();
    let mut cp = ControlPlane::start(&cfg_path, port);
    let (a, b) = (Upstream::start("A"), Upstream::start("B"));
    let n = nginx(port, &a, &b, 3);
    assert_eq!(n.workers().len(), 3);

    // The first strategy arrives from the control plane in every worker.
    wait_version(&n, 1, Duration::from_secs(20));
    assert_eq!(routes(&n, "2", 60).get("A"), Some(&60));
    assert_eq!(routes(&n, "300", 60).get("B"), Some(&60));

    // Flip A to R through the CLI: every worker routes tenant 2 to B, and says when it
    // started to (after the write was sent, before now).
    let sent = unix_micros();
    let v = version_of(&ok(&cp.cli(WRITE, &["set-state", "web", "A", "R"])));
    let took = wait_version(&n, v, Duration::from_secs(5));
    let last = installed_at(&n, v, Duration::from_secs(5));
    assert!(
        sent <= last && last <= unix_micros(),
        "{sent} <= {last} <= now"
    );
    eprintln!(
        "CLI write -> every nginx worker holding it: {took:?} (installed {} us after the write)",
        last - sent
    );
    assert_eq!(routes(&n, "2", 60).get("B"), Some(&60));

    // Control plane down: every worker keeps routing by its last strategy.
    cp.kill();
    let workers = n.workers();
    for _ in 0..3 {
        for t in ["2", "700", "300"] {
            assert_eq!(routes(&n, t, 30).get("B"), Some(&30), "tenant {t}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(n.workers(), workers, "no worker restarted");
    let feed = n.status()["web"]["feed"].clone();
    assert!(feed["failed"].as_u64().unwrap() > 0, "{feed}");

    // Restarted (same data): updates resume in every worker.
    cp.restart();
    let v = version_of(&ok(&cp.cli(WRITE, &["set-state", "web", "A", "Y"])));
    wait_version(&n, v, Duration::from_secs(10));
    assert_eq!(routes(&n, "2", 60).get("A"), Some(&60));
    assert_eq!(routes(&n, "700", 60).get("A"), Some(&60));
    assert_eq!(routes(&n, "300", 60).get("B"), Some(&60));
}

fn put(port: u16, path: &str, body: &str) -> u16 {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let req = format!(
        "PUT {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {WRITE}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
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

/// Benchmark (run by `make bench`, ignored by `make test`): from an admin API write to every
/// nginx worker holding it, over 50 changes, with 1 and 4 workers.
#[test]
#[ignore = "benchmark: run by make bench"]
fn nginx_propagation_latency() {
    for workers in [1, 4] {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let cfg_path = dir.path().join("graylane.yaml");
        std::fs::write(&cfg_path, config(port, &dir.path().join("data"))).unwrap();
        let _cp = ControlPlane::start(&cfg_path, port);
        let (a, b) = (Upstream::start("A"), Upstream::start("B"));
        let n = nginx(port, &a, &b, workers);
        wait_version(&n, 1, Duration::from_secs(20));
        let mut took = Vec::new();
        let mut version = 1;
        for i in 0..50 {
            let state = if i % 2 == 0 { "R" } else { "Y" };
            let t0 = unix_micros();
            let code = put(
                port,
                "/v1/services/web/clusters/A/state",
                &format!("{{\"state\": \"{state}\"}}"),
            );
            assert_eq!(code, 200);
            version += 1;
            // Each worker's own install time: the status page answers one worker per
            // connection, so finding every worker takes polls that are not propagation.
            let last = installed_at(&n, version, Duration::from_secs(10));
            took.push(Duration::from_micros(last.saturating_sub(t0)));
        }
        took.sort();
        let pct = |p: f64| took[((took.len() as f64 - 1.0) * p).round() as usize];
        println!(
            "propagation: API write -> every nginx worker, {workers} worker(s), 50 changes = p50 {:.1} ms, p99 {:.1} ms",
            pct(0.5).as_secs_f64() * 1e3,
            pct(0.99).as_secs_f64() * 1e3
        );
    }
}
