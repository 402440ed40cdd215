//! `make bench` only (ignored here): the admin API with a million ids in a whitelist. Explain
//! must not copy the compiled index (goal < 1 ms), and a state flip must not write or compile
//! the whitelist again (goal: durable in < 10 ms). Release build, a real SQLite file.
//!
//! And the control plane at scale (issue 13, goal 6): the real `graylane serve` (a child
//! process, so its RSS and CPU are its own) with 100 services x 100,000 ids and 1,000
//! simulated filters (plain HTTP clients in this process, over loopback) long-polling its
//! feed; state flips on random services, acknowledged (durable) and reaching each filter.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use graylane_control_plane::api::{router, AppState};
use graylane_control_plane::config::{Config, Limits};
use graylane_control_plane::metrics::Metrics;
use graylane_control_plane::store::Store;
use graylane_control_plane::writer::{Handle, Writer};
use http_body_util::BodyExt;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

const CONFIG: &str = r#"
tokens:
  - {name: ops, token: writer-token-1, role: write}
services:
  web:
    route-strategy:
      A: {status: Y, id: {ids: [1]}}
      B: {status: G, id: {all: true}}
"#;

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

async fn call(app: &axum::Router, method: &str, path: &str, body: serde_json::Value) -> StatusCode {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("authorization", "Bearer writer-token-1")
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let _ = resp.into_body().collect().await.unwrap();
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: make bench"]
async fn bench_control_plane_with_a_million_ids() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config::parse(CONFIG, Path::new("graylane.yaml")).unwrap();
    let store = Store::open(dir.path()).unwrap();
    let (writer, snapshots) = Writer::open(store, &cfg, "h0").unwrap();
    let history = writer.reader().unwrap();
    let (tx, rx) = mpsc::channel(64);
    let (_events, events_rx) = mpsc::channel(64);
    let stop = CancellationToken::new();
    tokio::spawn(writer.run(rx, events_rx, stop.clone()));
    let state = AppState::new(
        snapshots,
        Handle::new(tx),
        history,
        Arc::new(Metrics::new()),
    );
    let app = router(state, &Limits::default());

    let ids: Vec<u64> = (0..1_000_000u64).map(|i| 20_000_000 + i * 7).collect();
    let t = Instant::now();
    let s = call(
        &app,
        "POST",
        "/v1/services/web/clusters/A/whitelist/add",
        json!({"ids": ids}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let upload = t.elapsed();

    let mut explain = Vec::new();
    for i in 0..2_000u64 {
        let tenant = (20_000_000 + (i * 7_919 % 1_000_000) * 7).to_string();
        let t = Instant::now();
        let s = call(
            &app,
            "POST",
            "/v1/services/web/explain",
            json!({"tenant": tenant}),
        )
        .await;
        explain.push(t.elapsed());
        assert_eq!(s, StatusCode::OK);
    }
    let mut flips = Vec::new();
    for i in 0..60 {
        let state = if i % 2 == 0 { "R" } else { "Y" };
        let t = Instant::now();
        let s = call(
            &app,
            "PUT",
            "/v1/services/web/clusters/A/state",
            json!({"state": state}),
        )
        .await;
        flips.push(t.elapsed());
        assert_eq!(s, StatusCode::OK);
    }
    println!(
        "control plane: 1,000,000 ids uploaded in one call (durable) = {:.0} ms",
        upload.as_secs_f64() * 1e3
    );
    println!(
        "control plane: explain with 1,000,000 ids, through the router [goal < 1 ms] = p50 {:.3} ms, p99 {:.3} ms",
        pct(&mut explain, 0.5).as_secs_f64() * 1e3,
        pct(&mut explain, 0.99).as_secs_f64() * 1e3
    );
    println!(
        "control plane: state flip with 1,000,000 ids in place, acknowledged durable [goal < 10 ms] = p50 {:.2} ms, p99 {:.2} ms",
        pct(&mut flips, 0.5).as_secs_f64() * 1e3,
        pct(&mut flips, 0.99).as_secs_f64() * 1e3
    );
    stop.cancel();
}

/// The daemon's own figures from /proc/<pid>: CPU seconds (user + system) and RSS / peak
/// RSS in MiB.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// A tiny deterministic generator (reproducible runs, no dependency).
fn next(seed: &mut u64) -> u64 {
    *seed = seed
        .wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1_442_695_040_888_963_407);
    *seed >> 33
}

/// `graylane serve` as a child process; SIGKILLed and reaped on drop.
struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One simulated filter: long-polls its service's feed exactly as the filter does (what it
/// holds, `wait_ms`, `preview=0`), takes each 200's version (the body parsed as the filter
/// parses it) and polls again at once; says what it took on `took`.
async fn follow(
    http: reqwest::Client,
    base: String,
    service: String,
    filter: usize,
    took: mpsc::UnboundedSender<(usize, u64, Instant)>,
) {
    use graylane_strategy::feed::{Query, Reply};
    let node = format!("bench-node-{filter:04}");
    let mut q = Query {
        wait_ms: 20_000,
        preview: Some(0),
        ..Query::default()
    };
    loop {
        let resp = http
            .get(format!("{base}{}", q.path(&service)))
            .header("x-graylane-node", &node)
            .send()
            .await;
        let Ok(resp) = resp else {
            return; // the daemon is gone: the bench is over
        };
        if resp.status() != StatusCode::OK.as_u16() {
            let _ = resp.bytes().await;
            continue;
        }
        let Ok(body) = resp.bytes().await else {
            return;
        };
        let reply: Reply<Box<serde_json::value::RawValue>> = serde_json::from_slice(&body).unwrap();
        let at = Instant::now();
        q.epoch = reply.epoch;
        q.version = reply.version;
        q.health = reply.health;
        if took.send((filter, reply.version, at)).is_err() {
            return;
        }
    }
}

const SERVICES: usize = 100;
const IDS: u64 = 100_000;
const PER_SERVICE: usize = 10;
const FLIPS: usize = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: make bench"]
async fn bench_control_plane_at_scale() {
    use graylane_control_plane::api::types::WhitelistChange;
    use graylane_control_plane::client::Client;
    use graylane_strategy::id::IdList;
    use graylane_strategy::State;

    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let names: Vec<String> = (0..SERVICES).map(|i| format!("svc-{i:03}")).collect();
    let mut yaml = format!(
        "listen: 127.0.0.1:{port}\ndata_dir: data\n\
         tokens: [{{name: ops, token: writer-token-1, role: write}}]\nservices:\n"
    );
    for n in &names {
        yaml.push_str(&format!(
            "  {n}:\n    route-strategy:\n      A: {{status: Y, id: {{ids: [1]}}}}\n      \
             B: {{status: G, id: {{all: true}}}}\n"
        ));
    }
    let config = dir.path().join("graylane.yaml");
    std::fs::write(&config, yaml).unwrap();
    let log = std::fs::File::create(dir.path().join("graylane.log")).unwrap();
    // GRAYLANE_BIN: another build of the daemon, to compare two against the same clients.
    let bin =
        std::env::var("GRAYLANE_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_graylane").into());
    let child = std::process::Command::new(bin)
        .args(["serve", "--config"])
        .arg(&config)
        .current_dir(dir.path())
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let pid = child.id();
    let _daemon = Daemon(child);
    let base = format!("http://127.0.0.1:{port}");
    let api = Client::new(&base, Some("writer-token-1".into())).unwrap();
    let up = Instant::now();
    while api.status().await.is_err() {
        assert!(
            up.elapsed() < Duration::from_secs(30),
            "graylane serve did not come up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // 100 services x 100,000 ids, through the bulk whitelist API (each call durable).
    let cpu0 = cpu_seconds(pid);
    let t = Instant::now();
    let mut loaded = 0;
    for (i, n) in names.iter().enumerate() {
        let first = 20_000_000 + i as u64 * 10_000_000;
        let change = WhitelistChange {
            ids: IdList {
                nums: (0..IDS).map(|k| first + k * 7).collect(),
                strs: Vec::new(),
            },
            intervals: Vec::new(),
            all: None,
        };
        loaded = api.whitelist(n, "A", true, &change).await.unwrap().version;
    }
    let load = t.elapsed();
    let load_cpu = cpu_seconds(pid) - cpu0;
    let rss_loaded = mib(pid, "VmRSS:");

    // The same flips with nobody following: what the acknowledgement costs by itself.
    let mut seed = 0x0ff_u64;
    let mut state = [State::Y; SERVICES];
    let mut alone = Vec::new();
    for _ in 0..FLIPS {
        let s = (next(&mut seed) % SERVICES as u64) as usize;
        state[s] = if state[s] == State::Y {
            State::R
        } else {
            State::Y
        };
        let sent = Instant::now();
        api.set_state(&names[s], "A", state[s]).await.unwrap();
        alone.push(sent.elapsed());
        tokio::time::sleep(Duration::from_millis(20 + next(&mut seed) % 80)).await;
    }

    // 1,000 filters, 10 per service, each on its own connection.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let (took_tx, mut took) = mpsc::unbounded_channel();
    let cpu0 = cpu_seconds(pid);
    let t = Instant::now();
    for f in 0..SERVICES * PER_SERVICE {
        tokio::spawn(follow(
            http.clone(),
            base.clone(),
            names[f / PER_SERVICE].clone(),
            f,
            took_tx.clone(),
        ));
    }
    drop(took_tx);
    let mut held = vec![0u64; SERVICES * PER_SERVICE];
    let mut holding = 0;
    while holding < held.len() {
        let (f, v, _) = took.recv().await.unwrap();
        if held[f] == 0 {
            holding += 1;
        }
        held[f] = v;
    }
    let first_fetch = t.elapsed();
    let first_cpu = cpu_seconds(pid) - cpu0;
    let rss_following = mib(pid, "VmRSS:");
    assert!(held.iter().all(|&v| v >= 1) && loaded > 0);

    // Quiet: 1,000 long-polls waiting.
    let cpu0 = cpu_seconds(pid);
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_cpu = (cpu_seconds(pid) - cpu0) / t.elapsed().as_secs_f64();

    // State flips on random services, one at a time; each waits for the service's 10 filters.
    let mut seed = 0x5ca1e_u64;
    let mut acks = Vec::new();
    let mut reach = Vec::new(); // (flip, filter) from the PUT sent
    let mut reach_after_ack = Vec::new();
    let mut last_of_ten = Vec::new();
    let cpu0 = cpu_seconds(pid);
    let t = Instant::now();
    for _ in 0..FLIPS {
        let s = (next(&mut seed) % SERVICES as u64) as usize;
        state[s] = if state[s] == State::Y {
            State::R
        } else {
            State::Y
        };
        let sent = Instant::now();
        let w = api.set_state(&names[s], "A", state[s]).await.unwrap();
        let acked = Instant::now();
        acks.push(acked - sent);
        let mine = s * PER_SERVICE..(s + 1) * PER_SERVICE;
        let mut last = sent;
        while mine.clone().any(|f| held[f] < w.version) {
            let (f, v, at) = tokio::time::timeout(Duration::from_secs(10), took.recv())
                .await
                .expect("a filter did not get the flip within 10 s")
                .unwrap();
            if mine.contains(&f) && v >= w.version && held[f] < w.version {
                reach.push(at - sent);
                reach_after_ack.push(at.saturating_duration_since(acked));
                last = last.max(at);
            }
            held[f] = held[f].max(v);
        }
        last_of_ten.push(last - sent);
        tokio::time::sleep(Duration::from_millis(20 + next(&mut seed) % 80)).await;
    }
    let flip_cpu = (cpu_seconds(pid) - cpu0) / t.elapsed().as_secs_f64();
    let rss_end = mib(pid, "VmRSS:");
    let rss_peak = mib(pid, "VmHWM:");
    let ms = |d: Duration| d.as_secs_f64() * 1e3;

    println!(
        "control plane: at scale, 100 services x 100,000 ids loaded through the whitelist API (100 calls, each durable) = {:.1} s, daemon CPU {:.1} s",
        load.as_secs_f64(),
        load_cpu
    );
    println!(
        "control plane: at scale, 1,000 filters (10 per service) fetching their first strategy (100,000 ids each) = all in {:.1} s, daemon CPU {:.1} s",
        first_fetch.as_secs_f64(),
        first_cpu
    );
    println!(
        "control plane: at scale, state flip acknowledged durable, 1,000 filters long-polling [goal p99 < 10 ms] = p50 {:.2} ms, p99 {:.2} ms",
        ms(pct(&mut acks, 0.5)),
        ms(pct(&mut acks, 0.99))
    );
    println!(
        "control plane: at scale, the same flips with no filter following = p50 {:.2} ms, p99 {:.2} ms",
        ms(pct(&mut alone, 0.5)),
        ms(pct(&mut alone, 0.99))
    );
    println!(
        "control plane: at scale, flip sent -> each of the service's 10 filters holding it, {FLIPS} flips [goal p99 < 100 ms] = p50 {:.2} ms, p99 {:.2} ms; the last of the 10: p50 {:.2} ms, p99 {:.2} ms; after the acknowledgement: p50 {:.2} ms, p99 {:.2} ms",
        ms(pct(&mut reach, 0.5)),
        ms(pct(&mut reach, 0.99)),
        ms(pct(&mut last_of_ten, 0.5)),
        ms(pct(&mut last_of_ten, 0.99)),
        ms(pct(&mut reach_after_ack, 0.5)),
        ms(pct(&mut reach_after_ack, 0.99))
    );
    println!(
        "control plane: at scale, daemon RSS (graylane serve, its own process): loaded / 1,000 filters following / after the flips / peak = {rss_loaded:.0} / {rss_following:.0} / {rss_end:.0} / {rss_peak:.0} MiB"
    );
    println!(
        "control plane: at scale, daemon CPU with 1,000 long-polls: quiet / during the flips = {:.1} % / {:.1} % of a core",
        idle_cpu * 100.0,
        flip_cpu * 100.0
    );
}
