//! Seed 003's signed gray cookie end to end: the real control plane (`graylane serve`) mints a
//! tenant's cookie for the auth service (CLI `graylane gray-cookie`, token of role issuer)
//! under service portal's gray whitelist; a real Envoy (1 worker, so per-VM counts are exact)
//! running the real .wasm for service web, whose strategy comes from the feed and lists only
//! the public key, routes that tenant to gray by the cookie alone, verifies it once and
//! answers from its cache after; forged, expired, unknown-key, other-tenant and removed-key
//! cookies stay in prod. Envoy's config dump holds no private key.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use graylane_e2e::{
    count_by_body, fetch, free_port, runtime, wait_until, ControlPlane, Envoy, EnvoyConfig,
    Upstream,
};
use graylane_strategy::cookie::{self, SigningKey};
use graylane_strategy::Id;
use serde_json::json;

const WRITE: &str = "write-token-e2e";
const ISSUER: &str = "issuer-token-e2e";
const N: usize = 100;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn stat(envoy: &Envoy, name: &str) -> u64 {
    envoy
        .stat(&format!("wasmcustom.graylane.web.{name}"))
        .unwrap_or(0)
}

/// Waits until the filter's flushed counters show exactly `verified` signature checks and
/// `remembered` cache answers (flushed on the tick), then holds them to it.
fn verifications(envoy: &Envoy, verified: u64, remembered: u64) {
    wait_until(
        &format!("{verified} verified and {remembered} remembered"),
        Duration::from_secs(5),
        || {
            stat(envoy, "cookie_verified") == verified
                && stat(envoy, "cookie_remembered") == remembered
        },
    );
    std::thread::sleep(Duration::from_millis(150)); // three more ticks: nothing else comes
    assert_eq!(
        (
            stat(envoy, "cookie_verified"),
            stat(envoy, "cookie_remembered")
        ),
        (verified, remembered)
    );
}

#[test]
fn a_minted_cookie_routes_to_gray_forgeries_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let key = SigningKey::from_bytes(&[0x5e; 32]);
    let private = base64::engine::general_purpose::STANDARD.encode(key.to_bytes());
    let public = cookie::public_key_text(&key.verifying_key());
    std::fs::write(dir.path().join("k1.key"), format!("{private}\n")).unwrap();
    let stranger = SigningKey::from_bytes(&[0x66; 32]);
    let stranger_public = cookie::public_key_text(&stranger.verifying_key());
    let config = |web_key: &str, web_public: &str| {
        format!(
            r#"listen: 127.0.0.1:{port}
data_dir: data
tokens:
  - {{name: ops, token: {WRITE}, role: write}}
  - {{name: auth, token: {ISSUER}, role: issuer}}
cookie_keys:
  - {{id: k1, private_key_file: k1.key}}
services:
  portal:
    gray_cookie: {{keys: [{{id: k1, public_key: "{public}"}}]}}
    route-strategy:
      gray: {{status: Y, id: {{ids: [42, 43], interval: [[1000, 1999]]}}}}
      prod: {{status: G, id: {{all: true}}}}
  web:
    gray_cookie: {{keys: [{{id: {web_key}, public_key: "{web_public}"}}]}}
    route-strategy:
      A: {{status: Y, gray_cookie: true}}
      B: {{status: G, id: {{all: true}}}}
"#
        )
    };
    let cfg_path = dir.path().join("graylane.yaml");
    std::fs::write(&cfg_path, config("k1", &public)).unwrap();
    let cp = ControlPlane::start(&cfg_path, port);

    let (a, b) = (Upstream::start("A"), Upstream::start("B"));
    let plugin = json!({"service": "web", "reason_header": "x-graylane-reason",
        "control_plane": {"cluster": "graylane_cp", "wait_ms": 5000, "tick_ms": 50}});
    let envoy_cfg = EnvoyConfig::new()
        .graylane(&plugin)
        .fallback("B")
        .cluster("A", a.port())
        .cluster("B", b.port())
        .cluster("graylane_cp", port)
        .render();
    let envoy = Envoy::start(&envoy_cfg, 1).unwrap();
    wait_until(
        "web's strategy arrives from the feed",
        Duration::from_secs(20),
        || stat(&envoy, "snapshot_installed") >= 1,
    );

    // The auth service asks for tenants' cookies: 42 is in portal's gray whitelist, 7 is not.
    let mint = |tenant: &str| {
        let out = cp.cli(ISSUER, &["gray-cookie", "portal", tenant]);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let first = stdout.lines().next().unwrap_or_default();
        first.strip_prefix("tenantGray=").unwrap().to_string()
    };
    let minted = mint("42");
    assert!(
        minted.starts_with("1.42.") && minted.contains(".k1."),
        "{minted}"
    );
    assert_eq!(mint("7"), "0");
    let denied = cp.cli(WRITE, &["gray-cookie", "portal", "42"]);
    assert!(!denied.status.success(), "a write token does not issue");

    let route = |tenant: &str, value: &str| {
        let c = format!("rememberMe=x; tenantGray={value}; channel=web");
        count_by_body(
            envoy.port("ingress"),
            "/",
            &[("cookie", c.as_str()), ("x-tenant-id", tenant)],
            N,
        )
    };
    let all = |body: &str| -> std::collections::HashMap<String, usize> {
        [(body.to_string(), N)].into_iter().collect()
    };

    // Web lists no tenant: tenant 42 is gray by the minted cookie alone.
    assert_eq!(route("42", &minted), all("A"), "the minted cookie");
    let (_, _, headers) = graylane_e2e::get(
        envoy.port("ingress"),
        "/",
        &[
            ("cookie", format!("tenantGray={minted}").as_str()),
            ("x-tenant-id", "42"),
        ],
    );
    assert_eq!(headers["x-graylane-reason"], "A;gray_cookie");
    // Verified once in this VM (the first request); every later one answered from its cache.
    verifications(&envoy, 1, N as u64);

    assert_eq!(route("42", "1"), all("B"), "plain tenantGray=1");
    assert_eq!(route("7", "0"), all("B"), "tenantGray=0");
    assert_eq!(route("43", &minted), all("B"), "42's cookie sent by 43");
    let t42 = Id::Num(42);
    let expired = cookie::sign(&key, "k1", &t42, now() - 1);
    assert_eq!(route("42", &expired), all("B"), "expired");
    let unknown_kid = cookie::sign(&key, "k9", &t42, now() + 3_600);
    assert_eq!(route("42", &unknown_kid), all("B"), "unknown key id");
    // Cookies whose claims fail cost no verification.
    verifications(&envoy, 1, N as u64);

    // Forgeries whose claims hold are verified every time and never cached.
    let forged = cookie::sign(&stranger, "k1", &t42, now() + 3_600);
    assert_eq!(route("42", &forged), all("B"), "signed by another key");
    let moved = minted.replacen("1.42.", "1.43.", 1);
    assert_eq!(
        route("43", &moved),
        all("B"),
        "42's cookie rewritten for 43"
    );
    verifications(&envoy, 1 + 2 * N as u64, N as u64);

    // The key leaves web's strategy (a rotation's last step, an edit of graylane.yaml): the
    // cookie minted under it no longer routes, from the next feed answer on.
    let installed = stat(&envoy, "snapshot_installed");
    std::fs::write(&cfg_path, config("k2", &stranger_public)).unwrap();
    wait_until(
        "the new strategy reaches Envoy",
        Duration::from_secs(10),
        || stat(&envoy, "snapshot_installed") > installed && route("42", &minted) == all("B"),
    );
    assert_eq!(
        route("42", &minted),
        all("B"),
        "key removed from the strategy"
    );

    // Envoy's whole configuration holds no private key.
    let dump = envoy.admin("/config_dump?include_eds");
    assert!(
        !dump.contains(&private),
        "the private key is in Envoy's config dump"
    );
    let cp_metrics = runtime()
        .block_on(fetch::<&str, &str>(&format!("{}/metrics", cp.url()), &[]))
        .unwrap();
    assert!(!cp_metrics.1.contains(&private));
}
