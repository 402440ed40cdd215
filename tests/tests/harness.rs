//! The harness itself, with Envoy's native routing only (no wasm): upstreams answer with their
//! name, Envoy routes by `x-graylane-cluster`, counts are exact, and failures are visible.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use graylane_e2e::{
    count_by_body, count_by_body_with, get, render, Envoy, EnvoyConfig, Req, Upstream,
};

#[test]
fn cluster_header_routes_every_request_to_the_named_cluster() {
    let (a, b) = (Upstream::start("A"), Upstream::start("B"));
    let config = EnvoyConfig::new()
        .cluster("A", a.port())
        .cluster("B", b.port())
        .fallback("B")
        .render();
    let envoy = Envoy::start(&config, 2).unwrap();
    let port = envoy.port("ingress");

    let (status, body, headers) = get(port, "/", &[("x-graylane-cluster", "A")]);
    assert_eq!((status, body.as_str()), (200, "A"));
    assert_eq!(headers.get("x-upstream").map(String::as_str), Some("A"));

    // 10,000 requests, alternating by index: exact counts on both sides.
    let counts = count_by_body_with(port, 10_000, |i| {
        Req::new(format!("/?i={i}"))
            .header("x-graylane-cluster", if i % 4 == 0 { "A" } else { "B" })
    });
    assert_eq!(counts.get("A"), Some(&2_500), "{counts:?}");
    assert_eq!(counts.get("B"), Some(&7_500), "{counts:?}");
    assert_eq!(counts.len(), 2, "{counts:?}");
    assert_eq!(a.hits(), 2_501);

    // No header: the fallback route.
    let counts = count_by_body(port, "/", &[], 100);
    assert_eq!(counts.get("B"), Some(&100), "{counts:?}");

    // An unknown cluster name is Envoy's error, visible in the counts (not a silent success).
    let counts = count_by_body(port, "/", &[("x-graylane-cluster", "nope")], 3);
    assert_eq!(counts.get("A").copied().unwrap_or(0), 0, "{counts:?}");
    assert_eq!(counts.get("B").copied().unwrap_or(0), 0, "{counts:?}");
    assert_eq!(counts.values().sum::<usize>(), 3);
}

#[test]
fn echo_shows_the_headers_the_upstream_received() {
    let a = Upstream::start("A");
    let envoy = Envoy::start(&EnvoyConfig::new().cluster("A", a.port()).render(), 1).unwrap();
    let (status, body, _) = get(
        envoy.port("ingress"),
        "/echo",
        &[("x-graylane-cluster", "A"), ("x-tenant-id", "42")],
    );
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["x-tenant-id"], "42");
    assert_eq!(json["x-graylane-cluster"], "A");
}

#[test]
fn forwarding_upstreams_chain_two_envoys() {
    // client -> Envoy 1 -> front (forwards) -> Envoy 2 -> back-gray
    let back = Upstream::start("back-gray");
    let envoy2 = Envoy::start(
        &EnvoyConfig::new()
            .cluster("back", back.port())
            .fallback("back")
            .render(),
        1,
    )
    .unwrap();
    let front = Upstream::start_forwarding(
        "front",
        &format!("http://127.0.0.1:{}", envoy2.port("ingress")),
    );
    let envoy1 = Envoy::start(
        &EnvoyConfig::new()
            .cluster("front", front.port())
            .fallback("front")
            .render(),
        1,
    )
    .unwrap();
    let (status, body, _) = get(envoy1.port("ingress"), "/x", &[("x-tenant-id", "7")]);
    assert_eq!((status, body.as_str()), (200, "front->back-gray"));
    // The tenant header travelled along; the first hop's route header did not decide hop 2.
    let (_, body, _) = get(envoy1.port("ingress"), "/echo", &[("x-tenant-id", "7")]);
    let json: serde_json::Value = serde_json::from_str(body.trim_start_matches("front->")).unwrap();
    assert_eq!(json["x-tenant-id"], "7");
}

#[test]
fn templates_substitute_and_refuse_missing_values() {
    assert_eq!(render("a {{X}} b {{Y}}", &[("X", 1), ("Y", 2)]), "a 1 b 2");
    let missing = std::panic::catch_unwind(|| render("port {{PORT}}", &[("X", 1)]));
    assert!(missing.is_err());
}

#[test]
fn a_broken_config_is_an_error_carrying_envoys_log() {
    let err = match Envoy::start("static_resources: {clusters: [{name: x, type: NOPE}]}", 1) {
        Ok(_) => panic!("a broken config started"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("envoy log"), "{err}");
    assert!(err.contains("NOPE"), "{err}");
}

#[test]
fn dropping_stops_envoy_and_upstreams() {
    let a = Upstream::start("A");
    let envoy = Envoy::start(&EnvoyConfig::new().cluster("A", a.port()).render(), 1).unwrap();
    let (admin, listener, upstream) = (envoy.admin_port(), envoy.port("ingress"), a.port());
    assert_eq!(get(listener, "/", &[("x-graylane-cluster", "A")]).1, "A");
    drop(envoy);
    drop(a);
    for port in [admin, listener, upstream] {
        graylane_e2e::wait_until(
            &format!("port {port} refuses connections"),
            std::time::Duration::from_secs(10),
            || std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        );
    }
}
