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
use graylane_control_plane::config::Config;
use graylane_control_plane::metrics::Metrics;
use graylane_control_plane::store::Store;
use graylane_control_plane::writer::{Command, Writer};
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
    commands: mpsc::Sender<Command>,
    _stop: tokio_util::sync::DropGuard,
}

fn start(config: &str) -> Harness {
    let cfg = Config::parse(config, Path::new("graylane.yaml")).unwrap();
    let (writer, snapshots) = Writer::open(Store::memory().unwrap(), &cfg, "h0").unwrap();
    let (commands, rx) = mpsc::channel(64);
    let stop = CancellationToken::new();
    tokio::spawn(writer.run(rx, stop.clone()));
    let app = router(AppState {
        snapshots,
        commands: commands.clone(),
        metrics: Arc::new(Metrics::default()),
    });
    Harness {
        app,
        commands,
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

    // A change while a poll is held: answered as soon as it is written.
    let app = h.app.clone();
    let held = tokio::spawn(async move {
        let t = Instant::now();
        let r = call(
            &app,
            "GET",
            &format!("/v1/feed/web?epoch={e}&version=1&health={h0}&wait_ms=10000"),
            None,
            None,
        )
        .await;
        (r, t.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    call(
        &h.app,
        "PUT",
        "/v1/services/web/clusters/A/state",
        Some(W),
        Some(json!({"state": "R"})),
    )
    .await;
    let ((s, v), took) = held.await.unwrap();
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["version"], 2);
    assert!(took < Duration::from_secs(5), "{took:?}");

    // Health only: strategy null.
    h.commands
        .send(Command::Discovery(
            graylane_control_plane::discovery::Event::Endpoints {
                source: graylane_control_plane::discovery::SourceKind::Consul,
                service: "web".into(),
                cluster: "A".into(),
                endpoints: vec![],
            },
        ))
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

#[tokio::test]
async fn config_reloads_valid_and_invalid() {
    let h = start(CONFIG);
    let good = CONFIG.replace("status: Y", "status: R");
    let cfg = Config::parse(&good, Path::new("graylane.yaml")).map(Box::new);
    h.commands
        .send(Command::FileReloaded {
            result: cfg,
            hash: "h1".into(),
        })
        .await
        .unwrap();
    let bad = CONFIG.replace("[[1,100], [600,10000]]", "[[100,1]]");
    let err = Config::parse(&bad, Path::new("graylane.yaml")).expect_err("invalid");
    assert_eq!(err.field, "services.web.route-strategy.A.id.interval[0]");
    assert_eq!(err.location.map(|l| l.0), Some(8), "{err}");
    h.commands
        .send(Command::FileReloaded {
            result: Err(err),
            hash: "h2".into(),
        })
        .await
        .unwrap();
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
