//! The Consul source (`discovery::consul::run`) against the fake Consul of
//! `graylane_e2e::fakes::consul` (blocking queries, `X-Consul-Index`, plain-text errors, an
//! index that goes backwards or is 0).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use graylane_control_plane::discovery::consul::{self, BackoffConfig, RateLimit};
use graylane_control_plane::discovery::{Endpoint, Event, HumanDuration, SourceKind};
use graylane_e2e::fakes::consul::{instance, Consul};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

fn ep(address: &str, port: u16) -> Endpoint {
    Endpoint {
        address: address.into(),
        port,
    }
}

fn config(address: &str) -> consul::Config {
    consul::Config {
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
        ..consul::Config::default()
    }
}

/// A Consul mapping, parsed as graylane.yaml's `discovery.consul` is.
fn mapping(yaml: &str) -> consul::Mapping {
    serde_saphyr::from_str(yaml).unwrap()
}

fn web_by_meta() -> Vec<(String, consul::Mapping)> {
    vec![(
        "web".into(),
        mapping("meta: profile\nclusters: {gray: A, prod: B}\n"),
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
    fn start(cfg: consul::Config, services: Vec<(String, consul::Mapping)>) -> Running {
        let (tx, rx) = mpsc::channel(64);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(consul::run(cfg, services, tx, shutdown.clone()));
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
            .expect("consul::run did not stop on shutdown")
            .unwrap();
    }
}

#[tokio::test]
async fn registered_and_deregistered_instances_produce_events() {
    let (fake, addr) = Consul::start().await;
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
    let (fake, addr) = Consul::start().await;
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
    let (fake, addr) = Consul::start().await;
    let sample: Vec<Value> =
        serde_json::from_str(include_str!("../fixtures/consul_health_service.json")).unwrap();
    fake.set_service("redis", sample);
    let services = vec![(
        "web".into(),
        mapping("service: redis\nclusters: {primary: A}\n"),
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
    let (fake, addr) = Consul::start().await;
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
    let (fake, addr) = Consul::start().await;
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
    let (fake, addr) = Consul::start().await;
    fake.set_index(50);
    fake.set_service("web", vec![instance("10.0.0.1", "", 80, "gray", "passing")]);
    let mut run = Running::start(config(&addr), web_by_meta());
    run.endpoints().await;
    run.endpoints().await;
    fake.wait_requests(2).await; // blocking at index 51
                                 // A snapshot restore: the index goes back to 7, with other contents.
    fake.restore(
        7,
        "web",
        vec![instance("10.0.0.5", "", 80, "gray", "passing")],
    );
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
    let (fake, addr) = Consul::start().await;
    fake.set_service("web", vec![instance("10.0.0.1", "", 80, "gray", "passing")]);
    fake.answer_index(Some(0));
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
    let (fake, addr) = Consul::start().await;
    fake.set_service("web", vec![instance("10.0.0.1", "", 80, "gray", "passing")]);
    let mut cfg = config(&addr);
    cfg.wait = HumanDuration(Duration::from_millis(200));
    let mut run = Running::start(cfg, web_by_meta());
    run.endpoints().await;
    run.endpoints().await;
    // Consul's error bodies are plain text.
    fake.fail_next(500, "rpc error making call: No cluster leader");
    fake.fail_next(429, "rate limit exceeded");
    fake.fail_next(403, "ACL not found");
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
    let (fake, _) = Consul::start().await;
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
    let (fake, addr) = Consul::start().await;
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
        mapping("service: web-v2\nclusters: {gray: A}\n"),
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
    let (fake, addr) = Consul::start().await;
    fake.set_service("web", vec![instance("10.0.0.1", "", 80, "gray", "passing")]);
    // A registry whose index moves on every call: blocking never holds.
    fake.churn(true);
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
    let (fake, addr) = Consul::start().await;
    fake.index_per_service(true);
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
    let services: Vec<(String, consul::Mapping)> = (0..SERVICES)
        .map(|i| {
            (
                format!("svc-{i}"),
                mapping("meta: profile\nclusters: {gray: A, prod: B}\n"),
            )
        })
        .collect();
    let cfg = consul::Config {
        address: addr.clone(),
        ..consul::Config::default()
    };
    let (tx, mut rx) = mpsc::channel(4096);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(consul::run(cfg, services, tx, shutdown.clone()));
    for _ in 0..SERVICES * 2 {
        tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .unwrap()
            .unwrap();
    }
    let sent: Arc<Mutex<HashMap<(String, u16), Instant>>> = Arc::default();
    let cpu0 = graylane_e2e::cpu_seconds();
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
    let cpu = graylane_e2e::cpu_seconds() - cpu0;
    crate::report("consul", steps, &mut latencies, cpu, wall);
    assert_eq!(latencies.len(), steps, "every change must arrive");
    shutdown.cancel();
    task.await.unwrap();
}
