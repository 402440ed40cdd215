//! `graylane render istio`: for seed 003's three scenarios, every decision the filter's own
//! `decide` makes is sent by the rendered VirtualService to the version it names (a small
//! evaluator of the VirtualService's header matches stands in for Istio's route selection);
//! requests without the header go to the stable version(s); the routes follow a release; the
//! layouts, the header-hygiene EnvoyFilter and the errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;

use graylane_control_plane::config::Config;
use graylane_control_plane::render::istio::{self, Destination, Layout, Options};
use graylane_strategy::{decide, Compiled, Health, Lane, RequestView, State, StrategySpec};
use serde_json::{json, Value};

fn seed003() -> BTreeMap<String, StrategySpec> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/seed-003.yaml");
    Config::load(&path)
        .unwrap()
        .services
        .into_iter()
        .map(|(name, s)| (name, s.strategy))
        .collect()
}

fn render(service: &str, spec: &StrategySpec, opts: &Options) -> Vec<Value> {
    istio::render(service, spec, opts)
        .unwrap()
        .into_iter()
        .map(|d| d.value)
        .collect()
}

fn kind<'a>(docs: &'a [Value], k: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == k).collect()
}

/// Istio's choice for a request: the first http route whose header matches all hold (exact
/// only: all graylane renders), its destinations and weights.
fn route<'a>(vs: &'a Value, header: Option<&str>) -> &'a Vec<Value> {
    for r in vs["spec"]["http"].as_array().unwrap() {
        let matches = match r.get("match") {
            None => true,
            Some(ms) => ms.as_array().unwrap().iter().any(|m| {
                m["headers"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .all(|(name, cond)| {
                        name == "x-graylane-cluster" && header == cond["exact"].as_str()
                    })
            }),
        };
        if matches {
            return r["route"].as_array().unwrap();
        }
    }
    panic!("no route for {header:?}")
}

fn dest(d: &Value) -> Destination {
    Destination {
        host: d["destination"]["host"].as_str().unwrap().into(),
        subset: d["destination"]["subset"].as_str().map(Into::into),
        port: d["destination"]["port"]["number"]
            .as_u64()
            .map(|p| p as u16),
    }
}

/// For many requests: decide -> the header the filter writes -> the route Istio picks ->
/// exactly the destination of the cluster decided. Returns how many went to each cluster.
fn check_decisions(service: &str, spec: &StrategySpec, requests: &[Req]) -> BTreeMap<String, u32> {
    let docs = render(service, spec, &Options::default());
    let vs = kind(&docs, "VirtualService")[0];
    let compiled = Compiled::try_from(spec.clone()).unwrap();
    let mut counts = BTreeMap::new();
    for r in requests {
        let headers: Vec<(String, Vec<u8>)> = r
            .tenant
            .map(|t| vec![("x-tenant-id".to_string(), t.as_bytes().to_vec())])
            .unwrap_or_default();
        let view = RequestView {
            headers: &headers,
            tenant: None,
            own_lane: r.lane,
            now: None,
            draw: r.draw,
        };
        let d = decide(&compiled, &Health::UNKNOWN, &view);
        let c = &compiled.clusters()[d.cluster.unwrap()];
        let routed = route(vs, Some(&c.envoy));
        assert_eq!(routed.len(), 1, "a decided request has one destination");
        assert_eq!(
            dest(&routed[0]),
            Destination::from_istio_cluster(&c.envoy).unwrap(),
            "{service}: decided {} ({}) for {r:?}",
            c.key,
            c.envoy
        );
        *counts.entry(c.key.clone()).or_insert(0) += 1;
    }
    counts
}

#[derive(Debug, Clone, Copy)]
struct Req {
    tenant: Option<&'static str>,
    lane: Option<Lane>,
    draw: u64,
}

fn reqs() -> Vec<Req> {
    let mut v = Vec::new();
    let tenants = [
        None,
        Some("1001"),
        Some("1002"),
        Some("42"),
        Some("5000"),
        Some("5999"),
        Some("6000"),
    ];
    for (i, t) in tenants.iter().enumerate() {
        for lane in [None, Some(Lane::Prod), Some(Lane::Gray)] {
            for k in 0..20u64 {
                v.push(Req {
                    tenant: *t,
                    lane,
                    draw: k.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(i as u64),
                });
            }
        }
    }
    v
}

#[test]
fn scenario_a_a_by_whitelist_b_levelled() {
    let s = seed003();
    // a: whitelisted tenants (3 ids + 1000 interval) to gray, everyone else to prod.
    let a = check_decisions("a", &s["a"], &reqs());
    assert_eq!(a["gray"], 4 * 3 * 20, "1001, 1002, 5000, 5999");
    assert_eq!(a["prod"], 3 * 3 * 20, "none, 42, 6000");
    // b: levelled, both serve; without a header the default route splits 50:50.
    let b = check_decisions("b", &s["b"], &reqs());
    assert!(b["gray"] > 0 && b["prod"] > 0, "{b:?}");
    let docs = render("b", &s["b"], &Options::default());
    let default = route(kind(&docs, "VirtualService")[0], None);
    assert_eq!(
        default
            .iter()
            .map(|d| (dest(d).host, d["weight"].as_u64().unwrap()))
            .collect::<Vec<_>>(),
        [
            ("b.gray.svc.cluster.local".to_string(), 50),
            ("b.prod.svc.cluster.local".to_string(), 50)
        ]
    );
    // a: requests without the header (filter failed open) go to prod only.
    let docs = render("a", &s["a"], &Options::default());
    let vs = kind(&docs, "VirtualService")[0];
    let default = route(vs, None);
    assert_eq!(default.len(), 1);
    assert_eq!(dest(&default[0]).host, "a.prod.svc.cluster.local");
    // A header value the filter never writes (a forgery, an R cluster) gets the default too.
    assert_eq!(route(vs, Some("outbound|8080||evil.svc")), default);
    // One host per namespace: no DestinationRule, both hosts in the VirtualService.
    assert!(kind(&docs, "DestinationRule").is_empty());
    assert_eq!(
        vs["spec"]["hosts"],
        json!(["a.gray.svc.cluster.local", "a.prod.svc.cluster.local"])
    );
}

#[test]
fn scenario_b_a_by_whitelist_b_by_the_callers_label() {
    let s = seed003();
    let mut b = s["b"].clone();
    let gray = b.clusters.get_mut("gray").unwrap();
    gray.status = State::Y;
    gray.id = Default::default();
    gray.caller_lane = Some(Lane::Gray);
    let counts = check_decisions("b", &b, &reqs());
    // Callers in the gray lane (own_lane gray) reach gray b; all others prod b.
    assert_eq!(counts["gray"], 7 * 20);
    assert_eq!(counts["prod"], 7 * 2 * 20);
    let docs = render("b", &b, &Options::default());
    let default = route(kind(&docs, "VirtualService")[0], None);
    assert_eq!(default.len(), 1);
    assert_eq!(dest(&default[0]).host, "b.prod.svc.cluster.local");
}

#[test]
fn scenario_c_a_by_percentage_b_by_whitelist() {
    let s = seed003();
    let mut a = s["a"].clone();
    let gray = a.clusters.get_mut("gray").unwrap();
    gray.id = Default::default();
    gray.percent = Some(graylane_strategy::PercentSpec {
        value: 20.0,
        by: graylane_strategy::PercentBy::Request,
        salt: 0,
    });
    let many: Vec<Req> = (0..10_000u64)
        .map(|k| Req {
            tenant: None,
            lane: None,
            draw: k.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        })
        .collect();
    let counts = check_decisions("a", &a, &many);
    assert!((1900..=2100).contains(&counts["gray"]), "{counts:?}");
    let mut b = s["b"].clone();
    let gray = b.clusters.get_mut("gray").unwrap();
    gray.status = State::Y;
    gray.id.all = false;
    gray.id.ids = graylane_control_plane::edit::parse_ids("1001,1002").unwrap();
    let counts = check_decisions("b", &b, &reqs());
    assert_eq!(counts["gray"], 2 * 3 * 20);
}

#[test]
fn after_a_release_the_default_route_follows_the_stable_cluster() {
    let s = seed003();
    let mut a = s["a"].clone();
    a.clusters.get_mut("gray").unwrap().status = State::G;
    a.clusters.get_mut("prod").unwrap().status = State::R;
    let docs = render("a", &a, &Options::default());
    let vs = kind(&docs, "VirtualService")[0];
    let default = route(vs, None);
    assert_eq!(dest(&default[0]).host, "a.gray.svc.cluster.local");
    // No route for the R version: the filter never names it, and a forged header does not
    // reach it.
    assert_eq!(
        route(vs, Some("outbound|8080||a.prod.svc.cluster.local")),
        default
    );
    // The VirtualService stays where it was (its namespace does not follow states).
    let before = render("a", &s["a"], &Options::default());
    assert_eq!(
        kind(&before, "VirtualService")[0]["metadata"],
        vs["metadata"]
    );
}

#[test]
fn subsets_by_the_profile_label_for_clusters_without_istio_names() {
    let spec: StrategySpec = serde_saphyr::from_str(
        "route-strategy:\n  A: {status: Y, lane: gray, id: {ids: [1]}}\n  B: {status: G, weight: 3, id: {all: true}}\n  C: {status: G, id: {all: true}}\n",
    )
    .unwrap();
    let opts = Options {
        layout: Layout::Subsets,
        namespace: "shop".into(),
        port: Some(8080),
        profiles: BTreeMap::from([("B".into(), "prod".into()), ("C".into(), "canary".into())]),
        ..Options::default()
    };
    let docs = render("web", &spec, &opts);
    let dr = kind(&docs, "DestinationRule")[0];
    assert_eq!(dr["metadata"]["namespace"], "shop");
    assert_eq!(
        dr["spec"],
        json!({"host": "web.shop.svc.cluster.local", "subsets": [
            {"name": "canary", "labels": {"profile": "canary"}},
            {"name": "gray", "labels": {"profile": "gray"}},
            {"name": "prod", "labels": {"profile": "prod"}}]})
    );
    let vs = kind(&docs, "VirtualService")[0];
    // The header values are the Envoy cluster names (the keys here); Y routes first.
    let names: Vec<&str> = vs["spec"]["http"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["graylane-a", "graylane-b", "graylane-c", "graylane-default"]
    );
    assert_eq!(
        dest(&route(vs, Some("A"))[0]).subset.as_deref(),
        Some("gray")
    );
    // Two G clusters of weights 3 and 1: 75:25 without the header.
    let w: Vec<(Option<String>, u64)> = route(vs, None)
        .iter()
        .map(|d| (dest(d).subset, d["weight"].as_u64().unwrap()))
        .collect();
    assert_eq!(w, [(Some("prod".into()), 75), (Some("canary".into()), 25)]);
    // The namespaces layout: one host per profile.
    let docs = render(
        "web",
        &spec,
        &Options {
            layout: Layout::Namespaces,
            ..opts.clone()
        },
    );
    assert!(kind(&docs, "DestinationRule").is_empty());
    assert_eq!(
        kind(&docs, "VirtualService")[0]["spec"]["hosts"],
        json!([
            "web.canary.svc.cluster.local",
            "web.gray.svc.cluster.local",
            "web.prod.svc.cluster.local"
        ])
    );
}

#[test]
fn weights_always_sum_to_100() {
    for weights in [
        vec![1, 1, 1],
        vec![1, 2],
        vec![7, 3, 1],
        vec![1, 1, 1, 1, 1, 1, 1],
        vec![100, 1],
    ] {
        let mut yaml = String::from("route-strategy:\n");
        for (i, w) in weights.iter().enumerate() {
            yaml.push_str(&format!(
                "  c{i}: {{status: G, weight: {w}, id: {{all: true}}}}\n"
            ));
        }
        let spec: StrategySpec = serde_saphyr::from_str(&yaml).unwrap();
        let docs = render("s", &spec, &Options::default());
        let total: u64 = route(kind(&docs, "VirtualService")[0], None)
            .iter()
            .map(|d| d["weight"].as_u64().unwrap())
            .sum();
        assert_eq!(total, 100, "{weights:?}");
    }
}

#[test]
fn header_hygiene_strips_before_any_filter() {
    let d = istio::header_hygiene(
        &["x-graylane-cluster".to_string()].into(),
        &["x-graylane-lane".to_string()].into(),
        "istio-system",
    )
    .value;
    let patches = d["spec"]["configPatches"].as_array().unwrap();
    let removed = |ctx: &str| -> Vec<&str> {
        let p = patches
            .iter()
            .find(|p| p["match"]["context"] == ctx)
            .unwrap();
        // Merged into the connection manager: before route selection, not as an HTTP filter
        // (which would run after Envoy picked the route by the client's header).
        assert_eq!(p["applyTo"], "NETWORK_FILTER");
        assert_eq!(p["patch"]["operation"], "MERGE");
        let hcm = &p["patch"]["value"]["typed_config"];
        assert!(hcm["@type"]
            .as_str()
            .unwrap()
            .ends_with(".HttpConnectionManager"));
        let early = &hcm["early_header_mutation_extensions"][0];
        assert_eq!(
            early["name"],
            "envoy.http.early_header_mutation.header_mutation"
        );
        early["typed_config"]["mutations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["remove"].as_str().unwrap())
            .collect()
    };
    assert_eq!(
        removed("GATEWAY"),
        ["x-graylane-cluster", "x-graylane-lane"]
    );
    assert_eq!(removed("SIDECAR_OUTBOUND"), ["x-graylane-cluster"]);
    assert!(d["spec"].get("workloadSelector").is_none(), "mesh-wide");
}

#[test]
fn errors_name_the_field_or_option() {
    let no_g: StrategySpec =
        serde_saphyr::from_str("route-strategy: {A: {status: Y, id: {ids: [1]}}}").unwrap();
    let e = istio::render("s", &no_g, &Options::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("services.s.route-strategy: no G cluster"),
        "{e}"
    );
    let same: StrategySpec = serde_saphyr::from_str(
        "route-strategy:\n  A: {status: G, lane: gray, id: {all: true}}\n  gray: {status: Y, id: {ids: [1]}}\n",
    )
    .unwrap();
    let e = istio::render("s", &same, &Options::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("services.s.route-strategy.gray: goes to the same destination as cluster A"),
        "{e}"
    );
    let upper: StrategySpec =
        serde_saphyr::from_str("route-strategy: {B: {status: G, id: {all: true}}}").unwrap();
    let e = istio::render("s", &upper, &Options::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("route-strategy.B: profile \"B\" is not a DNS label"),
        "{e}"
    );
    let e = istio::render(
        "s",
        &upper,
        &Options {
            namespace: "Shop".into(),
            ..Options::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.starts_with("--namespace"), "{e}");
    assert_eq!(
        Destination::from_istio_cluster("outbound|8080|v2|b.prod.svc.cluster.local"),
        Some(Destination {
            host: "b.prod.svc.cluster.local".into(),
            subset: Some("v2".into()),
            port: Some(8080)
        })
    );
    for bad in [
        "inbound|8080||b",
        "outbound|x||b",
        "outbound|0||b",
        "outbound|8080||",
        "outbound|8080||B!",
        "outbound|8080||b|x",
    ] {
        assert_eq!(Destination::from_istio_cluster(bad), None, "{bad}");
    }
}

/// `--config FILE`: the options not given as flags come from the file's `istio:` section, per
/// service (what the control plane applies with `istio.apply`); a flag given wins.
#[tokio::test]
async fn render_from_a_file_takes_its_istio_options_and_flags_win() {
    use clap::Parser;
    let file = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/seed-003.yaml")
        .display()
        .to_string();
    let run = |extra: &[&str]| {
        let mut argv = vec!["graylane", "render", "istio", "--config", &file];
        argv.extend_from_slice(extra);
        let cli = graylane_control_plane::cli::Cli::try_parse_from(argv).unwrap();
        async move {
            let out = graylane_control_plane::cli::run(cli).await.unwrap();
            let docs: Vec<Value> = out
                .split("---\n")
                .filter(|d| {
                    d.lines()
                        .any(|l| !l.starts_with('#') && !l.trim().is_empty())
                })
                .map(|d| serde_saphyr::from_str::<Value>(d).unwrap())
                .collect();
            let vs = |name: &str| {
                docs.iter()
                    .find(|d| d["kind"] == "VirtualService" && d["metadata"]["name"] == name)
                    .map(|d| (d["spec"]["gateways"].clone(), d["spec"]["hosts"].clone()))
                    .unwrap()
            };
            (vs("graylane-a"), vs("graylane-b"))
        }
    };
    let (a, b) = run(&[]).await;
    assert_eq!(a.0, json!(["mesh", "istio-system/shop"]));
    assert_eq!(
        a.1,
        json!([
            "a.gray.svc.cluster.local",
            "a.prod.svc.cluster.local",
            "shop.example.com"
        ])
    );
    assert_eq!(b.0, Value::Null, "b: the mesh only");
    let (a, b) = run(&["--gateway", "shop/edge"]).await;
    assert_eq!(a.0, json!(["mesh", "shop/edge"]));
    assert_eq!(
        b.0,
        json!(["mesh", "shop/edge"]),
        "a flag applies to every service"
    );
}
