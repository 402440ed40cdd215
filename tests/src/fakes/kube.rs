//! A FAKE Kubernetes API server: an axum app on 127.0.0.1:0 that a real `kube::Client` (built
//! from a `kube::Config` pointing at it) talks to, imitating what kube's watcher uses, after
//! the documented API concepts:
//! - list with `labelSelector`, `limit` and `continue` (the fake may return fewer items than
//!   `limit`, as the API allows), answering `metadata.resourceVersion`; items carry no
//!   apiVersion/kind, as in real typed lists;
//! - watch (`watch=true&resourceVersion=N`) as a chunked stream of newline-delimited JSON
//!   events: ADDED, MODIFIED, DELETED, and BOOKMARK (`apiVersion`/`kind` + resourceVersion);
//! - an expired resourceVersion answered, like the real apiserver, with HTTP 200 and one
//!   `ERROR` event carrying a 410 `Expired` Status
//!   (control-plane/tests/fixtures/watch_expired.jsonl), which must make the client relist;
//! - pods served metadata-only (PartialObjectMetadata), as the client asks for;
//! - a 403 with the apiserver's RBAC wording, 500s on lists or watches, on demand;
//! - Deployments' `scale` subresource (`autoscaling/v1` Scale: GET, merge PATCH, PUT): a
//!   change of replicas makes the Deployment's EndpointSlices grow or shrink at once (one
//!   slice of one ready endpoint per replica, from the addresses the test gave it), as the
//!   ReplicaSet and EndpointSlice controllers would once the pods are ready.
//! - server-side apply of Istio's VirtualServices and DestinationRules
//!   (`PATCH /apis/networking.istio.io/v1/namespaces/{ns}/{resource}/{name}`, content type
//!   `application/apply-patch+yaml`): refused like the apiserver without `fieldManager` (400),
//!   with another patch type (415 here: the fake takes apply only), or with a body whose
//!   apiVersion, kind, name or namespace disagree with the path (400); answered with the
//!   object (201 when created, 200 after); every request recorded ([`Applied`]); 500s on
//!   demand. The fake replaces the whole object (one field manager: graylane), reads the body
//!   as JSON (what kube-rs sends), and does not validate it against Istio's schema.
//!
//! It is a fake: later list pages come from the current state rather than a snapshot, there is
//! no authentication, no field selectors, no watch timeout, and only the label-selector forms
//! graylane sends (`k in (a,b)`, `k=v`, `k`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State as Shared};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, MethodRouter};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

use super::lock;

/// The kinds of object the fake serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
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

/// Every object, by (kind, namespace, name).
pub type Objects = BTreeMap<(Kind, String, String), Value>;

/// One request as the fake saw it.
#[derive(Debug, Clone)]
pub struct Request {
    /// `EndpointSlice/<namespace>` or `Pod/<namespace>`.
    pub path: String,
    pub query: HashMap<String, String>,
}

impl Request {
    /// A watch rather than a list.
    pub fn is_watch(&self) -> bool {
        self.query.get("watch").is_some_and(|w| w == "true")
    }

    /// The query parameter `key`.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.query.get(key).map(String::as_str)
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
        match bytes.get(i).copied() {
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
struct State {
    rv: u64,
    objects: Objects,
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
    seen: Vec<Request>,
    deployments: BTreeMap<(String, String), Deployment>,
    /// Every scale write (PATCH or PUT): (namespace, name, replicas).
    scales: Vec<(String, String, u32)>,
    /// Every server-side apply request of an Istio object, refused ones included.
    applies: Vec<Applied>,
    /// Istio objects as applied, by (resource, namespace, name).
    istio: BTreeMap<(String, String, String), Value>,
    /// Applies fail with a 500 while > 0 (decremented per failure).
    apply_failures: usize,
}

/// One apply request of an Istio object, as the fake saw it.
#[derive(Debug, Clone)]
pub struct Applied {
    /// `virtualservices` or `destinationrules`.
    pub resource: String,
    pub namespace: String,
    pub name: String,
    pub content_type: String,
    /// `?fieldManager=`.
    pub field_manager: Option<String>,
    /// `?force=true`.
    pub force: bool,
    /// The body (`null` if it was not JSON).
    pub body: Value,
    /// What the fake answered.
    pub status: u16,
}

/// A Deployment as the fake keeps it: its replicas and the endpoints its pods would have.
struct Deployment {
    replicas: u32,
    /// The Service its pods back (the slices' `kubernetes.io/service-name`).
    service: String,
    /// Replica i listens at `pool[i]` (address, port); replicas past the pool are not ready.
    pool: Vec<(String, u16)>,
}

/// The fake. Cheap to share: `Arc<ApiServer>`.
pub struct ApiServer {
    state: Mutex<State>,
    requests: watch::Sender<usize>,
    addr: std::net::SocketAddr,
}

impl ApiServer {
    /// Starts it on 127.0.0.1:0 (resourceVersion 1000, pages of 500); returns it and a real
    /// client of it (default namespace `default`).
    pub async fn start() -> (Arc<ApiServer>, kube::Client) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the fake apiserver");
        let addr = listener.local_addr().expect("the fake apiserver's address");
        let fake = Arc::new(ApiServer {
            state: Mutex::new(State {
                rv: 1000,
                max_page: 500,
                ..State::default()
            }),
            requests: watch::channel(0).0,
            addr,
        });
        let app = Router::new()
            .route(
                "/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices",
                get(slices),
            )
            .route("/api/v1/namespaces/{ns}/pods", get(pods))
            .route(
                "/apis/apps/v1/namespaces/{ns}/deployments/{name}/scale",
                scale_routes(),
            )
            .route(
                "/apis/networking.istio.io/{version}/namespaces/{ns}/{resource}/{name}",
                axum::routing::patch(istio_apply),
            )
            .with_state(fake.clone());
        // Like Go's net/http (the apiserver), no Nagle delay on small watch chunks.
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        tokio::spawn(async move { axum::serve(listener, app).await });
        let url = format!("http://{addr}").parse().expect("the fake's URL");
        let client = kube::Client::try_from(kube::Config::new(url)).expect("a kube client");
        (fake, client)
    }

    /// Where it listens (for a kubeconfig of a process that is not this one).
    pub fn address(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// Creates Deployment `ns/name` with `replicas`, whose pods back Service `service`; replica
    /// i listens at `pool[i]`. Its slices (`<name>-<i>`) are made at once.
    pub fn deployment(
        &self,
        ns: &str,
        name: &str,
        service: &str,
        pool: Vec<(String, u16)>,
        replicas: u32,
    ) {
        let mut s = lock(&self.state);
        s.deployments.insert(
            (ns.to_owned(), name.to_owned()),
            Deployment {
                replicas: 0,
                service: service.to_owned(),
                pool,
            },
        );
        set_replicas(&mut s, ns, name, replicas);
    }

    /// Deployment `ns/name`'s replicas now.
    pub fn replicas(&self, ns: &str, name: &str) -> Option<u32> {
        lock(&self.state)
            .deployments
            .get(&(ns.to_owned(), name.to_owned()))
            .map(|d| d.replicas)
    }

    /// Every apply request of an Istio object so far, in order.
    pub fn applied(&self) -> Vec<Applied> {
        lock(&self.state).applies.clone()
    }

    /// The Istio object `resource/ns/name` as applied last (with the fake's metadata).
    pub fn istio_object(&self, resource: &str, ns: &str, name: &str) -> Option<Value> {
        lock(&self.state)
            .istio
            .get(&(resource.to_owned(), ns.to_owned(), name.to_owned()))
            .cloned()
    }

    /// The next `n` applies fail with a 500 (0: none fail from now on).
    pub fn fail_applies(&self, n: usize) {
        lock(&self.state).apply_failures = n;
    }

    /// Waits (at most 15 s) until the apply requests seen satisfy `pred`.
    pub async fn wait_applied(&self, what: &str, pred: impl Fn(&[Applied]) -> bool) {
        let mut rx = self.requests.subscribe();
        let fut = rx.wait_for(|_| pred(&lock(&self.state).applies));
        let waited = tokio::time::timeout(Duration::from_secs(15), fut).await;
        assert!(matches!(waited, Ok(Ok(_))), "timed out waiting for {what}");
    }

    /// Every scale write so far: (namespace, name, replicas).
    pub fn scales(&self) -> Vec<(String, String, u32)> {
        lock(&self.state).scales.clone()
    }

    /// Creates or replaces an object; open watches get ADDED or MODIFIED.
    pub fn apply(&self, kind: Kind, ns: &str, obj: Value) {
        apply_locked(&mut lock(&self.state), kind, ns, obj);
    }

    /// Deletes an object; open watches get DELETED with its last state.
    pub fn delete(&self, kind: Kind, ns: &str, name: &str) {
        delete_locked(&mut lock(&self.state), kind, ns, name);
    }

    /// Changes state WITHOUT telling watchers (as if their events were lost to compaction),
    /// then expires every resourceVersion so far: open watches get the 410 ERROR event and
    /// end; only a relist can reveal the change.
    pub fn silently_then_expire(&self, f: impl FnOnce(&mut Objects)) {
        let mut s = lock(&self.state);
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

    /// Sends a BOOKMARK at a new resourceVersion to every open watch of `kind`; returns it.
    pub fn bookmark(&self, kind: Kind) -> u64 {
        let mut s = lock(&self.state);
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
    pub fn send_raw(&self, kind: Kind, line: &str) {
        let mut s = lock(&self.state);
        let line = format!("{line}\n");
        s.watchers
            .retain(|w| w.kind != kind || w.tx.send(line.clone()).is_ok());
    }

    /// Ends every open watch normally (as the server's watch timeout would).
    pub fn close_watches(&self) {
        lock(&self.state).watchers.clear();
    }

    /// Starts the resourceVersion at `rv` (before any object exists).
    pub fn set_resource_version(&self, rv: u64) {
        lock(&self.state).rv = rv;
    }

    /// Answers at most `n` items per list page.
    pub fn page_size(&self, n: usize) {
        lock(&self.state).max_page = n;
    }

    /// The next `n` lists fail with a 500.
    pub fn fail_lists(&self, n: usize) {
        lock(&self.state).list_failures = n;
    }

    /// The next `n` watch requests fail with a 500.
    pub fn fail_watches(&self, n: usize) {
        lock(&self.state).watch_failures = n;
    }

    /// Lists of endpointslices are refused with a 403 (a missing RBAC rule) while `on`.
    pub fn forbid_slices(&self, on: bool) {
        lock(&self.state).forbidden = on;
    }

    /// Every request so far, in order.
    pub fn seen(&self) -> Vec<Request> {
        lock(&self.state).seen.clone()
    }

    /// Lists (not watches) so far.
    pub fn lists(&self) -> usize {
        lock(&self.state)
            .seen
            .iter()
            .filter(|r| !r.is_watch())
            .count()
    }

    /// Watches open now.
    pub fn open_watches(&self) -> usize {
        lock(&self.state).watchers.len()
    }

    /// Waits (at most 15 s) until the requests seen satisfy `pred`.
    pub async fn wait_for(&self, what: &str, pred: impl Fn(&[Request]) -> bool) {
        let mut rx = self.requests.subscribe();
        let fut = rx.wait_for(|_| pred(&lock(&self.state).seen));
        let waited = tokio::time::timeout(Duration::from_secs(15), fut).await;
        assert!(matches!(waited, Ok(Ok(_))), "timed out waiting for {what}");
    }

    /// Waits until `n` watch requests have been made in total.
    pub async fn wait_watches(&self, n: usize) {
        self.wait_for(&format!("{n} watch request(s)"), |seen| {
            seen.iter().filter(|r| r.is_watch()).count() >= n
        })
        .await;
    }
}

fn apply_locked(s: &mut State, kind: Kind, ns: &str, mut obj: Value) {
    s.rv += 1;
    let rv = s.rv;
    let name = obj["metadata"]["name"]
        .as_str()
        .expect("an object with metadata.name")
        .to_owned();
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
    broadcast(s, kind, ns, ty, &obj);
}

fn delete_locked(s: &mut State, kind: Kind, ns: &str, name: &str) {
    let mut obj = s
        .objects
        .remove(&(kind, ns.to_owned(), name.to_owned()))
        .unwrap_or_else(|| panic!("no such object {name}"));
    s.rv += 1;
    let rv = s.rv;
    obj["metadata"]["resourceVersion"] = json!(rv.to_string());
    s.log
        .push((rv, kind, ns.to_owned(), "DELETED", obj.clone()));
    broadcast(s, kind, ns, "DELETED", &obj);
}

/// Sets a Deployment's replicas: slices `<name>-<i>` exist for i below them (one ready
/// endpoint each, from its pool), none above.
fn set_replicas(s: &mut State, ns: &str, name: &str, replicas: u32) {
    let key = (ns.to_owned(), name.to_owned());
    let Some(d) = s.deployments.get_mut(&key) else {
        return;
    };
    let old = d.replicas;
    d.replicas = replicas;
    let (service, pool) = (d.service.clone(), d.pool.clone());
    for i in replicas..old {
        let slice_name = format!("{name}-{i}");
        if s.objects
            .contains_key(&(Kind::Slice, ns.to_owned(), slice_name.clone()))
        {
            delete_locked(s, Kind::Slice, ns, &slice_name);
        }
    }
    for i in old..replicas {
        if let Some((addr, port)) = pool.get(i as usize) {
            let mut obj = slice(&format!("{name}-{i}"), &service, vec![ready(addr)]);
            obj["ports"][0]["port"] = json!(port);
            apply_locked(s, Kind::Slice, ns, obj);
        }
    }
}

fn scale_routes() -> MethodRouter<Arc<ApiServer>> {
    get(scale_get).patch(scale_write).put(scale_write)
}

fn scale_of(ns: &str, name: &str, rv: u64, replicas: u32) -> Value {
    json!({"kind": "Scale", "apiVersion": "autoscaling/v1",
        "metadata": {"name": name, "namespace": ns, "resourceVersion": rv.to_string(),
                     "uid": format!("uid-{ns}-{name}")},
        "spec": {"replicas": replicas},
        "status": {"replicas": replicas, "selector": format!("app={name}")}})
}

async fn scale_get(Shared(fake): Fake, Path((ns, name)): Path<(String, String)>) -> Response {
    let s = lock(&fake.state);
    match s.deployments.get(&(ns.clone(), name.clone())) {
        Some(d) => Json(scale_of(&ns, &name, s.rv, d.replicas)).into_response(),
        None => not_found(&name),
    }
}

/// A merge patch or a replacement of the Scale: both carry `spec.replicas`.
async fn scale_write(
    Shared(fake): Fake,
    Path((ns, name)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the body is not JSON",
        );
    };
    let Some(replicas) = v["spec"]["replicas"]
        .as_u64()
        .and_then(|r| u32::try_from(r).ok())
    else {
        return status(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "Scale.autoscaling \"x\" is invalid: spec.replicas: Required value",
        );
    };
    let mut s = lock(&fake.state);
    if !s.deployments.contains_key(&(ns.clone(), name.clone())) {
        return not_found(&name);
    }
    s.scales.push((ns.clone(), name.clone(), replicas));
    set_replicas(&mut s, &ns, &name, replicas);
    s.rv += 1;
    Json(scale_of(&ns, &name, s.rv, replicas)).into_response()
}

/// Server-side apply of a VirtualService or DestinationRule (see the module's comment).
async fn istio_apply(
    Shared(fake): Fake,
    Path((version, ns, resource, name)): Path<(String, String, String, String)>,
    Query(q): Params,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let field_manager = q.get("fieldManager").cloned();
    let force = q.get("force").is_some_and(|f| f == "true");
    let kind = match resource.as_str() {
        "virtualservices" => "VirtualService",
        "destinationrules" => "DestinationRule",
        _ => "",
    };
    let api_version = format!("networking.istio.io/{version}");
    let answer = {
        let mut s = lock(&fake.state);
        let key = (resource.clone(), ns.clone(), name.clone());
        let answer = if kind.is_empty() {
            status(
                StatusCode::NOT_FOUND,
                "NotFound",
                "the server could not find the requested resource",
            )
        } else if content_type != "application/apply-patch+yaml" {
            status(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedMediaType",
                &format!("the fake takes server-side apply only, not {content_type:?}"),
            )
        } else if field_manager.as_deref().unwrap_or_default().is_empty() {
            status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
            )
        } else if parsed["apiVersion"] != json!(api_version)
            || parsed["kind"] != json!(kind)
            || parsed["metadata"]["name"] != json!(name)
            || !(parsed["metadata"]["namespace"].is_null()
                || parsed["metadata"]["namespace"] == json!(ns))
        {
            status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "the body's apiVersion, kind, name or namespace does not match the request",
            )
        } else if s.apply_failures > 0 {
            s.apply_failures -= 1;
            status(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "etcdserver: request timed out",
            )
        } else {
            s.rv += 1;
            let created = !s.istio.contains_key(&key);
            let mut obj = parsed.clone();
            obj["metadata"]["namespace"] = json!(ns);
            obj["metadata"]["uid"] = json!(format!("uid-{ns}-{name}"));
            obj["metadata"]["resourceVersion"] = json!(s.rv.to_string());
            s.istio.insert(key, obj.clone());
            let code = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            (code, Json(obj)).into_response()
        };
        s.applies.push(Applied {
            resource,
            namespace: ns,
            name,
            content_type,
            field_manager,
            force,
            body: parsed,
            status: answer.status().as_u16(),
        });
        answer
    };
    fake.requests.send_modify(|c| *c += 1);
    answer
}

fn not_found(name: &str) -> Response {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("deployments.apps \"{name}\" not found"),
    )
}

fn expired_line(asked: u64, current: u64) -> String {
    // The shape of control-plane/tests/fixtures/watch_expired.jsonl.
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
            if let Some(m) = o.as_object_mut() {
                m.remove("apiVersion");
                m.remove("kind");
            }
            o
        }
        Kind::Slice => obj.clone(),
    }
}

fn broadcast(s: &mut State, kind: Kind, ns: &str, ty: &str, obj: &Value) {
    let line = json!({"type": ty, "object": as_served(kind, obj, false)}).to_string() + "\n";
    s.watchers.retain(|w| {
        if w.kind != kind || w.ns != ns || !matches(&w.terms, obj) {
            return !w.tx.is_closed();
        }
        w.tx.send(line.clone()).is_ok()
    });
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16()});
    (
        code,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

type Fake = Shared<Arc<ApiServer>>;
type Params = Query<HashMap<String, String>>;

async fn slices(fake: Fake, ns: Path<String>, q: Params) -> Response {
    serve(fake, ns, q, Kind::Slice)
}

async fn pods(fake: Fake, ns: Path<String>, q: Params) -> Response {
    serve(fake, ns, q, Kind::Pod)
}

fn serve(Shared(fake): Fake, Path(ns): Path<String>, Query(q): Params, kind: Kind) -> Response {
    let path = format!("{}/{ns}", kind.kind());
    // Record, then notify without holding the state lock (waiters read the state).
    lock(&fake.state).seen.push(Request {
        path,
        query: q.clone(),
    });
    fake.requests.send_modify(|c| *c += 1);
    let mut s = lock(&fake.state);
    let terms = parse_selector(q.get("labelSelector").map_or("", String::as_str));
    let watching = q.get("watch").is_some_and(|w| w == "true" || w == "1");
    if !watching {
        if s.forbidden && kind == Kind::Slice {
            // The apiserver's wording for a missing RBAC rule.
            let msg = format!(
                "endpointslices.discovery.k8s.io is forbidden: User \"system:serviceaccount:graylane:graylane\" \
                 cannot list resource \"endpointslices\" in API group \"discovery.k8s.io\" in the namespace \"{ns}\""
            );
            return status(StatusCode::FORBIDDEN, "Forbidden", &msg);
        }
        if s.list_failures > 0 {
            s.list_failures -= 1;
            return status(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "etcdserver: request timed out",
            );
        }
        let mut items: Vec<Value> = s
            .objects
            .iter()
            .filter(|((k, n, _), o)| *k == kind && *n == ns && matches(&terms, o))
            .map(|(_, o)| as_served(kind, o, true))
            .collect();
        let limit = q
            .get("limit")
            .and_then(|l| l.parse::<usize>().ok())
            .unwrap_or(usize::MAX)
            .min(s.max_page);
        let offset: usize = q.get("continue").and_then(|c| c.parse().ok()).unwrap_or(0);
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
        return status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "etcdserver: leader changed",
        );
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
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        Body::from_stream(stream),
    )
        .into_response()
}

// ---- objects -------------------------------------------------------------------------------

/// An EndpointSlice of Service `service` (port `http` 8080) with `endpoints`.
pub fn slice(name: &str, service: &str, endpoints: Vec<Value>) -> Value {
    json!({
        "metadata": {"name": name, "labels": {
            "kubernetes.io/service-name": service,
            "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
        "endpoints": endpoints
    })
}

/// A ready, serving, not terminating endpoint.
pub fn ready(addr: &str) -> Value {
    json!({"addresses": [addr], "conditions": {"ready": true, "serving": true, "terminating": false},
           "nodeName": "node-1", "zone": "us-west2-a"})
}

/// An endpoint with these `conditions`.
pub fn cond(addr: &str, conditions: Value) -> Value {
    json!({"addresses": [addr], "conditions": conditions})
}

/// A ready endpoint whose `targetRef` is pod `pod` in `ns`.
pub fn of_pod(addr: &str, ns: &str, pod: &str) -> Value {
    let mut e = ready(addr);
    e["targetRef"] =
        json!({"kind": "Pod", "namespace": ns, "name": pod, "uid": format!("uid-{ns}-{pod}")});
    e
}

/// A pod labelled `app: web` and `profile: <profile>`.
pub fn pod(name: &str, profile: &str) -> Value {
    json!({"metadata": {"name": name, "labels": {"app": "web", "profile": profile}},
           "spec": {"containers": [{"name": "web", "image": "web:1"}]}})
}
