//! The admin API through the router, without sockets: auth, edits, bulk whitelists, invalid
//! writes, history / diff / revert, the operation log, explain, the feed's long-poll, and
//! config-file reloads.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use graylane_control_plane::api::{router, AppState};
use graylane_control_plane::config::{Config, Limits};
use graylane_control_plane::discovery::{Event, SourceKind};
use graylane_control_plane::metrics::Metrics;
use graylane_control_plane::store::Store;
use graylane_control_plane::writer::{Handle, Writer};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

const W: &str = "writer-token-1";
const R: &str = "reader-token-1";

const CONFIG: &str = r#"
tokens:
  - {name: ops, token: writer-token-1, role: write}
  - {name: viewer, token: reader-token-1, role: read}
services:
  web:
    route-strategy:
      A: {status: Y, id: {all: false, ids: [1, 2, 3], interval: [[1,100], [600,10000]]}}
      B: {status: G, id: {all: true}}
"#;

struct Harness {
    app: Router,
    writer: Handle,
    events: mpsc::Sender<Event>,
    _stop: tokio_util::sync::DropGuard,
}

fn start(config: &str) -> Harness {
    start_with(config, &Limits::default())
}

fn start_with(config: &str, limits: &Limits) -> Harness {
    let cfg = Config::parse(config, Path::new("graylane.yaml")).unwrap();
    let (writer, snapshots) = Writer::open(Store::memory().unwrap(), &cfg, "h0").unwrap();
    let history = writer.reader().unwrap();
    let (commands, rx) = mpsc::channel(64);
    let (events, events_rx) = mpsc::channel(64);
    let stop = CancellationToken::new();
    tokio::spawn(writer.run(rx, events_rx, stop.clone()));
    let handle = Handle::new(commands);
    let state = AppState::new(snapshots, handle.clone(), history, Arc::new(Metrics::new()));
    Harness {
        app: router(state, limits),
        writer: handle,
        events,
        _stop: stop.drop_guard(),
    }
}

async fn call(
    app: &Router,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = match body {
        Some(b) => req
            .header("content-type", "application/json")
            .body(Body::from(b.to_string())),
        None => req.body(Body::empty()),
    }
    .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
    (status, v)
}

async fn explain(app: &Router, tenant: &str) -> String {
    let (s, v) = call(
        app,
        "POST",
        "/v1/services/web/explain",
        Some(R),
        Some(json!({"tenant": tenant})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v["decision"]["cluster"]
        .as_str()
        .unwrap_or("none")
        .to_string()
}

#[tokio::test]
async fn auth_401_without_token_403_for_a_reader_writing() {
    let h = start(CONFIG);
    let (s, v) = call(&h.app, "GET", "/v1/status", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(v["code"], "unauthorized");
    let (s, _) = call(&h.app, "GET", "/v1/status", Some("nope-nope"), None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, v) = call(
        &h.app,
        "PUT",
        "/v1/services/web/clusters/A/state",
        Some(R),
        Some(json!({"state": "R"})),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(v["code"], "forbidden");
    let (s, v) = call(&h.app, "GET", "/v1/status", Some(R), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["version"], 1);
    // The feed, health and metrics need no token.
    let (s, _) = call(&h.app, "GET", "/healthz", None, None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = call(&h.app, "GET", "/v1/openapi.json", None, None).await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn edits_history_diff_revert_and_the_operation_log() {
    let h = start(CONFIG);
    assert_eq!(explain(&h.app, "2").await, "A");
    let (s, v) = call(
        &h.app,
        "PUT",
        "/v1/services/web/clusters/A/state",
        Some(W),
        Some(json!({"state": "R"})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["version"], 2);
    assert_eq!(v["summary"][0], "web.A: status Y -> R");
    assert_eq!(explain(&h.app, "2").await, "B");

    let (_, v) = call(
        &h.app,
        "POST",
        "/v1/services/web/clusters/A/whitelist/add",
        Some(W),
        Some(json!({"ids": [5000000], "intervals": [[20000, 20010]]})),
    )
    .await;
    assert_eq!(v["version"], 3, "{v}");
    let (_, v) = call(
        &h.app,
        "PUT",
        "/v1/services/web/clusters/A/state",
        Some(W),
        Some(json!({"state": "Y"})),
    )
    .await;
    assert_eq!(v["version"], 4);
    assert_eq!(explain(&h.app, "5000000").await, "A");
    assert_eq!(explain(&h.app, "20005").await, "A");
    let (_, v) = call(
        &h.app,
        "POST",
        "/v1/services/web/clusters/A/whitelist/remove",
        Some(W),
        Some(json!({"intervals": [[600, 10000]]})),
    )
    .await;
    assert_eq!(v["version"], 5, "{v}");
    assert_eq!(explain(&h.app, "700").await, "B");

    // The same edit twice: no new version.
    let (_, v) = call(
        &h.app,
        "PUT",
        "/v1/services/web/clusters/A/state",
        Some(W),
        Some(json!({"state": "Y"})),
    )
    .await;
    assert_eq!(
        (v["version"].as_u64(), v["changed"].as_bool()),
        (Some(5), Some(false))
    );

    let (_, v) = call(&h.app, "GET", "/v1/history", Some(R), None).await;
    let versions: Vec<u64> = v["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, vec![5, 4, 3, 2, 1]);
    assert_eq!(v["versions"][0]["author"], "ops");

    let (_, v) = call(&h.app, "GET", "/v1/diff?from=1&to=5", Some(R), None).await;
    let changes: Vec<&str> = v["changes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(changes, vec!["web.A: ids +1 -0", "web.A: intervals +1 -1"]);

    // Revert to version 1 makes version 6, equal to 1.
    let (_, v) = call(
        &h.app,
        "POST",
        "/v1/revert",
        Some(W),
        Some(json!({"version": 1})),
    )
    .await;
    assert_eq!(v["version"], 6, "{v}");
    assert_eq!(explain(&h.app, "700").await, "A");
    let (_, v) = call(&h.app, "GET", "/v1/diff?from=1&to=6", Some(R), None).await;
    assert_eq!(v["changes"], json!([]));
    let (s, v) = call(
        &h.app,
        "POST",
        "/v1/revert",
        Some(W),
        Some(json!({"version": 99})),
    )
    .await;
    assert_eq!(
        (s, v["field"].as_str()),
        (StatusCode::NOT_FOUND, Some("version"))
    );

    let (_, v) = call(&h.app, "GET", "/v1/operations", Some(R), None).await;
    let ops = v["operations"].as_array().unwrap();
    assert_eq!(ops[0]["what"], "revert to version 1");
    assert_eq!(
        (
            ops[0]["version_before"].as_u64(),
            ops[0]["version_after"].as_u64()
        ),
        (Some(5), Some(6))
    );
    assert!(ops
        .iter()
        .any(|o| o["what"] == "set-state web A R" && o["who"] == "ops"));
}

#[tokio::test]
async fn invalid_writes_name_the_field_and_change_nothing() {
    let h = start(CONFIG);
    let cases = [
        (
            "PUT",
            "/v1/services/web/clusters/A/state",
            json!({"state": "X"}),
            "state",
        ),
        (
            "POST",
            "/v1/services/web/clusters/A/whitelist/add",
            json!({"intervals": [[9, 1]]}),
            "intervals[0]",
        ),
        (
            "POST",
            "/v1/services/web/clusters/A/whitelist/add",
            json!({"ids": [-1]}),
            "ids[0]",
        ),
        (
            "PUT",
            "/v1/services/web/clusters/Z/state",
            json!({"state": "G"}),
            "cluster",
        ),
        (
            "PUT",
            "/v1/services/web/clusters/A/percent",
            json!({"percent": {"value": 150}}),
            "services.web.route-strategy.A.percent.value",
        ),
        (
            "PUT",
            "/v1/services/nope/clusters/A/state",
            json!({"state": "G"}),
            "service",
        ),
    ];
    for (method, path, body, field) in cases {
        let (s, v) = call(&h.app, method, path, Some(W), Some(body)).await;
        assert!(s.is_client_error(), "{path}: {s} {v}");
        assert_eq!(v["field"], field, "{path}: {v}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let (_, v) = call(&h.app, "GET", "/v1/status", Some(R), None).await;
    assert_eq!(v["version"], 1, "no invalid write made a version");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_ids_in_one_call() {
    let h = start(CONFIG);
    let ids: Vec<u64> = (0..1_000_000u64).map(|i| 20_000_000 + i * 7).collect();
    let t = Instant::now();
    let (s, v) = call(
        &h.app,
        "POST",
        "/v1/services/web/clusters/A/whitelist/add",
        Some(W),
        Some(json!({"ids": ids})),
    )
    .await;
    let took = t.elapsed();
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["summary"][0], "web.A: ids +1000000 -0");
    eprintln!("1,000,000 ids in one call: {took:?}");
    assert_eq!(
        explain(&h.app, &(20_000_000u64 + 7 * 999_999).to_string()).await,
        "A"
    );
    assert_eq!(explain(&h.app, "20000001").await, "B");
    // A state change afterwards does not resend or re-store the whitelist: the feed for a
    // health-only poll is tiny, and the version moves.
    let t = Instant::now();
    let (_, v) = call(
        &h.app,
        "PUT",
        "/v1/services/web/clusters/A/state",
        Some(W),
        Some(json!({"state": "G"})),
    )
    .await;
    eprintln!(
        "state change with a 1M-id whitelist in place: {:?}",
        t.elapsed()
    );
    assert_eq!(v["version"], 3);
}

#[tokio::test]
async fn feed_long_poll_answers_at_once_holds_then_304_and_sends_health_alone() {
    let h = start(CONFIG);
    let (s, v) = call(
        &h.app,
        "GET",
        "/v1/feed/web?version=0&health=0&wait_ms=5000",
        None,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["version"].as_u64(), Some(1));
    // Health generations start at the process's start time (never reused after a restart).
    let h0 = v["health"].as_u64().unwrap();
    // Versions are only comparable within one store: the caller says which (the epoch).
    let e = v["epoch"].as_u64().unwrap();
    assert!(e > 0);
    assert!(h0 > 1_600_000_000_000, "{h0}");
    assert_eq!(v["strategy"]["route-strategy"]["A"]["status"], "Y");

    // Current: held for wait_ms, then 304.
    let t = Instant::now();
    let (s, _) = call(
        &h.app,
        "GET",
        &format!("/v1/feed/web?epoch={e}&version=1&health={h0}&wait_ms=300"),
        None,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::NOT_MODIFIED);
    assert!(
        t.elapsed() >= Duration::from_millis(290),
        "{:?}",
        t.elapsed()
    );

    // A change while a poll is held: answered as soon as it is written. The poll is shown to
    // be parked first (still open well after it was sent), so a poll answered at once for
    // another reason would fail here.
    let app = h.app.clone();
    let held = tokio::spawn(async move {
        let r = call(
            &app,
            "GET",
            &format!("/v1/feed/web?epoch={e}&version=1&health={h0}&wait_ms=10000"),
            None,
            None,
        )
        .await;
        (r, Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !held.is_finished(),
        "the poll was answered before anything changed"
    );
    let written = Instant::now();
    call(
        &h.app,
        "PUT",
        "/v1/services/web/clusters/A/state",
        Some(W),
        Some(json!({"state": "R"})),
    )
    .await;
    let ((s, v), answered) = held.await.unwrap();
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["version"], 2);
    let took = answered.duration_since(written);
    assert!(
        took < Duration::from_secs(2),
        "answered {took:?} after the write"
    );

    // Health only: strategy null.
    h.events
        .send(Event::Endpoints {
            source: SourceKind::Consul,
            service: "web".into(),
            cluster: "A".into(),
            endpoints: vec![],
        })
        .await
        .unwrap();
    let (s, v) = call(
        &h.app,
        "GET",
        &format!("/v1/feed/web?epoch={e}&version=2&health={h0}&wait_ms=5000"),
        None,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["strategy"], Value::Null);
    assert_eq!(v["healthy"], json!({"A": 0, "B": null}));

    let (s, _) = call(&h.app, "GET", "/v1/feed/nope", None, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (_, text) = call(&h.app, "GET", "/metrics", None, None).await;
    let text = text.as_str().unwrap();
    assert!(text.contains("graylane_version 2"), "{text}");
    assert!(
        text.contains("graylane_feed_pushes_total{kind=\"health\"} 1"),
        "{text}"
    );
}

/// A long-poll waits on its own service: a change to another service leaves it parked, a
/// change to its own answers it (after the other's publish too), and a stopping control plane
/// ends it at once.
#[tokio::test]
async fn a_feed_long_poll_is_answered_by_its_own_service_and_by_shutdown() {
    let config = format!(
        "{CONFIG}  api:\n    route-strategy:\n      A: {{status: Y, id: {{ids: [7]}}}}\n      B: {{status: G, id: {{all: true}}}}\n"
    );
    let h = start(&config);
    let (s, v) = call(&h.app, "GET", "/v1/feed/api?wait_ms=0", None, None).await;
    assert_eq!(s, StatusCode::OK);
    let (e, version, health) = (
        v["epoch"].clone(),
        v["version"].clone(),
        v["health"].clone(),
    );
    let poll = |app: Router| {
        let path = format!(
            "/v1/feed/api?epoch={e}&version={version}&health={health}&wait_ms=10000&preview=0"
        );
        tokio::spawn(async move { call(&app, "GET", &path, None, None).await })
    };
    let held = poll(h.app.clone());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let put = |service: &'static str| {
        let app = h.app.clone();
        async move {
            let path = format!("/v1/services/{service}/clusters/A/state");
            let (s, v) = call(&app, "PUT", &path, Some(W), Some(json!({"state": "R"}))).await;
            assert_eq!(s, StatusCode::OK, "{v}");
        }
    };
    put("web").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!held.is_finished(), "answered by another service's change");
    put("api").await;
    let (s, v) = tokio::time::timeout(Duration::from_secs(2), held)
        .await
        .expect("not answered by its own service's change")
        .unwrap();
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["version"], 3);
    assert_eq!(v["strategy"]["route-strategy"]["A"]["status"], "R");

    let Harness { app, _stop, .. } = h;
    let (s, v) = call(&app, "GET", "/v1/feed/api?wait_ms=0", None, None).await;
    assert_eq!(s, StatusCode::OK);
    let (version, health) = (v["version"].clone(), v["health"].clone());
    let path = format!("/v1/feed/api?epoch={e}&version={version}&health={health}&wait_ms=10000");
    let app2 = app.clone();
    let held = tokio::spawn(async move { call(&app2, "GET", &path, None, None).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!held.is_finished());
    drop(_stop);
    let (s, _) = tokio::time::timeout(Duration::from_secs(2), held)
        .await
        .expect("a stopping control plane left the long-poll waiting")
        .unwrap();
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn config_reloads_valid_and_invalid() {
    let h = start(CONFIG);
    let good = CONFIG.replace("status: Y", "status: R");
    let cfg = Config::parse(&good, Path::new("graylane.yaml")).map(Box::new);
    h.writer.file_reloaded(cfg, "h1".into()).await;
    let bad = CONFIG.replace("[[1,100], [600,10000]]", "[[100,1]]");
    let err = Config::parse(&bad, Path::new("graylane.yaml")).expect_err("invalid");
    assert_eq!(err.field, "services.web.route-strategy.A.id.interval[0]");
    assert_eq!(err.location.map(|l| l.0), Some(8), "{err}");
    h.writer.file_reloaded(Err(err), "h2".into()).await;
    // The writer handles commands in order: once the error shows, both were handled.
    let deadline = Instant::now() + Duration::from_secs(5);
    let v = loop {
        let (_, v) = call(&h.app, "GET", "/v1/status", Some(R), None).await;
        if !v["config_error"].is_null() {
            break v;
        }
        assert!(Instant::now() < deadline, "reload never handled: {v}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(
        v["version"], 2,
        "the valid reload made version 2; the invalid one nothing: {v}"
    );
    assert_eq!(
        v["config_error"]["field"],
        "services.web.route-strategy.A.id.interval[0]"
    );
    assert_eq!(v["reload_failures"], 1);
    assert_eq!(explain(&h.app, "2").await, "B");
}

/// Every route the router serves, by method and path: the OpenAPI document must list exactly
/// these, and each must be served (not 404 or 405).
const ROUTES: &[(&str, &str)] = &[
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/v1/openapi.json"),
    ("get", "/v1/status"),
    ("get", "/v1/services"),
    ("get", "/v1/services/{service}"),
    ("put", "/v1/services/{service}"),
    ("put", "/v1/services/{service}/clusters/{cluster}/state"),
    (
        "post",
        "/v1/services/{service}/clusters/{cluster}/whitelist/add",
    ),
    (
        "post",
        "/v1/services/{service}/clusters/{cluster}/whitelist/remove",
    ),
    ("put", "/v1/services/{service}/clusters/{cluster}/percent"),
    ("post", "/v1/services/{service}/explain"),
    ("post", "/v1/services/{service}/gray-cookie"),
    ("get", "/v1/history"),
    ("get", "/v1/diff"),
    ("post", "/v1/revert"),
    ("get", "/v1/operations"),
    ("get", "/v1/feed/{service}"),
    ("get", "/v1/feed"),
    ("get", "/v1/plugin.wasm"),
    ("get", "/v1/plugin"),
    ("post", "/v1/services/{service}/releases"),
    ("get", "/v1/services/{service}/release"),
    ("get", "/v1/services/{service}/releases"),
    ("get", "/v1/releases"),
    ("post", "/v1/services/{service}/release/{action}"),
    ("get", "/v1/services/{service}/traffic"),
    ("post", "/v1/traffic/{service}"),
    ("post", "/v1/services/{service}/preview"),
    ("get", "/v1/services/{service}/preview"),
    ("delete", "/v1/services/{service}/preview"),
    ("post", "/v1/services/{service}/preview/apply"),
    ("post", "/v1/config/reload"),
];

/// `control-plane/src/openapi.json` (for readers of the repository) is the document served.
/// After an API change: `GRAYLANE_BLESS=1 cargo test -p graylane-control-plane --test api
/// checked_in_openapi` writes it again.
#[test]
fn the_checked_in_openapi_document_is_the_one_served() {
    let generated = serde_json::to_string_pretty(&graylane_control_plane::api::openapi_document())
        .unwrap()
        + "\n";
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/src/openapi.json");
    if std::env::var_os("GRAYLANE_BLESS").is_some() {
        std::fs::write(path, &generated).unwrap();
    }
    let checked_in = std::fs::read_to_string(path).unwrap();
    assert!(
        checked_in == generated,
        "{path} differs from the served document: run GRAYLANE_BLESS=1 cargo test -p \
         graylane-control-plane --test api checked_in_openapi"
    );
}

#[tokio::test]
async fn the_openapi_document_lists_every_route_and_every_listed_route_is_served() {
    let h = start(CONFIG);
    let (s, served) = call(&h.app, "GET", "/v1/openapi.json", None, None).await;
    assert_eq!(s, StatusCode::OK);
    let mut documented: Vec<(String, String)> = served["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .filter(|m| ["get", "put", "post", "delete", "patch"].contains(&m.as_str()))
                .map(|m| (m.clone(), path.clone()))
                .collect::<Vec<_>>()
        })
        .collect();
    documented.sort();
    let mut want: Vec<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    want.sort();
    assert_eq!(documented, want);
    // The served document is the generated one.
    let generated = serde_json::to_value(graylane_control_plane::api::openapi_document()).unwrap();
    assert_eq!(served, generated);
    // Every route answers (path parameters filled in; a 404 must be the API's own JSON).
    for (method, path) in ROUTES {
        let path = path
            .replace("{service}", "web")
            .replace("{cluster}", "A")
            .replace("{action}", "pause");
        let path = match path.as_str() {
            "/v1/diff" => "/v1/diff?from=1&to=1".to_string(),
            "/v1/feed/web" => "/v1/feed/web?wait_ms=0".to_string(),
            "/v1/feed" => "/v1/feed?wait_ms=0".to_string(),
            _ => path,
        };
        let (s, v) = call(&h.app, &method.to_uppercase(), &path, Some(W), None).await;
        assert_ne!(s, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        if s == StatusCode::NOT_FOUND {
            assert_eq!(v["code"], "not_found", "{method} {path} is not routed: {v}");
        }
    }
    // Schemas come from the API's own types.
    for schema in [
        "Written",
        "ErrorBody",
        "Status",
        "StrategySpec",
        "ClusterSpec",
        "Explanation",
    ] {
        assert!(
            served["components"]["schemas"][schema].is_object(),
            "schema {schema} missing"
        );
    }
}

#[tokio::test]
async fn a_burst_of_failed_authentications_is_refused_with_429_before_any_token_is_checked() {
    let limits = Limits {
        failed_auth: 3,
        ..Limits::default()
    };
    let h = start_with(CONFIG, &limits);
    // A token with the wrong role is not a guess: not counted.
    for _ in 0..5 {
        let (s, _) = call(
            &h.app,
            "PUT",
            "/v1/services/web/clusters/A/state",
            Some(R),
            Some(json!({"state": "R"})),
        )
        .await;
        assert_eq!(s, StatusCode::FORBIDDEN);
    }
    let (s, _) = call(&h.app, "GET", "/v1/status", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    for _ in 0..2 {
        let (s, _) = call(&h.app, "GET", "/v1/status", Some("guess"), None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
    }
    // The fourth failure within 10 s: refused, and so is the right token from that address
    // (it is not even looked at), on the API and on the feed alike.
    for token in [Some("guess"), Some(R), None] {
        let (s, body) = call(&h.app, "GET", "/v1/status", token, None).await;
        assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{token:?}");
        assert_eq!(body["code"], "too_many_failures");
    }
    let (s, _) = call(&h.app, "GET", "/v1/feed/web?wait_ms=0", None, None).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn strategies_past_the_size_limits_are_refused_naming_the_field() {
    let cfg = format!("limits: {{strategy: {{ids: 4, intervals: 2}}}}\n{CONFIG}");
    let h = start(&cfg);
    let add = |ids: Value| {
        let app = h.app.clone();
        async move {
            call(
                &app,
                "POST",
                "/v1/services/web/clusters/A/whitelist/add",
                Some(W),
                Some(json!({ "ids": ids })),
            )
            .await
        }
    };
    let (s, _) = add(json!([4])).await;
    assert_eq!(s, StatusCode::OK, "4 ids: at the limit");
    let (s, body) = add(json!([5])).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(body["field"], "services.web.route-strategy.A.id.ids");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .ends_with("the service has 5 ids here, more than the limit of 4 (limits.ids)"),
        "{body}"
    );
    // Nothing changed: still 4 ids.
    let (_, svc) = call(&h.app, "GET", "/v1/services/web", Some(R), None).await;
    assert_eq!(
        svc["strategy"]["route-strategy"]["A"]["id"]["ids"],
        json!([1, 2, 3, 4])
    );
    // The config file is held to the same limits.
    let too_many = format!("limits: {{strategy: {{intervals: 1}}}}\n{CONFIG}");
    let e = Config::parse(&too_many, Path::new("graylane.yaml")).unwrap_err();
    assert_eq!(e.field, "services.web.route-strategy.A.id.interval");
}

#[tokio::test]
async fn bodies_are_limited_per_route_with_a_json_413() {
    let limits = Limits {
        body_bytes: 1_000,
        upload_bytes: 100_000,
        ..Limits::default()
    };
    let h = start_with(CONFIG, &limits);
    let big_ids: Vec<u64> = (0..5_000).collect(); // ~25 KB of JSON
                                                  // An upload route takes it...
    let (s, v) = call(
        &h.app,
        "POST",
        "/v1/services/web/clusters/A/whitelist/add",
        Some(W),
        Some(json!({"ids": big_ids})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // ...a small route does not, and says so in JSON.
    let padding = "x".repeat(2_000);
    let (s, v) = call(
        &h.app,
        "POST",
        "/v1/services/web/explain",
        Some(R),
        Some(json!({"tenant": padding})),
    )
    .await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert_eq!(v["code"], "too_large");
    // A bad token is refused before the body is read: 401, not 413.
    let (s, v) = call(
        &h.app,
        "POST",
        "/v1/services/web/explain",
        Some("wrong-token-x"),
        Some(json!({"tenant": "x".repeat(2_000)})),
    )
    .await;
    assert_eq!(
        (s, v["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("unauthorized"))
    );
}

#[tokio::test]
async fn the_feed_answers_another_epoch_at_once_and_endpoints_when_asked() {
    let h = start(CONFIG);
    let (_, v) = call(&h.app, "GET", "/v1/feed/web?wait_ms=0", None, None).await;
    let (epoch, version, health) = (
        v["epoch"].as_u64().unwrap(),
        v["version"].as_u64().unwrap(),
        v["health"].as_u64().unwrap(),
    );
    assert!(v.get("endpoints").is_none(), "{v}");
    // The caller holds the same numbers from another store: the whole strategy, at once.
    let t = Instant::now();
    let (s, v) = call(
        &h.app,
        "GET",
        &format!(
            "/v1/feed/web?epoch={}&version={version}&health={health}&wait_ms=10000",
            epoch + 1
        ),
        None,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(v["epoch"].as_u64(), Some(epoch));
    assert_eq!(v["strategy"]["route-strategy"]["B"]["status"], "G");
    // Endpoints, when asked: present for mapped clusters only.
    h.events
        .send(Event::Endpoints {
            source: SourceKind::Consul,
            service: "web".into(),
            cluster: "B".into(),
            endpoints: vec![graylane_control_plane::discovery::Endpoint {
                address: "10.1.1.1".into(),
                port: 8080,
            }],
        })
        .await
        .unwrap();
    let (s, v) = call(
        &h.app,
        "GET",
        &format!(
            "/v1/feed/web?epoch={epoch}&version={version}&health={health}&wait_ms=5000&endpoints=true"
        ),
        None,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["strategy"], Value::Null);
    assert_eq!(
        v["endpoints"],
        json!({"B": [{"address": "10.1.1.1", "port": 8080}]})
    );
    assert_eq!(v["healthy"], json!({"A": null, "B": 1}));
}

#[tokio::test]
async fn a_version_without_a_default_cluster_is_refused_unless_forced() {
    let h = start(CONFIG);
    // The seed's cluster switch as two edits: B -> R first would leave no G cluster.
    let (s, v) = call(
        &h.app,
        "PUT",
        "/v1/services/web/clusters/B/state",
        Some(W),
        Some(json!({"state": "R"})),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["field"], "services.web.route-strategy");
    // It says to use the release that swaps the states in one version.
    assert_eq!(
        v["message"],
        "web would have no G cluster: every request matching no Y rule would get a 503. To \
         move to another cluster, `graylane release start web switch --to <cluster>` swaps the \
         states in one version; or set the new cluster G before the old one R (both G share by \
         weight), or force it"
    );
    // In the safe order it works: A -> G, then B -> R.
    for (cluster, state, version) in [("A", "G", 2), ("B", "R", 3)] {
        let (s, v) = call(
            &h.app,
            "PUT",
            &format!("/v1/services/web/clusters/{cluster}/state"),
            Some(W),
            Some(json!({"state": state})),
        )
        .await;
        assert_eq!(
            (s, v["version"].as_u64()),
            (StatusCode::OK, Some(version)),
            "{v}"
        );
    }
    // Forced, the operator gets what they asked for.
    let (s, v) = call(
        &h.app,
        "PUT",
        "/v1/services/web/clusters/A/state?force=true",
        Some(W),
        Some(json!({"state": "R"})),
    )
    .await;
    assert_eq!((s, v["version"].as_u64()), (StatusCode::OK, Some(4)), "{v}");
    // A G cluster with no healthy endpoint while another has some is refused as well.
    h.events
        .send(Event::Endpoints {
            source: SourceKind::Consul,
            service: "web".into(),
            cluster: "A".into(),
            endpoints: vec![graylane_control_plane::discovery::Endpoint {
                address: "10.0.0.1".into(),
                port: 80,
            }],
        })
        .await
        .unwrap();
    h.events
        .send(Event::Endpoints {
            source: SourceKind::Consul,
            service: "web".into(),
            cluster: "B".into(),
            endpoints: vec![],
        })
        .await
        .unwrap();
    // Once the writer holds those counts (A: 1, B: 0), B -> G is refused.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, v) = call(&h.app, "GET", "/v1/services/web", Some(R), None).await;
        if v["healthy"] == json!({"A": 1, "B": 0}) {
            break;
        }
        assert!(Instant::now() < deadline, "counts never arrived: {v}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (s, v) = call(
        &h.app,
        "PUT",
        "/v1/services/web/clusters/B/state",
        Some(W),
        Some(json!({"state": "G"})),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("no healthy endpoint while A has"),
        "{v}"
    );
}

/// The service's strategy now, as the API serves it.
async fn states(app: &Router) -> Vec<(String, String)> {
    let (_, v) = call(app, "GET", "/v1/services/web", Some(R), None).await;
    let clusters = v["strategy"]["route-strategy"].as_object().unwrap();
    clusters
        .iter()
        .map(|(k, c)| (k.clone(), c["status"].as_str().unwrap().to_string()))
        .collect()
}

async fn release_state(app: &Router, until: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (s, v) = call(app, "GET", "/v1/services/web/release", Some(R), None).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        if until(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "release never got there: {v}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

const RELEASE_CONFIG: &str = r#"
tokens:
  - {name: ops, token: writer-token-1, role: write}
  - {name: viewer, token: reader-token-1, role: read}
services:
  web:
    route-strategy:
      A: {status: G, id: {all: true}}
      B: {status: R, id: {all: false, ids: [9]}}
"#;

#[tokio::test]
async fn a_switch_release_swaps_the_states_in_one_version_and_logs_who_and_why() {
    let h = start(RELEASE_CONFIG);
    // Readers cannot start one; a target that is not R is refused with the field named.
    let req = json!({"procedure": "switch", "to": "B", "reason": "v2.3"});
    let (s, _) = call(
        &h.app,
        "POST",
        "/v1/services/web/releases",
        Some(R),
        Some(req.clone()),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, v) = call(
        &h.app,
        "POST",
        "/v1/services/web/releases",
        Some(W),
        Some(json!({"procedure": "switch", "to": "A"})),
    )
    .await;
    assert_eq!(
        (s, v["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("to")),
        "{v}"
    );
    let (s, v) = call(
        &h.app,
        "POST",
        "/v1/services/web/releases",
        Some(W),
        Some(req.clone()),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(
        (v["id"].as_u64(), v["stable"].as_str()),
        (Some(1), Some("A"))
    );
    let v = release_state(&h.app, |v| v["status"]["state"] == "succeeded").await;
    assert_eq!(v["at"], 2);
    assert_eq!(
        states(&h.app).await,
        vec![
            ("A".to_string(), "R".to_string()),
            ("B".to_string(), "G".to_string())
        ]
    );
    // Two versions, each one atomic: isolate (B Y) then the swap; never one without a G.
    let (_, hist) = call(&h.app, "GET", "/v1/history", Some(R), None).await;
    let authors: Vec<&str> = hist["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["author"].as_str().unwrap())
        .collect();
    assert_eq!(authors, vec!["release 1 (ops)", "release 1 (ops)", "file"]);
    let (_, ops) = call(&h.app, "GET", "/v1/operations", Some(R), None).await;
    let what: Vec<&str> = ops["operations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["what"].as_str().unwrap())
        .collect();
    assert!(
        what.contains(&"release 1 start: switch of web from A to B (v2.3)"),
        "{what:?}"
    );
    // One at a time: a second release of an ended one is fine, and the list shows the last.
    let (s, v) = call(&h.app, "GET", "/v1/releases", Some(R), None).await;
    assert_eq!(
        (s, v["releases"].as_array().unwrap().len()),
        (StatusCode::OK, 1)
    );
}

#[tokio::test]
async fn a_gray_upgrade_waits_for_approval_and_abort_restores_the_strategy_from_before() {
    let h = start(RELEASE_CONFIG);
    let (_, before) = call(&h.app, "GET", "/v1/services/web", Some(R), None).await;
    let req = json!({"procedure": "gray-upgrade", "to": "B", "percents": [10],
                     "gates": {"approval": true}});
    let (s, v) = call(
        &h.app,
        "POST",
        "/v1/services/web/releases",
        Some(W),
        Some(req),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let v = release_state(&h.app, |v| {
        v["waiting"].as_str().unwrap_or("").starts_with("approval")
    })
    .await;
    assert_eq!(v["waiting"], "approval before step 2: B: 10% of tenants");
    assert_eq!(
        states(&h.app).await,
        vec![
            ("A".to_string(), "G".to_string()),
            ("B".to_string(), "Y".to_string())
        ]
    );
    // A second release of the same service is refused while this one runs.
    let (s, v) = call(
        &h.app,
        "POST",
        "/v1/services/web/releases",
        Some(W),
        Some(json!({"procedure": "switch", "to": "B"})),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(
        v["message"].as_str().unwrap().contains("one at a time"),
        "{v}"
    );
    let (s, v) = call(
        &h.app,
        "POST",
        "/v1/services/web/release/approve",
        Some(W),
        Some(json!({"why": "smoke tests pass"})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let v = release_state(&h.app, |v| {
        v["at"] == 2 && v["waiting"].as_str().unwrap_or("").starts_with("approval")
    })
    .await;
    assert_eq!(
        v["waiting"],
        "approval before step 3: B: id.all true (everyone), Y"
    );
    let (_, svc) = call(&h.app, "GET", "/v1/services/web", Some(R), None).await;
    assert_eq!(
        svc["strategy"]["route-strategy"]["B"]["percent"],
        json!({"value": 10.0, "by": "tenant"})
    );
    let (s, v) = call(
        &h.app,
        "POST",
        "/v1/services/web/release/abort",
        Some(W),
        Some(json!({"why": "5xx"})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["status"]["state"], "aborted");
    assert_eq!(v["status"]["why"], "aborted by ops: 5xx");
    let (_, after) = call(&h.app, "GET", "/v1/services/web", Some(R), None).await;
    assert_eq!(after["strategy"], before["strategy"]);
    // Ended: no more actions.
    let (s, _) = call(
        &h.app,
        "POST",
        "/v1/services/web/release/resume",
        Some(W),
        Some(json!({})),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    // A second release; the service's history lists both, newest first.
    let (s, v) = call(
        &h.app,
        "POST",
        "/v1/services/web/releases",
        Some(W),
        Some(json!({"procedure": "switch", "to": "B", "reason": "v3"})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, v) = call(&h.app, "GET", "/v1/services/web/releases", Some(R), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let ids: Vec<u64> = v["releases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [2, 1]);
    assert_eq!(v["releases"][0]["reason"], "v3");
    assert_eq!(v["releases"][1]["status"]["state"], "aborted");
    let (_, v) = call(&h.app, "GET", "/v1/services/shop/releases", Some(R), None).await;
    assert_eq!(v["releases"], json!([]));
}

/// `POST .../release/rollback` with `why`: (status, body).
async fn rollback(app: &Router, service: &str, why: &str) -> (StatusCode, Value) {
    call(
        app,
        "POST",
        &format!("/v1/services/{service}/release/rollback"),
        Some(W),
        Some(json!({ "why": why })),
    )
    .await
}

/// The operations logged, oldest first: "who: what".
async fn operations(app: &Router) -> Vec<String> {
    let (_, ops) = call(app, "GET", "/v1/operations", Some(R), None).await;
    let mut v: Vec<String> = ops["operations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            format!(
                "{}: {}",
                o["who"].as_str().unwrap(),
                o["what"].as_str().unwrap()
            )
        })
        .collect();
    v.reverse();
    v
}

#[tokio::test]
async fn release_rollback_aborts_a_running_release_and_rolls_a_finished_one_back() {
    let h = start(RELEASE_CONFIG);
    let (_, before) = call(&h.app, "GET", "/v1/services/web", Some(R), None).await;
    // Nothing to roll back yet: a conflict that says so; an unknown service is not found.
    let (s, v) = rollback(&h.app, "web", "").await;
    assert_eq!(
        (s, v["code"].as_str(), v["message"].as_str()),
        (
            StatusCode::CONFLICT,
            Some("conflict"),
            Some("nothing to roll back: web has had no release")
        )
    );
    let (s, _) = rollback(&h.app, "shop", "").await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // While a release runs, rollback is the way out: the strategy from before is back.
    let req = json!({"procedure": "gray-upgrade", "to": "B", "percents": [10],
                     "gates": {"approval": true}});
    let (s, v) = call(
        &h.app,
        "POST",
        "/v1/services/web/releases",
        Some(W),
        Some(req),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let v = release_state(&h.app, |v| v["at"] == 1).await;
    // The typed gate: what holds the step now.
    assert_eq!(
        v["gates_now"],
        json!([{"gate": "approval", "service": "web", "step": 2}])
    );
    let (s, v) = rollback(&h.app, "web", "smoke tests fail").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        (v["id"].as_u64(), &v["status"]),
        (
            Some(1),
            &json!({"state": "aborted", "why": "rolled back by ops: smoke tests fail", "version": 3})
        )
    );
    assert_eq!(
        v["gates_now"],
        Value::Null,
        "nothing holds an ended release"
    );
    let (_, after) = call(&h.app, "GET", "/v1/services/web", Some(R), None).await;
    assert_eq!(after["strategy"], before["strategy"]);
    let (s, v) = rollback(&h.app, "web", "").await;
    assert_eq!(
        (s, v["message"].as_str()),
        (
            StatusCode::CONFLICT,
            Some(
                "nothing to roll back: release 1 of web was aborted (version 3), so its \
                 strategy from before is already back"
            )
        )
    );

    // After a release succeeded: a rollback release back to the cluster it replaced (kept R).
    let req = json!({"procedure": "switch", "to": "B", "reason": "v2"});
    let (s, v) = call(
        &h.app,
        "POST",
        "/v1/services/web/releases",
        Some(W),
        Some(req),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    release_state(&h.app, |v| v["status"]["state"] == "succeeded").await;
    assert_eq!(
        states(&h.app).await,
        vec![("A".into(), "R".into()), ("B".into(), "G".into())]
    );
    let (s, v) = rollback(&h.app, "web", "v2 is slow").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        (
            v["id"].as_u64(),
            v["procedure"].as_str(),
            v["stable"].as_str(),
            v["target"].as_str(),
            v["reason"].as_str(),
            v["started_by"].as_str()
        ),
        (
            Some(3),
            Some("rollback"),
            Some("B"),
            Some("A"),
            Some("rollback of release 2: v2 is slow"),
            Some("ops")
        )
    );
    let v = release_state(&h.app, |v| v["status"]["state"] == "succeeded").await;
    assert_eq!(v["id"], 3);
    assert_eq!(
        states(&h.app).await,
        vec![("A".into(), "G".into()), ("B".into(), "R".into())]
    );
    let (_, svc) = call(&h.app, "GET", "/v1/services/web", Some(R), None).await;
    assert_eq!(svc["strategy"]["route-strategy"]["A"]["id"]["all"], true);
    // A rollback is not rolled back.
    let (s, v) = rollback(&h.app, "web", "").await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert_eq!(
        v["message"],
        "nothing to roll back: release 3 of web was itself a rollback (to A); to move to B \
         again, start a release"
    );
    // Every action and every version in the operation log, with who and why.
    let ops = operations(&h.app).await;
    let releases: Vec<&str> = ops
        .iter()
        .map(|o| o.as_str())
        .filter(|o| o.contains(": release "))
        .collect();
    assert_eq!(
        releases,
        vec![
            "ops: release 1 start: gray-upgrade of web from A to B",
            "release 1 (ops): release 1 step 1/4: B: id.all false, no ids, intervals or percentage; Y",
            "ops: release 1 rollback (smoke tests fail)",
            "release 1 (ops): release 1 abort: the strategy from before it",
            "ops: release 2 start: switch of web from A to B (v2)",
            "release 2 (ops): release 2 step 1/2: B: id.all false, no ids, intervals or percentage; Y",
            "release 2 (ops): release 2 step 2/2: A R, B G",
            "ops: release 3 start: rollback of web from B to A (rollback of release 2: v2 is slow)",
            "release 3 (ops): release 3 step 1/2: A: id.all true (everyone), Y",
            "release 3 (ops): release 3 step 2/2: B R, A G",
        ]
    );
}

#[tokio::test]
async fn a_services_release_gates_from_the_file_apply_where_a_release_does_not_set_them() {
    let h = start(&format!(
        "{RELEASE_CONFIG}releases:\n  web: {{approval: true, bake_secs: 7}}\n"
    ));
    let req = json!({"procedure": "gray-upgrade", "to": "B", "percents": [10]});
    let (s, v) = call(
        &h.app,
        "POST",
        "/v1/services/web/releases",
        Some(W),
        Some(req),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(
        (&v["gates"]["approval"], &v["gates"]["bake_secs"]),
        (&json!(true), &json!(7))
    );
    let (s, _) = rollback(&h.app, "web", "").await;
    assert_eq!(s, StatusCode::OK);
    // What a release says wins.
    let req = json!({"procedure": "switch", "to": "B", "gates": {"approval": false}});
    let (s, v) = call(
        &h.app,
        "POST",
        "/v1/services/web/releases",
        Some(W),
        Some(req),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(
        (&v["gates"]["approval"], &v["gates"]["bake_secs"]),
        (&json!(false), &json!(7))
    );
}

/// A worker's report carrying preview counts: `pairs` as (from, to, requests, tenants).
fn preview_report(
    node: &str,
    worker: u64,
    seq: u64,
    id: u64,
    pairs: &[(&str, &str, u64, &[u64])],
) -> Value {
    let pairs: Vec<Value> = pairs
        .iter()
        .map(|(from, to, requests, tenants)| {
            let mut p = graylane_strategy::traffic::Pair {
                from: Some(from.to_string()),
                to: Some(to.to_string()),
                ..Default::default()
            };
            for i in 0..*requests {
                let t = tenants.get(i as usize % tenants.len().max(1)).copied();
                p.count(t.map(graylane_strategy::Id::Num).as_ref());
            }
            serde_json::to_value(p).unwrap()
        })
        .collect();
    json!({"node": node, "workers": [{"worker": worker, "seq": seq, "clusters": {},
        "preview": {"id": id, "pairs": pairs}}]})
}

#[tokio::test]
async fn a_preview_is_checked_like_a_version_reaches_the_feed_counts_and_applies() {
    let h = start(CONFIG);
    // An invalid candidate is refused, naming the field; nothing is published.
    let bad = json!({"strategy": {"route-strategy": {
        "A": {"status": "Y", "id": {"interval": [[9, 1]]}},
        "B": {"status": "G", "id": {"all": true}}}}});
    let (s, v) = call(
        &h.app,
        "POST",
        "/v1/services/web/preview",
        Some(W),
        Some(bad),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(
        v["field"], "strategy.route-strategy.A.id.interval[0]",
        "{v}"
    );
    let no_g = json!({"edit": {"op": "set_state", "cluster": "B", "state": "R"}});
    let (s, v) = call(
        &h.app,
        "POST",
        "/v1/services/web/preview",
        Some(W),
        Some(no_g),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("no G cluster"),
        "{v}"
    );
    let (s, _) = call(&h.app, "GET", "/v1/services/web/preview", Some(R), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // A reader may not start one.
    let edit = json!({"edit": {"op": "whitelist", "cluster": "A", "add": true,
        "ids": [200, 201], "intervals": [], "all": null}});
    let (s, _) = call(
        &h.app,
        "POST",
        "/v1/services/web/preview",
        Some(R),
        Some(edit.clone()),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    // A filter that evaluates previews is woken by the new one; one that does not is not.
    let feed = h.app.clone();
    let waiting = tokio::spawn(async move {
        call(
            &feed,
            "GET",
            "/v1/feed/web?epoch=0&version=0&health=0&wait_ms=0",
            None,
            None,
        )
        .await
    });
    let (_, first) = waiting.await.unwrap();
    let (epoch, version, health) = (&first["epoch"], &first["version"], &first["health"]);
    assert!(first.get("preview").is_none(), "{first}");
    let held = format!("/v1/feed/web?epoch={epoch}&version={version}&health={health}&wait_ms=5000");
    let (feed1, feed2) = (h.app.clone(), h.app.clone());
    let (p1, p2) = (format!("{held}&preview=0"), held.clone());
    let evaluating = tokio::spawn(async move { call(&feed1, "GET", &p1, None, None).await });
    let plain = tokio::spawn(async move {
        let t = Instant::now();
        let r = call(&feed2, "GET", &p2.replace("5000", "1500"), None, None).await;
        (r, t.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (s, v) = call(
        &h.app,
        "POST",
        "/v1/services/web/preview",
        Some(W),
        Some(edit),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let id = v["id"].as_u64().unwrap();
    assert_eq!(v["changes"], json!(["web.A: ids +2 -0"]), "{v}");
    assert_eq!(v["status"], json!({"state": "running"}));
    let (s, woke) = evaluating.await.unwrap();
    assert_eq!(s, StatusCode::OK);
    assert_eq!(woke["preview"]["id"], id, "{woke}");
    assert_eq!(woke["preview"]["every"], 1);
    assert_eq!(
        woke["preview"]["strategy"]["route-strategy"]["A"]["id"]["ids"],
        json!([1, 2, 3, 200, 201])
    );
    assert!(
        woke["strategy"].is_null(),
        "the live strategy did not change: {woke}"
    );
    let ((s, _), waited) = plain.await.unwrap();
    assert_eq!(
        s,
        StatusCode::NOT_MODIFIED,
        "a caller without previews is not woken"
    );
    assert!(waited >= Duration::from_millis(1_400), "{waited:?}");
    // Holding it: nothing new (the candidate is not sent again on other news either).
    let (s, _) = call(
        &h.app,
        "GET",
        &format!("{}&preview={id}", held.replace("5000", "100")),
        None,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::NOT_MODIFIED);

    // Two nodes report; one worker's counts arrive twice; tenants seen by both count once.
    let r1 = preview_report(
        "envoy-1",
        1,
        1,
        id,
        &[("B", "A", 6, &[200, 201]), ("B", "B", 10, &[])],
    );
    let r2 = preview_report(
        "envoy-2",
        9,
        4,
        id,
        &[("B", "A", 3, &[201]), ("A", "A", 5, &[])],
    );
    for r in [&r1, &r1, &r2] {
        let (s, v) = call(&h.app, "POST", "/v1/traffic/web", None, Some(r.clone())).await;
        assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    }
    // Counts for another preview id are not kept.
    let stray = preview_report("envoy-3", 1, 1, id + 1000, &[("B", "A", 50, &[7])]);
    call(&h.app, "POST", "/v1/traffic/web", None, Some(stray)).await;
    let (s, v) = call(&h.app, "GET", "/v1/services/web/preview", Some(R), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        (
            v["requests"].as_u64(),
            v["moved"].as_u64(),
            v["nodes"].as_u64()
        ),
        (Some(24), Some(9), Some(2)),
        "{v}"
    );
    assert_eq!(v["pairs"][0]["from"], "B");
    assert_eq!(v["pairs"][0]["to"], "A");
    assert_eq!(v["pairs"][0]["tenants"], 2);
    assert_eq!(v["pairs"][0]["examples"], json!(["200", "201"]));
    let summary = v["summary"].as_str().unwrap();
    assert!(summary.starts_with("of 24 requests in "), "{summary}");
    assert!(
        summary.ends_with(
            " s, 9 (37.5 %) would move B -> A, from 2 tenants; none would move to an R cluster"
        ),
        "{summary}"
    );

    // The live strategy moved since: apply is refused (it would undo that change) unless forced.
    let (s, _) = call(
        &h.app,
        "PUT",
        "/v1/services/web/clusters/A/percent",
        Some(W),
        Some(json!({"percent": {"value": 1.0, "by": "tenant"}})),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = call(
        &h.app,
        "POST",
        "/v1/services/web/preview/apply",
        Some(W),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert_eq!(v["field"], "preview");
    assert_eq!(explain(&h.app, "200").await, "B", "nothing applied");
    let (s, v) = call(
        &h.app,
        "POST",
        "/v1/services/web/preview/apply?force=true",
        Some(W),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["written"]["version"], 3);
    assert_eq!(v["preview"]["status"]["state"], "applied");
    assert_eq!(explain(&h.app, "200").await, "A");
    // Ended: no longer in the feed; cannot be applied or discarded twice.
    let (s, v) = call(
        &h.app,
        "GET",
        "/v1/feed/web?preview=0&wait_ms=0",
        None,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert!(v.get("preview").is_none(), "{v}");
    let (s, _) = call(&h.app, "DELETE", "/v1/services/web/preview", Some(W), None).await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (_, ops) = call(&h.app, "GET", "/v1/operations?limit=10", Some(R), None).await;
    let whats: Vec<&str> = ops["operations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["what"].as_str().unwrap())
        .collect();
    assert!(
        whats.contains(&format!("apply preview {id} of web").as_str()),
        "{whats:?}"
    );
    assert!(
        whats.contains(&format!("preview {id} of web applied as version 3 by ops").as_str()),
        "{whats:?}"
    );
}

#[tokio::test]
async fn a_preview_can_be_discarded_and_expires_by_itself() {
    let h = start(CONFIG);
    let start = |secs: u64| json!({"edit": {"op": "set_state", "cluster": "A", "state": "G"}, "expires_secs": secs, "every": 4});
    let (s, v) = call(
        &h.app,
        "POST",
        "/v1/services/web/preview",
        Some(W),
        Some(start(600)),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, v) = call(&h.app, "DELETE", "/v1/services/web/preview", Some(W), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["status"], json!({"state": "discarded", "who": "ops"}));
    let (s, v) = call(
        &h.app,
        "POST",
        "/v1/services/web/preview",
        Some(W),
        Some(json!({"edit": {"op": "set_state", "cluster": "A", "state": "G"}, "every": 0})),
    )
    .await;
    assert_eq!(
        (s, v["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("every"))
    );
    let (s, v) = call(
        &h.app,
        "POST",
        "/v1/services/web/preview",
        Some(W),
        Some(start(1)),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["every"], 4);
    let (_, feed) = call(
        &h.app,
        "GET",
        "/v1/feed/web?preview=0&wait_ms=0",
        None,
        None,
    )
    .await;
    assert_eq!(feed["preview"]["every"], 4);
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    let (_, v) = call(&h.app, "GET", "/v1/services/web/preview", Some(R), None).await;
    assert_eq!(v["status"], json!({"state": "expired"}), "{v}");
    assert_eq!(v["elapsed_secs"], 1);
    let (_, feed) = call(
        &h.app,
        "GET",
        "/v1/feed/web?preview=0&wait_ms=0",
        None,
        None,
    )
    .await;
    assert!(feed.get("preview").is_none(), "{feed}");
    assert_eq!(
        explain(&h.app, "5000").await,
        "A",
        "A was Y with 600..10000 before; nothing applied"
    );
}

/// Issue 10: a reload applies what changed in the file since it was last applied and keeps
/// the API's edits of other fields; a field changed in both keeps the API's value and is shown
/// as a conflict, until the operator says the file wins.
#[tokio::test]
async fn a_reload_merges_the_file_with_the_apis_edits_three_ways() {
    let h = start(CONFIG);
    let reload = |text: String, hash: &str| {
        let cfg = Config::parse(&text, Path::new("graylane.yaml")).map(Box::new);
        h.writer.file_reloaded(cfg, hash.to_string())
    };
    let status = || async {
        let (s, v) = call(&h.app, "GET", "/v1/status", Some(R), None).await;
        assert_eq!(s, StatusCode::OK);
        v
    };
    let strategy = || async {
        let (_, v) = call(&h.app, "GET", "/v1/services/web", Some(R), None).await;
        v["strategy"]["route-strategy"].clone()
    };
    // The API sends tenant 700's interval to B: A's intervals change through the API.
    let (s, _) = call(
        &h.app,
        "POST",
        "/v1/services/web/clusters/A/whitelist/remove",
        Some(W),
        Some(json!({"ids": [], "intervals": [[700, 700]]})),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(explain(&h.app, "700").await, "B");
    // The file adds id 50000 to A (ids, not intervals) and gives B a weight.
    let v1 = CONFIG.replace("ids: [1, 2, 3]", "ids: [1, 2, 3, 50000]");
    reload(v1.clone(), "h1").await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while status().await["version"] != 3 {
        assert!(Instant::now() < deadline, "the reload made no version");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(explain(&h.app, "50000").await, "A", "the file's change");
    assert_eq!(
        explain(&h.app, "700").await,
        "B",
        "the API's change survived the reload"
    );
    assert_eq!(status().await["config_conflicts"], json!([]));

    // Both change A's intervals: the API's value stays, the conflict is shown.
    let v2 = v1.replace("[[1,100], [600,10000]]", "[[1,100], [600,20000]]");
    reload(v2, "h2").await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let conflicts = loop {
        let c = status().await["config_conflicts"].clone();
        if c != json!([]) {
            break c;
        }
        assert!(Instant::now() < deadline, "no conflict shown");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        conflicts,
        json!([{"field": "services.web.route-strategy.A.id.interval",
                "file": "[[1,100],[600,20000]]",
                "live": "[[1,100],[600,699],[701,10000]]"}])
    );
    assert_eq!(explain(&h.app, "700").await, "B");
    assert_eq!(
        explain(&h.app, "15000").await,
        "B",
        "the file's value is not taken"
    );
    assert_eq!(status().await["version"], 3, "nothing else changed");
    // The operator says the file wins.
    let (s, v) = call(
        &h.app,
        "POST",
        "/v1/config/reload?prefer=file",
        Some(R),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let (s, v) = call(
        &h.app,
        "POST",
        "/v1/config/reload?prefer=file",
        Some(W),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["written"]["version"], 4);
    assert_eq!(v["conflicts"].as_array().unwrap().len(), 1);
    assert_eq!(explain(&h.app, "700").await, "A");
    assert_eq!(explain(&h.app, "15000").await, "A");
    assert_eq!(
        strategy().await["A"]["id"]["interval"],
        json!([[1, 100], [600, 20000]])
    );
    let (_, ops) = call(&h.app, "GET", "/v1/operations?limit=1", Some(R), None).await;
    assert_eq!(
        ops["operations"][0]["what"],
        "reload config file by ops, the file winning conflicts"
    );
}

#[tokio::test]
async fn the_catalog_lists_every_service_and_long_polls_on_the_set_of_names() {
    let h = start(CONFIG);
    let (s, v) = call(&h.app, "GET", "/v1/feed?digest=0&wait_ms=5000", None, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["services"], json!([{"name": "web", "version": 1}]));
    let digest = v["digest"].as_u64().unwrap();
    assert_eq!(digest, graylane_strategy::feed::names_digest(["web"]));
    // The same set: held, then 304; a new version of a listed service is not news here.
    let (s, _) = call(
        &h.app,
        "PUT",
        "/v1/services/web/clusters/A/state",
        Some(W),
        Some(json!({"state": "G"})),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let t = Instant::now();
    let path = format!("/v1/feed?digest={digest}&wait_ms=300");
    let (s, _) = call(&h.app, "GET", &path, None, None).await;
    assert_eq!(s, StatusCode::NOT_MODIFIED);
    assert!(t.elapsed() >= Duration::from_millis(290));
    // A service added while a poll is held: answered as soon as it is written.
    let app = h.app.clone();
    let path = format!("/v1/feed?digest={digest}&wait_ms=10000");
    let held = tokio::spawn(async move { call(&app, "GET", &path, None, None).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!held.is_finished());
    let t = Instant::now();
    let more =
        format!("{CONFIG}  api:\n    route-strategy:\n      A: {{status: G, id: {{all: true}}}}\n");
    let cfg = Config::parse(&more, Path::new("graylane.yaml")).map(Box::new);
    h.writer.file_reloaded(cfg, "h1".into()).await;
    let (s, v) = held.await.unwrap();
    assert_eq!(s, StatusCode::OK);
    assert!(t.elapsed() < Duration::from_secs(5));
    let names: Vec<&str> = v["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["api", "web"]);
    assert_eq!(
        v["digest"].as_u64(),
        Some(graylane_strategy::feed::names_digest(["api", "web"]))
    );
}
