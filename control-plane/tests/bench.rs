//! `make bench` only (ignored here): the admin API with a million ids in a whitelist. Explain
//! must not copy the compiled index (goal < 1 ms), and a state flip must not write or compile
//! the whitelist again (goal: durable in < 10 ms). Release build, a real SQLite file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use graylane_control_plane::api::{router, AppState};
use graylane_control_plane::config::{Config, Limits};
use graylane_control_plane::metrics::Metrics;
use graylane_control_plane::store::Store;
use graylane_control_plane::writer::{Handle, Writer};
use http_body_util::BodyExt;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

const CONFIG: &str = r#"
tokens:
  - {name: ops, token: writer-token-1, role: write}
services:
  web:
    route-strategy:
      A: {status: Y, id: {ids: [1]}}
      B: {status: G, id: {all: true}}
"#;

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

async fn call(app: &axum::Router, method: &str, path: &str, body: serde_json::Value) -> StatusCode {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("authorization", "Bearer writer-token-1")
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let _ = resp.into_body().collect().await.unwrap();
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: make bench"]
async fn bench_control_plane_with_a_million_ids() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config::parse(CONFIG, Path::new("graylane.yaml")).unwrap();
    let store = Store::open(dir.path()).unwrap();
    let (writer, snapshots) = Writer::open(store, &cfg, "h0").unwrap();
    let history = writer.reader().unwrap();
    let (tx, rx) = mpsc::channel(64);
    let (_events, events_rx) = mpsc::channel(64);
    let stop = CancellationToken::new();
    tokio::spawn(writer.run(rx, events_rx, stop.clone()));
    let state = AppState::new(
        snapshots,
        Handle::new(tx),
        history,
        Arc::new(Metrics::new()),
    );
    let app = router(state, &Limits::default());

    let ids: Vec<u64> = (0..1_000_000u64).map(|i| 20_000_000 + i * 7).collect();
    let t = Instant::now();
    let s = call(
        &app,
        "POST",
        "/v1/services/web/clusters/A/whitelist/add",
        json!({"ids": ids}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let upload = t.elapsed();

    let mut explain = Vec::new();
    for i in 0..2_000u64 {
        let tenant = (20_000_000 + (i * 7_919 % 1_000_000) * 7).to_string();
        let t = Instant::now();
        let s = call(
            &app,
            "POST",
            "/v1/services/web/explain",
            json!({"tenant": tenant}),
        )
        .await;
        explain.push(t.elapsed());
        assert_eq!(s, StatusCode::OK);
    }
    let mut flips = Vec::new();
    for i in 0..60 {
        let state = if i % 2 == 0 { "R" } else { "Y" };
        let t = Instant::now();
        let s = call(
            &app,
            "PUT",
            "/v1/services/web/clusters/A/state",
            json!({"state": state}),
        )
        .await;
        flips.push(t.elapsed());
        assert_eq!(s, StatusCode::OK);
    }
    println!(
        "control plane: 1,000,000 ids uploaded in one call (durable) = {:.0} ms",
        upload.as_secs_f64() * 1e3
    );
    println!(
        "control plane: explain with 1,000,000 ids, through the router [goal < 1 ms] = p50 {:.3} ms, p99 {:.3} ms",
        pct(&mut explain, 0.5).as_secs_f64() * 1e3,
        pct(&mut explain, 0.99).as_secs_f64() * 1e3
    );
    println!(
        "control plane: state flip with 1,000,000 ids in place, acknowledged durable [goal < 10 ms] = p50 {:.2} ms, p99 {:.2} ms",
        pct(&mut flips, 0.5).as_secs_f64() * 1e3,
        pct(&mut flips, 0.99).as_secs_f64() * 1e3
    );
    stop.cancel();
}
