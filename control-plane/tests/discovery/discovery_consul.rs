//! The Consul source against a FAKE Consul.
//!
//! No Consul binary can run in this project's CI, so these tests talk to an axum app on
//! 127.0.0.1:0 that imitates the parts of Consul's HTTP API graylane uses, as documented:
//! `GET /v1/health/service/<name>` with blocking queries (`index`, `wait`) that hold until the
//! index passes the client's or `wait` expires (then answer with the same index), an
//! `X-Consul-Index` header, entries shaped like the documented sample response
//! (tests/fixtures/consul_health_service.json), and plain-text bodies on 403/429/500. It can
//! also move the index backwards (a snapshot restore) and answer index 0. It is a fake: it does
//! not add Consul's wait/16 jitter, has one global index, and knows nothing of ACL rules.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::ListenerExt;
use axum::Router;
use graylane_control_plane::discovery::consul::{BackoffConfig, RateLimit};
use graylane_control_plane::discovery::{
    run_consul, ConsulConfig, ConsulService, Endpoint, Event, HumanDuration, SourceKind,
};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// One request as the fake saw it.
#[derive(Debug, Clone)]
struct Seen {
    service: String,
    query: HashMap<String, String>,
    token: Option<String>,
    at: Instant,
    /// The status it was answered with when it was one of the queued failures.
    failed: Option<u16>,
}

#[derive(Default)]
struct FakeState {
    index: u64,
    services: BTreeMap<String, Vec<Value>>,
    /// Answers to give instead of the normal one, in order: status + plain-text body.
    failures: VecDeque<(StatusCode, String)>,
    /// Overrides the X-Consul-Index header of the next answers.
    index_override: Option<u64>,
    /// Every answer bumps the index first (a registry that never settles).
    churn: bool,
    /// Index per service (what modern Consul answers for /v1/health/service: a write to one
    /// service does not wake the queries of another) instead of one global index.
    per_service: bool,
    modified: BTreeMap<String, u64>,
    seen: Vec<Seen>,
}

impl FakeState {
    fn index_of(&self, service: &str) -> u64 {
        if self.per_service {
            self.modified.get(service).copied().unwrap_or(self.index)
        } else {
            self.index
        }
    }
}

pub(crate) struct FakeConsul {
    state: Mutex<FakeState>,
    /// Bumped on every change of state; blocked queries wake on it.
    changed: watch::Sender<u64>,
    /// Number of requests seen.
    requests: watch::Sender<usize>,
}

impl FakeConsul {
    pub(crate) async fn start() -> (Arc<FakeConsul>, String) {
        let fake = Arc::new(FakeConsul {
            state: Mutex::new(FakeState {
                index: 10,
                ..FakeState::default()
            }),
            changed: watch::channel(0).0,
            requests: watch::channel(0).0,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        fake.serve(listener, CancellationToken::new());
        (fake, format!("http://{addr}"))
    }

    /// Serves on `listener` until `stop` (then open connections are closed too).
    fn serve(self: &Arc<Self>, listener: tokio::net::TcpListener, stop: CancellationToken) {
        let app = Router::new()
            .route("/v1/health/service/{name}", get(health))
            .with_state(self.clone());
        // Like Go's net/http (Consul), no Nagle delay.
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
        });
    }

    fn mutate(&self, f: impl FnOnce(&mut FakeState)) {
        f(&mut self.state.lock().unwrap());
        self.changed.send_modify(|g| *g += 1);
    }

    /// Registers or replaces a service's instances (a Raft write: the index moves on).
    pub(crate) fn set_service(&self, name: &str, entries: Vec<Value>) {
        self.mutate(|s| {
            s.index += 1;
            let index = s.index;
            s.modified.insert(name.into(), index);
            s.services.insert(name.into(), entries);
        });
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    /// Waits until at least `n` requests arrived in total.
    async fn wait_requests(&self, n: usize) {
        let mut rx = self.requests.subscribe();
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|c| *c >= n))
            .await
            .unwrap_or_else(|_| panic!("fewer than {n} requests within 10s"))
            .unwrap();
    }

    fn request_count(&self) -> usize {
        *self.requests.borrow()
    }
}

/// Parses Consul's Go-style `wait` ("250ms", "30s", "5m"); default 5m as documented.
fn parse_wait(s: Option<&String>) -> Duration {
    let Some(s) = s else {
        return Duration::from_secs(300);
    };
    let (n, mul) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s.as_str(), 1.0)
    };
    Duration::from_secs_f64(n.parse::<f64>().unwrap() * mul).min(Duration::from_secs(600))
}

async fn health(
    State(fake): State<Arc<FakeConsul>>,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let client_index: u64 = query.get("index").map_or(0, |i| i.parse().unwrap());
    let wait = parse_wait(query.get("wait"));
    let mut changed = fake.changed.subscribe();
    {
        let mut s = fake.state.lock().unwrap();
        let failed = s.failures.front().map(|(st, _)| st.as_u16());
        s.seen.push(Seen {
            service: name.clone(),
            query: query.clone(),
            token: headers
                .get("x-consul-token")
                .map(|v| v.to_str().unwrap().to_owned()),
            at: Instant::now(),
            failed,
        });
        fake.requests.send_modify(|c| *c += 1);
        if let Some((status, body)) = s.failures.pop_front() {
            return (status, [("content-type", "text/plain")], body).into_response();
        }
        if s.churn {
            s.index += 1;
        }
    }
    // Blocking query: hold while the index has not passed the client's, up to `wait`.
    if client_index > 0 {
        let deadline = tokio::time::sleep(wait);
        tokio::pin!(deadline);
        loop {
            {
                let s = fake.state.lock().unwrap();
                if s.index_of(&name) != client_index || s.index_override.is_some() {
                    break;
                }
            }
            tokio::select! {
                () = &mut deadline => break,
                r = changed.changed() => if r.is_err() { break },
            }
        }
    }
    let s = fake.state.lock().unwrap();
    let index = s.index_override.unwrap_or(s.index_of(&name));
    let body = Value::Array(s.services.get(&name).cloned().unwrap_or_default());
    (
        StatusCode::OK,
        [
            ("content-type", "application/json".to_owned()),
            ("x-consul-index", index.to_string()),
        ],
        body.to_string(),
    )
        .into_response()
}

/// A `/v1/health/service` entry shaped like Consul's documented sample (node, service,
/// node check `serfHealth` and one service check).
pub(crate) fn instance(
    node_addr: &str,
    svc_addr: &str,
    port: u16,
    profile: &str,
    check: &str,
) -> Value {
    json!({
        "Node": {
            "ID": "40e4a748-2192-161a-0510-9bf59fe950b5",
            "Node": format!("node-{node_addr}"),
            "Address": node_addr,
            "Datacenter": "dc1",
            "TaggedAddresses": {"lan": node_addr, "wan": node_addr},
            "Meta": {"instance_type": "t2.medium"}
        },
        "Service": {
            "ID": format!("web-{node_addr}-{port}"),
            "Service": "web",
            "Tags": [profile],
            "Address": svc_addr,
            "Meta": {"profile": profile},
            "Port": port,
            "Weights": {"Passing": 10, "Warning": 1},
            "Namespace": "default"
        },
        "Checks": [
            {"Node": format!("node-{node_addr}"), "CheckID": "serfHealth", "Name": "Serf Health Status",
             "Status": "passing", "Notes": "", "Output": "", "ServiceID": "", "ServiceName": "",
             "ServiceTags": [], "Namespace": "default"},
            {"Node": format!("node-{node_addr}"), "CheckID": "service:web", "Name": "Service 'web' check",
             "Status": check, "Notes": "", "Output": "", "ServiceID": "web", "ServiceName": "web",
             "ServiceTags": [profile], "Namespace": "default"}
        ]
    })
}

fn ep(address: &str, port: u16) -> Endpoint {
    Endpoint {
        address: address.into(),
        port,
    }
}

fn config(address: &str) -> ConsulConfig {
    ConsulConfig {
        address: address.into(),
        wait: HumanDuration(Duration::from_secs(5)),
        rate: RateLimit {
            per_second: 100.0,
            burst: 100,
        },
        backoff: BackoffConfig {
            initial: HumanDuration(Duration::from_millis(100)),
            max: HumanDuration(Duration::from_secs(1)),
        },
        ..ConsulConfig::default()
    }
}

fn web_by_meta() -> Vec<(String, ConsulService)> {
    vec![(
        "web".into(),
        ConsulService {
            service: None,
            meta: Some("profile".into()),
            clusters: [("gray".into(), "A".into()), ("prod".into(), "B".into())].into(),
        },
    )]
}

struct Running {
    rx: mpsc::Receiver<Event>,
    /// `Synced` events seen (set aside by `next`).
    synced: usize,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    fn start(cfg: ConsulConfig, services: Vec<(String, ConsulService)>) -> Running {
        let (tx, rx) = mpsc::channel(64);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run_consul(cfg, services, tx, shutdown.clone()));
        Running {
            rx,
            synced: 0,
            shutdown,
            task,
        }
    }

    /// The next event other than `Synced` (counted in `synced`).
    async fn next(&mut self) -> Event {
        loop {
            let ev = tokio::time::timeout(Duration::from_secs(10), self.rx.recv())
                .await
                .expect("no event within 10s")
                .expect("channel closed");
            match ev {
                Event::Synced { .. } => self.synced += 1,
                other => return other,
            }
        }
    }

    async fn endpoints(&mut self) -> (String, Vec<Endpoint>) {
        match self.next().await {
            Event::Endpoints {
                source,
                service,
                cluster,
                endpoints,
            } => {
                assert_eq!(source, SourceKind::Consul);
                assert_eq!(service, "web");
                (cluster, endpoints)
            }
            other => panic!("expected endpoints, got {other:?}"),
        }
    }

    fn assert_quiet(&mut self) {
        while let Ok(ev) = self.rx.try_recv() {
            match ev {
                Event::Synced { .. } => self.synced += 1,
                other => panic!("unexpected event {other:?}"),
            }
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("run_consul did not stop on shutdown")
            .unwrap();
    }
}

#[tokio::test]
async fn registered_and_deregistered_instances_produce_events() {
    let (fake, addr) = FakeConsul::start().await;
    fake.set_service(
        "web",
        vec![
            instance("10.0.0.1", "", 8080, "gray", "passing"),
            instance("10.0.0.2", "172.17.0.2", 8080, "prod", "passing"),
        ],
    );
    let mut run = Running::start(config(&addr), web_by_meta());
    // Empty Service.Address means the node's address.
    assert_eq!(
        run.endpoints().await,
        ("A".into(), vec![ep("10.0.0.1", 8080)])
    );
    assert_eq!(
        run.endpoints().await,
        ("B".into(), vec![ep("172.17.0.2", 8080)])
    );

    // A second prod instance registers: only B changes.
    fake.set_service(
        "web",
        vec![
            instance("10.0.0.1", "", 8080, "gray", "passing"),
            instance("10.0.0.2", "172.17.0.2", 8080, "prod", "passing"),
            instance("10.0.0.3", "", 9090, "prod", "passing"),
        ],
    );
    assert_eq!(
        run.endpoints().await,
        (
            "B".into(),
            vec![ep("10.0.0.3", 9090), ep("172.17.0.2", 8080)]
        )
    );
    // The gray instance deregisters: A is legitimately empty (the registry says so).
    fake.set_service(
        "web",
        vec![
            instance("10.0.0.2", "172.17.0.2", 8080, "prod", "passing"),
            instance("10.0.0.3", "", 9090, "prod", "passing"),
        ],
    );
    assert_eq!(run.endpoints().await, ("A".into(), vec![]));
    // The source said once that it had synced (after its first answer), never again.
    assert_eq!(run.synced, 1);

    let seen = fake.seen();
    assert!(seen.iter().all(|s| s.service == "web"));
    // The first query does not block; the following ones do, with the last index and wait.
    assert!(!seen[0].query.contains_key("index"));
    assert_eq!(seen[1].query.get("index").map(String::as_str), Some("11"));
    assert_eq!(
        seen[1].query.get("wait").map(String::as_str),
        Some("5000ms")
    );
    run.stop().await;
}

#[tokio::test]
async fn discovery_run_starts_consul_and_reports_missing_sources() {
    use graylane_control_plane::discovery::{self, Mappings};
    let (fake, addr) = FakeConsul::start().await;
    fake.set_service("web", vec![instance("10.0.0.1", "", 80, "gray", "passing")]);
    let services = Mappings {
        consul: web_by_meta(),
        kube: Vec::new(),
    };
    let (tx, mut rx) = mpsc::channel(16);
    let shutdown = CancellationToken::new();
    let cfg = discovery::Config {
        consul: Some(config(&addr)),
        kubernetes: None,
    };
    let task = tokio::spawn(discovery::run(
        cfg,
        services.clone(),
        None,
        tx,
        shutdown.clone(),
    ));
    let ev = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap();
    assert!(
        matches!(&ev, Some(Event::Endpoints { cluster, endpoints, .. }) if cluster == "A" && endpoints.len() == 1),
        "{ev:?}"
    );
    shutdown.cancel();
    task.await.unwrap();
    // Services map Consul instances but no global `consul` block: reported, not silent.
    let (tx, mut rx) = mpsc::channel(16);
    discovery::run(
        discovery::Config::default(),
        services,
        None,
        tx,
        CancellationToken::new(),
    )
    .await;
    match rx.recv().await {
        Some(Event::Stale {
            source: SourceKind::Consul,
            stale: true,
            error: Some(e),
        }) => assert!(e.contains("discovery.consul"), "{e}"),
        other => panic!("expected stale, got {other:?}"),
    }
}

#[tokio::test]
async fn documented_sample_response_served_verbatim() {
    // Consul's documented sample answer of /v1/health/service/redis, unchanged.
    let (fake, addr) = FakeConsul::start().await;
    let sample: Vec<Value> =
        serde_json::from_str(include_str!("../fixtures/consul_health_service.json")).unwrap();
    fake.set_service("redis", sample);
    let services = vec![(
        "web".into(),
        ConsulService {
            service: Some("redis".into()),
            meta: None,
            clusters: [("primary".into(), "A".into())].into(),
        },
    )];
    let mut run = Running::start(config(&addr), services);
    assert_eq!(
        run.endpoints().await,
        ("A".into(), vec![ep("10.1.10.12", 8000)])
    );
    run.stop().await;
}

#[tokio::test]
async fn failing_checks_are_excluded() {
    let (fake, addr) = FakeConsul::start().await;
    fake.set_service(
        "web",
        vec![
            instance("10.0.0.1", "", 8080, "gray", "critical"),
            instance("10.0.0.2", "", 8080, "prod", "warning"),
            instance("10.0.0.3", "", 8080, "prod", "passing"),
        ],
    );
    let mut run = Running::start(config(&addr), web_by_meta());
    assert_eq!(run.endpoints().await, ("A".into(), vec![]));
    assert_eq!(
        run.endpoints().await,
        ("B".into(), vec![ep("10.0.0.3", 8080)])
    );
    // The gray check recovers.
    fake.set_service(
        "web",
        vec![
            instance("10.0.0.1", "", 8080, "gray", "passing"),
            instance("10.0.0.2", "", 8080, "prod", "warning"),
            instance("10.0.0.3", "", 8080, "prod", "passing"),
        ],
    );
    assert_eq!(
        run.endpoints().await,
        ("A".into(), vec![ep("10.0.0.1", 8080)])
    );
    run.stop().await;
}

#[tokio::test]
async fn unchanged_index_or_content_sends_nothing() {
    let (fake, addr) = FakeConsul::start().await;
    fake.set_service("web", vec![instance("10.0.0.1", "", 80, "gray", "passing")]);
    let mut cfg = config(&addr);
    cfg.wait = HumanDuration(Duration::from_millis(100));
    let mut run = Running::start(cfg, web_by_meta());
    run.endpoints().await;
    run.endpoints().await;
    // Several blocking queries expire with the same index...
    let n = fake.request_count();
    fake.wait_requests(n + 4).await;
    run.assert_quiet();
    // ...and a write elsewhere moves the index without changing web's answer.
    fake.set_service("api", vec![instance("10.0.9.9", "", 80, "prod", "passing")]);
    let n = fake.request_count();
    fake.wait_requests(n + 2).await;
    run.assert_quiet();
    let seen = fake.seen();
    let last = seen.last().unwrap();
    assert_eq!(last.query.get("index").map(String::as_str), Some("12"));
    run.stop().await;
}

#[tokio::test]
async fn index_going_backwards_resets_to_zero() {
    let (fake, addr) = FakeConsul::start().await;
    fake.mutate(|s| s.index = 50);
    fake.set_service("web", vec![instance("10.0.0.1", "", 80, "gray", "passing")]);
    let mut run = Running::start(config(&addr), web_by_meta());
    run.endpoints().await;
    run.endpoints().await;
    fake.wait_requests(2).await; // blocking at index 51
                                 // A snapshot restore: the index goes back to 7, with other contents.
    fake.mutate(|s| {
        s.index = 7;
        s.services.insert(
            "web".into(),
            vec![instance("10.0.0.5", "", 80, "gray", "passing")],
        );
    });
    assert_eq!(
        run.endpoints().await,
        ("A".into(), vec![ep("10.0.0.5", 80)])
    );
    fake.wait_requests(4).await;
    let seen = fake.seen();
    assert_eq!(seen[1].query.get("index").map(String::as_str), Some("51"));
    // After the reset: a non-blocking query (no index), then blocking on the new index.
    assert!(!seen[2].query.contains_key("index"), "{:?}", seen[2].query);
    assert_eq!(seen[3].query.get("index").map(String::as_str), Some("7"));
    run.stop().await;
}

#[tokio::test]
async fn index_zero_is_never_used_to_block() {
    let (fake, addr) = FakeConsul::start().await;
    fake.set_service("web", vec![instance("10.0.0.1", "", 80, "gray", "passing")]);
    fake.mutate(|s| s.index_override = Some(0));
    let mut run = Running::start(config(&addr), web_by_meta());
    run.endpoints().await;
    fake.wait_requests(3).await;
    let seen = fake.seen();
    assert!(!seen[0].query.contains_key("index"));
    // Index 0 would return at once forever: the client blocks on 1 instead.
    assert_eq!(seen[1].query.get("index").map(String::as_str), Some("1"));
    assert_eq!(seen[2].query.get("index").map(String::as_str), Some("1"));
    run.stop().await;
}

#[tokio::test]
async fn errors_mark_stale_keep_last_endpoints_and_back_off() {
    let (fake, addr) = FakeConsul::start().await;
    fake.set_service("web", vec![instance("10.0.0.1", "", 80, "gray", "passing")]);
    let mut cfg = config(&addr);
    cfg.wait = HumanDuration(Duration::from_millis(200));
    let mut run = Running::start(cfg, web_by_meta());
    run.endpoints().await;
    run.endpoints().await;
    // Consul's error bodies are plain text.
    fake.mutate(|s| {
        s.failures.extend([
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "rpc error making call: No cluster leader".to_owned(),
            ),
            (
                StatusCode::TOO_MANY_REQUESTS,
                "rate limit exceeded".to_owned(),
            ),
            (StatusCode::FORBIDDEN, "ACL not found".to_owned()),
        ]);
    });
    match run.next().await {
        Event::Stale {
            source,
            stale,
            error,
        } => {
            assert_eq!(source, SourceKind::Consul);
            assert!(stale);
            let error = error.unwrap();
            assert!(error.contains("500"), "{error}");
            assert!(error.contains("No cluster leader"), "{error}");
        }
        other => panic!("expected stale, got {other:?}"),
    }
    // Recovery: stale=false, and no endpoint event (nothing changed; nothing was emptied).
    match run.next().await {
        Event::Stale { stale, error, .. } => {
            assert!(!stale);
            assert!(error.is_none());
        }
        other => panic!("expected recovery, got {other:?}"),
    }
    let n = fake.request_count();
    fake.wait_requests(n + 2).await;
    run.assert_quiet();
    // Backoff with equal jitter from 100ms: gaps >= 50ms, 100ms, 200ms after the failures.
    let seen = fake.seen();
    let failed: Vec<usize> = (0..seen.len())
        .filter(|&i| seen[i].failed.is_some())
        .collect();
    assert_eq!(
        failed
            .iter()
            .map(|&i| seen[i].failed.unwrap())
            .collect::<Vec<_>>(),
        [500, 429, 403]
    );
    let gaps: Vec<Duration> = failed
        .iter()
        .map(|&i| seen[i + 1].at - seen[i].at)
        .collect();
    assert!(gaps[0] >= Duration::from_millis(50), "{gaps:?}");
    assert!(gaps[1] >= Duration::from_millis(100), "{gaps:?}");
    assert!(gaps[2] >= Duration::from_millis(200), "{gaps:?}");
    run.stop().await;
}

#[tokio::test]
async fn unreachable_agent_is_stale_then_recovers() {
    let (fake, _) = FakeConsul::start().await;
    fake.set_service("web", vec![instance("10.0.0.1", "", 80, "gray", "passing")]);
    // A second listener for the same fake that can be stopped and restarted on its port.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    fake.serve(listener, stop.clone());
    let mut cfg = config(&format!("http://{addr}"));
    // Graceful shutdown lets a held query finish: keep `wait` short.
    cfg.wait = HumanDuration(Duration::from_millis(300));
    let mut run = Running::start(cfg, web_by_meta());
    run.endpoints().await;
    run.endpoints().await;
    fake.wait_requests(2).await;
    // The agent goes away: connection refused.
    stop.cancel();
    match run.next().await {
        Event::Stale { stale, error, .. } => {
            assert!(stale);
            assert!(error.unwrap().contains("consul request failed"));
        }
        other => panic!("expected stale, got {other:?}"),
    }
    // It comes back on the same address with a change made meanwhile.
    fake.set_service("web", vec![instance("10.0.0.2", "", 80, "gray", "passing")]);
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    fake.serve(listener, CancellationToken::new());
    match run.next().await {
        Event::Stale { stale, .. } => assert!(!stale),
        other => panic!("expected recovery, got {other:?}"),
    }
    assert_eq!(
        run.endpoints().await,
        ("A".into(), vec![ep("10.0.0.2", 80)])
    );
    run.stop().await;
}

#[tokio::test]
async fn token_datacenter_and_stale_are_sent() {
    let (fake, addr) = FakeConsul::start().await;
    fake.set_service(
        "web-v2",
        vec![instance("10.0.0.1", "", 80, "gray", "passing")],
    );
    let mut cfg = config(&addr);
    cfg.token = Some("b1gs33cr3t".into());
    cfg.datacenter = Some("dc2".into());
    cfg.stale = true;
    let services = vec![(
        "web".into(),
        ConsulService {
            service: Some("web-v2".into()),
            meta: None,
            clusters: [("gray".into(), "A".into())].into(),
        },
    )];
    let mut run = Running::start(cfg, services);
    assert_eq!(
        run.endpoints().await,
        ("A".into(), vec![ep("10.0.0.1", 80)])
    );
    fake.wait_requests(2).await;
    for s in fake.seen() {
        assert_eq!(s.service, "web-v2");
        assert_eq!(s.token.as_deref(), Some("b1gs33cr3t"));
        assert_eq!(s.query.get("dc").map(String::as_str), Some("dc2"));
        assert!(s.query.contains_key("stale"));
    }
    run.stop().await;
}

#[tokio::test]
async fn rate_limit_is_respected() {
    let (fake, addr) = FakeConsul::start().await;
    fake.set_service("web", vec![instance("10.0.0.1", "", 80, "gray", "passing")]);
    // A registry whose index moves on every call: blocking never holds.
    fake.mutate(|s| s.churn = true);
    let mut cfg = config(&addr);
    cfg.rate = RateLimit {
        per_second: 20.0,
        burst: 2,
    };
    let mut run = Running::start(cfg, web_by_meta());
    run.endpoints().await;
    fake.wait_requests(12).await;
    let seen = fake.seen();
    // 2 calls from the burst, then one per 50ms: 12 calls take at least 10 x 50ms.
    let span = seen[11].at - seen[0].at;
    assert!(span >= Duration::from_millis(480), "{span:?}");
    run.stop().await;
}

/// Not a correctness test: `cargo test -p graylane-control-plane discovery_bench -- --ignored
/// --nocapture`. 100 services x 100 instances in the fake Consul (per-service index), 1% of
/// the instances change every second (one every 10 ms, round robin); measures the time from
/// the fake's write to the `Endpoints` event. CPU and RSS are the whole test process, fake
/// Consul included (it serializes a 100-instance answer per call).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; run explicitly"]
async fn discovery_bench_consul_churn() {
    const SERVICES: usize = 100;
    const INSTANCES: usize = 100;
    let (fake, addr) = FakeConsul::start().await;
    fake.mutate(|s| s.per_service = true);
    let mut ports = vec![[8080u16; INSTANCES]; SERVICES];
    let entries = |i: usize, ports: &[u16; INSTANCES]| -> Vec<Value> {
        (0..INSTANCES)
            .map(|k| {
                let profile = if k % 2 == 0 { "gray" } else { "prod" };
                instance(&format!("10.0.{i}.{k}"), "", ports[k], profile, "passing")
            })
            .collect()
    };
    for (i, p) in ports.iter().enumerate() {
        fake.set_service(&format!("svc-{i}"), entries(i, p));
    }
    let services: Vec<(String, ConsulService)> = (0..SERVICES)
        .map(|i| {
            (
                format!("svc-{i}"),
                ConsulService {
                    service: None,
                    meta: Some("profile".into()),
                    clusters: [("gray".into(), "A".into()), ("prod".into(), "B".into())].into(),
                },
            )
        })
        .collect();
    let cfg = ConsulConfig {
        address: addr.clone(),
        ..ConsulConfig::default()
    };
    let (tx, mut rx) = mpsc::channel(4096);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run_consul(cfg, services, tx, shutdown.clone()));
    for _ in 0..SERVICES * 2 {
        tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .unwrap()
            .unwrap();
    }
    let sent: Arc<Mutex<HashMap<(String, u16), Instant>>> = Arc::default();
    let cpu0 = crate::cpu_seconds();
    let t0 = Instant::now();
    let churn_for = Duration::from_secs(10);
    let driver = {
        let fake = fake.clone();
        let sent = sent.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let mut step = 0usize;
            while t0.elapsed() < churn_for {
                tick.tick().await;
                let i = step % SERVICES;
                let k = (step / SERVICES) % INSTANCES;
                let port = 20_000 + u16::try_from(step).unwrap();
                ports[i][k] = port;
                let list = entries(i, &ports[i]);
                sent.lock()
                    .unwrap()
                    .insert((format!("svc-{i}"), port), Instant::now());
                fake.set_service(&format!("svc-{i}"), list);
                step += 1;
            }
            step
        })
    };
    let mut latencies = Vec::new();
    let mut seen_ports = std::collections::HashSet::new();
    loop {
        let ev = match tokio::time::timeout(Duration::from_secs(3), rx.recv()).await {
            Ok(Some(ev)) => ev,
            _ => break,
        };
        let now = Instant::now();
        if let Event::Endpoints {
            service, endpoints, ..
        } = ev
        {
            for e in endpoints {
                if e.port >= 20_000 && seen_ports.insert((service.clone(), e.port)) {
                    if let Some(t) = sent.lock().unwrap().get(&(service.clone(), e.port)) {
                        latencies.push(now - *t);
                    }
                }
            }
        }
        if driver.is_finished() && latencies.len() >= sent.lock().unwrap().len() {
            break;
        }
    }
    let steps = driver.await.unwrap();
    let wall = t0.elapsed();
    let cpu = crate::cpu_seconds() - cpu0;
    crate::report("consul", steps, &mut latencies, cpu, wall);
    assert_eq!(latencies.len(), steps, "every change must arrive");
    shutdown.cancel();
    task.await.unwrap();
}
