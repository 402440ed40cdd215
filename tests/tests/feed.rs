//! The filter's live feed, against a scripted feed server: one worker polls, every worker
//! installs each new version once (shared data), an invalid or failed fetch keeps the last
//! good snapshot and routing never stops. The real control plane's feed is tested in
//! `live.rs`; this scripted server exists to produce answers the real one never would
//! (invalid strategies, garbage, outages on demand).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use graylane_e2e::{count_by_body, wait_until, Envoy, EnvoyConfig, Upstream};
use serde_json::{json, Value};

#[derive(Clone)]
struct Script {
    version: u64,
    health: u64,
    strategy: Value,
    healthy: Value,
    /// Answer with this raw body instead (garbage).
    raw: Option<String>,
}

struct FeedServer {
    port: u16,
    script: Arc<Mutex<Script>>,
    down: Arc<AtomicBool>,
    requests: Arc<AtomicU64>,
    full_bodies: Arc<AtomicU64>,
}

impl FeedServer {
    fn start(script: Script) -> FeedServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let script = Arc::new(Mutex::new(script));
        let down = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicU64::new(0));
        let full_bodies = Arc::new(AtomicU64::new(0));
        let (s, d, r, f) = (
            script.clone(),
            down.clone(),
            requests.clone(),
            full_bodies.clone(),
        );
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (s, d, r, f) = (s.clone(), d.clone(), r.clone(), f.clone());
                std::thread::spawn(move || serve(conn, &s, &d, &r, &f));
            }
        });
        FeedServer {
            port,
            script,
            down,
            requests,
            full_bodies,
        }
    }

    fn set(&self, f: impl FnOnce(&mut Script)) {
        f(&mut self.script.lock().unwrap());
    }
}

fn query(path: &str, key: &str) -> Option<u64> {
    let q = path.split_once('?')?.1;
    q.split('&')
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
}

fn serve(
    conn: TcpStream,
    script: &Mutex<Script>,
    down: &AtomicBool,
    requests: &AtomicU64,
    full: &AtomicU64,
) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut out = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                break;
            }
        }
        requests.fetch_add(1, Ordering::SeqCst);
        if down.load(Ordering::SeqCst) {
            let _ =
                out.write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\ndown");
            continue;
        }
        let (have_v, have_h) = (query(&path, "version"), query(&path, "health"));
        // Long-poll, briefly: hold while nothing is new.
        let mut waited = 0;
        let snap = loop {
            let s = script.lock().unwrap().clone();
            let current = have_v == Some(s.version) && have_h == Some(s.health);
            if !current || waited >= 300 || s.raw.is_some() {
                break s;
            }
            std::thread::sleep(Duration::from_millis(20));
            waited += 20;
        };
        let resp = if let Some(raw) = &snap.raw {
            format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{raw}",
                raw.len()
            )
        } else if have_v == Some(snap.version) && have_h == Some(snap.health) {
            "HTTP/1.1 304 Not Modified\r\n\r\n".to_string()
        } else {
            let strategy = if have_v == Some(snap.version) {
                Value::Null
            } else {
                full.fetch_add(1, Ordering::SeqCst);
                snap.strategy.clone()
            };
            let body = json!({"service": "web", "version": snap.version, "health": snap.health,
                "strategy": strategy, "healthy": snap.healthy})
            .to_string();
            format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len())
        };
        if out.write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}

fn strategy(gray_ids: &[u64]) -> Value {
    json!({"route-strategy": {
        "A": {"status": "Y", "id": {"ids": gray_ids}},
        "B": {"status": "G", "id": {"all": true}}}})
}

const WORKERS: u32 = 2;

fn start(feed: &FeedServer, a: &Upstream, b: &Upstream) -> Envoy {
    let plugin = json!({"service": "web", "strategy": strategy(&[]),
        // This scripted server answers the feed only: no traffic reports.
        "control_plane": {"cluster": "graylane_cp", "wait_ms": 300, "tick_ms": 50, "report_ms": 0}});
    let cfg = EnvoyConfig::new()
        .graylane(&plugin)
        .fallback("B")
        .cluster("A", a.port())
        .cluster("B", b.port())
        .cluster("graylane_cp", feed.port)
        .render();
    Envoy::start(&cfg, WORKERS).unwrap()
}

/// Many requests for `tenant`, so that every worker serves some: the body they all got.
fn all_go_to(envoy: &Envoy, tenant: &str) -> Option<String> {
    let counts = count_by_body(envoy.port("ingress"), "/", &[("x-tenant-id", tenant)], 64);
    (counts.len() == 1).then(|| counts.into_keys().next().unwrap())
}

fn stat(envoy: &Envoy, name: &str) -> u64 {
    envoy
        .stat(&format!("wasmcustom.graylane.web.{name}"))
        .unwrap_or(0)
}

#[test]
fn live_updates_reach_every_worker_and_failures_keep_the_last_snapshot() {
    let (a, b) = (Upstream::start("A"), Upstream::start("B"));
    let feed = FeedServer::start(Script {
        version: 1,
        health: 1,
        strategy: strategy(&[7]),
        healthy: json!({}),
        raw: None,
    });
    let envoy = start(&feed, &a, &b);
    let long = Duration::from_secs(20);
    wait_until("version 1 routes tenant 7 to A", long, || {
        all_go_to(&envoy, "7").as_deref() == Some("A")
    });
    // Every VM (one per worker, and Envoy's main-thread VM) installed version 1 once, and
    // only one full body was fetched for all of them.
    let mut vms = 0;
    wait_until("every VM installed v1", long, || {
        let n = stat(&envoy, "snapshot_installed");
        let settled = n == vms && n > u64::from(WORKERS);
        vms = n;
        std::thread::sleep(Duration::from_millis(200));
        settled
    });
    assert!(
        vms <= u64::from(WORKERS) + 1,
        "{vms} installs for {WORKERS} workers"
    );
    assert_eq!(
        feed.full_bodies.load(Ordering::SeqCst),
        1,
        "one fetch shared by all workers"
    );

    // Version 2 moves tenant 8 to A.
    feed.set(|s| {
        s.version = 2;
        s.strategy = strategy(&[8]);
    });
    wait_until("version 2 reaches every worker", long, || {
        all_go_to(&envoy, "8").as_deref() == Some("A")
            && all_go_to(&envoy, "7").as_deref() == Some("B")
    });
    assert_eq!(feed.full_bodies.load(Ordering::SeqCst), 2);
    wait_until("every VM installed v2, once", long, || {
        stat(&envoy, "snapshot_installed") == 2 * vms
    });

    // Health-only change: A has no healthy endpoint -> tenant 8 falls back to B; no strategy resent.
    feed.set(|s| {
        s.health = 2;
        s.healthy = json!({"A": 0});
    });
    wait_until("health reaches every worker", long, || {
        all_go_to(&envoy, "8").as_deref() == Some("B")
    });
    assert_eq!(
        feed.full_bodies.load(Ordering::SeqCst),
        2,
        "unchanged strategy never resent"
    );

    // An invalid strategy: rejected, counted, routing unchanged.
    feed.set(|s| {
        s.version = 3;
        s.health = 3;
        s.healthy = json!({});
        s.strategy = json!({"route-strategy": {"A": {"status": "X"}}});
    });
    wait_until("invalid feed counted", long, || {
        stat(&envoy, "feed_invalid") >= 1
    });
    assert_eq!(all_go_to(&envoy, "8").as_deref(), Some("B"));
    assert_eq!(all_go_to(&envoy, "1").as_deref(), Some("B"));

    // Garbage body: same.
    feed.set(|s| s.raw = Some("{not json".into()));
    let before = stat(&envoy, "feed_invalid");
    wait_until("garbage counted", long, || {
        stat(&envoy, "feed_invalid") > before
    });
    assert_eq!(all_go_to(&envoy, "8").as_deref(), Some("B"));

    // The feed down: routing goes on by the last good snapshot; failures counted.
    feed.set(|s| s.raw = None);
    feed.down.store(true, Ordering::SeqCst);
    let before = stat(&envoy, "feed_failed");
    wait_until("outage counted", long, || {
        stat(&envoy, "feed_failed") > before
    });
    assert_eq!(all_go_to(&envoy, "8").as_deref(), Some("B"));

    // Back, with a valid version 4: updates resume.
    feed.set(|s| {
        s.version = 4;
        s.health = 4;
        s.strategy = strategy(&[9]);
    });
    feed.down.store(false, Ordering::SeqCst);
    wait_until("updates resume after the outage", long, || {
        all_go_to(&envoy, "9").as_deref() == Some("A")
    });
    assert!(feed.requests.load(Ordering::SeqCst) > 0);
}
