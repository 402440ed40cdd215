//! Seed 003's cookie generator through the API (`POST /v1/services/{s}/gray-cookie`): who may
//! ask, what it answers, key rotation; and the private keys never leave the control plane:
//! a real `serve::run` is searched, every GET route of its OpenAPI document with every kind
//! of token, the feed, `/metrics`, the history, an invalid reload's error, its logs and its
//! data directory, for any spelling of the private key.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine as _;
use graylane_control_plane::api::{router, AppState};
use graylane_control_plane::config::{Config, Limits};
use graylane_control_plane::cookie::PrivateKey;
use graylane_control_plane::metrics::Metrics;
use graylane_control_plane::store::Store;
use graylane_control_plane::writer::{Handle, Writer};
use graylane_strategy::cookie::{self, Rejected, Verdict};
use graylane_strategy::{Compiled, Id, StrategySpec};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

const W: &str = "writer-token-1";
const R: &str = "reader-token-1";
const I: &str = "issuer-token-1";

fn key(id: &str, seed: u8) -> PrivateKey {
    PrivateKey::from_seed(id, &[seed; 32])
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// graylane.yaml with `private` in cookie_keys and `public` listed by service web (as
/// `{id, public_key, not_after}` entries), plus a service whose key the control plane lacks
/// and one with plain cookies.
fn config(private: &[&PrivateKey], public: &[(&PrivateKey, Option<u64>)]) -> String {
    let private: String = private
        .iter()
        .map(|k| {
            format!(
                "  - {{id: {}, private_key: \"{}\"}}\n",
                k.id(),
                &*k.private_key_text()
            )
        })
        .collect();
    let public = public
        .iter()
        .map(|(k, not_after)| {
            let na = not_after
                .map(|t| format!(", not_after: {t}"))
                .unwrap_or_default();
            format!("{{id: {}, public_key: \"{}\"{na}}}", k.id(), k.public_key())
        })
        .collect::<Vec<_>>()
        .join(", ");
    let stranger = key("k9", 9).public_key();
    format!(
        r#"
tokens:
  - {{name: ops, token: {W}, role: write}}
  - {{name: viewer, token: {R}, role: read}}
  - {{name: auth, token: {I}, role: issuer}}
cookie_keys:
{private}cookie_ttl: 1h
services:
  web:
    gray_cookie: {{keys: [{public}]}}
    route-strategy:
      A: {{status: Y, id: {{ids: [1, 2, 3, acme], interval: [[600, 10000]]}}, gray_cookie: true}}
      B: {{status: G, id: {{all: true}}}}
  other:
    gray_cookie: {{keys: [{{id: k9, public_key: "{stranger}"}}]}}
    route-strategy:
      A: {{status: Y, id: {{ids: [1]}}, gray_cookie: true}}
      B: {{status: G}}
  plain:
    gray_cookie: {{mode: plain}}
    route-strategy:
      A: {{status: Y, id: {{ids: [1]}}, gray_cookie: true}}
      B: {{status: G}}
"#
    )
}

struct Harness {
    app: Router,
    writer: Handle,
    _stop: tokio_util::sync::DropGuard,
}

fn start(text: &str) -> Harness {
    let cfg = Config::parse(text, Path::new("graylane.yaml")).unwrap();
    let (writer, snapshots) = Writer::open(Store::memory().unwrap(), &cfg, "h0").unwrap();
    let history = writer.reader().unwrap();
    let (commands, rx) = mpsc::channel(64);
    let (_events, events_rx) = mpsc::channel(64);
    let stop = CancellationToken::new();
    tokio::spawn(writer.run(rx, events_rx, stop.clone()));
    let handle = Handle::new(commands);
    let state = AppState::new(snapshots, handle.clone(), history, Arc::new(Metrics::new()));
    Harness {
        app: router(state, &Limits::default()),
        writer: handle,
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

async fn issue(app: &Router, service: &str, tenant: &str) -> (StatusCode, Value) {
    let path = format!("/v1/services/{service}/gray-cookie");
    call(app, "POST", &path, Some(I), Some(json!({"tenant": tenant}))).await
}

/// Service web's strategy as the filters get it (through the API), compiled.
async fn live_strategy(app: &Router) -> Compiled {
    let (s, v) = call(app, "GET", "/v1/services/web", Some(R), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let spec: StrategySpec = serde_json::from_value(v["strategy"].clone()).unwrap();
    Compiled::try_from(spec).unwrap()
}

/// Reloads graylane.yaml as `text`, and returns once the writer handled it (it handles
/// commands in order: an edit that changes nothing, sent after, is the barrier).
async fn reload(h: &Harness, text: &str, hash: &str) {
    let cfg = Config::parse(text, Path::new("graylane.yaml")).unwrap();
    h.writer.file_reloaded(Ok(Box::new(cfg)), hash.into()).await;
    let (s, v) = call(
        &h.app,
        "PUT",
        "/v1/services/web/clusters/B/state",
        Some(W),
        Some(json!({"state": "G"})),
    )
    .await;
    assert_eq!((s, &v["changed"]), (StatusCode::OK, &json!(false)), "{v}");
}

fn verify(c: &Compiled, value: &str, tenant: Id, at: u64) -> Verdict {
    cookie::verify_signed(
        c.gray_cookie_keys(),
        value.as_bytes(),
        Some(&tenant),
        Some(at),
        &cookie::Uncached,
    )
}

#[tokio::test]
async fn whitelisted_tenants_get_a_cookie_the_filters_verify_others_get_zero() {
    let k1 = key("k1", 1);
    let h = start(&config(&[&k1], &[(&k1, None)]));
    let before = now();
    let (s, v) = issue(&h.app, "web", "700").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["gray"], true);
    assert_eq!(v["name"], "tenantGray");
    assert_eq!(v["key_id"], "k1");
    assert_eq!(
        (v["cluster"].as_str(), v["reason"].as_str()),
        (Some("A"), Some("interval"))
    );
    let value = v["value"].as_str().unwrap();
    assert!(value.starts_with("1.700."), "{value}");
    let expires = v["expires"].as_u64().unwrap();
    assert!(
        (before + 3_600..=now() + 3_600).contains(&expires),
        "cookie_ttl: 1h"
    );
    let issued_at = expires - v["max_age"].as_u64().unwrap();
    assert!(
        (before..=now()).contains(&issued_at),
        "max_age counts from now"
    );
    assert_eq!(
        v["set_cookie"].as_str().unwrap(),
        format!(
            "tenantGray={value}; Max-Age={}; Path=/; Secure; HttpOnly; SameSite=Lax",
            v["max_age"]
        )
    );
    let c = live_strategy(&h.app).await;
    assert_eq!(verify(&c, value, Id::Num(700), now()), Verdict::Gray);
    assert_eq!(
        verify(&c, value, Id::Num(701), now()),
        Verdict::NotGray(Rejected::OtherTenant)
    );
    assert_eq!(
        verify(&c, value, Id::Num(700), expires),
        Verdict::NotGray(Rejected::Expired)
    );

    // A string tenant in the whitelist; the filter's own decide routes it by the cookie.
    let (_, v) = issue(&h.app, "web", "acme").await;
    assert_eq!(
        (v["gray"].as_bool(), v["reason"].as_str()),
        (Some(true), Some("id"))
    );
    let value = v["value"].as_str().unwrap().to_string();
    let ck = format!("tenantGray={value}");
    let headers = vec![("cookie".to_string(), ck.into_bytes())];
    let req = graylane_strategy::RequestView {
        headers: &headers,
        tenant: Some(b"acme"),
        own_lane: None,
        now: Some(now()),
        draw: 0,
    };
    assert!(verify(&c, &value, Id::Str("acme".into()), now()) == Verdict::Gray);
    let d = graylane_strategy::decide(&c, &graylane_strategy::Health::UNKNOWN, &req);
    assert_eq!(d.target(&c).unwrap().key, "A");

    // Not whitelisted: seed 003's tenantGray=0 (R and G clusters, and percentages, do not
    // make a tenant gray).
    for tenant in ["300", "10001", "zeta"] {
        let (s, v) = issue(&h.app, "web", tenant).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["gray"], false, "{tenant}");
        assert_eq!(v["value"], "0");
        assert_eq!(
            v["set_cookie"],
            "tenantGray=0; Max-Age=3600; Path=/; Secure; HttpOnly; SameSite=Lax"
        );
        assert!(
            v.get("key_id").is_none() && v.get("expires").is_none(),
            "{v}"
        );
    }

    // The answer follows the live strategy: whitelist 300, then take A out of gray.
    let (s, v) = call(
        &h.app,
        "POST",
        "/v1/services/web/clusters/A/whitelist/add",
        Some(W),
        Some(json!({"ids": [300]})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(issue(&h.app, "web", "300").await.1["gray"], true);
    let (s, v) = call(
        &h.app,
        "PUT",
        "/v1/services/web/clusters/A/state",
        Some(W),
        Some(json!({"state": "R"})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(issue(&h.app, "web", "300").await.1["gray"], false);
    assert_eq!(issue(&h.app, "web", "700").await.1["gray"], false);
}

#[tokio::test]
async fn only_issuer_tokens_issue_and_issuers_do_nothing_else() {
    let k1 = key("k1", 1);
    let h = start(&config(&[&k1], &[(&k1, None)]));
    let body = Some(json!({"tenant": "1"}));
    let path = "/v1/services/web/gray-cookie";
    let (s, v) = call(&h.app, "POST", path, None, body.clone()).await;
    assert_eq!(
        (s, v["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("unauthorized"))
    );
    for (token, role) in [(W, "write"), (R, "read")] {
        let (s, v) = call(&h.app, "POST", path, Some(token), body.clone()).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{role}: {v}");
        assert!(
            v["message"]
                .as_str()
                .unwrap()
                .contains(&format!("role {role}; this needs issuer")),
            "{v}"
        );
    }
    // An issuer token reads and writes nothing.
    for (method, path, body) in [
        ("GET", "/v1/status", None),
        ("GET", "/v1/services/web", None),
        ("GET", "/v1/history", None),
        (
            "PUT",
            "/v1/services/web/clusters/A/state",
            Some(json!({"state": "R"})),
        ),
        (
            "POST",
            "/v1/services/web/clusters/A/whitelist/add",
            Some(json!({"ids": [5]})),
        ),
    ] {
        let (s, v) = call(&h.app, method, path, Some(I), body).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{method} {path}: {v}");
    }
    let (s, v) = call(&h.app, "GET", "/v1/history", Some(R), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        v["versions"].as_array().unwrap().len(),
        1,
        "nothing was written"
    );
    let (s, _) = call(&h.app, "POST", path, Some(I), body).await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn no_usable_key_is_a_409_never_an_unverifiable_cookie() {
    let k1 = key("k1", 1);
    let h = start(&config(&[&k1], &[(&k1, None)]));
    let (s, v) = issue(&h.app, "nowhere", "1").await;
    assert_eq!(
        (s, v["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found")),
        "{v}"
    );
    // Service other lists k9, whose private key the control plane does not have: not even
    // tenantGray=0 is answered, so the misconfiguration shows at once.
    for tenant in ["1", "5"] {
        let (s, v) = issue(&h.app, "other", tenant).await;
        assert_eq!(s, StatusCode::CONFLICT, "{v}");
        assert_eq!(
            (v["code"].as_str(), v["field"].as_str()),
            (Some("conflict"), Some("gray_cookie.keys"))
        );
        let m = v["message"].as_str().unwrap();
        assert!(
            m.contains("[\"k9\"]") && m.contains("[\"k1\"]") && m.contains("could not be verified"),
            "{m}"
        );
    }
    let (s, v) = issue(&h.app, "plain", "1").await;
    assert_eq!(
        (s, v["field"].as_str()),
        (StatusCode::CONFLICT, Some("gray_cookie")),
        "{v}"
    );
    assert!(v["message"].as_str().unwrap().contains("mode plain"), "{v}");
    // The key id the strategy lists, but another public key: refused too.
    let impostor = key("k1", 7);
    let h2 = start(&config(&[&impostor], &[(&k1, None)]));
    let (s, v) = issue(&h2.app, "web", "1").await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    // A listed key past its not_after signs nothing.
    let h3 = start(&config(&[&k1], &[(&k1, Some(now() - 1))]));
    assert_eq!(issue(&h3.app, "web", "1").await.0, StatusCode::CONFLICT);
    // Bad requests name the field.
    for body in [
        json!({"tenant": "a b"}),
        json!({"tenant": ""}),
        json!({"tenant": "1", "ttl": 5}),
        json!({}),
    ] {
        let (s, v) = call(
            &h.app,
            "POST",
            "/v1/services/web/gray-cookie",
            Some(I),
            Some(body.clone()),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert!(v["field"].is_string(), "{v}");
    }
}

#[tokio::test]
async fn keys_rotate_without_breaking_live_cookies() {
    let (old, new) = (key("old", 1), key("new", 2));
    let h = start(&config(&[&old], &[(&old, None)]));
    let (_, v) = issue(&h.app, "web", "2").await;
    assert_eq!(v["key_id"], "old");
    let by_old = v["value"].as_str().unwrap().to_string();
    let t = now();

    // Step 1 and 2: the strategy lists both keys, the old one until t + 100; the control
    // plane has both private keys (a reload of graylane.yaml).
    let window = t + 100;
    let text = config(&[&old, &new], &[(&old, Some(window)), (&new, None)]);
    reload(&h, &text, "h1").await;
    let (_, v) = issue(&h.app, "web", "2").await;
    assert_eq!(v["key_id"], "new", "the key that lives longer signs");
    let by_new = v["value"].as_str().unwrap().to_string();
    let c = live_strategy(&h.app).await;
    assert_eq!(c.gray_cookie_keys().len(), 2, "the reload is live");
    for (at, old_verdict) in [
        (t, Verdict::Gray),
        (window - 1, Verdict::Gray),
        (window, Verdict::NotGray(Rejected::KeyRetired)),
    ] {
        assert_eq!(
            verify(&c, &by_old, Id::Num(2), at),
            old_verdict,
            "old key at {at}"
        );
        assert_eq!(
            verify(&c, &by_new, Id::Num(2), at),
            Verdict::Gray,
            "new key at {at}"
        );
    }

    // Step 3: the old key leaves the strategy (through the API) and the config.
    let (s, v) = call(&h.app, "GET", "/v1/services/web", Some(R), None).await;
    assert_eq!(s, StatusCode::OK);
    let mut strategy = v["strategy"].clone();
    strategy["gray_cookie"]["keys"] = json!([{"id": "new", "public_key": new.public_key()}]);
    let (s, v) = call(&h.app, "PUT", "/v1/services/web", Some(W), Some(strategy)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let c = live_strategy(&h.app).await;
    assert_eq!(
        verify(&c, &by_old, Id::Num(2), t),
        Verdict::NotGray(Rejected::UnknownKey)
    );
    assert_eq!(verify(&c, &by_new, Id::Num(2), t), Verdict::Gray);
    // A control plane left with only the old private key now refuses to sign.
    reload(&h, &config(&[&old], &[(&new, None)]), "h2").await;
    assert_eq!(issue(&h.app, "web", "2").await.0, StatusCode::CONFLICT);
}

/// Every spelling of a 32-byte secret that could end up in text: raw, base64 (padded or not,
/// standard or URL alphabet), hex; and the expanded key Ed25519 derives from it.
fn spellings(seed: &[u8; 32]) -> Vec<(String, Vec<u8>)> {
    use sha2::{Digest, Sha512};
    let expanded = Sha512::digest(seed);
    let mut out = Vec::new();
    for (what, bytes) in [("seed", &seed[..]), ("expanded", &expanded[..32])] {
        out.push((format!("{what} raw"), bytes.to_vec()));
        for (name, text) in [
            ("base64", STANDARD.encode(bytes)),
            ("base64 no pad", STANDARD_NO_PAD.encode(bytes)),
            ("base64url", URL_SAFE.encode(bytes)),
            ("base64url no pad", URL_SAFE_NO_PAD.encode(bytes)),
            ("hex", bytes.iter().map(|b| format!("{b:02x}")).collect()),
            ("HEX", bytes.iter().map(|b| format!("{b:02X}")).collect()),
        ] {
            out.push((format!("{what} {name}"), text.into_bytes()));
        }
    }
    out
}

fn find(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Log lines captured from the tracing subscriber.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_keys_never_leave_the_control_plane() {
    let logs = Captured::default();
    let sink = logs.clone();
    tracing::subscriber::set_global_default(
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .finish(),
    )
    .unwrap();

    // Two fresh keys: one inline in graylane.yaml, one in a file beside it.
    let dir = tempfile::tempdir().unwrap();
    let inline = PrivateKey::generate("k1").unwrap();
    let filed = PrivateKey::generate("k2").unwrap();
    std::fs::write(
        dir.path().join("k2.key"),
        format!("{}\n", &*filed.private_key_text()),
    )
    .unwrap();
    let secrets: Vec<(String, Vec<u8>)> = [&inline, &filed]
        .iter()
        .flat_map(|k| {
            let seed: [u8; 32] = STANDARD
                .decode(&*k.private_key_text())
                .unwrap()
                .try_into()
                .unwrap();
            spellings(&seed)
                .into_iter()
                .map(|(what, s)| (format!("{} {what}", k.id()), s))
        })
        .collect();
    let text = config(&[&inline], &[(&inline, None), (&filed, None)]).replace(
        "cookie_ttl: 1h",
        // Every route is asked with every kind of token and none, from one address: more
        // failed authentications than the default allows in 10 s.
        "  - {id: k2, private_key_file: k2.key}\ncookie_ttl: 1h\nfeed_token: feed-token-1\ndata_dir: data\nlimits: {failed_auth: 1000}",
    );
    let path = dir.path().join("graylane.yaml");
    std::fs::write(&path, &text).unwrap();
    let cfg = Config::parse(&text, &path).unwrap();
    assert_eq!(cfg.cookie_generator.keys.ids(), ["k1", "k2"]);
    let mut seen: Vec<(String, Vec<u8>)> = vec![(
        "Debug of the config".into(),
        format!("{cfg:?}").into_bytes(),
    )];

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let loaded = graylane_control_plane::serve::Loaded::read(&path).unwrap();
    let stop = CancellationToken::new();
    let server = tokio::spawn(graylane_control_plane::serve::run(
        listener,
        None,
        loaded,
        None,
        stop.clone(),
    ));
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while http.get(format!("{base}/healthz")).send().await.is_err() {
        assert!(Instant::now() < deadline, "the control plane did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let get = |path: String, token: Option<&'static str>| {
        let mut req = http.get(format!("{base}{path}"));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        async move {
            let resp = req.send().await.unwrap();
            let status = resp.status();
            let head = format!("{:?}", resp.headers());
            let body = resp.bytes().await.unwrap().to_vec();
            (status, head.into_bytes(), body)
        }
    };

    // Traffic worth searching: cookies issued (one gray, one not), a write, explain with a
    // signed cookie, and a reload caught broken on the line of the inline key.
    for tenant in ["700", "300"] {
        let resp = http
            .post(format!("{base}/v1/services/web/gray-cookie"))
            .bearer_auth(I)
            .json(&json!({"tenant": tenant}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        seen.push((
            format!("gray-cookie {tenant}"),
            resp.bytes().await.unwrap().to_vec(),
        ));
    }
    let resp = http
        .put(format!("{base}/v1/services/web/clusters/A/state"))
        .bearer_auth(W)
        .json(&json!({"state": "R"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    seen.push(("set-state".into(), resp.bytes().await.unwrap().to_vec()));
    let resp = http
        .post(format!("{base}/v1/services/web/explain"))
        .bearer_auth(R)
        .json(&json!({"tenant": "700", "cookies": {"tenantGray": "1.700.9999999999.k1.x"}}))
        .send()
        .await
        .unwrap();
    seen.push(("explain".into(), resp.bytes().await.unwrap().to_vec()));
    let broken = text.replacen("\"}\n", "\"\n", 1);
    assert_ne!(broken, text);
    std::fs::write(&path, &broken).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, _, body) = get("/v1/status".into(), Some(R)).await;
        let body = String::from_utf8_lossy(&body).to_string();
        if body.contains("\"config_error\":{") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the broken file was not reported: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Every GET route of the API document, with each kind of token and none.
    let (_, _, doc) = get("/v1/openapi.json".into(), None).await;
    let doc: Value = serde_json::from_slice(&doc).unwrap();
    let mut routes = 0;
    for (template, ops) in doc["paths"].as_object().unwrap() {
        let Some(op) = ops.get("get") else { continue };
        routes += 1;
        let mut path = template
            .replace("{service}", "web")
            .replace("{cluster}", "A");
        let required: Vec<&str> = op["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["in"] == "query" && p["required"] == true)
            .filter_map(|p| p["name"].as_str())
            .collect();
        if !required.is_empty() {
            let q: Vec<String> = required
                .iter()
                .map(|n| format!("{n}={}", if *n == "to" { 2 } else { 1 }))
                .collect();
            path = format!("{path}?{}", q.join("&"));
        }
        assert!(!path.contains('{'), "{path}");
        for token in [None, Some(R), Some(W), Some(I), Some("feed-token-1")] {
            let (status, head, body) = get(path.clone(), token).await;
            seen.push((
                format!("GET {path} with {token:?}: {status}"),
                [head, body].concat(),
            ));
        }
    }
    assert!(routes >= 10, "only {routes} GET routes in the document");
    // The feed as each data plane asks for it (strategy, health, endpoints).
    for q in ["", "?endpoints=true", "?version=1&wait_ms=0"] {
        for svc in ["web", "other", "plain"] {
            let (status, head, body) =
                get(format!("/v1/feed/{svc}{q}"), Some("feed-token-1")).await;
            assert_eq!(status, 200, "feed {svc}{q}");
            seen.push((format!("feed {svc}{q}"), [head, body].concat()));
        }
    }
    stop.cancel();
    server.await.unwrap().unwrap();

    // The search would find a key if one were there: the public keys are in the answers.
    let all: Vec<u8> = seen.iter().flat_map(|(_, b)| b.iter().copied()).collect();
    assert!(
        find(&all, inline.public_key().as_bytes()) && find(&all, filed.public_key().as_bytes())
    );
    assert!(
        find(&all, b"\"value\":\"1.700."),
        "a signed cookie was answered"
    );
    let log = logs.0.lock().unwrap().clone();
    assert!(
        find(&log, b"gray cookie issued") && find(&log, b"config file changed but is invalid"),
        "logs captured"
    );
    seen.push(("logs".into(), log));
    for entry in walk(dir.path()) {
        if entry
            .file_name()
            .is_some_and(|n| n == "graylane.yaml" || n == "k2.key")
        {
            continue; // where the operator put them
        }
        seen.push((
            format!("file {}", entry.display()),
            std::fs::read(&entry).unwrap(),
        ));
    }
    for (what, bytes) in &seen {
        for (secret, spelled) in &secrets {
            assert!(!find(bytes, spelled), "{secret} found in {what}");
        }
    }
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn keygen_writes_the_private_key_only_where_asked() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("k.key");
    let bin = env!("CARGO_BIN_EXE_graylane");
    let out = std::process::Command::new(bin)
        .args(["keygen", "--id", "k2026a", "--out"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).unwrap();
    let secret = std::fs::read_to_string(&file).unwrap();
    assert!(!printed.contains(secret.trim()));
    // The two snippets make a working pair: paste them and the control plane signs.
    let public = printed
        .split("public_key: \"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap();
    let text = format!(
        "tokens: [{{name: auth, token: {I}, role: issuer}}]\ncookie_keys:\n  - {{id: k2026a, private_key_file: {}}}\nservices:\n  web:\n    gray_cookie: {{keys: [{{id: k2026a, public_key: \"{public}\"}}]}}\n    route-strategy: {{A: {{status: Y, id: {{ids: [1]}}}}, B: {{status: G}}}}\n",
        file.display()
    );
    let cfg = Config::parse(&text, &dir.path().join("graylane.yaml")).unwrap();
    let c = &cfg.services["web"].compiled;
    let issued = cfg
        .cookie_generator
        .issue("web", c, &Id::Num(1), now())
        .unwrap();
    let graylane_control_plane::cookie::Issued::Gray { value, .. } = issued else {
        panic!("not gray")
    };
    assert_eq!(verify(c, &value, Id::Num(1), now()), Verdict::Gray);
}
