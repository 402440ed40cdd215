//! TLS end to end (issue 10): a REAL Envoy talks to the control plane only over mutual TLS,
//! with certificates made in the test: ADS (xDS) with a client certificate, and the REAL
//! graylane .wasm following the feed through an Envoy cluster whose transport socket presents
//! the same client certificate. A change through the API reaches the routing.

use std::time::Duration;

use graylane_e2e::{count_by_body, runtime, wait_until, wasm_path, Envoy, Upstream};

use crate::control_plane::{runtime_of_two, ControlPlane};

const SERVICES: &str = "  web:
    route-strategy:
      A: {status: Y, id: {ids: [1, 2, 3]}}
      B: {status: G, id: {all: true}}
";

/// An upstream TLS context presenting the client certificate and trusting only the test CA.
fn tls_socket(dir: &std::path::Path) -> String {
    let f = |name: &str| serde_json::Value::String(dir.join(name).display().to_string());
    format!(
        r#"transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: localhost
        common_tls_context:
          tls_certificates: [{{certificate_chain: {{filename: {cert}}}, private_key: {{filename: {key}}}}}]
          validation_context:
            trusted_ca: {{filename: {ca}}}
            match_typed_subject_alt_names: [{{san_type: DNS, matcher: {{exact: localhost}}}}]"#,
        cert = f("client.crt"),
        key = f("client.key"),
        ca = f("ca.crt"),
    )
}

#[test]
fn envoy_and_the_filter_reach_the_control_plane_only_over_mutual_tls() {
    let certs = tempfile::tempdir().unwrap();
    graylane_e2e::pki::issue(certs.path()).unwrap();
    let path = |f: &str| certs.path().join(f).display().to_string();
    let tls = format!(
        "tokens: [{{name: ops, token: write-token-1, role: write}}]\n\
         tls: {{cert: {}, key: {}, client_ca: {}}}",
        path("server.crt"),
        path("server.key"),
        path("ca.crt")
    );
    let cp = ControlPlane::start(runtime_of_two(), SERVICES, &tls, None);
    let (a, b) = (Upstream::start("A"), Upstream::start("B"));
    let plugin = serde_json::json!({"service": "web",
        "control_plane": {"cluster": "graylane_cp", "authority": "localhost", "wait_ms": 5000, "tick_ms": 50}});
    let socket = tls_socket(certs.path());
    let yaml = format!(
        r#"node: {{id: e2e-tls, cluster: e2e}}
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}}}
dynamic_resources:
  ads_config:
    api_type: GRPC
    transport_api_version: V3
    grpc_services: [{{envoy_grpc: {{cluster_name: graylane_xds}}}}]
  cds_config: {{ads: {{}}, resource_api_version: V3}}
static_resources:
  listeners:
  - name: ingress
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          route_config:
            virtual_hosts:
            - name: web
              domains: ["*"]
              routes:
              - match: {{prefix: "/", headers: [{{name: x-graylane-cluster, present_match: true}}]}}
                route: {{cluster_header: x-graylane-cluster}}
              - match: {{prefix: "/"}}
                route: {{cluster: B}}
          http_filters:
          - name: envoy.filters.http.wasm
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: graylane
                root_id: graylane
                failure_policy: FAIL_CLOSED
                vm_config:
                  vm_id: graylane
                  runtime: envoy.wasm.runtime.v8
                  code: {{local: {{filename: {wasm}}}}}
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: {plugin}
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
  - name: graylane_xds
    type: STATIC
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment: {{cluster_name: graylane_xds, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {xds}}}}}}}}}]}}]}}
    {socket}
  - name: graylane_cp
    type: STATIC
    load_assignment: {{cluster_name: graylane_cp, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {api}}}}}}}}}]}}]}}
    {socket}
  - name: A
    type: STATIC
    load_assignment: {{cluster_name: A, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {a}}}}}}}}}]}}]}}
  - name: B
    type: STATIC
    load_assignment: {{cluster_name: B, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {b}}}}}}}}}]}}]}}
"#,
        wasm = serde_json::Value::String(wasm_path().display().to_string()),
        plugin = serde_json::Value::String(plugin.to_string()),
        xds = cp.xds,
        api = cp.api,
        a = a.port(),
        b = b.port(),
    );
    let envoy = Envoy::start(&yaml, 2).unwrap();
    // xDS over mutual TLS: the ADS stream is up.
    wait_until(
        "Envoy connected to xDS over mTLS",
        Duration::from_secs(20),
        || envoy.stat("control_plane.connected_state") == Some(1),
    );
    // The feed over mutual TLS: the filter routes tenant 2 by the control plane's strategy.
    let port = envoy.port("ingress");
    let route = |tenant: &str| count_by_body(port, "/", &[("x-tenant-id", tenant)], 10);
    wait_until(
        "the filter follows the feed over mTLS",
        Duration::from_secs(20),
        || route("2").get("A") == Some(&10),
    );
    assert_eq!(route("7").get("B"), Some(&10));
    // A change through the API (TLS, the test CA) reaches the routing.
    let ca = std::fs::read(certs.path().join("ca.crt")).unwrap();
    let client = graylane_control_plane::client::Client::with_ca(
        &format!("https://localhost:{}", cp.api),
        Some("write-token-1".into()),
        Some(&ca),
    )
    .unwrap();
    let w = runtime()
        .block_on(client.set_state("web", "A", graylane_strategy::State::R))
        .unwrap();
    assert_eq!(w.version, 2);
    wait_until(
        "the change reaches the routing",
        Duration::from_secs(10),
        || route("2").get("B") == Some(&10),
    );
    // Envoy's own view: the feed cluster's connections are TLS (handshakes counted).
    let handshakes = envoy.stat("cluster.graylane_cp.ssl.handshake").unwrap_or(0);
    assert!(handshakes >= 1, "graylane_cp TLS handshakes: {handshakes}");
}
