//! The library's feed thread against a scripted feed server (answers the real control plane
//! never gives: invalid strategies, garbage, another service, outages), natively: what a
//! worker holds after each answer, through the same calls nginx's Lua side makes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use graylane_nginx::{Config, Outcome, Router};
use serde_json::{json, Value};

/// What the scripted feed answers: the current versions and body, or a raw body, or 503.
#[derive(Clone)]
struct Script {
    version: u64,
    health: u64,
    body: Value,
    raw: Option<String>,
}

struct Feed {
    port: u16,
    script: Arc<Mutex<Script>>,
    down: Arc<AtomicBool>,
    requests: Arc<AtomicU64>,
    /// The last request's path and headers.
    last_query: Arc<Mutex<String>>,
}

impl Feed {
    fn start(script: Script) -> Feed {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let feed = Feed {
            port,
            script: Arc::new(Mutex::new(script)),
            down: Arc::new(AtomicBool::new(false)),
            requests: Arc::new(AtomicU64::new(0)),
            last_query: Arc::new(Mutex::new(String::new())),
        };
        let (s, d, r, q) = (
            feed.script.clone(),
            feed.down.clone(),
            feed.requests.clone(),
            feed.last_query.clone(),
        );
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (s, d, r, q) = (s.clone(), d.clone(), r.clone(), q.clone());
                std::thread::spawn(move || serve(conn, &s, &d, &r, &q));
            }
        });
        feed
    }

    fn set(&self, f: impl FnOnce(&mut Script)) {
        f(&mut self.script.lock().unwrap());
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
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
    last: &Mutex<String>,
) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut out = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
        let mut seen = path.clone();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                break;
            }
            seen.push('\n');
            seen.push_str(h.trim_end());
        }
        requests.fetch_add(1, Ordering::SeqCst);
        *last.lock().unwrap() = seen;
        if down.load(Ordering::SeqCst) {
            let _ =
                out.write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\ndown");
            continue;
        }
        let (v, h) = (query(&path, "version"), query(&path, "health"));
        let mut waited = 0;
        let snap = loop {
            let s = script.lock().unwrap().clone();
            let current = v == Some(s.version) && h == Some(s.health);
            if !current || waited >= 200 || s.raw.is_some() {
                break s;
            }
            std::thread::sleep(Duration::from_millis(10));
            waited += 10;
        };
        let resp = if let Some(raw) = &snap.raw {
            format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{raw}",
                raw.len()
            )
        } else if v == Some(snap.version) && h == Some(snap.health) {
            "HTTP/1.1 304 Not Modified\r\ncontent-length: 0\r\n\r\n".to_string()
        } else {
            let body = snap.body.to_string();
            format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
        };
        if out.write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}

fn strategy(a_status: &str) -> Value {
    json!({"route-strategy": {
        "A": {"status": a_status, "id": {"ids": [1, 2, 3]}},
        "B": {"status": "G", "id": {"all": true}}}})
}

fn reply(version: u64, health: u64, strategy: Option<Value>, extra: Value) -> Value {
    let mut r = json!({"service": "web", "version": version, "health": health,
        "strategy": strategy, "healthy": {"A": null, "B": null}});
    for (k, v) in extra.as_object().cloned().unwrap_or_default() {
        r[k] = v;
    }
    r
}

fn open(feed: &Feed, extra: Value) -> Arc<Router> {
    let mut cfg = json!({"service": "web", "drain_ms": 300,
        "control_plane": {"url": feed.url(), "wait_ms": 1000},
        "endpoints": {"A": ["127.0.0.1:1001"], "B": ["127.0.0.1:1002"]}});
    for (k, v) in extra.as_object().cloned().unwrap_or_default() {
        cfg[k] = v;
    }
    Router::open(Config::parse(cfg.to_string().as_bytes()).unwrap()).unwrap()
}

fn wait(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The cluster key tenant `t` is routed to, as the Lua side would ask.
fn route(r: &Router, tenant: &str) -> Option<String> {
    let snap = r.current();
    let c = snap.compiled.as_deref()?;
    let values: Vec<Option<&[u8]>> = c
        .needed_headers()
        .iter()
        .map(|h| (h == "x-tenant-id").then_some(tenant.as_bytes()))
        .collect();
    match r.decide(snap.generation, &values) {
        Outcome::Decided { cluster, .. } => cluster.map(|i| c.clusters()[i].key.clone()),
        other => panic!("{other:?}"),
    }
}

fn peer(r: &Router, key: &str) -> Option<SocketAddr> {
    r.peer(key.as_bytes(), 0).map(|(a, _)| a)
}

fn status(r: &Router) -> Value {
    serde_json::from_str(&r.status()).unwrap()
}

#[test]
fn strategy_health_and_endpoints_follow_the_feed_and_bad_answers_change_nothing() {
    let feed = Feed::start(Script {
        version: 1,
        health: 1,
        body: reply(1, 1, Some(strategy("Y")), json!({})),
        raw: None,
    });
    let r = open(&feed, json!({}));
    wait("version 1 installed", || r.current().version == 1);
    let g1 = r.generation();
    assert_eq!(route(&r, "2").as_deref(), Some("A"));
    assert!(feed.last_query.lock().unwrap().contains("endpoints=true"));
    // No endpoints in the answer: the configuration's.
    assert_eq!(peer(&r, "A"), Some("127.0.0.1:1001".parse().unwrap()));

    // A new strategy: a new generation (the Lua side describes again).
    feed.set(|s| {
        s.version = 2;
        s.body = reply(2, 1, Some(strategy("R")), json!({}));
    });
    wait("version 2", || r.current().version == 2);
    assert_ne!(r.generation(), g1);
    assert_eq!(route(&r, "2").as_deref(), Some("B"));
    // A decision asked with the old generation is refused as stale, not guessed.
    assert_eq!(r.decide(g1, &[Some(b"2")]), Outcome::Stale);

    // Health only (strategy null) with endpoints: A has none healthy, its tenants go to B;
    // the feed's endpoints replace the configuration's; the generation moves (the Lua side's
    // balancer reads the endpoints from the description).
    feed.set(|s| {
        s.version = 3;
        s.body = reply(3, 1, Some(strategy("Y")), json!({}));
    });
    wait("version 3", || r.current().version == 3);
    let g3 = r.generation();
    feed.set(|s| {
        s.health = 2;
        s.body = reply(
            3,
            2,
            None,
            json!({"healthy": {"A": 0, "B": 2},
                   "endpoints": {"A": [], "B": [{"address": "10.0.0.7", "port": 8080}, {"address": "10.0.0.8", "port": 8080}]}}),
        );
    });
    wait("health 2", || r.current().health == 2);
    let g4 = r.generation();
    assert_ne!(g4, g3);
    let described = r.current().describe().to_string();
    let peers: Vec<&str> = described
        .lines()
        .filter(|l| l.starts_with("peer "))
        .collect();
    assert_eq!(
        peers,
        ["peer B 10.0.0.7 8080", "peer B 10.0.0.8 8080"],
        "{described}"
    );
    assert_eq!(route(&r, "2").as_deref(), Some("B"));
    // A request decided for A just before still finds A's last endpoint while it drains.
    let drained_at = Instant::now();
    assert_eq!(peer(&r, "A"), Some("127.0.0.1:1001".parse().unwrap()));
    wait("A's drain window ends", || peer(&r, "A").is_none());
    assert!(drained_at.elapsed() < Duration::from_secs(5));
    assert_eq!(r.peer(b"B", 1), Some(("10.0.0.8:8080".parse().unwrap(), 2)));
    assert_eq!(
        r.peer(b"B", 2).map(|p| p.0),
        Some("10.0.0.7:8080".parse().unwrap())
    );

    // Health again without endpoints: the last endpoints the feed gave stay.
    feed.set(|s| {
        s.health = 3;
        s.body = reply(3, 3, None, json!({"healthy": {"A": 1, "B": 2}}));
    });
    wait("health 3", || r.current().health == 3);
    assert_eq!(r.generation(), g4);
    assert_eq!(route(&r, "2").as_deref(), Some("A"));
    assert_eq!(r.peer(b"B", 0).map(|p| p.1), Some(2));

    // Answers that cannot be used: each leaves version 3 / health 3 in force.
    let bad: Vec<(&str, String)> = vec![
        (
            "an invalid strategy",
            reply(
                4,
                3,
                Some(json!({"route-strategy": {"A": {"status": "X"}}})),
                json!({}),
            )
            .to_string(),
        ),
        ("garbage", "{not json".to_string()),
        (
            "another service",
            json!({"service": "api", "version": 5, "health": 1, "strategy": strategy("R")})
                .to_string(),
        ),
        (
            "health for a version not held",
            reply(9, 9, None, json!({})).to_string(),
        ),
    ];
    for (what, body) in bad {
        let before = status(&r)["feed"]["failed"].as_u64().unwrap();
        feed.set(|s| s.raw = Some(body));
        wait(what, || {
            status(&r)["feed"]["failed"].as_u64().unwrap() > before
        });
        assert_eq!((r.current().version, r.current().health), (3, 3), "{what}");
        assert_eq!(route(&r, "2").as_deref(), Some("A"), "{what}");
        feed.set(|s| s.raw = None);
    }
    let last = status(&r)["feed"]["last_error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!last.is_empty());

    // The control plane goes away: the last snapshot stays; back, updates resume.
    feed.down.store(true, Ordering::SeqCst);
    let n = feed.requests.load(Ordering::SeqCst);
    wait("a failed poll", || {
        feed.requests.load(Ordering::SeqCst) > n + 1
    });
    assert_eq!(route(&r, "2").as_deref(), Some("A"));
    assert_eq!(r.peer(b"B", 0).map(|p| p.1), Some(2));
    feed.set(|s| {
        s.version = 5;
        s.body = reply(5, 3, Some(strategy("R")), json!({}));
    });
    feed.down.store(false, Ordering::SeqCst);
    wait("version 5 after the outage", || r.current().version == 5);
    assert_eq!(route(&r, "2").as_deref(), Some("B"));
    // The next poll says what the worker holds now.
    wait("a poll for what follows version 5", || {
        feed.last_query
            .lock()
            .unwrap()
            .contains("epoch=0&version=5&health=3")
    });

    // A control plane that lost its data (another epoch) starts again at version 1: taken.
    feed.set(|s| {
        s.version = 1;
        s.health = 1;
        s.body = reply(1, 1, Some(strategy("Y")), json!({"epoch": 42}));
    });
    wait("epoch 42", || r.current().epoch == 42);
    assert_eq!(r.current().version, 1);
    assert_eq!(route(&r, "2").as_deref(), Some("A"));
    r.close();
}

#[test]
fn invalid_strategy_error_names_the_field() {
    let feed = Feed::start(Script {
        version: 1,
        health: 1,
        body: reply(
            1,
            1,
            Some(json!({"route-strategy": {"A": {"status": "G", "weight": 0}}})),
            json!({}),
        ),
        raw: None,
    });
    let r = open(&feed, json!({"strategy": strategy("Y")}));
    wait("a failed answer", || {
        status(&r)["feed"]["failed"].as_u64().unwrap() > 0
    });
    let e = status(&r)["feed"]["last_error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(e.contains("route-strategy.A.weight"), "{e}");
    // The configuration's strategy stays in force.
    assert_eq!(route(&r, "2").as_deref(), Some("A"));
    assert_eq!(r.current().version, 0);
    r.close();
}

#[test]
fn a_strategy_over_the_size_limits_is_refused_naming_the_field() {
    // The feed sends 3 ids; this nginx allows 2: refused, the configuration's strategy stays.
    let feed = Feed::start(Script {
        version: 1,
        health: 1,
        body: reply(1, 1, Some(strategy("Y")), json!({})),
        raw: None,
    });
    let mine = json!({"route-strategy": {"A": {"status": "Y", "id": {"ids": [2]}},
        "B": {"status": "G", "id": {"all": true}}}});
    let r = open(&feed, json!({"strategy": mine, "limits": {"ids": 2}}));
    wait("a failed answer", || {
        status(&r)["feed"]["failed"].as_u64().unwrap() > 0
    });
    let e = status(&r)["feed"]["last_error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        e.contains("route-strategy.A.id.ids: the service has 3 ids here, more than the limit of 2 (limits.ids)"),
        "{e}"
    );
    assert_eq!(r.current().version, 0);
    assert_eq!(route(&r, "1").as_deref(), Some("B"));
    r.close();
    // Its own configuration is held to them too.
    let cfg = json!({"service": "web", "strategy": strategy("Y"), "limits": {"ids": 2}});
    assert!(Config::parse(cfg.to_string().as_bytes()).is_err());
}

#[test]
fn the_token_is_sent_and_never_shown() {
    let feed = Feed::start(Script {
        version: 1,
        health: 1,
        body: reply(1, 1, Some(strategy("Y")), json!({})),
        raw: None,
    });
    let mut cfg = json!({"service": "web", "control_plane": {"url": feed.url(), "token": "t0ps3cret", "wait_ms": 500}});
    cfg["strategy"] = strategy("G");
    let r = Router::open(Config::parse(cfg.to_string().as_bytes()).unwrap()).unwrap();
    wait("version 1", || r.current().version == 1);
    let seen = feed.last_query.lock().unwrap().to_ascii_lowercase();
    assert!(seen.contains("\nauthorization: bearer t0ps3cret"), "{seen}");
    assert!(!r.status().contains("t0ps3cret"));
    assert!(!format!("{r:?}").contains("t0ps3cret"));
    r.close();
}
