//! The filter's .wasm served by the control plane (`/v1/plugin.wasm`, `/v1/plugin`): through
//! the merged router, and over a real socket from `serve::run` with `plugin:` in the config.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use graylane_control_plane::api::{router, AppState};
use graylane_control_plane::config::{Config, Limits};
use graylane_control_plane::metrics::Metrics;
use graylane_control_plane::plugin::{self, Plugin};
use graylane_control_plane::serve::Loaded;
use graylane_control_plane::store::Store;
use graylane_control_plane::writer::{Handle, Writer};
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

const CONFIG: &str = r#"
tokens: [{name: ops, token: writer-token-1, role: write}]
services:
  web:
    route-strategy:
      A: {status: Y, id: {ids: [1]}}
      B: {status: G, id: {all: true}}
"#;

/// A module header and some bytes: the server checks the magic, not the code.
fn module() -> Vec<u8> {
    let mut m = b"\0asm\x01\0\0\0".to_vec();
    m.extend((0..100_000u32).map(|i| (i % 253) as u8));
    m
}

fn hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn app(plugin: Option<Arc<Plugin>>) -> (Router, tokio_util::sync::DropGuard) {
    let cfg = Config::parse(CONFIG, Path::new("graylane.yaml")).unwrap();
    let (writer, snapshots) = Writer::open(Store::memory().unwrap(), &cfg, "h0").unwrap();
    let history = writer.reader().unwrap();
    let (commands, rx) = tokio::sync::mpsc::channel(16);
    let (_events, events_rx) = tokio::sync::mpsc::channel(16);
    let stop = CancellationToken::new();
    tokio::spawn(writer.run(rx, events_rx, stop.clone()));
    let state = AppState::new(
        snapshots,
        Handle::new(commands),
        history,
        Arc::new(Metrics::new()),
    );
    let api = router(state, &Limits::default());
    let app = match plugin {
        Some(p) => api.layer(axum::Extension(p)),
        None => api,
    };
    (app, stop.drop_guard())
}

async fn get(
    app: &Router,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let mut req = Request::builder().uri(path);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = app
        .clone()
        .oneshot(req.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes().to_vec();
    (parts.status, parts.headers, bytes)
}

#[tokio::test]
async fn the_wasm_is_served_with_its_sha256_without_a_token() {
    let wasm = module();
    let want = hex(&wasm);
    let (app, _g) = app(Some(Arc::new(Plugin::new(wasm.clone()).unwrap())));

    let (s, h, body) = get(&app, "/v1/plugin.wasm", &[]).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body, wasm);
    assert_eq!(h["content-type"], "application/wasm");
    assert_eq!(h["etag"], format!("\"sha256:{want}\"").as_str());
    assert_eq!(h["x-graylane-sha256"], want.as_str());
    // RFC 9530 Repr-Digest: base64 of the raw digest, between colons.
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(&wasm));
    assert_eq!(h["repr-digest"], format!("sha-256=:{b64}:").as_str());

    let (s, _, body) = get(&app, "/v1/plugin", &[]).await;
    assert_eq!(s, StatusCode::OK);
    let info: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        info,
        serde_json::json!({"sha256": want, "size": wasm.len(), "path": "/v1/plugin.wasm"})
    );

    // A cache holding this version gets 304 and no body; another ETag gets the module.
    let etag = format!("\"sha256:{want}\"");
    let (s, h, body) = get(&app, "/v1/plugin.wasm", &[("if-none-match", &etag)]).await;
    assert_eq!(s, StatusCode::NOT_MODIFIED);
    assert!(body.is_empty());
    assert_eq!(h["etag"], etag.as_str());
    let (s, _, body) = get(
        &app,
        "/v1/plugin.wasm",
        &[("if-none-match", "\"sha256:0000\", W/\"other\"")],
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body.len(), wasm.len());

    // The API around it is unchanged, and documents both routes.
    let (s, _, _) = get(&app, "/v1/status", &[]).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _, _) = get(&app, "/healthz", &[]).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, body) = get(&app, "/v1/openapi.json", &[]).await;
    assert_eq!(s, StatusCode::OK);
    let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
    for path in ["/v1/plugin.wasm", "/v1/plugin"] {
        assert!(doc["paths"][path]["get"].is_object(), "{path} undocumented");
    }
}

#[tokio::test]
async fn without_a_plugin_both_routes_say_which_field_to_set() {
    let (app, _g) = app(None);
    for path in ["/v1/plugin.wasm", "/v1/plugin"] {
        let (s, _, body) = get(&app, path, &[]).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{path}");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["code"], "not_found");
        assert_eq!(v["field"], "plugin.wasm");
    }
}

#[test]
fn the_config_field_is_parsed_and_its_errors_name_it() {
    let cfg = Config::parse(
        &format!("{CONFIG}plugin: {{wasm: filter.wasm}}\n"),
        Path::new("/etc/graylane/graylane.yaml"),
    )
    .unwrap();
    assert_eq!(
        cfg.plugin,
        Some(plugin::Config {
            wasm: "filter.wasm".into()
        })
    );
    let e = Config::parse(
        &format!("{CONFIG}plugin: {{wazm: filter.wasm}}\n"),
        Path::new("graylane.yaml"),
    )
    .unwrap_err();
    assert!(e.field.starts_with("plugin"), "{e}");
    assert!(e.to_string().contains("wazm"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    let cfg_file = dir.path().join("graylane.yaml");
    // Relative to the config file; a missing file and a non-module are named.
    let e = Plugin::load(
        &plugin::Config {
            wasm: "missing.wasm".into(),
        },
        &cfg_file,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("plugin.wasm: cannot read"), "{e}");
    assert!(
        e.contains(&dir.path().join("missing.wasm").display().to_string()),
        "{e}"
    );
    std::fs::write(dir.path().join("text.wasm"), "not a module").unwrap();
    let e = Plugin::load(
        &plugin::Config {
            wasm: "text.wasm".into(),
        },
        &cfg_file,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("is not a WebAssembly module"), "{e}");
    std::fs::write(dir.path().join("ok.wasm"), module()).unwrap();
    let p = Plugin::load(
        &plugin::Config {
            wasm: "ok.wasm".into(),
        },
        &cfg_file,
    )
    .unwrap();
    assert_eq!(p.sha256(), hex(&module()));
}

#[tokio::test]
async fn serve_run_serves_the_configured_file_over_http() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("graylane_filter.wasm"), module()).unwrap();
    let path = dir.path().join("graylane.yaml");
    let text = format!("{CONFIG}data_dir: data\nplugin: {{wasm: graylane_filter.wasm}}\n");
    std::fs::write(&path, &text).unwrap();
    let loaded = Loaded::read(&path).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let server = tokio::spawn(graylane_control_plane::serve::run(
        listener,
        None,
        loaded,
        None,
        stop.clone(),
    ));
    let resp = reqwest::get(format!("http://{addr}/v1/plugin.wasm"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let sha = resp.headers()["x-graylane-sha256"]
        .to_str()
        .unwrap()
        .to_string();
    let body = resp.bytes().await.unwrap();
    assert_eq!(body.as_ref(), module().as_slice());
    assert_eq!(sha, hex(&module()));
    stop.cancel();
    server.await.unwrap().unwrap();

    // A plugin file that is not there stops the daemon at start, naming the field.
    let text = format!("{CONFIG}data_dir: data\nplugin: {{wasm: nope.wasm}}\n");
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, &text).unwrap();
    let loaded = Loaded::read(&path).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let e =
        graylane_control_plane::serve::run(listener, None, loaded, None, CancellationToken::new())
            .await
            .unwrap_err()
            .to_string();
    assert!(e.contains("plugin.wasm: cannot read"), "{e}");
}
