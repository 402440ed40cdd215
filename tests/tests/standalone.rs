//! The config users copy, `envoy/standalone.yaml`, as shipped (only its ports and the .wasm
//! path replaced): seed 000's strategy routes tenant 2 and 700 to gray (A) and 300 to prod
//! (B), and clients cannot choose a cluster themselves. `make demo` runs the same file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use base64::Engine as _;
use graylane_e2e::{count_by_body, get, repo_root, wasm_path, Envoy, Upstream};

#[test]
fn standalone_config_routes_seed_000() {
    let (gray, prod) = (Upstream::start("gray"), Upstream::start("prod"));
    let shipped = std::fs::read_to_string(repo_root().join("envoy/standalone.yaml")).unwrap();
    let mut config = shipped.clone();
    for (from, to) in [
        ("port_value: 10000", "port_value: 0".to_owned()),
        ("port_value: 9901", "port_value: 0".to_owned()),
        ("port_value: 18081", format!("port_value: {}", gray.port())),
        ("port_value: 18082", format!("port_value: {}", prod.port())),
        (
            "target/wasm32-wasip1/release/graylane_filter.wasm",
            wasm_path().display().to_string(),
        ),
    ] {
        assert!(
            config.contains(from),
            "envoy/standalone.yaml no longer has {from:?}"
        );
        config = config.replace(from, &to);
    }
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
