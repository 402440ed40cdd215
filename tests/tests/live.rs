//! Issue 4 end to end: the real control plane (`graylane serve`, its CLI) feeding a real
//! Envoy with 2 workers. A state change through the CLI moves traffic; with the control plane
//! stopped Envoy keeps routing by its last snapshot; restarted, updates resume; an invalid edit
//! of the config file leaves routing unchanged and shows the error in the API.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use graylane_e2e::{count_by_body, free_port, get, ControlPlane, Envoy, EnvoyConfig, Upstream};
use serde_json::json;

const WRITE: &str = "write-token-e2e";
const READ: &str = "read-token-e2e";

fn config(port: u16, data: &std::path::Path, a_status: &str) -> String {
    format!(
        r#"listen: 127.0.0.1:{port}
data_dir: {data}
tokens:
  - {{name: ops, token: {WRITE}, role: write}}
  - {{name: viewer, token: {READ}, role: read}}
services:
  web:
    route-strategy:
      A:
        status: {a_status}
        id:
          all: false
          ids: [1, 2, 3]
          interval: [[1,100], [600,10000]]
      B:
        status: G
        id:
          all: true
"#,
        data = data.display()
    )
}

/// The body every one of `n` requests for `tenant` got, if they all agree.
fn route(envoy: &Envoy, tenant: &str) -> Option<String> {
    let counts = count_by_body(envoy.port("ingress"), "/", &[("x-tenant-id", tenant)], 40);
    (counts.len() == 1).then(|| counts.into_keys().next().unwrap())
}

fn wait_route(envoy: &Envoy, tenant: &str, want: &str, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if route(envoy, tenant).as_deref() == Some(want) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "tenant {tenant} did not reach {want} within {within:?} (now {:?})",
            route(envoy, tenant)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ok(out: &std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "CLI failed: {}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn cli_moves_traffic_envoy_survives_the_control_plane_and_bad_edits() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg_path = dir.path().join("graylane.yaml");
    std::fs::write(&cfg_path, config(port, &dir.path().join("data"), "Y")).unwrap();
    let mut cp = ControlPlane::start(&cfg_path, port);

    let (a, b) = (Upstream::start("A"), Upstream::start("B"));
    // No strategy in Envoy's config: everything the filter knows comes from the feed.
    let plugin = json!({"service": "web", "reason_header": "x-graylane-reason",
        "control_plane": {"cluster": "graylane_cp", "wait_ms": 5000, "tick_ms": 50}});
    let envoy_cfg = EnvoyConfig::new()
        .graylane(&plugin)
        .fallback("B")
        .cluster("A", a.port())
        .cluster("B", b.port())
        .cluster("graylane_cp", port)
        .render();
    let envoy = Envoy::start(&envoy_cfg, 2).unwrap();
    let secs = Duration::from_secs;

    // The first snapshot arrives from the control plane.
    wait_route(&envoy, "2", "A", secs(20));
    assert_eq!(route(&envoy, "300").as_deref(), Some("B"));
    assert_eq!(route(&envoy, "700").as_deref(), Some("A"));

    // A read token cannot write; the CLI says so and exits non-zero.
    let denied = cp.cli(READ, &["set-state", "web", "A", "R"]);
    assert!(!denied.status.success());
    assert_eq!(route(&envoy, "2").as_deref(), Some("A"));

    // Flip A to R through the CLI: tenant 2 moves to B on every worker.
    ok(&cp.cli(WRITE, &["set-state", "web", "A", "R"]));
    let took = wait_route(&envoy, "2", "B", secs(5));
    eprintln!("CLI write -> every worker routing by it: {took:?}");
    let status = ok(&cp.cli(READ, &["status"]));
    assert!(status.contains("web"), "{status}");

    // Explain agrees with Envoy (the same decide()).
    let explained = ok(&cp.cli(READ, &["explain", "web", "--tenant", "700"]));
    assert!(explained.contains('B'), "{explained}");

    // Control plane down: Envoy keeps routing by its last snapshot.
    cp.kill();
    std::thread::sleep(Duration::from_millis(300));
    for t in ["2", "700", "300"] {
        assert_eq!(
            route(&envoy, t).as_deref(),
            Some("B"),
            "tenant {t} with the control plane down"
        );
    }
    let (status, _, _) = get(envoy.port("ingress"), "/", &[("x-tenant-id", "2")]);
    assert_eq!(status, 200);

    // Restarted (same data): history survived, updates resume.
    cp.restart();
    ok(&cp.cli(WRITE, &["set-state", "web", "A", "Y"]));
    wait_route(&envoy, "2", "A", secs(10));
    let history = ok(&cp.cli(READ, &["history"]));
    assert!(history.lines().count() >= 3, "{history}");

    // An invalid edit of the file: rejected, visible in the API, routing unchanged.
    let bad = config(port, &dir.path().join("data"), "X");
    std::fs::write(&cfg_path, bad).unwrap();
    let api = format!("{}/v1/status", cp.url());
    let deadline = Instant::now() + secs(10);
    let shown = loop {
        let (code, body, _) = graylane_e2e::runtime()
            .block_on(graylane_e2e::fetch(
                &api,
                &[("authorization", format!("Bearer {READ}"))],
            ))
            .unwrap();
        if code == 200 && body.contains("\"config_error\":{") {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "config error never shown: {code} {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    let err = &shown["config_error"];
    assert_eq!(
        err["field"], "services.web.route-strategy.A.status",
        "{err}"
    );
    assert_eq!(
        err["location"],
        serde_json::json!([10, 17]),
        "line, column of the X in `status: X`: {err}"
    );
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("unknown variant `X`"),
        "{err}"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(route(&envoy, "2").as_deref(), Some("A"));
    assert_eq!(route(&envoy, "300").as_deref(), Some("B"));
}
