//! The config users copy, `envoy/standalone.yaml`, as shipped (only its ports and the .wasm
//! path replaced): seed 000's strategy routes tenant 2 and 700 to gray (A) and 300 to prod
//! (B), and clients cannot choose a cluster themselves. `make demo` runs the same file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use base64::Engine as _;

use graylane_e2e::{count_by_body, get, noop_wasm_path, repo_root, wasm_path, Envoy, Upstream};

/// `envoy/standalone.yaml` as shipped, with ports 0, the two upstreams' ports and `wasm`.
fn shipped(gray: &Upstream, prod: &Upstream, wasm: &Path) -> String {
    let mut config = std::fs::read_to_string(repo_root().join("envoy/standalone.yaml")).unwrap();
    for (from, to) in [
        ("port_value: 10000", "port_value: 0".to_owned()),
        ("port_value: 9901", "port_value: 0".to_owned()),
        ("port_value: 18081", format!("port_value: {}", gray.port())),
        ("port_value: 18082", format!("port_value: {}", prod.port())),
        (
            "target/wasm32-wasip1/release/graylane_filter.wasm",
            wasm.display().to_string(),
        ),
    ] {
        assert!(
            config.contains(from),
            "envoy/standalone.yaml no longer has {from:?}"
        );
        config = config.replace(from, &to);
    }
    config
}

#[test]
fn standalone_config_routes_seed_000() {
    let (gray, prod) = (Upstream::start("gray"), Upstream::start("prod"));
    let config = shipped(&gray, &prod, &wasm_path());
    let envoy = Envoy::start(&config, 2).unwrap();
    let port = envoy.port("ingress");
    let route = |headers: &[(&str, &str)]| count_by_body(port, "/", headers, 50);

    for tenant in ["2", "700", "1", "100", "600", "10000"] {
        let got = route(&[("x-tenant-id", tenant)]);
        assert_eq!(got.get("gray"), Some(&50), "tenant {tenant}: {got:?}");
    }
    for tenant in ["300", "0", "101", "599", "10001", "not-a-number"] {
        let got = route(&[("x-tenant-id", tenant)]);
        assert_eq!(got.get("prod"), Some(&50), "tenant {tenant}: {got:?}");
    }
    assert_eq!(route(&[]).get("prod"), Some(&50));
    assert_eq!(route(&[("cookie", "tenantId=2")]).get("gray"), Some(&50));
    let got = count_by_body(port, "/?tenant=700", &[], 50);
    assert_eq!(got.get("gray"), Some(&50), "{got:?}");
    // A gray cookie signed with the demo's private key (examples/demo-cookie.key, whose
    // public key the config lists as `demo`) puts tenant 300 in gray; signed with another
    // key, or under another key id, it does not.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let demo = std::fs::read_to_string(repo_root().join("examples/demo-cookie.key")).unwrap();
    let seed: [u8; 32] = base64::engine::general_purpose::STANDARD
        .decode(demo.trim())
        .unwrap()
        .try_into()
        .unwrap();
    let demo = graylane_strategy::cookie::SigningKey::from_bytes(&seed);
    let tenant = graylane_strategy::parse_id(b"300").unwrap();
    let signed = graylane_strategy::cookie::sign(&demo, "demo", &tenant, now + 600);
    let cookie = format!("tenantGray={signed}");
    let got = route(&[("x-tenant-id", "300"), ("cookie", &cookie)]);
    assert_eq!(got.get("gray"), Some(&50), "{got:?}");
    let other = graylane_strategy::cookie::SigningKey::from_bytes(&[1; 32]);
    for bad in [
        graylane_strategy::cookie::sign(&other, "demo", &tenant, now + 600),
        graylane_strategy::cookie::sign(&demo, "k2", &tenant, now + 600),
    ] {
        let cookie = format!("tenantGray={bad}");
        let got = route(&[("x-tenant-id", "300"), ("cookie", &cookie)]);
        assert_eq!(got.get("prod"), Some(&50), "{bad}: {got:?}");
    }
    // A client cannot pick its cluster, its lane or forge the plain cookie.
    for forged in [
        ("x-graylane-cluster", "A"),
        ("x-graylane-lane", "gray"),
        ("cookie", "tenantGray=1"),
    ] {
        let got = route(&[("x-tenant-id", "300"), forged]);
        assert_eq!(got.get("prod"), Some(&50), "{forged:?}: {got:?}");
    }
    // As shipped, nothing tells a client why it was routed (it could probe the whitelist).
    for tenant in ["2", "300"] {
        let (status, _, headers) = get(port, "/", &[("x-tenant-id", tenant)]);
        assert_eq!(status, 200);
        let graylane: Vec<_> = headers
            .keys()
            .filter(|k| k.starts_with("x-graylane"))
            .collect();
        assert!(graylane.is_empty(), "tenant {tenant}: {graylane:?}");
    }
}

/// The README's promise for `failure_policy: FAIL_OPEN`: with the Wasm VM failed, requests
/// take the fallback route to prod, and a client still cannot pick a cluster, because the
/// connection manager's early header mutation strips the routing headers before the route is
/// selected (shown by the same config without it, where the client's header wins; an HTTP
/// `header_mutation` filter, which shipped configs used before, lost the same way).
#[test]
fn with_the_vm_failed_requests_reach_prod_and_clients_still_cannot_choose() {
    let (gray, prod) = (Upstream::start("gray"), Upstream::start("prod"));
    let run = |config: &str| {
        let envoy = Envoy::start(config, 1).unwrap();
        let port = envoy.port("ingress");
        // A request that makes the VM trap; it fails, and the VM is gone for good.
        let trapped = graylane_e2e::runtime().block_on(graylane_e2e::fetch(
            &format!("http://127.0.0.1:{port}/"),
            &[("x-noop-trap", "1")],
        ));
        assert!(
            trapped
                .as_ref()
                .map_or(true, |(status, _, _)| *status != 200),
            "the trap did not fail its request: {trapped:?}"
        );
        let chosen = [("x-tenant-id", "2"), ("x-graylane-cluster", "A")];
        let got = count_by_body(port, "/", &chosen, 50);
        // The trap header no longer reaches a filter: the VM failed, FAIL_OPEN passes.
        let (status, body, _) = get(port, "/", &[("x-noop-trap", "1")]);
        (got, status, body)
    };
    let config = shipped(&gray, &prod, &noop_wasm_path());
    let (got, status, body) = run(&config);
    assert_eq!(got.get("prod"), Some(&50), "{got:?}");
    assert_eq!((status, body.as_str()), (200, "prod"));
    // Control: without the stripping, the client's header picks gray.
    let unprotected = config.replace("- remove: x-graylane-cluster", "- remove: x-unrelated");
    assert_ne!(unprotected, config);
    let (got, _, _) = run(&unprotected);
    assert_eq!(got.get("gray"), Some(&50), "{got:?}");
}
