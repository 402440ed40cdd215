//! The Kubernetes source against a FAKE Kubernetes API server.
//!
//! No apiserver can run in this project's CI, so the real `kube::Client` (built from a
//! `kube::Config` pointing at http://127.0.0.1:PORT) talks to an axum app that imitates what
//! kube's watcher uses, following the documented API concepts:
//! - list with `labelSelector`, `limit` and `continue` (the fake may return fewer items than
//!   `limit`, as the API allows), answering `metadata.resourceVersion`; items carry no
//!   apiVersion/kind, as in real typed lists;
//! - watch (`watch=true&resourceVersion=N`) as a chunked stream of newline-delimited JSON
//!   events: ADDED, MODIFIED, DELETED, and BOOKMARK (`apiVersion`/`kind` + resourceVersion);
//! - an expired resourceVersion answered, like the real apiserver, with HTTP 200 and one
//!   `ERROR` event carrying a 410 `Expired` Status (tests/fixtures/watch_expired.jsonl), which
//!   must make the client relist;
//! - pods served metadata-only (PartialObjectMetadata), as the client asks for.
//!
//! It is a fake: later list pages come from the current state rather than a snapshot, there is
//! no authentication, no field selectors, no watch timeout, and only the label-selector forms
//! graylane sends (`k in (a,b)`, `k=v`, `k`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::ListenerExt;
use axum::Router;
use graylane_control_plane::discovery::{run_kube, Endpoint, Event, KubeService, SourceKind};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Kind {
    Slice,
    Pod,
}

impl Kind {
    fn api_version(self) -> &'static str {
        match self {
            Kind::Slice => "discovery.k8s.io/v1",
            Kind::Pod => "v1",
        }
    }
    fn kind(self) -> &'static str {
        match self {
            Kind::Slice => "EndpointSlice",
            Kind::Pod => "Pod",
        }
    }
}

/// A parsed label selector term.
#[derive(Debug, Clone)]
enum Term {
    In(String, Vec<String>),
    Eq(String, String),
    Exists(String),
}

fn parse_selector(s: &str) -> Vec<Term> {
    let mut terms = Vec::new();
    let mut depth = 0;
    let mut start = 0;
    let bytes = s.as_bytes();
    for i in 0..=bytes.len() {
        let c = bytes.get(i).copied();
        match c {
            Some(b'(') => depth += 1,
            Some(b')') => depth -= 1,
            Some(b',') if depth > 0 => {}
            Some(b',') | None => {
                let t = s[start..i].trim();
                start = i + 1;
                if t.is_empty() {
                    continue;
                }
                if let Some((k, rest)) = t.split_once(" in ") {
                    let vals = rest
                        .trim()
                        .trim_start_matches('(')
                        .trim_end_matches(')')
                        .split(',')
                        .map(|v| v.trim().to_owned())
                        .collect();
                    terms.push(Term::In(k.trim().to_owned(), vals));
                } else if let Some((k, v)) = t.split_once('=') {
                    terms.push(Term::Eq(
                        k.trim().to_owned(),
                        v.trim_start_matches('=').trim().to_owned(),
                    ));
                } else {
                    terms.push(Term::Exists(t.to_owned()));
                }
            }
            _ => {}
        }
    }
    terms
}

fn matches(terms: &[Term], obj: &Value) -> bool {
    let labels = &obj["metadata"]["labels"];
    terms.iter().all(|t| match t {
        Term::In(k, vs) => labels[k]
            .as_str()
            .is_some_and(|v| vs.iter().any(|x| x == v)),
        Term::Eq(k, v) => labels[k].as_str() == Some(v.as_str()),
        Term::Exists(k) => !labels[k].is_null(),
    })
}

struct WatchSub {
    kind: Kind,
    ns: String,
    terms: Vec<Term>,
    tx: mpsc::UnboundedSender<String>,
}

#[derive(Default)]
struct FakeState {
    rv: u64,
    objects: BTreeMap<(Kind, String, String), Value>,
    /// Every change, for watches that start from an older resourceVersion.
    log: Vec<(u64, Kind, String, &'static str, Value)>,
    /// Watches from a resourceVersion below this one get the 410 ERROR event.
    compacted: u64,
    /// The fake returns at most this many items per list page.
    max_page: usize,
    /// Lists fail with a 500 while > 0 (decremented per failure).
    list_failures: usize,
    /// Lists of endpointslices are refused with 403 (RBAC missing) while set.
    forbidden: bool,
    /// Watch requests fail with a 500 while > 0 (decremented per failure).
    watch_failures: usize,
    watchers: Vec<WatchSub>,
    seen: Vec<(String, HashMap<String, String>)>,
}

pub(crate) struct FakeApi {
    state: Mutex<FakeState>,
    requests: watch::Sender<usize>,
}

impl FakeApi {
    pub(crate) async fn start() -> (Arc<FakeApi>, kube::Client) {
        let fake = Arc::new(FakeApi {
            state: Mutex::new(FakeState {
                rv: 1000,
                max_page: 500,
                ..FakeState::default()
            }),
            requests: watch::channel(0).0,
        });
        let app = Router::new()
            .route(
                "/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices",
                get(slices),
            )
            .route("/api/v1/namespaces/{ns}/pods", get(pods))
            .with_state(fake.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Like Go's net/http (the apiserver), no Nagle delay on small watch chunks.
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        tokio::spawn(async move { axum::serve(listener, app).await });
        let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
        (fake, kube::Client::try_from(config).unwrap())
    }

    /// Creates or replaces an object; open watches get ADDED or MODIFIED.
    pub(crate) fn apply(&self, kind: Kind, ns: &str, mut obj: Value) {
        let mut s = self.state.lock().unwrap();
        s.rv += 1;
        let rv = s.rv;
        let name = obj["metadata"]["name"].as_str().unwrap().to_owned();
        obj["apiVersion"] = json!(kind.api_version());
        obj["kind"] = json!(kind.kind());
        obj["metadata"]["namespace"] = json!(ns);
        obj["metadata"]["uid"] = json!(format!("uid-{ns}-{name}"));
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let key = (kind, ns.to_owned(), name);
        let ty = if s.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        s.objects.insert(key, obj.clone());
        s.log.push((rv, kind, ns.to_owned(), ty, obj.clone()));
        broadcast(&mut s, kind, ns, ty, &obj);
    }

    /// Deletes an object; open watches get DELETED with its last state.
    fn delete(&self, kind: Kind, ns: &str, name: &str) {
        let mut s = self.state.lock().unwrap();
        let Some(mut obj) = s.objects.remove(&(kind, ns.to_owned(), name.to_owned())) else {
            panic!("no such object {name}");
        };
        s.rv += 1;
        let rv = s.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        s.log
            .push((rv, kind, ns.to_owned(), "DELETED", obj.clone()));
        broadcast(&mut s, kind, ns, "DELETED", &obj);
    }

    /// Changes state WITHOUT telling watchers (as if their events were lost to compaction),
    /// then expires every resourceVersion so far: open watches get the 410 ERROR event and
    /// end; only a relist can reveal the change.
    fn silently_then_expire(&self, f: impl FnOnce(&mut BTreeMap<(Kind, String, String), Value>)) {
        let mut s = self.state.lock().unwrap();
        f(&mut s.objects);
        s.rv += 1;
        let rv = s.rv;
        for o in s.objects.values_mut() {
            o["metadata"]["resourceVersion"] = json!(rv.to_string());
        }
        s.compacted = rv;
        s.log.clear();
        for w in s.watchers.drain(..) {
            let _ = w.tx.send(expired_line(rv - 1, rv));
        }
    }

    /// Sends a BOOKMARK at the current resourceVersion to every open watch of `kind`.
    fn bookmark(&self, kind: Kind) -> u64 {
        let mut s = self.state.lock().unwrap();
        s.rv += 1;
        let rv = s.rv;
        let line = json!({"type": "BOOKMARK", "object": {
            "kind": kind.kind(), "apiVersion": kind.api_version(),
            "metadata": {"resourceVersion": rv.to_string()}}})
        .to_string()
            + "\n";
        s.watchers
            .retain(|w| w.kind != kind || w.tx.send(line.clone()).is_ok());
        rv
    }

    /// Sends a raw line (e.g. a recorded fixture) to every open watch of `kind`.
    fn send_raw(&self, kind: Kind, line: &str) {
        let mut s = self.state.lock().unwrap();
        let line = format!("{line}\n");
        s.watchers
            .retain(|w| w.kind != kind || w.tx.send(line.clone()).is_ok());
    }

    /// Ends every open watch normally (as the server's watch timeout would).
    fn close_watches(&self) {
        self.state.lock().unwrap().watchers.clear();
    }

    fn set(&self, f: impl FnOnce(&mut FakeState)) {
        f(&mut self.state.lock().unwrap());
    }

    fn seen(&self) -> Vec<(String, HashMap<String, String>)> {
        self.state.lock().unwrap().seen.clone()
    }

    fn open_watches(&self) -> usize {
        self.state.lock().unwrap().watchers.len()
    }

    /// Waits until a request satisfying `pred` has been seen.
    async fn wait_for(
        &self,
        what: &str,
        pred: impl Fn(&[(String, HashMap<String, String>)]) -> bool,
    ) {
        let mut rx = self.requests.subscribe();
        let fut = rx.wait_for(|_| pred(&self.state.lock().unwrap().seen));
        tokio::time::timeout(Duration::from_secs(15), fut)
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
            .unwrap();
    }
}

fn expired_line(asked: u64, current: u64) -> String {
    // The shape of tests/fixtures/watch_expired.jsonl.
    json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure",
        "message": format!("too old resource version: {asked} ({current})"),
        "reason": "Expired", "code": 410}})
    .to_string()
        + "\n"
}

/// What a watch of `kind` sees of `obj` (pods: metadata only, as the client asked).
fn as_served(kind: Kind, obj: &Value, in_list: bool) -> Value {
    match kind {
        Kind::Pod => json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
            "metadata": obj["metadata"].clone()}),
        Kind::Slice if in_list => {
            let mut o = obj.clone();
            let m = o.as_object_mut().unwrap();
            m.remove("apiVersion");
            m.remove("kind");
            o
        }
        Kind::Slice => obj.clone(),
    }
}

fn broadcast(s: &mut FakeState, kind: Kind, ns: &str, ty: &str, obj: &Value) {
    let line = json!({"type": ty, "object": as_served(kind, obj, false)}).to_string() + "\n";
    s.watchers.retain(|w| {
        if w.kind != kind || w.ns != ns || !matches(&w.terms, obj) {
            return !w.tx.is_closed();
        }
        w.tx.send(line.clone()).is_ok()
    });
}

fn status(code: u16, reason: &str, message: &str) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code});
    (
        StatusCode::from_u16(code).unwrap(),
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

type Fake = State<Arc<FakeApi>>;
type Params = Query<HashMap<String, String>>;

async fn slices(fake: Fake, ns: Path<String>, q: Params) -> Response {
    serve(fake, ns, q, Kind::Slice)
}

async fn pods(fake: Fake, ns: Path<String>, q: Params) -> Response {
    serve(fake, ns, q, Kind::Pod)
}

fn serve(State(fake): Fake, Path(ns): Path<String>, Query(q): Params, kind: Kind) -> Response {
    let path = format!("{}/{ns}", kind.kind());
    // Record, then notify without holding the state lock (waiters read the state).
    fake.state.lock().unwrap().seen.push((path, q.clone()));
    fake.requests.send_modify(|c| *c += 1);
    let mut s = fake.state.lock().unwrap();
    let terms = parse_selector(q.get("labelSelector").map_or("", String::as_str));
    let watching = q.get("watch").is_some_and(|w| w == "true" || w == "1");
    if !watching {
        if s.forbidden && kind == Kind::Slice {
            // The apiserver's wording for a missing RBAC rule.
            let msg = format!(
                "endpointslices.discovery.k8s.io is forbidden: User \"system:serviceaccount:graylane:graylane\" \
                 cannot list resource \"endpointslices\" in API group \"discovery.k8s.io\" in the namespace \"{ns}\""
            );
            return status(403, "Forbidden", &msg);
        }
        if s.list_failures > 0 {
            s.list_failures -= 1;
            return status(500, "InternalError", "etcdserver: request timed out");
        }
        let mut items: Vec<Value> = s
            .objects
            .iter()
            .filter(|((k, n, _), o)| *k == kind && *n == ns && matches(&terms, o))
            .map(|(_, o)| as_served(kind, o, true))
            .collect();
        let limit = q
            .get("limit")
            .map_or(usize::MAX, |l| l.parse::<usize>().unwrap())
            .min(s.max_page);
        let offset: usize = q.get("continue").map_or(0, |c| c.parse().unwrap());
        let rest = items.split_off(offset.min(items.len()));
        let more = rest.len() > limit;
        let page: Vec<Value> = rest.into_iter().take(limit).collect();
        let mut meta = json!({"resourceVersion": s.rv.to_string()});
        if more {
            meta["continue"] = json!((offset + limit).to_string());
        }
        let (list_kind, api_version) = match kind {
            Kind::Slice => ("EndpointSliceList", "discovery.k8s.io/v1"),
            Kind::Pod => ("PartialObjectMetadataList", "meta.k8s.io/v1"),
        };
        let body =
            json!({"kind": list_kind, "apiVersion": api_version, "metadata": meta, "items": page});
        return (
            StatusCode::OK,
            [("content-type", "application/json")],
            body.to_string(),
        )
            .into_response();
    }
    if s.watch_failures > 0 {
        s.watch_failures -= 1;
        return status(500, "InternalError", "etcdserver: leader changed");
    }
    let from: u64 = q
        .get("resourceVersion")
        .map_or(0, |v| v.parse().unwrap_or(0));
    let (tx, rx) = mpsc::unbounded_channel::<String>();
    if from < s.compacted {
        // Like the apiserver: HTTP 200 and a single ERROR event with a 410 Status.
        let _ = tx.send(expired_line(from, s.rv));
        drop(tx);
    } else {
        for (rv, k, n, ty, obj) in &s.log {
            if *rv > from && *k == kind && *n == ns && matches(&terms, obj) {
                let line = json!({"type": ty, "object": as_served(kind, obj, false)}).to_string();
                let _ = tx.send(line + "\n");
            }
        }
        s.watchers.push(WatchSub {
            kind,
            ns,
            terms,
            tx,
        });
    }
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|line| (Ok::<_, std::io::Error>(Bytes::from(line)), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap()
}

// ---- objects -------------------------------------------------------------------------------

pub(crate) fn slice(name: &str, service: &str, endpoints: Vec<Value>) -> Value {
    json!({
        "metadata": {"name": name, "labels": {
            "kubernetes.io/service-name": service,
            "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
        "endpoints": endpoints
    })
}

pub(crate) fn ready(addr: &str) -> Value {
    json!({"addresses": [addr], "conditions": {"ready": true, "serving": true, "terminating": false},
           "nodeName": "node-1", "zone": "us-west2-a"})
}

pub(crate) fn cond(addr: &str, conditions: Value) -> Value {
    json!({"addresses": [addr], "conditions": conditions})
}

fn of_pod(addr: &str, ns: &str, pod: &str) -> Value {
    let mut e = ready(addr);
    e["targetRef"] =
        json!({"kind": "Pod", "namespace": ns, "name": pod, "uid": format!("uid-{ns}-{pod}")});
    e
}

fn pod(name: &str, profile: &str) -> Value {
    json!({"metadata": {"name": name, "labels": {"app": "web", "profile": profile}},
           "spec": {"containers": [{"name": "web", "image": "web:1"}]}})
}

fn ep(address: &str) -> Endpoint {
    Endpoint {
        address: address.into(),
        port: 8080,
    }
}

// ---- harness -------------------------------------------------------------------------------

struct Running {
    rx: mpsc::Receiver<Event>,
    /// `Synced` events seen (set aside by `next`).
    synced: usize,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    fn start(client: kube::Client, services: Vec<(String, KubeService)>) -> Running {
        let (tx, rx) = mpsc::channel(64);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run_kube(client, services, tx, shutdown.clone()));
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
            .expect("run_kube did not stop on shutdown")
            .unwrap();
    }
}

fn by_service(ns: &str) -> Vec<(String, KubeService)> {
    vec![(
        "web".into(),
        KubeService {
            namespace: Some(ns.into()),
            services: [
                ("web-gray".into(), "A".into()),
                ("web-prod".into(), "B".into()),
            ]
            .into(),
            ..KubeService::default()
        },
    )]
}

fn key(c: &str) -> (String, String) {
    ("web".into(), c.into())
}

fn is_watch(q: &HashMap<String, String>) -> bool {
    q.get("watch").is_some_and(|w| w == "true")
}

// ---- tests ---------------------------------------------------------------------------------

#[tokio::test]
async fn endpoints_appear_and_follow_changes() {
    let (fake, client) = FakeApi::start().await;
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

    fake.wait_for("a watch", |seen| seen.iter().any(|(_, q)| is_watch(q)))
        .await;
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
    let (path, q) = &seen[0];
    assert_eq!(path, "EndpointSlice/shop");
    assert_eq!(
        q.get("labelSelector").map(String::as_str),
        Some("kubernetes.io/service-name in (web-gray,web-prod)")
    );
    run.stop().await;
}

#[tokio::test]
async fn not_ready_and_terminating_excluded_and_slices_deduplicated() {
    let (fake, client) = FakeApi::start().await;
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
    let (fake, client) = FakeApi::start().await;
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
    fake.wait_for("a watch", |seen| seen.iter().any(|(_, q)| is_watch(q)))
        .await;
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
    let (fake, client) = FakeApi::start().await;
    fake.set(|s| s.max_page = 2);
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
    let continues: Vec<&str> = seen
        .iter()
        .filter_map(|(_, q)| q.get("continue").map(String::as_str))
        .collect();
    assert_eq!(continues, ["2", "4"]);
    run.stop().await;
}

#[tokio::test]
async fn expired_resource_version_relists_to_the_right_state() {
    let (fake, client) = FakeApi::start().await;
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
    fake.wait_for("a watch", |seen| seen.iter().any(|(_, q)| is_watch(q)))
        .await;
    let lists_before = fake.seen().iter().filter(|(_, q)| !is_watch(q)).count();
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
    let lists_after = fake.seen().iter().filter(|(_, q)| !is_watch(q)).count();
    assert!(lists_after > lists_before, "no relist");
    // A 410 is routine (compaction), not an outage: no Stale event.
    fake.wait_for("a new watch", |seen| {
        seen.iter().filter(|(_, q)| is_watch(q)).count() >= 2
    })
    .await;
    run.assert_quiet();
    run.stop().await;
}

#[tokio::test]
async fn bookmark_sets_the_resume_point() {
    let (fake, client) = FakeApi::start().await;
    fake.apply(
        Kind::Slice,
        "shop",
        slice("web-prod-1", "web-prod", vec![ready("10.0.2.1")]),
    );
    let mut run = Running::start(client, by_service("shop"));
    run.endpoints_n(2).await;
    fake.wait_for("a watch", |seen| seen.iter().any(|(_, q)| is_watch(q)))
        .await;
    let first = fake
        .seen()
        .into_iter()
        .find(|(_, q)| is_watch(q))
        .unwrap()
        .1;
    assert_eq!(
        first.get("allowWatchBookmarks").map(String::as_str),
        Some("true")
    );
    assert_eq!(first["resourceVersion"], "1001");
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
    fake.wait_for("a resumed watch", |seen| {
        seen.iter().filter(|(_, q)| is_watch(q)).count() >= 2
    })
    .await;
    let resumed = fake
        .seen()
        .into_iter()
        .filter(|(_, q)| is_watch(q))
        .nth(1)
        .unwrap()
        .1;
    assert_eq!(resumed["resourceVersion"], rv.to_string());
    // Resumed, not relisted, and no event (nothing changed).
    let lists = fake.seen().iter().filter(|(_, q)| !is_watch(q)).count();
    assert_eq!(lists, 1);
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
    let (fake, client) = FakeApi::start().await;
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
    let services = vec![(
        "web".into(),
        KubeService {
            namespaces: [("gray".into(), "A".into()), ("prod".into(), "B".into())].into(),
            ..KubeService::default()
        },
    )];
    let mut run = Running::start(client, services);
    let got = run.endpoints_n(2).await;
    assert_eq!(got[&key("A")], [ep("10.1.0.1")]);
    assert_eq!(got[&key("B")], [ep("10.2.0.1"), ep("10.2.0.2")]);
    fake.wait_for("two watches", |seen| {
        seen.iter().filter(|(_, q)| is_watch(q)).count() >= 2
    })
    .await;
    fake.delete(Kind::Slice, "gray", "web-1");
    assert_eq!(run.endpoints().await, ("web".into(), "A".into(), vec![]));
    run.stop().await;
}

#[tokio::test]
async fn pod_label_mapping_through_target_ref() {
    let (fake, client) = FakeApi::start().await;
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
        KubeService {
            namespace: Some("shop".into()),
            pod_label: Some("profile".into()),
            clusters: [("gray".into(), "A".into()), ("prod".into(), "B".into())].into(),
            ..KubeService::default()
        },
    )];
    let mut run = Running::start(client, services);
    let got = run.endpoints_n(2).await;
    assert_eq!(got[&key("A")], [ep("10.0.0.1")]);
    assert_eq!(got[&key("B")], [ep("10.0.0.2"), ep("10.0.0.3")]);
    let seen = fake.seen();
    let pod_list = seen.iter().find(|(p, _)| p == "Pod/shop").unwrap();
    assert_eq!(
        pod_list.1.get("labelSelector").map(String::as_str),
        Some("profile")
    );
    fake.wait_for("two watches", |seen| {
        seen.iter().filter(|(_, q)| is_watch(q)).count() >= 2
    })
    .await;
    // A prod pod is relabelled gray: its endpoint moves from B to A.
    fake.apply(Kind::Pod, "shop", pod("web-5c4b-c", "gray"));
    let got = run.endpoints_n(2).await;
    assert_eq!(got[&key("A")], [ep("10.0.0.1"), ep("10.0.0.3")]);
    assert_eq!(got[&key("B")], [ep("10.0.0.2")]);
    run.stop().await;
}

#[tokio::test]
async fn apiserver_outage_marks_stale_and_keeps_endpoints() {
    let (fake, client) = FakeApi::start().await;
    fake.apply(
        Kind::Slice,
        "shop",
        slice("web-prod-1", "web-prod", vec![ready("10.0.2.1")]),
    );
    let mut run = Running::start(client, by_service("shop"));
    run.endpoints_n(2).await;
    fake.wait_for("a watch", |seen| seen.iter().any(|(_, q)| is_watch(q)))
        .await;
    // The watch expires and the relist fails twice (apiserver in trouble).
    fake.set(|s| s.list_failures = 2);
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
    fake.wait_for("a new watch", |seen| {
        seen.iter().filter(|(_, q)| is_watch(q)).count() >= 2
    })
    .await;
    run.assert_quiet();
    assert_eq!(fake.open_watches(), 1);
    run.stop().await;
}

#[tokio::test]
async fn fixture_watch_stream_is_understood() {
    // tests/fixtures/watch_stream.jsonl verbatim: ADDED (ready), MODIFIED (terminating),
    // BOOKMARK, DELETED, for the Service "example" in namespace "default".
    let (fake, client) = FakeApi::start().await;
    fake.set(|s| s.rv = 10_000);
    let services = vec![(
        "example".into(),
        KubeService {
            services: [("example".into(), "A".into())].into(),
            ..KubeService::default()
        },
    )];
    let mut run = Running::start(client, services);
    // Empty at first (client's default namespace: "default").
    assert_eq!(
        run.endpoints().await,
        ("example".into(), "A".into(), vec![])
    );
    fake.wait_for("a watch", |seen| seen.iter().any(|(_, q)| is_watch(q)))
        .await;
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
    fake.wait_for("a resumed watch", |seen| {
        seen.iter().filter(|(_, q)| is_watch(q)).count() >= 2
    })
    .await;
    let resumed = fake
        .seen()
        .into_iter()
        .filter(|(_, q)| is_watch(q))
        .nth(1)
        .unwrap()
        .1;
    assert_eq!(resumed["resourceVersion"], "12801");
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
    let (fake, client) = FakeApi::start().await;
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
    let services: Vec<(String, KubeService)> = (0..SERVICES)
        .map(|i| {
            (
                format!("svc-{i}"),
                KubeService {
                    namespace: Some("bench".into()),
                    services: [
                        (format!("svc-{i}-gray"), "A".into()),
                        (format!("svc-{i}-prod"), "B".into()),
                    ]
                    .into(),
                    ..KubeService::default()
                },
            )
        })
        .collect();
    let (tx, mut rx) = mpsc::channel(4096);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run_kube(client, services, tx, shutdown.clone()));
    for _ in 0..SERVICES * 2 {
        tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .unwrap()
            .unwrap();
    }
    let sent: Arc<Mutex<HashMap<(String, String), Instant>>> = Arc::default();
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
    let cpu = crate::cpu_seconds() - cpu0;
    crate::report("kubernetes", steps, &mut latencies, cpu, wall);
    assert_eq!(latencies.len(), steps, "every change must arrive");
    shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn mixed_mappings_in_one_namespace_all_sync() {
    let (fake, client) = FakeApi::start().await;
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
            KubeService {
                namespace: Some("shop".into()),
                pod_label: Some("profile".into()),
                clusters: [("gray".into(), "A".into()), ("prod".into(), "B".into())].into(),
                ..KubeService::default()
            },
        ),
        (
            "api".into(),
            KubeService {
                namespace: Some("shop".into()),
                services: [
                    ("api-gray".into(), "A".into()),
                    ("api-prod".into(), "B".into()),
                ]
                .into(),
                ..KubeService::default()
            },
        ),
    ];
    let mut run = Running::start(client, services);
    // Whichever of the two watches syncs last, every cluster of both services is sent.
    let got = run.endpoints_n(4).await;
    assert_eq!(got[&("web".into(), "A".into())], [ep("10.0.0.1")]);
    assert_eq!(got[&("web".into(), "B".into())], []);
    assert_eq!(got[&("api".into(), "A".into())], [ep("10.0.1.1")]);
    assert_eq!(got[&("api".into(), "B".into())], [ep("10.0.2.1")]);
    fake.wait_for("two watches", |seen| {
        seen.iter().filter(|(_, q)| is_watch(q)).count() >= 2
    })
    .await;
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
    let (fake, client) = FakeApi::start().await;
    fake.apply(
        Kind::Slice,
        "shop",
        slice("web-prod-1", "web-prod", vec![ready("10.0.2.1")]),
    );
    let mut run = Running::start(client, by_service("shop"));
    run.endpoints_n(2).await;
    fake.wait_for("a watch", |seen| seen.iter().any(|(_, q)| is_watch(q)))
        .await;
    // The watch ends and the next restart fails; the one after succeeds, quietly (no event
    // and no relist: the watcher resumes from its resourceVersion).
    fake.set(|s| s.watch_failures = 1);
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
        .filter(|(_, q)| !is_watch(q) && q.get("limit").map(String::as_str) == Some("1"))
        .collect();
    assert!(!probes.is_empty(), "no probe list");
    // Nothing was emptied or re-sent.
    run.assert_quiet();
    run.stop().await;
}

#[tokio::test]
async fn missing_rbac_is_reported_as_stale_with_the_apiserver_message() {
    let (fake, client) = FakeApi::start().await;
    fake.apply(
        Kind::Slice,
        "shop",
        slice("web-prod-1", "web-prod", vec![ready("10.0.2.1")]),
    );
    fake.set(|s| s.forbidden = true);
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
    fake.set(|s| s.forbidden = false);
    match run.next().await {
        Event::Stale { stale, .. } => assert!(!stale),
        other => panic!("expected recovery, got {other:?}"),
    }
    let got = run.endpoints_n(2).await;
    assert_eq!(got[&key("B")], [ep("10.0.2.1")]);
    run.stop().await;
}
