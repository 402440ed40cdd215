//! The Kubernetes source (`discovery::kube::run`) against the fake API server of
//! `graylane_e2e::fakes::kube`, through the real `kube::Client` (list + watch, paging,
//! bookmarks, 410 Expired, metadata-only pods, RBAC and etcd errors).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use graylane_control_plane::discovery::kube;
use graylane_control_plane::discovery::{Endpoint, Event, SourceKind};
use graylane_e2e::fakes::kube::{cond, of_pod, pod, ready, slice, ApiServer, Kind};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

fn ep(address: &str) -> Endpoint {
    Endpoint {
        address: address.into(),
        port: 8080,
    }
}

struct Running {
    rx: mpsc::Receiver<Event>,
    /// `Synced` events seen (set aside by `next`).
    synced: usize,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    fn start(client: ::kube::Client, services: Vec<(String, kube::Mapping)>) -> Running {
        let (tx, rx) = mpsc::channel(64);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(kube::run(client, services, tx, shutdown.clone()));
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
            let ev = tokio::time::timeout(Duration::from_secs(15), self.rx.recv())
                .await
                .expect("no event within 15s")
                .expect("channel closed");
            match ev {
                Event::Synced { .. } => self.synced += 1,
                other => return other,
            }
        }
    }

    async fn endpoints(&mut self) -> (String, String, Vec<Endpoint>) {
        match self.next().await {
            Event::Endpoints {
                source,
                service,
                cluster,
                endpoints,
            } => {
                assert_eq!(source, SourceKind::Kubernetes);
                (service, cluster, endpoints)
            }
            other => panic!("expected endpoints, got {other:?}"),
        }
    }

    /// The next endpoint events, as a map, until `n` were received.
    async fn endpoints_n(&mut self, n: usize) -> BTreeMap<(String, String), Vec<Endpoint>> {
        let mut out = BTreeMap::new();
        for _ in 0..n {
            let (s, c, e) = self.endpoints().await;
            out.insert((s, c), e);
        }
        out
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
            .expect("kube::run did not stop on shutdown")
            .unwrap();
    }
}

/// A Kubernetes mapping, parsed as graylane.yaml's `discovery.kubernetes` is.
fn mapping(yaml: &str) -> kube::Mapping {
    serde_saphyr::from_str(yaml).unwrap()
}

fn by_service(ns: &str) -> Vec<(String, kube::Mapping)> {
    vec![(
        "web".into(),
        mapping(&format!(
            "{{namespace: {ns}, services: {{web-gray: A, web-prod: B}}}}"
        )),
    )]
}

fn key(c: &str) -> (String, String) {
    ("web".into(), c.into())
}

// ---- tests ---------------------------------------------------------------------------------

#[tokio::test]
async fn endpoints_appear_and_follow_changes() {
    let (fake, client) = ApiServer::start().await;
    fake.apply(
        Kind::Slice,
        "shop",
        slice("web-gray-abc", "web-gray", vec![ready("10.0.1.1")]),
    );
    fake.apply(
        Kind::Slice,
        "shop",
        slice(
            "web-prod-xyz",
            "web-prod",
            vec![ready("10.0.2.2"), ready("10.0.2.1")],
        ),
    );
    fake.apply(
        Kind::Slice,
        "shop",
        slice("other-1", "other", vec![ready("10.9.9.9")]),
    );
    fake.apply(
        Kind::Slice,
        "elsewhere",
        slice("web-gray-zzz", "web-gray", vec![ready("10.8.8.8")]),
    );
    let mut run = Running::start(client, by_service("shop"));
    let got = run.endpoints_n(2).await;
    assert_eq!(got[&key("A")], [ep("10.0.1.1")]);
    assert_eq!(got[&key("B")], [ep("10.0.2.1"), ep("10.0.2.2")]);

    fake.wait_watches(1).await;
    // Synced once, after the first complete answer.
    run.assert_quiet();
    assert_eq!(run.synced, 1);
    // The gray pod starts terminating: ready=false, serving=true, terminating=true.
    fake.apply(
        Kind::Slice,
        "shop",
        slice(
            "web-gray-abc",
            "web-gray",
            vec![cond(
                "10.0.1.1",
                json!({"ready": false, "serving": true, "terminating": true}),
            )],
        ),
    );
    assert_eq!(run.endpoints().await, ("web".into(), "A".into(), vec![]));
    // A new gray slice with a ready endpoint.
    fake.apply(
        Kind::Slice,
        "shop",
        slice("web-gray-def", "web-gray", vec![ready("10.0.1.7")]),
    );
    assert_eq!(
        run.endpoints().await,
        ("web".into(), "A".into(), vec![ep("10.0.1.7")])
    );
    // Changes elsewhere send nothing.
    fake.apply(
        Kind::Slice,
        "shop",
        slice("other-1", "other", vec![ready("10.9.9.8")]),
    );
    fake.apply(
        Kind::Slice,
        "shop",
        slice(
            "web-prod-xyz",
            "web-prod",
            vec![ready("10.0.2.1"), ready("10.0.2.2")],
        ),
    );
    fake.apply(
        Kind::Slice,
        "shop",
        slice("web-gray-def", "web-gray", vec![ready("10.0.1.7")]),
    );
    // Make sure the client has processed them: a final visible change.
    fake.apply(
        Kind::Slice,
        "shop",
        slice("web-prod-xyz", "web-prod", vec![ready("10.0.2.1")]),
    );
    assert_eq!(
        run.endpoints().await,
        ("web".into(), "B".into(), vec![ep("10.0.2.1")])
    );
    run.assert_quiet();

    let seen = fake.seen();
    assert_eq!(seen[0].path, "EndpointSlice/shop");
    assert_eq!(
        seen[0].param("labelSelector"),
        Some("kubernetes.io/service-name in (web-gray,web-prod)")
    );
    run.stop().await;
}

#[tokio::test]
async fn not_ready_and_terminating_excluded_and_slices_deduplicated() {
    let (fake, client) = ApiServer::start().await;
    // During a rebalance an endpoint can sit in two slices at once.
    fake.apply(
        Kind::Slice,
        "shop",
        slice(
            "web-prod-1",
            "web-prod",
            vec![
                ready("10.0.2.1"),
                cond(
                    "10.0.2.2",
                    json!({"ready": false, "serving": false, "terminating": false}),
                ),
                cond(
                    "10.0.2.3",
                    json!({"ready": false, "serving": true, "terminating": true}),
                ),
                cond("10.0.2.4", json!({})),
                json!({"addresses": ["10.0.2.5"]}),
            ],
        ),
    );
    fake.apply(
        Kind::Slice,
        "shop",
        slice(
            "web-prod-2",
            "web-prod",
            vec![ready("10.0.2.1"), ready("10.0.2.6")],
        ),
    );
    let mut run = Running::start(client, by_service("shop"));
    let got = run.endpoints_n(2).await;
    assert_eq!(got[&key("A")], []);
    // Unset conditions count as ready (the API says nil means true for ready).
    assert_eq!(
        got[&key("B")],
        [
            ep("10.0.2.1"),
            ep("10.0.2.4"),
            ep("10.0.2.5"),
            ep("10.0.2.6")
        ]
    );
    run.stop().await;
}

#[tokio::test]
async fn deleted_slice_removes_its_endpoints() {
    let (fake, client) = ApiServer::start().await;
    fake.apply(
        Kind::Slice,
        "shop",
        slice("web-prod-1", "web-prod", vec![ready("10.0.2.1")]),
    );
    fake.apply(
        Kind::Slice,
        "shop",
        slice("web-prod-2", "web-prod", vec![ready("10.0.2.2")]),
    );
    fake.apply(
        Kind::Slice,
        "shop",
        slice("web-gray-1", "web-gray", vec![ready("10.0.1.1")]),
    );
    let mut run = Running::start(client, by_service("shop"));
    let got = run.endpoints_n(2).await;
    assert_eq!(got[&key("B")], [ep("10.0.2.1"), ep("10.0.2.2")]);
    fake.wait_watches(1).await;
    fake.delete(Kind::Slice, "shop", "web-prod-1");
    assert_eq!(
        run.endpoints().await,
        ("web".into(), "B".into(), vec![ep("10.0.2.2")])
    );
    fake.delete(Kind::Slice, "shop", "web-gray-1");
    assert_eq!(run.endpoints().await, ("web".into(), "A".into(), vec![]));
    run.stop().await;
}

#[tokio::test]
async fn paged_list_is_followed() {
    let (fake, client) = ApiServer::start().await;
    fake.page_size(2);
    for i in 1..=5 {
        fake.apply(
            Kind::Slice,
            "shop",
            slice(
                &format!("web-prod-{i}"),
                "web-prod",
                vec![ready(&format!("10.0.2.{i}"))],
            ),
        );
    }
    let mut run = Running::start(client, by_service("shop"));
    let got = run.endpoints_n(2).await;
    assert_eq!(
        got[&key("B")],
        (1..=5)
            .map(|i| ep(&format!("10.0.2.{i}")))
            .collect::<Vec<_>>()
    );
    let seen = fake.seen();
    let continues: Vec<&str> = seen.iter().filter_map(|r| r.param("continue")).collect();
    assert_eq!(continues, ["2", "4"]);
    run.stop().await;
}

#[tokio::test]
async fn expired_resource_version_relists_to_the_right_state() {
    let (fake, client) = ApiServer::start().await;
    fake.apply(
        Kind::Slice,
        "shop",
        slice("web-gray-1", "web-gray", vec![ready("10.0.1.1")]),
    );
    fake.apply(
        Kind::Slice,
        "shop",
        slice("web-prod-1", "web-prod", vec![ready("10.0.2.1")]),
    );
    let mut run = Running::start(client, by_service("shop"));
    run.endpoints_n(2).await;
    fake.wait_watches(1).await;
    let lists_before = fake.lists();
    // While the client's events are lost: the gray slice goes away, prod gains an endpoint.
    fake.silently_then_expire(|objects| {
        objects.retain(|(_, _, name), _| name != "web-gray-1");
        let prod = objects
            .get_mut(&(Kind::Slice, "shop".into(), "web-prod-1".into()))
            .unwrap();
        prod["endpoints"] = json!([ready("10.0.2.1"), ready("10.0.2.9")]);
    });
    let got = run.endpoints_n(2).await;
    assert_eq!(got[&key("A")], []);
    assert_eq!(got[&key("B")], [ep("10.0.2.1"), ep("10.0.2.9")]);
    let lists_after = fake.lists();
    assert!(lists_after > lists_before, "no relist");
    // A 410 is routine (compaction), not an outage: no Stale event.
    fake.wait_watches(2).await;
    run.assert_quiet();
    run.stop().await;
}

#[tokio::test]
async fn bookmark_sets_the_resume_point() {
    let (fake, client) = ApiServer::start().await;
    fake.apply(
        Kind::Slice,
        "shop",
        slice("web-prod-1", "web-prod", vec![ready("10.0.2.1")]),
    );
    let mut run = Running::start(client, by_service("shop"));
    run.endpoints_n(2).await;
    fake.wait_watches(1).await;
    let first = fake.seen().into_iter().find(|r| r.is_watch()).unwrap();
    assert_eq!(first.param("allowWatchBookmarks"), Some("true"));
    assert_eq!(first.param("resourceVersion"), Some("1001"));
    // Writes to other Services move the resourceVersion on without reaching this watch;
    // the bookmark tells the client how far it is.
    fake.apply(
        Kind::Slice,
        "shop",
        slice("other-1", "other", vec![ready("10.9.9.9")]),
    );
    let rv = fake.bookmark(Kind::Slice);
    // The watch then ends (server timeout); buffered lines are still delivered first.
    fake.close_watches();
    fake.wait_watches(2).await;
    let resumed = fake
        .seen()
        .into_iter()
        .filter(|r| r.is_watch())
        .nth(1)
        .unwrap();
    assert_eq!(
        resumed.param("resourceVersion"),
        Some(rv.to_string().as_str())
    );
    // Resumed, not relisted, and no event (nothing changed).
    assert_eq!(fake.lists(), 1);
    // A change after the resume still arrives.
    fake.apply(
        Kind::Slice,
        "shop",
        slice("web-prod-1", "web-prod", vec![ready("10.0.2.2")]),
    );
    assert_eq!(
        run.endpoints().await,
        ("web".into(), "B".into(), vec![ep("10.0.2.2")])
    );
    run.stop().await;
}

#[tokio::test]
async fn per_namespace_mapping() {
    let (fake, client) = ApiServer::start().await;
    fake.apply(
        Kind::Slice,
        "gray",
        slice("web-1", "web", vec![ready("10.1.0.1")]),
    );
    fake.apply(
        Kind::Slice,
        "prod",
        slice("web-1", "web", vec![ready("10.2.0.1")]),
    );
    fake.apply(
        Kind::Slice,
        "prod",
        slice("web-2", "web", vec![ready("10.2.0.2")]),
    );
    let services = vec![("web".into(), mapping("namespaces: {gray: A, prod: B}"))];
    let mut run = Running::start(client, services);
    let got = run.endpoints_n(2).await;
    assert_eq!(got[&key("A")], [ep("10.1.0.1")]);
    assert_eq!(got[&key("B")], [ep("10.2.0.1"), ep("10.2.0.2")]);
    fake.wait_watches(2).await;
    fake.delete(Kind::Slice, "gray", "web-1");
    assert_eq!(run.endpoints().await, ("web".into(), "A".into(), vec![]));
    run.stop().await;
}

#[tokio::test]
async fn pod_label_mapping_through_target_ref() {
    let (fake, client) = ApiServer::start().await;
    fake.apply(Kind::Pod, "shop", pod("web-7d9f-a", "gray"));
    fake.apply(Kind::Pod, "shop", pod("web-5c4b-b", "prod"));
    fake.apply(Kind::Pod, "shop", pod("web-5c4b-c", "prod"));
    fake.apply(
        Kind::Slice,
        "shop",
        slice(
            "web-1",
            "web",
            vec![
                of_pod("10.0.0.1", "shop", "web-7d9f-a"),
                of_pod("10.0.0.2", "shop", "web-5c4b-b"),
                of_pod("10.0.0.3", "shop", "web-5c4b-c"),
                ready("10.0.0.4"), // no targetRef: no profile, no cluster
            ],
        ),
    );
    let services = vec![(
        "web".into(),
        mapping("{namespace: shop, pod_label: profile, clusters: {gray: A, prod: B}}"),
    )];
    let mut run = Running::start(client, services);
    let got = run.endpoints_n(2).await;
    assert_eq!(got[&key("A")], [ep("10.0.0.1")]);
    assert_eq!(got[&key("B")], [ep("10.0.0.2"), ep("10.0.0.3")]);
    let seen = fake.seen();
    let pod_list = seen.iter().find(|r| r.path == "Pod/shop").unwrap();
    assert_eq!(pod_list.param("labelSelector"), Some("profile"));
    fake.wait_watches(2).await;
    // A prod pod is relabelled gray: its endpoint moves from B to A.
    fake.apply(Kind::Pod, "shop", pod("web-5c4b-c", "gray"));
    let got = run.endpoints_n(2).await;
    assert_eq!(got[&key("A")], [ep("10.0.0.1"), ep("10.0.0.3")]);
    assert_eq!(got[&key("B")], [ep("10.0.0.2")]);
    run.stop().await;
}

#[tokio::test]
async fn apiserver_outage_marks_stale_and_keeps_endpoints() {
    let (fake, client) = ApiServer::start().await;
    fake.apply(
        Kind::Slice,
        "shop",
        slice("web-prod-1", "web-prod", vec![ready("10.0.2.1")]),
    );
    let mut run = Running::start(client, by_service("shop"));
    run.endpoints_n(2).await;
    fake.wait_watches(1).await;
    // The watch expires and the relist fails twice (apiserver in trouble).
    fake.fail_lists(2);
    fake.silently_then_expire(|_| {});
    match run.next().await {
        Event::Stale {
            source,
            stale,
            error,
        } => {
            assert_eq!(source, SourceKind::Kubernetes);
            assert!(stale);
            let error = error.unwrap();
            assert!(error.contains("etcdserver: request timed out"), "{error}");
        }
        other => panic!("expected stale, got {other:?}"),
    }
    match run.next().await {
        Event::Stale { stale, .. } => assert!(!stale),
        other => panic!("expected recovery, got {other:?}"),
    }
    // Same state after the relist: nothing was emptied, nothing is re-sent.
    fake.wait_watches(2).await;
    run.assert_quiet();
    assert_eq!(fake.open_watches(), 1);
    run.stop().await;
}

#[tokio::test]
async fn fixture_watch_stream_is_understood() {
    // tests/fixtures/watch_stream.jsonl verbatim: ADDED (ready), MODIFIED (terminating),
    // BOOKMARK, DELETED, for the Service "example" in namespace "default".
    let (fake, client) = ApiServer::start().await;
    fake.set_resource_version(10_000);
    let services = vec![("example".into(), mapping("services: {example: A}"))];
    let mut run = Running::start(client, services);
    // Empty at first (client's default namespace: "default").
    assert_eq!(
        run.endpoints().await,
        ("example".into(), "A".into(), vec![])
    );
    fake.wait_watches(1).await;
    let lines: Vec<&str> = include_str!("../fixtures/watch_stream.jsonl")
        .lines()
        .collect();
    assert_eq!(lines.len(), 4);
    let ep80 = Endpoint {
        address: "10.1.2.3".into(),
        port: 80,
    };
    fake.send_raw(Kind::Slice, lines[0]);
    assert_eq!(
        run.endpoints().await,
        ("example".into(), "A".into(), vec![ep80])
    );
    fake.send_raw(Kind::Slice, lines[1]);
    assert_eq!(
        run.endpoints().await,
        ("example".into(), "A".into(), vec![])
    );
    fake.send_raw(Kind::Slice, lines[2]);
    fake.send_raw(Kind::Slice, lines[3]);
    fake.close_watches();
    fake.wait_watches(2).await;
    let resumed = fake
        .seen()
        .into_iter()
        .filter(|r| r.is_watch())
        .nth(1)
        .unwrap();
    assert_eq!(resumed.param("resourceVersion"), Some("12801"));
    // The DELETED slice had no ready endpoint left: nothing to send.
    run.assert_quiet();
    run.stop().await;
}

/// Not a correctness test: `cargo test -p graylane-control-plane discovery_bench -- --ignored
/// --nocapture`. 100 graylane services, each a gray and a prod Service with one 50-endpoint
/// slice (10,000 endpoints) in the fake apiserver; 1% of the endpoints change every second (one
/// every 10 ms, round robin); measures the time from the fake's write to the `Endpoints`
/// event. CPU and RSS are the whole test process, fake apiserver included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; run explicitly"]
async fn discovery_bench_kube_churn() {
    use std::time::Instant;
    const SERVICES: usize = 100;
    const PER_SLICE: usize = 50;
    let (fake, client) = ApiServer::start().await;
    let mut addrs: Vec<Vec<String>> = Vec::new();
    for i in 0..SERVICES {
        for (j, profile) in ["gray", "prod"].iter().enumerate() {
            let list: Vec<String> = (0..PER_SLICE)
                .map(|k| format!("10.{}.{i}.{k}", j + 1))
                .collect();
            let eps = list.iter().map(|a| ready(a)).collect();
            let name = format!("svc-{i}-{profile}");
            fake.apply(
                Kind::Slice,
                "bench",
                slice(&format!("{name}-x1"), &name, eps),
            );
            addrs.push(list);
        }
    }
    let services: Vec<(String, kube::Mapping)> = (0..SERVICES)
        .map(|i| {
            (
                format!("svc-{i}"),
                mapping(&format!(
                    "{{namespace: bench, services: {{svc-{i}-gray: A, svc-{i}-prod: B}}}}"
                )),
            )
        })
        .collect();
    let (tx, mut rx) = mpsc::channel(4096);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(kube::run(client, services, tx, shutdown.clone()));
    for _ in 0..SERVICES * 2 {
        tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .unwrap()
            .unwrap();
    }
    let sent: Arc<Mutex<HashMap<(String, String), Instant>>> = Arc::default();
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
                let s = step % (SERVICES * 2);
                let k = (step / (SERVICES * 2)) % PER_SLICE;
                let addr = format!(
                    "10.{}.{}.{}",
                    100 + step / 65536,
                    (step / 256) % 256,
                    step % 256
                );
                addrs[s][k] = addr.clone();
                let profile = if s.is_multiple_of(2) { "gray" } else { "prod" };
                let name = format!("svc-{}-{profile}", s / 2);
                let eps = addrs[s].iter().map(|a| ready(a)).collect();
                sent.lock()
                    .unwrap()
                    .insert((format!("svc-{}", s / 2), addr), Instant::now());
                fake.apply(
                    Kind::Slice,
                    "bench",
                    slice(&format!("{name}-x1"), &name, eps),
                );
                step += 1;
            }
            step
        })
    };
    let mut latencies = Vec::new();
    let mut seen = std::collections::HashSet::new();
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
                if e.address.starts_with("10.1") && e.address.len() > 6 {
                    let key = (service.clone(), e.address);
                    if !seen.contains(&key) {
                        if let Some(t) = sent.lock().unwrap().get(&key) {
                            latencies.push(now - *t);
                            seen.insert(key);
                        }
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
    crate::report("kubernetes", steps, &mut latencies, cpu, wall);
    assert_eq!(latencies.len(), steps, "every change must arrive");
    shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn mixed_mappings_in_one_namespace_all_sync() {
    let (fake, client) = ApiServer::start().await;
    fake.apply(Kind::Pod, "shop", pod("web-a", "gray"));
    fake.apply(
        Kind::Slice,
        "shop",
        slice("web-1", "web", vec![of_pod("10.0.0.1", "shop", "web-a")]),
    );
    fake.apply(
        Kind::Slice,
        "shop",
        slice("api-gray-1", "api-gray", vec![ready("10.0.1.1")]),
    );
    fake.apply(
        Kind::Slice,
        "shop",
        slice("api-prod-1", "api-prod", vec![ready("10.0.2.1")]),
    );
    let services = vec![
        (
            "web".into(),
            mapping("{namespace: shop, pod_label: profile, clusters: {gray: A, prod: B}}"),
        ),
        (
            "api".into(),
            mapping("{namespace: shop, services: {api-gray: A, api-prod: B}}"),
        ),
    ];
    let mut run = Running::start(client, services);
    // Whichever of the two watches syncs last, every cluster of both services is sent.
    let got = run.endpoints_n(4).await;
    assert_eq!(got[&("web".into(), "A".into())], [ep("10.0.0.1")]);
    assert_eq!(got[&("web".into(), "B".into())], []);
    assert_eq!(got[&("api".into(), "A".into())], [ep("10.0.1.1")]);
    assert_eq!(got[&("api".into(), "B".into())], [ep("10.0.2.1")]);
    fake.wait_watches(2).await;
    // A pod update that leaves its profile alone (e.g. status) sends nothing; a relabel does.
    let mut p = pod("web-a", "gray");
    p["metadata"]["labels"]["pod-template-hash"] = json!("5c4b");
    fake.apply(Kind::Pod, "shop", p);
    fake.apply(Kind::Pod, "shop", pod("web-a", "prod"));
    let got = run.endpoints_n(2).await;
    assert_eq!(got[&("web".into(), "A".into())], []);
    assert_eq!(got[&("web".into(), "B".into())], [ep("10.0.0.1")]);
    run.assert_quiet();
    run.stop().await;
}

#[tokio::test]
async fn failed_watch_restart_is_stale_until_the_apiserver_answers_again() {
    let (fake, client) = ApiServer::start().await;
    fake.apply(
        Kind::Slice,
        "shop",
        slice("web-prod-1", "web-prod", vec![ready("10.0.2.1")]),
    );
    let mut run = Running::start(client, by_service("shop"));
    run.endpoints_n(2).await;
    fake.wait_watches(1).await;
    // The watch ends and the next restart fails; the one after succeeds, quietly (no event
    // and no relist: the watcher resumes from its resourceVersion).
    fake.fail_watches(1);
    fake.close_watches();
    match run.next().await {
        Event::Stale { stale, error, .. } => {
            assert!(stale);
            assert!(error.unwrap().contains("leader changed"));
        }
        other => panic!("expected stale, got {other:?}"),
    }
    // The probe (a one-item list) finds the apiserver back and clears stale.
    match run.next().await {
        Event::Stale { stale, .. } => assert!(!stale),
        other => panic!("expected recovery, got {other:?}"),
    }
    let seen = fake.seen();
    let probes: Vec<_> = seen
        .iter()
        .filter(|r| !r.is_watch() && r.param("limit") == Some("1"))
        .collect();
    assert!(!probes.is_empty(), "no probe list");
    // Nothing was emptied or re-sent.
    run.assert_quiet();
    run.stop().await;
}

#[tokio::test]
async fn missing_rbac_is_reported_as_stale_with_the_apiserver_message() {
    let (fake, client) = ApiServer::start().await;
    fake.apply(
        Kind::Slice,
        "shop",
        slice("web-prod-1", "web-prod", vec![ready("10.0.2.1")]),
    );
    fake.forbid_slices(true);
    let mut run = Running::start(client, by_service("shop"));
    match run.next().await {
        Event::Stale { stale, error, .. } => {
            assert!(stale);
            let error = error.unwrap();
            assert!(error.contains("shop/endpointslices"), "{error}");
            assert!(error.contains("forbidden"), "{error}");
        }
        other => panic!("expected stale, got {other:?}"),
    }
    // The RBAC manifest gets applied: the watcher's retry lists, then everything is sent.
    fake.forbid_slices(false);
    match run.next().await {
        Event::Stale { stale, .. } => assert!(!stale),
        other => panic!("expected recovery, got {other:?}"),
    }
    let got = run.endpoints_n(2).await;
    assert_eq!(got[&key("B")], [ep("10.0.2.1")]);
    run.stop().await;
}
