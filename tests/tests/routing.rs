//! Issue 3 end to end: every strategy of both seeds decided by the real .wasm inside a real
//! Envoy, routed to real upstream servers. Counts are exact wherever the rule is exact.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use graylane_e2e::{
    count_by_body, count_replies, get, get_all, wait_until, Envoy, EnvoyConfig, Req, Upstream,
};
use graylane_strategy::{cookie, Id};
use serde_json::{json, Value};

/// Two upstreams and an Envoy with the graylane filter running `strategy` for service `svc`.
struct Stack {
    _ups: Vec<Upstream>,
    envoy: Envoy,
}

impl Stack {
    fn start(names: &[&str], fallback: &str, plugin: Value, labels: &[(&str, &str)]) -> Stack {
        let ups: Vec<Upstream> = names.iter().map(|n| Upstream::start(n)).collect();
        Self::with_upstreams(ups, fallback, plugin, labels)
    }

    fn with_upstreams(
        ups: Vec<Upstream>,
        fallback: &str,
        plugin: Value,
        labels: &[(&str, &str)],
    ) -> Stack {
        let mut cfg = EnvoyConfig::new().graylane(&plugin).fallback(fallback);
        for u in &ups {
            cfg = cfg.cluster(u.name(), u.port());
        }
        for (k, v) in labels {
            cfg = cfg.node_label(k, v);
        }
        let envoy = Envoy::start(&cfg.render(), 2).unwrap();
        Stack { _ups: ups, envoy }
    }

    fn port(&self) -> u16 {
        self.envoy.port("ingress")
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port())
    }
}

fn plugin(strategy: Value) -> Value {
    json!({"service": "web", "reason_header": "x-graylane-reason", "strategy": strategy})
}

fn seed_000() -> Value {
    json!({"route-strategy": {
        "A": {"status": "Y", "id": {"all": false, "ids": [1, 2, 3], "interval": [[1, 100], [600, 10000]]}},
        "B": {"status": "G", "id": {"all": true}}}})
}

fn tenants(port: u16, ids: impl Iterator<Item = u64>) -> Vec<(u64, String)> {
    let ids: Vec<u64> = ids.collect();
    let reqs = ids
        .iter()
        .map(|t| Req::new("/").header("x-tenant-id", t.to_string()))
        .collect();
    let replies = get_all(port, reqs);
    ids.into_iter()
        .zip(replies)
        .map(|(t, (status, body, _))| {
            assert_eq!(status, 200, "tenant {t}: {body}");
            (t, body)
        })
        .collect()
}

/// Two plugin configurations in one VM (two listeners, one `vm_id`, 2 workers): Envoy gives
/// each its own root context in each worker's VM, and every request is decided by the
/// configuration of the listener it came through (the filter learns a request's root context
/// as Envoy creates the request's context: filter/src/abi.rs).
#[test]
fn two_configurations_sharing_a_vm_each_decide_their_own_requests() {
    let ups: Vec<Upstream> = ["A", "B"].iter().map(|n| Upstream::start(n)).collect();
    let all_to_a = plugin(json!({"route-strategy": {
        "A": {"status": "Y", "id": {"all": true}},
        "B": {"status": "G", "id": {"all": true}}}}));
    let only_1_to_a = plugin(json!({"route-strategy": {
        "A": {"status": "Y", "id": {"ids": [1]}},
        "B": {"status": "G", "id": {"all": true}}}}));
    let mut cfg = EnvoyConfig::new()
        .graylane(&all_to_a)
        .fallback("B")
        .listener("second", &only_1_to_a);
    for u in &ups {
        cfg = cfg.cluster(u.name(), u.port());
    }
    let envoy = Envoy::start(&cfg.render(), 2).unwrap();
    let (first, second) = (envoy.port("ingress"), envoy.port("second"));
    // Interleaved, so that each worker's VM decides for both configurations in turn.
    for round in 0..4u64 {
        let ids = round * 50 + 1..=round * 50 + 50;
        let a = tenants(first, ids.clone());
        let b = tenants(second, ids);
        assert!(
            a.iter().all(|(_, body)| body == "A"),
            "ingress (all to A): {a:?}"
        );
        for (t, body) in b {
            assert_eq!(body, if t == 1 { "A" } else { "B" }, "second, tenant {t}");
        }
    }
}

#[test]
fn seed_000_whitelist_sends_exactly_the_listed_tenants_to_a() {
    let s = Stack::start(&["A", "B"], "B", plugin(seed_000()), &[]);
    let in_a = |t: u64| (1..=100).contains(&t) || (600..=10_000).contains(&t);
    let mut wrong = Vec::new();
    for (t, body) in tenants(s.port(), 0..=11_000) {
        let want = if in_a(t) { "A" } else { "B" };
        if body != want {
            wrong.push((t, body));
        }
    }
    assert!(
        wrong.is_empty(),
        "misrouted tenants: {:?}",
        &wrong[..wrong.len().min(20)]
    );
    // Without an id, and with garbage ids: B.
    for h in [
        vec![],
        vec![("x-tenant-id", "abc")],
        vec![("x-tenant-id", "-5")],
    ] {
        assert_eq!(get(s.port(), "/", &h).1, "B", "{h:?}");
    }
    let (_, _, headers) = get(s.port(), "/", &[("x-tenant-id", "700")]);
    assert_eq!(headers["x-graylane-reason"], "A;interval");
    // The filter's counters (flushed to Envoy's stats on its tick): exactly the requests
    // that went to A: 100 + 9,401 tenants, and the one for tenant 700.
    let a = || s.envoy.stat("wasmcustom.graylane.web.cluster.A.requests");
    wait_until("A's counter", std::time::Duration::from_secs(10), || {
        a() == Some(9_502)
    });
    assert_eq!(
        s.envoy.stat("wasmcustom.graylane.web.reason.interval"),
        Some(97 + 9_401 + 1)
    );
    assert_eq!(s.envoy.stat("wasmcustom.graylane.web.reason.id"), Some(3));
}

/// A plugin configuration far larger than the 64 KiB pieces the filter reads it in (300,000
/// ids, 2.3 MB of JSON): ids from the start, the middle and the end of the list route to A,
/// and so does the interval written after the list (serde_json orders keys: `interval` after
/// `ids`), which only holds if the last piece was read.
#[test]
fn a_configuration_of_many_pieces_is_read_to_the_end() {
    let ids: Vec<u64> = (1..=300_000u64).map(|i| i * 7).collect();
    let strategy = json!({"route-strategy": {
        "A": {"status": "Y", "id": {"ids": ids, "interval": [[5_000_000, 5_000_099]]}},
        "B": {"status": "G", "id": {"all": true}}}});
    assert!(plugin(strategy.clone()).to_string().len() > 2_000_000);
    let s = Stack::start(&["A", "B"], "B", plugin(strategy), &[]);
    let probes: Vec<u64> = [7, 14, 1_050_000, 2_099_993, 2_100_000, 5_000_000, 5_000_099]
        .into_iter()
        .chain([1, 8, 1_050_001, 2_100_007, 4_999_999, 5_000_100])
        .collect();
    let in_a =
        |t: u64| (t.is_multiple_of(7) && t <= 2_100_000) || (5_000_000..=5_000_099).contains(&t);
    for (t, body) in tenants(s.port(), probes.into_iter()) {
        assert_eq!(body, if in_a(t) { "A" } else { "B" }, "tenant {t}");
    }
}

#[test]
fn r_cluster_receives_nothing_y_beats_g_and_a_third_cluster_c() {
    let strategy = json!({"route-strategy": {
        "A": {"status": "R", "id": {"all": true}},
        "B": {"status": "G", "id": {"all": true}},
        "C": {"status": "Y", "id": {"interval": [[500, 599]]}}}});
    let s = Stack::start(&["A", "B", "C"], "B", plugin(strategy), &[]);
    let counts = count_replies(&get_all(
        s.port(),
        (0..10_000u64)
            .map(|i| Req::new("/").header("x-tenant-id", (i % 1_000).to_string()))
            .collect(),
    ));
    assert_eq!(counts.get("A"), None, "R must receive nothing: {counts:?}");
    assert_eq!(counts.get("C"), Some(&1_000), "{counts:?}");
    assert_eq!(counts.get("B"), Some(&9_000), "{counts:?}");
    assert_eq!(s._ups[0].hits(), 0);
}

#[test]
fn all_true_takes_everyone() {
    let strategy = json!({"route-strategy": {
        "A": {"status": "Y", "id": {"all": true}},
        "B": {"status": "G", "id": {"all": true}}}});
    let s = Stack::start(&["A", "B"], "B", plugin(strategy), &[]);
    let counts = count_replies(&get_all(
        s.port(),
        (0..2_000u64)
            .map(|i| {
                let r = Req::new("/");
                if i % 2 == 0 {
                    r.header("x-tenant-id", i.to_string())
                } else {
                    r
                }
            })
            .collect(),
    ));
    assert_eq!(counts.get("A"), Some(&2_000), "{counts:?}");
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A test signing key (never a real one) and its public key as strategies list it.
fn test_key(seed: u8) -> (cookie::SigningKey, String) {
    let k = cookie::SigningKey::from_bytes(&[seed; 32]);
    let public = cookie::public_key_text(&k.verifying_key());
    (k, public)
}

#[test]
fn tenant_gray_cookie_signed_plain_forged_expired() {
    let (k1, p1) = test_key(1);
    let (k2, p2) = test_key(2);
    let (stranger, _) = test_key(3);
    // k2's rotation window has closed: cookies it signed are no longer honoured.
    let signed = json!({"gray_cookie": {"mode": "signed", "keys": [
            {"id": "k1", "public_key": p1},
            {"id": "k2", "public_key": p2, "not_after": now() - 1}]},
        "route-strategy": {
        "prod": {"status": "G", "id": {"all": true}},
        "gray": {"status": "Y", "gray_cookie": true}}});
    let s = Stack::start(&["prod", "gray"], "prod", plugin(signed), &[]);
    let t42 = Id::Num(42);
    let good = cookie::sign(&k1, "k1", &t42, now() + 3_600);
    let at = |value: &str, tenant: &str| {
        let c = format!("rememberMe=x; tenantGray={value}; channel=web");
        count_by_body(
            s.port(),
            "/",
            &[("cookie", &c), ("x-tenant-id", tenant)],
            100,
        )
    };
    assert_eq!(at(&good, "42").get("gray"), Some(&100));
    for (value, tenant, why) in [
        (good.clone(), "43", "bound to tenant 42"),
        (cookie::sign(&k1, "k1", &t42, now() - 1), "42", "expired"),
        (
            cookie::sign(&stranger, "k1", &t42, now() + 3_600),
            "42",
            "forged: another private key",
        ),
        (
            cookie::sign(&k1, "k7", &t42, now() + 3_600),
            "42",
            "unknown key id",
        ),
        (
            cookie::sign(&k2, "k2", &t42, now() + 3_600),
            "42",
            "key past its not_after",
        ),
        ("1".to_string(), "42", "plain cookie in signed mode"),
    ] {
        assert_eq!(at(&value, tenant).get("prod"), Some(&100), "{why}");
    }

    let plain = json!({"gray_cookie": {"mode": "plain"}, "route-strategy": {
        "prod": {"status": "G", "id": {"all": true}},
        "gray": {"status": "Y", "gray_cookie": true}}});
    let p = Stack::start(&["prod", "gray"], "prod", plugin(plain), &[]);
    let c = |v: &str| {
        count_by_body(
            p.port(),
            "/",
            &[("cookie", &format!("tenantGray={v}"))],
            100,
        )
    };
    assert_eq!(c("1").get("gray"), Some(&100));
    assert_eq!(c("0").get("prod"), Some(&100));
}

#[test]
fn clients_cannot_choose_their_route() {
    let s = Stack::start(&["A", "B"], "B", plugin(seed_000()), &[]);
    // A client naming the gray cluster, the lane, or both: still decided by the strategy.
    let h = [
        ("x-tenant-id", "300"),
        ("x-graylane-cluster", "A"),
        ("x-graylane-lane", "gray"),
    ];
    assert_eq!(count_by_body(s.port(), "/", &h, 200).get("B"), Some(&200));
    let (_, body, _) = get(s.port(), "/echo", &h);
    let echoed: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(echoed["x-graylane-cluster"], "B");
    assert_eq!(echoed["x-graylane-lane"], "prod");
}

#[test]
fn percentage_80_20_within_two_percent() {
    let strategy = json!({"route-strategy": {
        "prod": {"status": "G", "id": {"all": true}},
        "gray": {"status": "Y", "percent": {"value": 20}}}});
    let s = Stack::start(&["prod", "gray"], "prod", plugin(strategy), &[]);
    let counts = count_by_body(s.port(), "/", &[], 10_000);
    let gray = counts.get("gray").copied().unwrap_or(0);
    assert_eq!(counts.values().sum::<usize>(), 10_000, "{counts:?}");
    assert!((1_800..=2_200).contains(&gray), "{counts:?}");
}

#[test]
fn tenant_stable_percentage_keeps_sides_and_only_adds_tenants() {
    let stable = |pct: u32| {
        plugin(json!({"route-strategy": {
            "prod": {"status": "G", "id": {"all": true}},
            "gray": {"status": "Y", "percent": {"value": pct, "by": "tenant"}}}}))
    };
    let s10 = Stack::start(&["prod", "gray"], "prod", stable(10), &[]);
    let s30 = Stack::start(&["prod", "gray"], "prod", stable(30), &[]);
    // 200 tenants x 100 requests each at 10 %: every tenant always on the same side.
    let mut side: HashMap<u64, String> = HashMap::new();
    let reqs: Vec<(u64, Req)> = (0..200u64)
        .flat_map(|t| {
            (0..100).map(move |_| (t, Req::new("/").header("x-tenant-id", t.to_string())))
        })
        .collect();
    let (ts, rs): (Vec<u64>, Vec<Req>) = reqs.into_iter().unzip();
    for (t, (status, body, _)) in ts.into_iter().zip(get_all(s10.port(), rs)) {
        assert_eq!(status, 200);
        let prev = side.entry(t).or_insert_with(|| body.clone());
        assert_eq!(*prev, body, "tenant {t} switched sides");
    }
    let gray10: Vec<u64> = side
        .iter()
        .filter(|(_, b)| *b == "gray")
        .map(|(t, _)| *t)
        .collect();
    assert!(
        (8..=35).contains(&gray10.len()),
        "10% of 200: {}",
        gray10.len()
    );
    // Growing to 30 % moves nobody out of gray.
    for (t, body) in tenants(s30.port(), gray10.iter().copied()) {
        assert_eq!(body, "gray", "tenant {t} left gray when the share grew");
    }
    let gray30 = tenants(s30.port(), 0..200)
        .into_iter()
        .filter(|(_, b)| b == "gray")
        .count();
    assert!(gray30 > gray10.len(), "{gray30} vs {}", gray10.len());
}

#[test]
fn levelled_shares_one_to_one() {
    let strategy = json!({"route-strategy": {
        "prod": {"status": "G", "id": {"all": true}},
        "gray": {"status": "G", "id": {"all": true}}}});
    let s = Stack::start(&["prod", "gray"], "prod", plugin(strategy), &[]);
    let counts = count_by_body(s.port(), "/", &[], 10_000);
    let gray = counts.get("gray").copied().unwrap_or(0);
    assert!((4_800..=5_200).contains(&gray), "{counts:?}");
}

#[test]
fn unhealthy_gray_sends_its_tenants_to_prod_with_the_reason() {
    let mut cfg = plugin(seed_000());
    cfg["healthy"] = json!({"A": 0});
    let s = Stack::start(&["A", "B"], "B", cfg, &[]);
    let (_, body, headers) = get(s.port(), "/", &[("x-tenant-id", "2")]);
    assert_eq!(body, "B");
    assert_eq!(headers["x-graylane-reason"], "B;all,fallback_unhealthy");
    assert_eq!(
        count_by_body(s.port(), "/", &[("x-tenant-id", "700")], 500).get("B"),
        Some(&500)
    );
    let fb = || s.envoy.stat("wasmcustom.graylane.web.fallback_unhealthy");
    wait_until(
        "the fallback counter",
        std::time::Duration::from_secs(10),
        || fb() == Some(501),
    );
}

#[test]
fn invalid_configuration_is_refused_naming_the_field() {
    let bad = plugin(json!({"route-strategy": {"A": {"status": "X"}}}));
    let cfg = EnvoyConfig::new().graylane(&bad).cluster("A", 1).render();
    let err = match Envoy::start(&cfg, 1) {
        Ok(e) => panic!("Envoy accepted an invalid strategy:\n{}", e.log()),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("graylane: invalid configuration"), "{err}");
    assert!(err.contains("route-strategy.A.status"), "{err}");
}

// ---- seed 003: services A -> B in series, each behind its own filter ---------------------

fn b_whitelist(ids: &[u64]) -> Value {
    json!({"route-strategy": {
        "B-prod": {"status": "G", "id": {"all": true}},
        "B-gray": {"status": "Y", "id": {"ids": ids}}}})
}

fn plugin_for(service: &str, strategy: Value) -> Value {
    json!({"service": service, "strategy": strategy})
}

/// Service B (prod and gray upstreams) behind an Envoy with `strategy`, then service A whose
/// upstreams forward to `b_url(gray)` and behind an edge Envoy with `a_strategy`.
struct Chain {
    _b: Vec<Stack>,
    a: Stack,
}

impl Chain {
    fn start(a_strategy: Value, b_for_lane: impl Fn(&str) -> Stack) -> Chain {
        let b_prod = b_for_lane("prod");
        let b_gray = b_for_lane("gray");
        let a_up = vec![
            Upstream::start_forwarding("A-prod", &b_prod.url()),
            Upstream::start_forwarding("A-gray", &b_gray.url()),
        ];
        let a = Stack::with_upstreams(a_up, "A-prod", plugin_for("a", a_strategy), &[]);
        Chain {
            _b: vec![b_prod, b_gray],
            a,
        }
    }

    fn counts(&self, tenants: impl Iterator<Item = u64>) -> HashMap<String, usize> {
        let mut out = HashMap::new();
        for (_, body) in tenants_of(self.a.port(), tenants) {
            *out.entry(body).or_insert(0) += 1;
        }
        out
    }
}

fn tenants_of(port: u16, ids: impl Iterator<Item = u64>) -> Vec<(u64, String)> {
    tenants(port, ids)
}

fn a_strategy_whitelist() -> Value {
    json!({"route-strategy": {
        "A-prod": {"status": "G", "id": {"all": true}},
        "A-gray": {"status": "Y", "id": {"interval": [[1, 10]]}}}})
}

fn b_stack(strategy: Value, lane: &str) -> Stack {
    Stack::start(
        &["B-prod", "B-gray"],
        "B-prod",
        plugin_for("b", strategy),
        &[("profile", lane)],
    )
}

#[test]
fn scenario_a_whitelist_then_levelled() {
    let levelled = json!({"route-strategy": {
        "B-prod": {"status": "G", "id": {"all": true}},
        "B-gray": {"status": "G", "id": {"all": true}}}});
    let chain = Chain::start(a_strategy_whitelist(), |lane| {
        b_stack(levelled.clone(), lane)
    });
    let gray = chain.counts((1..=10).cycle().take(2_000));
    let prod = chain.counts((11..=20).cycle().take(2_000));
    // A: exact by whitelist. B: levelled 1:1 whatever A's lane.
    let sum = |m: &HashMap<String, usize>, p: &str| -> usize {
        m.iter()
            .filter(|(k, _)| k.starts_with(p))
            .map(|(_, v)| v)
            .sum()
    };
    assert_eq!(sum(&gray, "A-gray->"), 2_000, "{gray:?}");
    assert_eq!(sum(&prod, "A-prod->"), 2_000, "{prod:?}");
    for m in [&gray, &prod] {
        let b_gray = sum(m, "A-gray->B-gray") + sum(m, "A-prod->B-gray");
        assert!((900..=1_100).contains(&b_gray), "levelled B: {m:?}");
    }
}

#[test]
fn scenario_b_whitelist_then_caller_label() {
    let by_caller = json!({"route-strategy": {
        "B-prod": {"status": "G", "id": {"all": true}},
        "B-gray": {"status": "Y", "caller_lane": "gray"}}});
    // Each A version calls B through its own sidecar, labelled with A's profile.
    let chain = Chain::start(a_strategy_whitelist(), |lane| {
        b_stack(by_caller.clone(), lane)
    });
    let got = chain.counts((1..=20).cycle().take(2_000));
    assert_eq!(got.get("A-gray->B-gray"), Some(&1_000), "{got:?}");
    assert_eq!(got.get("A-prod->B-prod"), Some(&1_000), "{got:?}");
    assert_eq!(got.len(), 2, "{got:?}");
}

#[test]
fn scenario_b_by_trusted_lane_header() {
    // One B sidecar, no labels: B trusts the lane header that A's filter set and A forwarded.
    let by_lane = json!({"lane": {"trust": true, "label": ""}, "route-strategy": {
        "B-prod": {"status": "G", "id": {"all": true}},
        "B-gray": {"status": "Y", "caller_lane": "gray"}}});
    let chain = Chain::start(a_strategy_whitelist(), |_| {
        Stack::start(
            &["B-prod", "B-gray"],
            "B-prod",
            plugin_for("b", by_lane.clone()),
            &[],
        )
    });
    let got = chain.counts((1..=20).cycle().take(1_000));
    assert_eq!(got.get("A-gray->B-gray"), Some(&500), "{got:?}");
    assert_eq!(got.get("A-prod->B-prod"), Some(&500), "{got:?}");
}

#[test]
fn scenario_c_percentage_then_whitelist() {
    let a_pct = json!({"route-strategy": {
        "A-prod": {"status": "G", "id": {"all": true}},
        "A-gray": {"status": "Y", "percent": {"value": 20}}}});
    let b_wl = b_whitelist(&[1, 2, 3, 4, 5]);
    let chain = Chain::start(a_pct, |lane| b_stack(b_wl.clone(), lane));
    let got = chain.counts((1..=10).cycle().take(10_000));
    let count = |k: &str| got.get(k).copied().unwrap_or(0);
    // B: whitelisted users (1..=5) reach B-gray from either A; the others B-prod. Exact.
    assert_eq!(
        count("A-prod->B-gray") + count("A-gray->B-gray"),
        5_000,
        "{got:?}"
    );
    assert_eq!(
        count("A-prod->B-prod") + count("A-gray->B-prod"),
        5_000,
        "{got:?}"
    );
    // A: 80:20 within 2 %.
    let a_gray = count("A-gray->B-gray") + count("A-gray->B-prod");
    assert!((1_800..=2_200).contains(&a_gray), "{got:?}");
}

#[test]
fn scenario_b_falls_back_per_hop_when_the_callee_has_no_healthy_gray() {
    let by_caller = json!({"route-strategy": {
        "B-prod": {"status": "G", "id": {"all": true}},
        "B-gray": {"status": "Y", "caller_lane": "gray"}}});
    let chain = Chain::start(a_strategy_whitelist(), |lane| {
        let mut cfg = plugin_for("b", by_caller.clone());
        cfg["healthy"] = json!({"B-gray": 0});
        Stack::start(&["B-prod", "B-gray"], "B-prod", cfg, &[("profile", lane)])
    });
    let got = chain.counts((1..=20).cycle().take(1_000));
    assert_eq!(got.get("A-gray->B-prod"), Some(&500), "{got:?}");
    assert_eq!(got.get("A-prod->B-prod"), Some(&500), "{got:?}");
}
