//! A FAKE Consul: an axum app on 127.0.0.1:0 that imitates the parts of Consul's HTTP API
//! graylane uses, as documented:
//! - `GET /v1/health/service/<name>` with blocking queries (`index`, `wait`) that hold until
//!   the index passes the client's or `wait` expires (then answer with the same index);
//! - an `X-Consul-Index` header; entries shaped like the documented sample response
//!   (control-plane/tests/fixtures/consul_health_service.json, see [`instance`]);
//! - plain-text bodies on 403/429/500 ([`Consul::fail_next`]);
//! - an index that moves backwards (a snapshot restore, [`Consul::restore`]) or answers 0.
//!
//! It is a fake: it does not add Consul's wait/16 jitter and knows nothing of ACL rules. Its
//! index is global by default (older Consul: a write anywhere wakes every query) or per service
//! ([`Consul::index_per_service`], modern Consul).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, State as Shared};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::ListenerExt;
use axum::Router;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::lock;

/// One request as the fake saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The service asked for (`/v1/health/service/<service>`).
    pub service: String,
    pub query: HashMap<String, String>,
    /// The `X-Consul-Token` header.
    pub token: Option<String>,
    /// When it arrived (tokio's clock).
    pub at: Instant,
    /// The status it was answered with when it was one of the queued failures.
    pub failed: Option<u16>,
}

#[derive(Default)]
struct State {
    index: u64,
    services: BTreeMap<String, Vec<Value>>,
    /// Answers to give instead of the normal one, in order: status + plain-text body.
    failures: VecDeque<(StatusCode, String)>,
    /// Overrides the X-Consul-Index header of the next answers.
    index_override: Option<u64>,
    /// Every answer bumps the index first (a registry that never settles).
    churn: bool,
    /// Index per service instead of one global index.
    per_service: bool,
    modified: BTreeMap<String, u64>,
    seen: Vec<Seen>,
}

impl State {
    fn index_of(&self, service: &str) -> u64 {
        if self.per_service {
            self.modified.get(service).copied().unwrap_or(self.index)
        } else {
            self.index
        }
    }
}

/// The fake. Cheap to share: `Arc<Consul>`.
pub struct Consul {
    state: Mutex<State>,
    /// Bumped on every change of state; blocked queries wake on it.
    changed: watch::Sender<u64>,
    /// Number of requests seen.
    requests: watch::Sender<usize>,
}

impl Consul {
    /// Starts it on 127.0.0.1:0 (index 10, no services); returns it and its base URL.
    pub async fn start() -> (Arc<Consul>, String) {
        let fake = Arc::new(Consul {
            state: Mutex::new(State {
                index: 10,
                ..State::default()
            }),
            changed: watch::channel(0).0,
            requests: watch::channel(0).0,
        });
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the fake Consul");
        let addr = listener.local_addr().expect("the fake Consul's address");
        fake.serve(listener, CancellationToken::new());
        (fake, format!("http://{addr}"))
    }

    /// Also serves on `listener` until `stop` (then its open connections are closed too): an
    /// agent that can go away and come back on the same address.
    pub fn serve(self: &Arc<Self>, listener: TcpListener, stop: CancellationToken) {
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

    fn mutate(&self, f: impl FnOnce(&mut State)) {
        f(&mut lock(&self.state));
        self.changed.send_modify(|g| *g += 1);
    }

    /// Registers or replaces a service's instances (a Raft write: the index moves on).
    pub fn set_service(&self, name: &str, entries: Vec<Value>) {
        self.mutate(|s| {
            s.index += 1;
            let index = s.index;
            s.modified.insert(name.into(), index);
            s.services.insert(name.into(), entries);
        });
    }

    /// Moves the (global) index to `index` without a write.
    pub fn set_index(&self, index: u64) {
        self.mutate(|s| s.index = index);
    }

    /// A snapshot restore: the index becomes `index` (maybe lower than before) and service
    /// `name` has `entries`.
    pub fn restore(&self, index: u64, name: &str, entries: Vec<Value>) {
        self.mutate(|s| {
            s.index = index;
            s.modified.insert(name.into(), index);
            s.services.insert(name.into(), entries);
        });
    }

    /// Answers `index` in `X-Consul-Index` from now on (`None`: the real index again).
    pub fn answer_index(&self, index: Option<u64>) {
        self.mutate(|s| s.index_override = index);
    }

    /// The next call gets `status` with the plain-text `body` (queued after earlier ones).
    pub fn fail_next(&self, status: u16, body: &str) {
        let status = StatusCode::from_u16(status).expect("an HTTP status");
        self.mutate(|s| s.failures.push_back((status, body.to_owned())));
    }

    /// Every answer moves the index on first (a registry that never settles).
    pub fn churn(&self, on: bool) {
        self.mutate(|s| s.churn = on);
    }

    /// One index per service (modern Consul: a write to one service does not wake the queries
    /// of another) instead of one global index.
    pub fn index_per_service(&self, on: bool) {
        self.mutate(|s| s.per_service = on);
    }

    /// Every request so far, in order.
    pub fn seen(&self) -> Vec<Seen> {
        lock(&self.state).seen.clone()
    }

    /// Waits until at least `n` requests arrived in total (at most 10 s).
    pub async fn wait_requests(&self, n: usize) {
        let mut rx = self.requests.subscribe();
        let waited = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|c| *c >= n)).await;
        assert!(
            matches!(waited, Ok(Ok(_))),
            "fewer than {n} requests within 10s"
        );
    }

    /// Requests so far.
    pub fn request_count(&self) -> usize {
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
    let n: f64 = n.parse().expect("a numeric wait");
    Duration::from_secs_f64(n * mul).min(Duration::from_secs(600))
}

async fn health(
    Shared(fake): Shared<Arc<Consul>>,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let client_index: u64 = query
        .get("index")
        .map_or(0, |i| i.parse().expect("a numeric index"));
    let wait = parse_wait(query.get("wait"));
    let mut changed = fake.changed.subscribe();
    {
        let mut s = lock(&fake.state);
        let failed = s.failures.front().map(|(st, _)| st.as_u16());
        s.seen.push(Seen {
            service: name.clone(),
            query: query.clone(),
            token: headers
                .get("x-consul-token")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
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
                let s = lock(&fake.state);
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
    let s = lock(&fake.state);
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

/// A `/v1/health/service` entry shaped like Consul's documented sample: node `node_addr`,
/// service address `svc_addr` (empty: the node's), tag and `Meta.profile` = `profile`, the node
/// check `serfHealth` passing and one service check with status `check`.
pub fn instance(node_addr: &str, svc_addr: &str, port: u16, profile: &str, check: &str) -> Value {
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
