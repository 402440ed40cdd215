//! graylane in an Istio-like mesh, with real Envoys configured as Istio configures its
//! proxies: node metadata with `LABELS` and `NAMESPACE`, outbound virtual hosts and clusters
//! named as Istio names them (`outbound|8080||b.prod.svc.cluster.local`), routes translated
//! from the VirtualServices `graylane render istio` writes (served over file-based RDS, so a
//! re-render reaches the running Envoys as Istio's push would), the header-hygiene
//! EnvoyFilter's early header mutation, and one graylane filter per proxy serving every
//! service (no `service` in its configuration: strategies come only from the control plane's
//! feed, services from its catalog).
//!
//! ```text
//!  client ─Host: shop.example.com─▶ gateway ──▶ a-prod app ─Host: b──────▶ sidecar(prod) ──▶ b-prod
//!                                   (filter)  └▶ a-gray app ─Host: b:8080─▶ sidecar(gray) ──▶ b-gray
//!                                                                          (filter)
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use graylane_control_plane::render::istio::{self, Layout, Options};
use graylane_e2e::{
    count_by_body_with, free_port, get, noop_wasm_path, wait_until, wasm_path, ControlPlane, Envoy,
    Req, Upstream,
};
use graylane_strategy::{Compiled, Health, RequestView, StrategySpec};
use serde_json::{json, Value};

const WRITE: &str = "write-token-e2e";
/// The control plane's Service as the filters' sidecars reach it (`graylane install`).
const CP_CLUSTER: &str = "outbound|9901||graylane.graylane-system.svc.cluster.local";
const PORT: u16 = 8080;
const ROUTE_HEADER: &str = "x-graylane-cluster";

fn outbound(host: &str) -> String {
    format!("outbound|{PORT}||{host}")
}

fn svc(name: &str, ns: &str) -> String {
    format!("{name}.{ns}.svc.cluster.local")
}

/// A strategy as the API takes it.
fn strategy(json: Value) -> StrategySpec {
    graylane_strategy::parse_json(json.to_string().as_bytes()).unwrap()
}

/// Seed 003's versions of `service`: prod (G, everyone) and gray (`gray`), in namespaces.
fn versions(service: &str, gray: Value) -> Value {
    let mut gray = gray;
    gray["lane"] = json!("gray");
    gray["cluster"] = json!(outbound(&svc(service, "gray")));
    json!({"route-strategy": {
        "prod": {"status": "G", "cluster": outbound(&svc(service, "prod")), "id": {"all": true}},
        "gray": gray,
    }})
}

fn whitelisted(service: &str, ids: Value) -> Value {
    versions(service, json!({"status": "Y", "id": ids}))
}

/// The documents `graylane render istio` writes for `service` (seed 003's layout: one host
/// per namespace), as JSON values.
fn render(service: &str, spec: &Value, hosts: &[&str]) -> Vec<Value> {
    let opts = Options {
        layout: Layout::Namespaces,
        hosts: hosts.iter().map(|h| h.to_string()).collect(),
        ..Options::default()
    };
    istio::render(service, &strategy(spec.clone()), &opts)
        .unwrap()
        .into_iter()
        .map(|d| d.value)
        .collect()
}

/// The header-hygiene EnvoyFilter's early header mutation for `context` (`GATEWAY` or
/// `SIDECAR_OUTBOUND`), as the connection manager field it merges.
fn hygiene(context: &str) -> Value {
    let headers = BTreeSet::from([ROUTE_HEADER.to_string()]);
    let lanes = BTreeSet::from(["x-graylane-lane".to_string()]);
    let doc = istio::header_hygiene(&headers, &lanes, "istio-system").value;
    let patch = doc["spec"]["configPatches"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["match"]["context"] == context)
        .unwrap_or_else(|| panic!("no patch for {context}: {doc}"));
    patch["patch"]["value"]["typed_config"]["early_header_mutation_extensions"].clone()
}

/// An Envoy route from a VirtualService's destination(s).
fn route_action(route: &Value) -> Value {
    let cluster = |d: &Value| {
        let port = d["destination"]["port"]["number"].as_u64().unwrap();
        let subset = d["destination"]["subset"].as_str().unwrap_or("");
        let host = d["destination"]["host"].as_str().unwrap();
        format!("outbound|{port}|{subset}|{host}")
    };
    let dests = route.as_array().unwrap();
    if dests.len() == 1 {
        json!({"cluster": cluster(&dests[0])})
    } else {
        let clusters: Vec<Value> = dests
            .iter()
            .map(|d| json!({"name": cluster(d), "weight": d["weight"]}))
            .collect();
        json!({"weighted_clusters": {"clusters": clusters}})
    }
}

/// The virtual hosts Istio makes of a VirtualService for a proxy in namespace `ns`: one per
/// host and port, with the names a client may use (`b` only in b's own namespace), each
/// with the VirtualService's routes, in order.
fn virtual_hosts(vs: &Value, ns: &str) -> Vec<Value> {
    let routes: Vec<Value> = vs["spec"]["http"]
        .as_array()
        .unwrap()
        .iter()
        .map(|http| {
            let mut m = json!({"prefix": "/"});
            if let Some(matches) = http["match"].as_array() {
                let headers: Vec<Value> = matches[0]["headers"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(name, v)| json!({"name": name, "string_match": {"exact": v["exact"]}}))
                    .collect();
                m["headers"] = json!(headers);
            }
            json!({"name": http["name"], "match": m, "route": route_action(&http["route"])})
        })
        .collect();
    vs["spec"]["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            let host = h.as_str().unwrap();
            let domains = domains(host, ns);
            json!({"name": format!("{host}:{PORT}"), "domains": domains, "routes": routes})
        })
        .collect()
}

/// The names a client in namespace `ns` may call `host` by, with and without the port.
fn domains(host: &str, ns: &str) -> Vec<String> {
    let mut names = vec![host.to_string()];
    if let Some(short) = host.strip_suffix(".svc.cluster.local") {
        names.push(format!("{short}.svc"));
        names.push(short.to_string());
        if let Some((name, host_ns)) = short.split_once('.') {
            if host_ns == ns {
                names.push(name.to_string());
            }
        }
    }
    names
        .iter()
        .flat_map(|n| [n.clone(), format!("{n}:{PORT}")])
        .collect()
}

/// A service no strategy manages: one virtual host, one cluster.
fn plain_virtual_host(host: &str, ns: &str) -> Value {
    json!({"name": format!("{host}:{PORT}"), "domains": domains(host, ns),
           "routes": [{"match": {"prefix": "/"}, "route": {"cluster": outbound(host)}}]})
}

/// One proxy: its bootstrap and its route configuration file (RDS over a watched path).
struct Proxy {
    routes: PathBuf,
    version: u32,
    last: Vec<Value>,
}

impl Proxy {
    /// Writes the route configuration atomically (a rename, which Envoy's watch sees), if
    /// it changed (Envoy keeps the version of a configuration it already has).
    fn set_routes(&mut self, vhosts: &[Value]) {
        if self.last == vhosts {
            return;
        }
        self.last = vhosts.to_vec();
        self.version += 1;
        let doc = json!({"version_info": self.version.to_string(), "resources": [{
            "@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
            "name": PORT.to_string(), "virtual_hosts": vhosts}]});
        let tmp = self.routes.with_extension("tmp");
        std::fs::write(&tmp, doc.to_string()).unwrap();
        std::fs::rename(&tmp, &self.routes).unwrap();
    }

    /// Waits until `envoy` routes by the last routes written.
    fn wait_routes(&self, envoy: &Envoy) {
        let want = format!("\"version_info\": \"{}\"", self.version);
        wait_until("Envoy took the new routes", Duration::from_secs(10), || {
            envoy
                .admin("/config_dump?resource=dynamic_route_configs")
                .contains(&want)
        });
    }
}

/// What a proxy is: its node metadata, its filter, its outbound clusters.
struct Node<'a> {
    id: &'a str,
    namespace: &'a str,
    labels: &'a [(&'a str, &'a str)],
    /// The Wasm module, its configuration and failure policy.
    filter: Option<(PathBuf, String, &'a str)>,
    /// `GATEWAY` or `SIDECAR_OUTBOUND`.
    context: &'a str,
    clusters: Vec<(String, u16)>,
}

/// Starts a proxy (1 worker unless `workers`) with listener `outbound` (the header hygiene
/// in place) and `unprotected` (the same without it, to show what it prevents).
fn start(dir: &Path, node: &Node<'_>, vhosts: &[Value], workers: u32) -> (Envoy, Proxy) {
    let mut proxy = Proxy {
        routes: dir.join(format!("routes-{}.json", node.id)),
        version: 0,
        last: Vec::new(),
    };
    proxy.set_routes(vhosts);
    let mut filters = Vec::new();
    if let Some((wasm, config, policy)) = &node.filter {
        filters.push(json!({"name": "envoy.filters.http.wasm", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {"name": "graylane", "root_id": "graylane", "failure_policy": policy,
                "vm_config": {"vm_id": "graylane", "runtime": "envoy.wasm.runtime.v8",
                              "code": {"local": {"filename": wasm}}},
                "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                                  "value": config}}}}));
    }
    filters.push(
        json!({"name": "envoy.filters.http.router", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}),
    );
    let listener = |name: &str, early: Option<Value>| {
        let mut hcm = json!({
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": name,
            "rds": {"route_config_name": PORT.to_string(), "config_source": {
                "path_config_source": {"path": proxy.routes}, "resource_api_version": "V3"}},
            "http_filters": filters,
        });
        if let Some(e) = early {
            hcm["early_header_mutation_extensions"] = e;
        }
        json!({"name": name, "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
               "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                               "typed_config": hcm}]}]})
    };
    let clusters: Vec<Value> = node
        .clusters
        .iter()
        .map(|(name, port)| {
            json!({"name": name, "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint":
                {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}})
        })
        .collect();
    let labels: serde_json::Map<String, Value> = node
        .labels
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    let bootstrap = json!({
        "node": {"id": node.id, "cluster": node.id,
                 "metadata": {"LABELS": labels, "NAMESPACE": node.namespace}},
        "static_resources": {
            "listeners": [listener("outbound", Some(hygiene(node.context))), listener("unprotected", None)],
            "clusters": clusters,
        },
    });
    let envoy = Envoy::start(&bootstrap.to_string(), workers).unwrap();
    (envoy, proxy)
}

/// The filter's configuration in every proxy: every service, from the feed only.
fn plugin(extra: Value) -> String {
    let mut p = json!({"control_plane": {"cluster": CP_CLUSTER, "wait_ms": 5000, "tick_ms": 50}});
    if let Some(o) = extra.as_object() {
        for (k, v) in o {
            p[k] = v.clone();
        }
    }
    p.to_string()
}

fn control_plane(dir: &Path, services: &[(&str, Value)]) -> ControlPlane {
    let port = free_port();
    let path = write_config(dir, port, services);
    ControlPlane::start(&path, port)
}

/// The control plane's graylane.yaml with these services (rewritten: the daemon reloads it).
fn write_config(dir: &Path, port: u16, services: &[(&str, Value)]) -> PathBuf {
    let mut cfg = format!(
        "listen: 127.0.0.1:{port}\ndata_dir: {}\ntokens:\n  - {{name: ops, token: {WRITE}, role: write}}\nservices:\n",
        dir.join("data").display()
    );
    for (name, spec) in services {
        cfg.push_str(&format!("  {name}: {spec}\n"));
    }
    let path = dir.join("graylane.yaml");
    let tmp = dir.join("graylane.yaml.tmp");
    std::fs::write(&tmp, cfg).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    path
}

/// Replaces a service's strategy through the API.
fn put(cp: &ControlPlane, service: &str, spec: &Value) {
    let body = spec.to_string();
    let out = std::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PUT"])
        .args(["-H", &format!("Authorization: Bearer {WRITE}")])
        .args([
            "-H",
            "content-type: application/json",
            "--data-binary",
            &body,
        ])
        .arg(format!("{}/v1/services/{service}", cp.url()))
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "PUT {service}");
}

/// Envoy's counter `name`, 0 when absent.
fn stat(envoy: &Envoy, name: &str) -> u64 {
    envoy.stat(name).unwrap_or(0)
}

/// The services whose filter counted a request (a decision by cluster or reason, or a
/// request without a strategy): a service never met counts nothing.
fn counted_services(envoy: &Envoy) -> BTreeSet<String> {
    envoy
        .admin("/stats")
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(": ")?;
            let rest = k.strip_prefix("wasmcustom.graylane.")?;
            let (service, what) = rest.split_once('.')?;
            let request = what.starts_with("cluster.")
                || what.starts_with("reason.")
                || what == "no_snapshot";
            (request && v.trim() != "0").then(|| service.to_string())
        })
        .collect()
}

/// Requests for `tenants` to `host` at `port` (with `headers`), counted by body.
fn by_tenant(
    port: u16,
    host: &str,
    tenants: &[u64],
    headers: &[(&str, &str)],
) -> HashMap<String, usize> {
    count_by_body_with(port, tenants.len(), |i| {
        let mut r = Req::new("/")
            .header("host", host)
            .header("x-tenant-id", tenants[i].to_string());
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r
    })
}

/// What `spec` decides for `tenant` (the same `decide` as the filter), by cluster key.
fn decide(spec: &Value, tenant: u64) -> String {
    let c = Compiled::try_from(strategy(spec.clone())).unwrap();
    let headers = vec![("x-tenant-id".to_string(), tenant.to_string().into_bytes())];
    let req = RequestView {
        headers: &headers,
        tenant: None,
        own_lane: None,
        now: None,
        draw: 0,
    };
    let d = graylane_strategy::decide(&c, &Health::UNKNOWN, &req);
    d.target(&c).unwrap().key.clone()
}

fn counts(pairs: &[(&str, usize)]) -> HashMap<String, usize> {
    pairs
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(k, n)| (k.to_string(), *n))
        .collect()
}

/// Seed 003's three scenarios, end to end: client -> ingress gateway (a's filter) -> a's
/// versions -> their sidecars (b's filter, each knowing its own `profile` label) -> b's
/// versions. Every strategy comes from the control plane's feed; routes from `graylane render
/// istio`, re-rendered after every change.
#[test]
fn seed_003_scenarios_through_a_gateway_and_sidecars() {
    let dir = tempfile::tempdir().unwrap();
    let a_spec = versions(
        "a",
        json!({"status": "Y", "id": {"ids": [1001, 1002, 1003], "interval": [[5000, 5999]]}}),
    );
    let b_levelled = versions("b", json!({"status": "G", "id": {"all": true}}));
    let cp = control_plane(
        dir.path(),
        &[("a", a_spec.clone()), ("b", b_levelled.clone())],
    );

    let (b_prod, b_gray, c) = (
        Upstream::start("b-prod"),
        Upstream::start("b-gray"),
        Upstream::start("c"),
    );
    // a's sidecars: b's routes (as each namespace sees them), c unmanaged.
    let sidecar_routes = |b_spec: &Value, ns: &str| -> Vec<Value> {
        let mut v: Vec<Value> = render("b", b_spec, &[])
            .iter()
            .filter(|d| d["kind"] == "VirtualService")
            .flat_map(|d| virtual_hosts(d, ns))
            .collect();
        v.push(plain_virtual_host(&svc("c", ns), ns));
        v
    };
    let sidecar_clusters = |ns: &str| {
        vec![
            (outbound(&svc("b", "prod")), b_prod.port()),
            (outbound(&svc("b", "gray")), b_gray.port()),
            (outbound(&svc("c", ns)), c.port()),
            (CP_CLUSTER.to_string(), cp.port),
        ]
    };
    let mut sidecars = Vec::new();
    for ns in ["prod", "gray"] {
        let node = Node {
            id: &format!("a-{ns}-sidecar"),
            namespace: ns,
            labels: &[("app", "a"), ("profile", ns)],
            filter: Some((
                wasm_path(),
                plugin(json!({"reason_header": "x-graylane-reason"})),
                "FAIL_OPEN",
            )),
            context: "SIDECAR_OUTBOUND",
            clusters: sidecar_clusters(ns),
        };
        sidecars.push(start(
            dir.path(),
            &node,
            &sidecar_routes(&b_levelled, ns),
            1,
        ));
    }
    // a's versions call b by its short name, through their own sidecar.
    let a_prod = Upstream::start_calling(
        "a-prod",
        &format!("http://127.0.0.1:{}", sidecars[0].0.port("outbound")),
        "b",
    );
    let a_gray = Upstream::start_calling(
        "a-gray",
        &format!("http://127.0.0.1:{}", sidecars[1].0.port("outbound")),
        "b:8080",
    );
    // The gateway: a's routes bound to it with the public host, which its filter maps to a.
    let gateway_routes = |a: &Value| -> Vec<Value> {
        render("a", a, &["shop.example.com"])
            .iter()
            .filter(|d| d["kind"] == "VirtualService")
            .flat_map(|d| virtual_hosts(d, "istio-system"))
            .collect()
    };
    let node = Node {
        id: "ingressgateway",
        namespace: "istio-system",
        labels: &[("istio", "ingressgateway")],
        filter: Some((
            wasm_path(),
            plugin(json!({"hosts": {"shop.example.com": "a"}})),
            "FAIL_OPEN",
        )),
        context: "GATEWAY",
        clusters: vec![
            (outbound(&svc("a", "prod")), a_prod.port()),
            (outbound(&svc("a", "gray")), a_gray.port()),
            (CP_CLUSTER.to_string(), cp.port),
        ],
    };
    let (gateway, mut gw_proxy) = start(dir.path(), &node, &gateway_routes(&a_spec), 2);
    let gw = gateway.port("outbound");
    let shop = "shop.example.com";

    // Tenants: three whitelisted ids, fifty of the interval, a hundred others.
    let tenants: Vec<u64> = [1001, 1002, 1003]
        .into_iter()
        .chain(5000..5050)
        .chain(1..=100)
        .collect();
    let gray_a: BTreeSet<u64> = tenants.iter().copied().filter(|t| *t > 1000).collect();
    assert_eq!(gray_a.len(), 53);

    // Every filter has its strategy (from the catalog, then the service's feed): the gateway
    // routes a (`/status/200` is answered by a itself, without calling b); each sidecar
    // decides b for requests sent to it directly (answered with the reason header). Those it
    // decided are counted exactly, so that what follows counts from a known base.
    wait_until(
        "the gateway routes a by the feed",
        Duration::from_secs(30),
        || {
            let got = count_by_body_with(gw, 2, |i| {
                Req::new("/status/200")
                    .header("host", shop)
                    .header("x-tenant-id", ["1001", "42"][i])
            });
            got == counts(&[("a-gray", 1), ("a-prod", 1)])
        },
    );
    let b_counted = |e: &Envoy| -> [u64; 2] {
        [
            stat(e, "wasmcustom.graylane.b.cluster.prod.requests"),
            stat(e, "wasmcustom.graylane.b.cluster.gray.requests"),
        ]
    };
    for (e, _) in &sidecars {
        let mut decided = 0;
        wait_until(
            "the sidecar decides b by the feed",
            Duration::from_secs(30),
            || {
                let (status, _, headers) = get(e.port("outbound"), "/", &[("host", "b")]);
                let routed = status == 200 && headers.contains_key("x-graylane-reason");
                decided += u64::from(routed);
                routed
            },
        );
        wait_until("the sidecar counted them", Duration::from_secs(5), || {
            b_counted(e).iter().sum::<u64>() == decided
        });
    }

    // (a) a by whitelist, b levelled: the whitelisted tenants reach gray a, the others prod
    // a; b's versions share each a's traffic.
    let before: Vec<[u64; 2]> = sidecars.iter().map(|(e, _)| b_counted(e)).collect();
    let got = by_tenant(gw, shop, &tenants, &[]);
    let a_of = |who: &str| -> usize {
        got.iter()
            .filter(|(k, _)| k.starts_with(&format!("{who}->b-")))
            .map(|(_, n)| n)
            .sum()
    };
    assert_eq!((a_of("a-gray"), a_of("a-prod")), (53, 100), "{got:?}");
    let b_share = |b: &str| -> usize {
        got.iter()
            .filter(|(k, _)| k.ends_with(b))
            .map(|(_, n)| n)
            .sum()
    };
    assert!(b_share("b-prod") > 20 && b_share("b-gray") > 20, "{got:?}");
    // Each sidecar's filter decided exactly its a's requests for b.
    wait_until("b's counts flushed", Duration::from_secs(5), || {
        sidecars
            .iter()
            .zip(&before)
            .zip([100, 53])
            .all(|(((e, _), b), n)| {
                stat(e, "wasmcustom.graylane.b.cluster.prod.requests") - b[0]
                    + stat(e, "wasmcustom.graylane.b.cluster.gray.requests")
                    - b[1]
                    == n
            })
    });

    // Clients cannot choose (the filter working): a client naming a's gray version, with the
    // gray lane, is decided like any other request; inside the mesh, a caller naming b's
    // version is decided by b's filter too.
    let chosen = [
        (ROUTE_HEADER, outbound(&svc("a", "gray"))),
        ("x-graylane-lane", "gray".to_string()),
    ];
    let chosen: Vec<(&str, &str)> = chosen.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let got = by_tenant(gw, shop, &[42; 20], &chosen);
    assert_eq!(a_of_all(&got, "a-prod"), 20, "{got:?}");

    // (b) a by whitelist, b by the caller's label: gray a calls gray b, prod a prod b. The
    // sidecars learn their lane from their node's LABELS, with b's strategy from the feed only.
    let b_by_label = versions("b", json!({"status": "Y", "caller_lane": "gray"}));
    put(&cp, "b", &b_by_label);
    for (ns, (envoy, proxy)) in ["prod", "gray"].iter().zip(sidecars.iter_mut()) {
        proxy.set_routes(&sidecar_routes(&b_by_label, ns));
        proxy.wait_routes(envoy);
    }
    wait_until(
        "b routes by the caller's label",
        Duration::from_secs(10),
        || {
            by_tenant(gw, shop, &[1001, 42, 1002, 7], &[])
                == counts(&[("a-gray->b-gray", 2), ("a-prod->b-prod", 2)])
        },
    );
    let got = by_tenant(gw, shop, &tenants, &[]);
    assert_eq!(
        got,
        counts(&[("a-gray->b-gray", 53), ("a-prod->b-prod", 100)])
    );
    // A caller inside the mesh naming b's gray version from prod a's sidecar: still prod.
    let inside = by_tenant(
        sidecars[0].0.port("outbound"),
        "b",
        &[42; 10],
        &[(ROUTE_HEADER, &outbound(&svc("b", "gray")))],
    );
    assert_eq!(inside, counts(&[("b-prod", 10)]));
    // c is no managed service: its requests are left alone (no header written, not counted).
    let echo = get(
        sidecars[1].0.port("outbound"),
        "/echo",
        &[("host", "c"), ("x-tenant-id", "1001")],
    );
    assert_eq!(echo.0, 200);
    let seen: Value = serde_json::from_str(&echo.1).unwrap();
    assert!(
        seen.get(ROUTE_HEADER).is_none() && seen.get("x-graylane-lane").is_none(),
        "{seen}"
    );
    for (e, _) in &sidecars {
        assert_eq!(counted_services(e), BTreeSet::from(["b".to_string()]));
    }

    // (c) a by percentage (20 %, by tenant), b by whitelist: gray b for its whitelisted
    // tenants whichever a called it.
    let a_percent = versions(
        "a",
        json!({"status": "Y", "percent": {"value": 20, "by": "tenant"}}),
    );
    let b_whitelist = whitelisted("b", json!({"ids": [1001, 1002, 7, 8]}));
    put(&cp, "a", &a_percent);
    put(&cp, "b", &b_whitelist);
    gw_proxy.set_routes(&gateway_routes(&a_percent));
    gw_proxy.wait_routes(&gateway);
    for (ns, (envoy, proxy)) in ["prod", "gray"].iter().zip(sidecars.iter_mut()) {
        proxy.set_routes(&sidecar_routes(&b_whitelist, ns));
        proxy.wait_routes(envoy);
    }
    let mut want: BTreeMap<String, usize> = BTreeMap::new();
    for t in &tenants {
        let a = decide(&a_percent, *t);
        let b = decide(&b_whitelist, *t);
        *want.entry(format!("a-{a}->b-{b}")).or_default() += 1;
    }
    let want: HashMap<String, usize> = want.into_iter().collect();
    let gray_share = want
        .iter()
        .filter(|(k, _)| k.starts_with("a-gray"))
        .map(|(_, n)| n)
        .sum::<usize>();
    assert!((15..=50).contains(&gray_share), "about 20 %: {want:?}");
    wait_until(
        "a by percentage, b by whitelist",
        Duration::from_secs(10),
        || by_tenant(gw, shop, &tenants, &[]) == want,
    );
    // Stable: the same again, exactly.
    assert_eq!(by_tenant(gw, shop, &tenants, &[]), want);
    assert_eq!(
        counted_services(&gateway),
        BTreeSet::from(["a".to_string()])
    );
}

fn a_of_all(got: &HashMap<String, usize>, a: &str) -> usize {
    got.iter()
        .filter(|(k, _)| k.starts_with(&format!("{a}->")))
        .map(|(_, n)| n)
        .sum()
}

/// Two managed services behind one Envoy (2 workers) never get each other's decision: a's
/// whitelist decides the requests to a (by any of its names), b's those to b, and c, which
/// no strategy manages, is left alone. Exact counts, in the responses and in each service's
/// counters.
#[test]
fn two_services_behind_one_envoy_never_get_each_others_decision() {
    let dir = tempfile::tempdir().unwrap();
    let a_spec = whitelisted("a", json!({"interval": [[1, 10]]}));
    let b_spec = whitelisted("b", json!({"interval": [[5, 20]]}));
    let cp = control_plane(dir.path(), &[("a", a_spec.clone()), ("b", b_spec.clone())]);
    let ups: Vec<Upstream> = ["a-prod", "a-gray", "b-prod", "b-gray", "c"]
        .iter()
        .map(|n| Upstream::start(n))
        .collect();
    let mut clusters: Vec<(String, u16)> = ups
        .iter()
        .map(|u| {
            let (service, ns) = u.name().split_once('-').unwrap_or(("c", "prod"));
            (outbound(&svc(service, ns)), u.port())
        })
        .collect();
    clusters.push((CP_CLUSTER.to_string(), cp.port));
    let mut vhosts: Vec<Value> = [("a", &a_spec), ("b", &b_spec)]
        .iter()
        .flat_map(|(s, spec)| render(s, spec, &[]))
        .filter(|d| d["kind"] == "VirtualService")
        .flat_map(|d| virtual_hosts(&d, "prod"))
        .collect();
    vhosts.push(plain_virtual_host(&svc("c", "prod"), "prod"));
    let node = Node {
        id: "caller-sidecar",
        namespace: "prod",
        labels: &[("app", "caller"), ("profile", "prod")],
        filter: Some((
            wasm_path(),
            plugin(json!({"reason_header": "x-graylane-reason"})),
            "FAIL_CLOSED",
        )),
        context: "SIDECAR_OUTBOUND",
        clusters,
    };
    let (envoy, _proxy) = start(dir.path(), &node, &vhosts, 2);
    let port = envoy.port("outbound");
    let tenants: Vec<u64> = (1..=30).collect();
    // Until both strategies arrived; the requests each filter decided (those answered with
    // the reason header) are counted exactly, so what follows counts from a known base.
    let decided = std::cell::RefCell::new(BTreeMap::<&str, u64>::new());
    wait_until("both strategies arrived", Duration::from_secs(30), || {
        let mut ok = true;
        for (host, tenant, want) in [
            ("a", "1", "a-gray"),
            ("a", "30", "a-prod"),
            ("b", "5", "b-gray"),
            ("b", "1", "b-prod"),
        ] {
            let (status, body, headers) =
                get(port, "/", &[("host", host), ("x-tenant-id", tenant)]);
            if status == 200 && headers.contains_key("x-graylane-reason") {
                *decided.borrow_mut().entry(host).or_default() += 1;
            }
            ok &= body == want;
        }
        ok
    });
    let counted = |s: &str| {
        ["cluster.gray.requests", "cluster.prod.requests"]
            .iter()
            .map(|c| stat(&envoy, &format!("wasmcustom.graylane.{s}.{c}")))
            .sum::<u64>()
    };
    wait_until("the warm-up counted", Duration::from_secs(5), || {
        let d = decided.borrow();
        counted("a") == d.get("a").copied().unwrap_or(0)
            && counted("b") == d.get("b").copied().unwrap_or(0)
    });
    let before = |s: &str, k: &str| {
        stat(
            &envoy,
            &format!("wasmcustom.graylane.{s}.cluster.{k}.requests"),
        )
    };
    let base = [
        before("a", "gray"),
        before("a", "prod"),
        before("b", "gray"),
        before("b", "prod"),
    ];
    // Each service by any of its names, in turn and interleaved across both workers.
    for host in ["a", "a.prod:8080", "a.gray.svc.cluster.local"] {
        assert_eq!(
            by_tenant(port, host, &tenants, &[]),
            counts(&[("a-gray", 10), ("a-prod", 20)]),
            "{host}"
        );
    }
    for host in ["b:8080", "b.gray", "b.prod.svc.cluster.local:8080"] {
        assert_eq!(
            by_tenant(port, host, &tenants, &[]),
            counts(&[("b-gray", 16), ("b-prod", 14)]),
            "{host}"
        );
    }
    let mixed = count_by_body_with(port, 120, |i| {
        let host = ["a", "b", "c"][i % 3];
        Req::new("/")
            .header("host", host)
            .header("x-tenant-id", (i / 3 % 30 + 1).to_string())
    });
    // Tenants 1..=30 and 1..=10 again, to each of a, b and c.
    assert_eq!(
        mixed,
        counts(&[
            ("a-gray", 20),
            ("a-prod", 20),
            ("b-gray", 22),
            ("b-prod", 18),
            ("c", 40)
        ])
    );
    // The counters: exactly each service's own requests.
    wait_until("counts flushed", Duration::from_secs(5), || {
        [
            before("a", "gray"),
            before("a", "prod"),
            before("b", "gray"),
            before("b", "prod"),
        ]
        .iter()
        .zip(base)
        .map(|(now, b)| now - b)
        .eq([50, 80, 70, 60])
    });
    assert_eq!(
        counted_services(&envoy),
        BTreeSet::from(["a".to_string(), "b".to_string()])
    );
    // Each service's traffic reports (one per service, from the worker holding its lease)
    // reach the control plane: its totals per cluster equal the filter's counters exactly.
    let client =
        graylane_control_plane::client::Client::new(&cp.url(), Some(WRITE.into())).unwrap();
    wait_until(
        "the traffic reports add up",
        Duration::from_secs(10),
        || {
            ["a", "b"].iter().all(|s| {
                let t = graylane_e2e::runtime().block_on(client.traffic(s)).unwrap();
                let reported: BTreeMap<String, u64> = t
                    .clusters
                    .iter()
                    .map(|c| (c.cluster.clone(), c.total.requests))
                    .collect();
                let counted: BTreeMap<String, u64> = ["gray", "prod"]
                    .iter()
                    .map(|k| (k.to_string(), before(s, k)))
                    .collect();
                reported == counted
            })
        },
    );
    // c is untouched: no header written (the echo shows what reached it).
    let (status, body, _) = get(port, "/echo", &[("host", "c.prod"), ("x-tenant-id", "5")]);
    assert_eq!(status, 200);
    let seen: Value = serde_json::from_str(&body).unwrap();
    assert!(
        seen.get(ROUTE_HEADER).is_none() && seen.get("x-graylane-lane").is_none(),
        "{seen}"
    );

    // b leaves the control plane (its config file no longer names it): the filter learns it
    // from the catalog and leaves b's requests alone (b's default route, not counted), while
    // a is decided as before.
    let b_counted = || before("b", "gray") + before("b", "prod");
    let b_decided = std::cell::Cell::new(b_counted());
    write_config(dir.path(), cp.port, &[("a", a_spec.clone())]);
    wait_until("b is left alone", Duration::from_secs(10), || {
        let (_, body, headers) = get(port, "/", &[("host", "b"), ("x-tenant-id", "5")]);
        let decided = headers.contains_key("x-graylane-reason");
        b_decided.set(b_decided.get() + u64::from(decided));
        body == "b-prod" && !decided
    });
    // What b's filter decided before it let go is counted; nothing after.
    wait_until("b's last decisions counted", Duration::from_secs(5), || {
        b_counted() == b_decided.get()
    });
    let b_before = [before("b", "gray"), before("b", "prod")];
    assert_eq!(
        by_tenant(port, "b", &tenants, &[]),
        counts(&[("b-prod", 30)])
    );
    assert_eq!(
        by_tenant(port, "a", &tenants, &[]),
        counts(&[("a-gray", 10), ("a-prod", 20)])
    );
    wait_until("a's requests counted", Duration::from_secs(5), || {
        before("a", "gray") + before("a", "prod") == 50 + 80 + base[0] + base[1] + 30
    });
    assert_eq!([before("b", "gray"), before("b", "prod")], b_before);
}

/// With the filter failed open (its VM trapped, `FAIL_OPEN`: requests pass without it), a
/// caller sending `x-graylane-cluster` still cannot pick a cluster: the header-hygiene
/// EnvoyFilter's early header mutation removes it before the route is selected. The same
/// listener without it shows the hole it closes.
#[test]
fn with_the_filter_failed_open_a_caller_still_cannot_pick_a_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let b_spec = whitelisted("b", json!({"ids": [7]}));
    let (b_prod, b_gray) = (Upstream::start("b-prod"), Upstream::start("b-gray"));
    let vhosts: Vec<Value> = render("b", &b_spec, &[])
        .iter()
        .filter(|d| d["kind"] == "VirtualService")
        .flat_map(|d| virtual_hosts(d, "prod"))
        .collect();
    let node = Node {
        id: "failed-sidecar",
        namespace: "prod",
        labels: &[("profile", "prod")],
        filter: Some((noop_wasm_path(), String::new(), "FAIL_OPEN")),
        context: "SIDECAR_OUTBOUND",
        clusters: vec![
            (outbound(&svc("b", "prod")), b_prod.port()),
            (outbound(&svc("b", "gray")), b_gray.port()),
        ],
    };
    let (envoy, _proxy) = start(dir.path(), &node, &vhosts, 1);
    let (port, open) = (envoy.port("outbound"), envoy.port("unprotected"));
    let trapped = graylane_e2e::runtime().block_on(graylane_e2e::fetch(
        &format!("http://127.0.0.1:{port}/"),
        &[("host", "b"), ("x-noop-trap", "1")],
    ));
    assert!(
        trapped.as_ref().map_or(true, |(s, _, _)| *s != 200),
        "the trap did not fail its request: {trapped:?}"
    );
    // The VM is gone: the trap header no longer reaches a filter.
    let (status, body, _) = get(port, "/", &[("host", "b"), ("x-noop-trap", "1")]);
    assert_eq!((status, body.as_str()), (200, "b-prod"));
    let gray = outbound(&svc("b", "gray"));
    let chosen = [(ROUTE_HEADER, gray.as_str())];
    assert_eq!(
        by_tenant(port, "b", &[42; 30], &chosen),
        counts(&[("b-prod", 30)])
    );
    // Without the early header mutation the caller's header picks gray.
    assert_eq!(
        by_tenant(open, "b", &[42; 30], &chosen),
        counts(&[("b-gray", 30)])
    );
}

/// A preview runs per service in a filter serving several: b's candidate is evaluated on
/// b's requests only. Requests to a, for the very tenants b's candidate would move, never
/// reach b's preview, and a has none.
#[test]
fn a_preview_of_one_service_counts_only_that_services_requests() {
    let dir = tempfile::tempdir().unwrap();
    let a_spec = whitelisted("a", json!({"interval": [[1, 5]]}));
    let b_spec = whitelisted("b", json!({"interval": [[1, 5]]}));
    let cp = control_plane(dir.path(), &[("a", a_spec.clone()), ("b", b_spec.clone())]);
    let ups: Vec<Upstream> = ["a-prod", "a-gray", "b-prod", "b-gray"]
        .iter()
        .map(|n| Upstream::start(n))
        .collect();
    let mut clusters: Vec<(String, u16)> = ups
        .iter()
        .map(|u| {
            let (service, ns) = u.name().split_once('-').unwrap();
            (outbound(&svc(service, ns)), u.port())
        })
        .collect();
    clusters.push((CP_CLUSTER.to_string(), cp.port));
    let vhosts: Vec<Value> = [("a", &a_spec), ("b", &b_spec)]
        .iter()
        .flat_map(|(s, spec)| render(s, spec, &[]))
        .filter(|d| d["kind"] == "VirtualService")
        .flat_map(|d| virtual_hosts(&d, "prod"))
        .collect();
    let node = Node {
        id: "preview-sidecar",
        namespace: "prod",
        labels: &[("profile", "prod")],
        filter: Some((
            wasm_path(),
            plugin(
                json!({"control_plane": {"cluster": CP_CLUSTER, "wait_ms": 5000,
                "tick_ms": 50, "report_ms": 200}}),
            ),
            "FAIL_CLOSED",
        )),
        context: "SIDECAR_OUTBOUND",
        clusters,
    };
    // One worker: once its counts show the preview, every request after is evaluated.
    let (envoy, _proxy) = start(dir.path(), &node, &vhosts, 1);
    let port = envoy.port("outbound");
    wait_until("both strategies arrived", Duration::from_secs(30), || {
        let a = by_tenant(port, "a", &[1, 30], &[]);
        let b = by_tenant(port, "b", &[1, 30], &[]);
        a == counts(&[("a-gray", 1), ("a-prod", 1)]) && b == counts(&[("b-gray", 1), ("b-prod", 1)])
    });
    // b's candidate adds 11..=20 to gray.
    let candidate = dir.path().join("candidate.json");
    let b_next = whitelisted("b", json!({"interval": [[1, 5], [11, 20]]}));
    std::fs::write(&candidate, b_next.to_string()).unwrap();
    let out = cp.cli(
        WRITE,
        &["preview", "b", "--file", candidate.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let client =
        graylane_control_plane::client::Client::new(&cp.url(), Some(WRITE.into())).unwrap();
    let view = |s: &str| graylane_e2e::runtime().block_on(client.preview(s));
    // Probes (tenant 30 stays on prod) until the worker evaluates the preview.
    wait_until(
        "the filter evaluates b's preview",
        Duration::from_secs(10),
        || {
            by_tenant(port, "b", &[30], &[]);
            view("b").unwrap().requests > 0
        },
    );
    // Tenants 11..=20, twice, to a and to b: only b's count in b's preview, and move.
    let movers: Vec<u64> = (11..=20).chain(11..=20).collect();
    assert_eq!(
        by_tenant(port, "a", &movers, &[]),
        counts(&[("a-prod", 20)])
    );
    assert_eq!(
        by_tenant(port, "b", &movers, &[]),
        counts(&[("b-prod", 20)]),
        "a preview routes nothing"
    );
    let moved = |v: &graylane_control_plane::preview::View| -> Vec<(String, String, u64, u64)> {
        v.pairs
            .iter()
            .filter(|p| p.from != p.to)
            .map(|p| {
                (
                    p.from.clone().unwrap_or_default(),
                    p.to.clone().unwrap_or_default(),
                    p.requests,
                    p.tenants,
                )
            })
            .collect()
    };
    wait_until(
        "b's preview counted its movers",
        Duration::from_secs(10),
        || moved(&view("b").unwrap()) == [("prod".to_string(), "gray".to_string(), 20, 10)],
    );
    assert!(
        view("a").is_err(),
        "a has no preview: {:?}",
        view("a").map(|v| v.requests)
    );
    // Nothing else moved in b's preview, and the counts stay (no a request arrives late).
    let again = view("b").unwrap();
    assert_eq!(
        moved(&again),
        [("prod".to_string(), "gray".to_string(), 20, 10)]
    );
}
