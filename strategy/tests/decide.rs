//! Table tests of `decide`: seed 000's whitelist and states, seed 003's cookie, percentage,
//! caller label and levelled strategies, health fallback and identity sources.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;
use graylane_strategy::{cookie, Health, Id, Lane, Reason, RequestView};

#[test]
fn seed_000_ids_and_intervals() {
    let c = compile_json(SEED_000_JSON);
    for (tenant, want) in [
        ("1", "A"),
        ("2", "A"),
        ("3", "A"),
        ("100", "A"),
        ("101", "B"),
        ("300", "B"),
        ("599", "B"),
        ("600", "A"),
        ("700", "A"),
        ("10000", "A"),
        ("10001", "B"),
        ("0", "B"),
        ("abc", "B"),
        ("", "B"),
    ] {
        assert_eq!(
            target_of(&c, tenant).as_deref(),
            Some(want),
            "tenant {tenant:?}"
        );
    }
    let d = decide_with(&c, &[("x-tenant-id", "700")], 0);
    assert_eq!(
        d.reason,
        Reason::IdInterval(graylane_strategy::id::Interval { lo: 600, hi: 10000 })
    );
    assert_eq!(
        decide_with(&c, &[("x-tenant-id", "2")], 0).reason,
        Reason::IdListed
    );
    assert_eq!(decide_with(&c, &[], 0).reason, Reason::IdAll);
}

#[test]
fn seed_000_yaml_verbatim() {
    // Copied from seed 000, including `interval:[[` without a space and the comment.
    let yaml = r#"
"route-strategy":
  A: 
    status: Y
    id: 
      all: false # 为true时,所有id。为false,则看`ids`, `interval`配置
      ids: [1, 2, 3]
      interval:[[1,100], [600,10000]]
  B:
    status: G
    id:
      all: true
"#;
    let spec = graylane_strategy::parse_yaml(yaml).expect("seed 000 parses");
    let c = graylane_strategy::Compiled::try_from(spec).unwrap();
    assert_eq!(target_of(&c, "2").as_deref(), Some("A"));
    assert_eq!(target_of(&c, "700").as_deref(), Some("A"));
    assert_eq!(target_of(&c, "300").as_deref(), Some("B"));
}

#[test]
fn r_never_receives_traffic_and_y_beats_g() {
    let c = compile_json(
        r#"{"route-strategy": {
        "A": {"status": "R", "id": {"all": true}},
        "B": {"status": "G", "id": {"all": true}},
        "C": {"status": "Y", "id": {"ids": [7]}}}}"#,
    );
    for draw in 0..10_000u64 {
        let d = decide_with(&c, &[("x-tenant-id", "5")], draw.wrapping_mul(0x9e37_79b9));
        assert_eq!(d.target(&c).unwrap().key, "B");
    }
    assert_eq!(target_of(&c, "7").as_deref(), Some("C"));
}

#[test]
fn no_g_cluster_and_no_match_is_no_cluster() {
    let c = compile_json(r#"{"route-strategy": {"A": {"status": "Y", "id": {"ids": [1]}}}}"#);
    let d = decide_with(&c, &[("x-tenant-id", "2")], 0);
    assert_eq!(d.cluster, None);
    assert_eq!(d.reason, Reason::NoCluster);
}

#[test]
fn unhealthy_gray_falls_back_to_prod_with_reason() {
    let c = compile_json(SEED_000_JSON);
    let mut health = Health::from_counts(&c, [("A", Some(0))]);
    assert_eq!(health.get(0), Some(0));
    let d = decide_healthy(&c, &health, &[("x-tenant-id", "2")], 0);
    assert_eq!(d.target(&c).unwrap().key, "B");
    assert_eq!(d.fallback.map(|f| f.skipped), Some(0));
    assert!(
        d.detail(&c).contains("skipped A (Y) with 0 healthy"),
        "{}",
        d.detail(&c)
    );
    health.set(0, Some(3));
    let d = decide_healthy(&c, &health, &[("x-tenant-id", "2")], 0);
    assert_eq!(d.target(&c).unwrap().key, "A");
    // Every G unhealthy: routed to G anyway, never to an unmatched Y.
    health.set(1, Some(0));
    let d = decide_healthy(&c, &health, &[("x-tenant-id", "300")], 0);
    assert_eq!(d.target(&c).unwrap().key, "B");
    assert_eq!(d.reason, Reason::AllUnhealthy);
}

#[test]
fn levelled_shares_by_weight() {
    let c = compile_json(
        r#"{"route-strategy": {
        "prod": {"status": "G", "id": {"all": true}},
        "gray": {"status": "G", "id": {"all": true}, "weight": 3}}}"#,
    );
    let mut gray = 0;
    let n = 40_000u64;
    for i in 0..n {
        let d = decide_with(&c, &[], graylane_strategy::hash::mix64(i));
        if d.target(&c).unwrap().key == "gray" {
            gray += 1;
        }
    }
    let share = f64::from(gray) / n as f64;
    assert!((share - 0.75).abs() < 0.02, "gray share {share}");
}

#[test]
fn percent_per_request_and_by_tenant() {
    let c = compile_json(
        r#"{"route-strategy": {
        "prod": {"status": "G", "id": {"all": true}},
        "gray": {"status": "Y", "percent": {"value": 20}}}}"#,
    );
    let n = 20_000u64;
    let gray = (0..n)
        .filter(|i| {
            let d = decide_with(&c, &[], graylane_strategy::hash::mix64(*i));
            d.target(&c).unwrap().key == "gray"
        })
        .count();
    let share = gray as f64 / n as f64;
    assert!((share - 0.20).abs() < 0.015, "gray share {share}");

    let stable = |pct: u32| {
        compile_json(&format!(
            r#"{{"route-strategy": {{
            "prod": {{"status": "G", "id": {{"all": true}}}},
            "gray": {{"status": "Y", "percent": {{"value": {pct}, "by": "tenant"}}}}}}}}"#
        ))
    };
    let (c10, c30) = (stable(10), stable(30));
    let mut in10 = 0;
    for t in 0..5_000u64 {
        let tenant = t.to_string();
        let first = target_of(&c10, &tenant);
        for draw in 0..20u64 {
            let d = decide_with(&c10, &[("x-tenant-id", &tenant)], draw * 7919);
            assert_eq!(d.target(&c10).map(|x| x.key.clone()), first);
        }
        if first.as_deref() == Some("gray") {
            in10 += 1;
            assert_eq!(
                target_of(&c30, &tenant).as_deref(),
                Some("gray"),
                "{tenant} left gray"
            );
        }
    }
    assert!((400..600).contains(&in10), "10% of 5000 tenants: {in10}");
}

#[test]
fn gray_cookie_signed_and_plain() {
    let (key, public) = test_key(7);
    let (other, _) = test_key(8);
    let c = compile_json(&format!(
        r#"{{"gray_cookie": {{"mode": "signed", "keys": [{{"id": "k1", "public_key": "{public}"}}]}},
        "route-strategy": {{
        "prod": {{"status": "G", "id": {{"all": true}}}},
        "gray": {{"status": "Y", "gray_cookie": true}}}}}}"#
    ));
    let good = cookie::sign(&key, "k1", &Id::Num(42), 2_000);
    let at = |cookie_value: &str, tenant: &str, now: u64| {
        let ck = format!("rememberMe=x; tenantGray={cookie_value}; channel=y");
        let d = decide_full(
            &c,
            &[("x-tenant-id", tenant), ("cookie", &ck)],
            None,
            now,
            0,
        );
        d.target(&c).unwrap().key.clone()
    };
    assert_eq!(at(&good, "42", 1_000), "gray");
    assert_eq!(at(&good, "42", 2_000), "prod", "expired");
    assert_eq!(at(&good, "43", 1_000), "prod", "bound to another tenant");
    assert_eq!(
        at("1", "42", 1_000),
        "prod",
        "plain cookie not honoured in signed mode"
    );
    let forged = good.replace("1.42.", "1.43.");
    assert_eq!(at(&forged, "43", 1_000), "prod", "forged");
    let other_key = cookie::sign(&other, "k1", &Id::Num(42), 2_000);
    assert_eq!(at(&other_key, "42", 1_000), "prod", "another private key");
    let unknown_id = cookie::sign(&key, "k2", &Id::Num(42), 2_000);
    assert_eq!(at(&unknown_id, "42", 1_000), "prod", "unknown key id");

    // Without a clock no signed cookie is honoured (each one expires).
    let ck = format!("tenantGray={good}");
    let h = hdrs(&[("x-tenant-id", "42"), ("cookie", &ck)]);
    let req = RequestView {
        headers: &h,
        tenant: None,
        own_lane: None,
        now: None,
        draw: 0,
    };
    let d = graylane_strategy::decide(&c, &Health::UNKNOWN, &req);
    assert_eq!(d.target(&c).unwrap().key, "prod", "no clock");
    let req = RequestView {
        now: Some(1_000),
        ..req
    };
    let d = graylane_strategy::decide(&c, &Health::UNKNOWN, &req);
    assert_eq!(d.target(&c).unwrap().key, "gray", "with the clock");

    let plain = compile_json(
        r#"{"gray_cookie": {"mode": "plain"}, "route-strategy": {
        "prod": {"status": "G", "id": {"all": true}},
        "gray": {"status": "Y", "gray_cookie": true}}}"#,
    );
    let d = decide_with(&plain, &[("cookie", "tenantGray=1")], 0);
    assert_eq!(d.target(&plain).unwrap().key, "gray");
    assert_eq!(d.reason, Reason::GrayCookie);
    let d = decide_with(&plain, &[("cookie", "tenantGray=0")], 0);
    assert_eq!(d.target(&plain).unwrap().key, "prod");
}

/// Counts the signatures `decide_with` asks to check, and answers as `verify` does.
struct Counting(std::cell::Cell<u32>);

impl cookie::Signatures for Counting {
    fn verify(&self, c: &cookie::Signed<'_>) -> bool {
        self.0.set(self.0.get() + 1);
        c.verify()
    }
}

#[test]
fn keys_rotate_and_signatures_are_checked_only_for_cookies_whose_claims_hold() {
    let (old, old_pub) = test_key(1);
    let (new, new_pub) = test_key(2);
    // The rotation window: both keys trusted, the old one until 1_500.
    let c = compile_json(&format!(
        r#"{{"gray_cookie": {{"keys": [
            {{"id": "old", "public_key": "{old_pub}", "not_after": 1500}},
            {{"id": "new", "public_key": "{new_pub}"}}]}},
        "route-strategy": {{
        "prod": {{"status": "G", "id": {{"all": true}}}},
        "gray": {{"status": "Y", "gray_cookie": true}}}}}}"#
    ));
    let by_old = cookie::sign(&old, "old", &Id::Num(42), 9_000);
    let by_new = cookie::sign(&new, "new", &Id::Num(42), 9_000);
    let counting = Counting(std::cell::Cell::new(0));
    let at = |value: &str, tenant: &str, now: u64| {
        let ck = format!("tenantGray={value}");
        let h = hdrs(&[("x-tenant-id", tenant), ("cookie", &ck)]);
        let req = RequestView {
            headers: &h,
            tenant: None,
            own_lane: None,
            now: Some(now),
            draw: 0,
        };
        let d = graylane_strategy::decide_with(&c, &Health::UNKNOWN, &req, &counting);
        assert_eq!(d, graylane_strategy::decide(&c, &Health::UNKNOWN, &req));
        d.target(&c).unwrap().key.clone()
    };
    assert_eq!(
        at(&by_old, "42", 1_000),
        "gray",
        "old key, inside the window"
    );
    assert_eq!(at(&by_new, "42", 1_000), "gray", "new key");
    assert_eq!(counting.0.get(), 2);
    assert_eq!(at(&by_old, "42", 1_500), "prod", "old key, window over");
    assert_eq!(at(&by_new, "43", 1_000), "prod", "another tenant");
    assert_eq!(at(&by_new, "42", 9_000), "prod", "expired");
    assert_eq!(counting.0.get(), 2, "claims that fail cost no verification");
    // One signature character changed (the first: every bit of it is signature).
    let at_sig = by_new.rfind('.').unwrap() + 1;
    let swap = if by_new.as_bytes()[at_sig] == b'A' {
        "B"
    } else {
        "A"
    };
    let forged = format!("{}{swap}{}", &by_new[..at_sig], &by_new[at_sig + 1..]);
    assert_eq!(at(&forged, "42", 1_000), "prod", "forged");
    assert_eq!(counting.0.get(), 3);
}

#[test]
fn the_gray_whitelist_is_the_y_clusters_id_rules() {
    let c = compile_json(
        r#"{"route-strategy": {
        "A": {"status": "Y", "id": {"ids": [1, "acme"], "interval": [[600, 10000]]}},
        "C": {"status": "R", "id": {"ids": [300]}},
        "P": {"status": "Y", "percent": {"value": 100}},
        "B": {"status": "G", "id": {"all": true}}}}"#,
    );
    let gray = |t: Id| {
        graylane_strategy::gray_whitelist(&c, &t).map(|(i, r)| (c.clusters()[i].key.clone(), r))
    };
    assert_eq!(gray(Id::Num(1)), Some(("A".into(), Reason::IdListed)));
    assert_eq!(
        gray(Id::Str("acme".into())),
        Some(("A".into(), Reason::IdListed))
    );
    assert!(matches!(gray(Id::Num(700)), Some((k, Reason::IdInterval(_))) if k == "A"));
    assert_eq!(
        gray(Id::Num(300)),
        None,
        "R clusters and G clusters do not count"
    );
    assert_eq!(gray(Id::Num(5)), None, "percentages do not count");
    let all = compile_json(
        r#"{"route-strategy": {"A": {"status": "Y", "id": {"all": true}}, "B": {"status": "G"}}}"#,
    );
    assert_eq!(
        graylane_strategy::gray_whitelist(&all, &Id::Num(5)).map(|(_, r)| r),
        Some(Reason::IdAll)
    );
}

#[test]
fn caller_lane_from_label_and_trusted_header() {
    let spec = |trust: bool| {
        compile_json(&format!(
            r#"{{"lane": {{"trust": {trust}}}, "route-strategy": {{
            "prod": {{"status": "G", "id": {{"all": true}}}},
            "gray": {{"status": "Y", "caller_lane": "gray"}}}}}}"#
        ))
    };
    let (trusting, strict) = (spec(true), spec(false));
    let key = |c: &graylane_strategy::Compiled, h: &[(&str, &str)], own: Option<Lane>| {
        decide_full(c, h, own, 0, 0).target(c).unwrap().key.clone()
    };
    assert_eq!(key(&strict, &[], Some(Lane::Gray)), "gray");
    assert_eq!(key(&strict, &[], Some(Lane::Prod)), "prod");
    assert_eq!(
        key(&strict, &[("x-graylane-lane", "gray")], None),
        "prod",
        "untrusted header"
    );
    assert_eq!(key(&trusting, &[("x-graylane-lane", "gray")], None), "gray");
    assert_eq!(key(&trusting, &[("x-graylane-lane", "prod")], None), "prod");
}

#[test]
fn identity_sources_in_order() {
    let c = compile_json(
        r#"{"identity": [{"header": "X-User"}, {"cookie": "uid"}, {"query": "tenant"}],
        "route-strategy": {
        "prod": {"status": "G", "id": {"all": true}},
        "gray": {"status": "Y", "id": {"ids": [5, "acme"]}}}}"#,
    );
    let key = |h: &[(&str, &str)]| decide_with(&c, h, 0).target(&c).unwrap().key.clone();
    assert_eq!(key(&[("x-user", "5")]), "gray");
    assert_eq!(key(&[("x-user", "acme")]), "gray");
    assert_eq!(key(&[("cookie", "a=b; uid=5")]), "gray");
    assert_eq!(key(&[(":path", "/x?a=1&tenant=5")]), "gray");
    assert_eq!(
        key(&[("x-user", "6"), ("cookie", "uid=5")]),
        "prod",
        "header wins"
    );
    assert_eq!(
        key(&[("x-user", "\u{1}bad"), ("cookie", "uid=5")]),
        "gray",
        "garbage is no id"
    );
    assert_eq!(key(&[("x-user", "99999999999999999999999")]), "prod");
}

#[test]
fn header_and_cookie_rules() {
    let c = compile_json(
        r#"{"route-strategy": {
        "prod": {"status": "G", "id": {"all": true}},
        "gray": {"status": "Y",
          "headers": [{"name": "X-Canary", "exact": "yes"}, {"name": "user-agent", "prefix": "beta/"}],
          "cookies": [{"name": "plan", "one_of": ["gold", "platinum"]}]}}}"#,
    );
    let key = |h: &[(&str, &str)]| decide_with(&c, h, 0).target(&c).unwrap().key.clone();
    assert_eq!(key(&[("x-canary", "yes")]), "gray");
    assert_eq!(key(&[("x-canary", "no")]), "prod");
    assert_eq!(key(&[("user-agent", "beta/2")]), "gray");
    assert_eq!(key(&[("cookie", "plan=gold")]), "gray");
    assert_eq!(key(&[("cookie", "plan=silver")]), "prod");
}

#[test]
fn three_clusters_abc() {
    let c = compile_json(
        r#"{"route-strategy": {
        "A": {"status": "G", "id": {"all": true}},
        "B": {"status": "Y", "id": {"interval": [[1, 100]]}},
        "C": {"status": "Y", "id": {"interval": [[50, 200]]}}}}"#,
    );
    assert_eq!(target_of(&c, "10").as_deref(), Some("B"));
    assert_eq!(target_of(&c, "150").as_deref(), Some("C"));
    assert_eq!(target_of(&c, "300").as_deref(), Some("A"));
    // Overlap 50..=100: both Y match; tie by weight (1:1).
    let mut seen = std::collections::BTreeSet::new();
    for draw in 0..64u64 {
        let d = decide_with(
            &c,
            &[("x-tenant-id", "75")],
            graylane_strategy::hash::mix64(draw),
        );
        seen.insert(d.target(&c).unwrap().key.clone());
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["B", "C"]);
}

#[test]
fn explain_names_tenant_and_rule() {
    let c = compile_json(SEED_000_JSON);
    let h = hdrs(&[]);
    let req = graylane_strategy::RequestView {
        headers: &h,
        tenant: Some(b"700"),
        own_lane: None,
        now: None,
        draw: 0,
    };
    let d = graylane_strategy::decide(&c, &Health::UNKNOWN, &req);
    let e = d.explain(&c, &req);
    assert_eq!(e.cluster.as_deref(), Some("A"));
    assert_eq!(e.tenant.as_deref(), Some("700"));
    assert_eq!(e.reason, "interval");
    assert_eq!(e.detail, "A (Y): the id is in interval [600, 10000]");
}

#[test]
fn large_whitelist_compiles_and_decides() {
    let ids: Vec<String> = (0..200_000u64).map(|i| (i * 3).to_string()).collect();
    let intervals: Vec<String> = (0..2_000u64)
        .map(|i| format!("[{}, {}]", 10_000_000 + i * 100, 10_000_000 + i * 100 + 9))
        .collect();
    let json = format!(
        r#"{{"route-strategy": {{"A": {{"status": "Y", "id": {{"ids": [{}], "interval": [{}]}}}},
        "B": {{"status": "G", "id": {{"all": true}}}}}}}}"#,
        ids.join(","),
        intervals.join(",")
    );
    let c = compile_json(&json);
    assert_eq!(target_of(&c, "299997").as_deref(), Some("A"));
    assert_eq!(target_of(&c, "299998").as_deref(), Some("B"));
    assert_eq!(target_of(&c, "10000105").as_deref(), Some("A"));
    assert_eq!(target_of(&c, "10000110").as_deref(), Some("B"));
}

#[test]
fn reason_ordinals_index_the_codes() {
    use graylane_strategy::id::Interval;
    let all = [
        Reason::IdAll,
        Reason::IdListed,
        Reason::IdInterval(Interval { lo: 1, hi: 2 }),
        Reason::GrayCookie,
        Reason::Cookie(0),
        Reason::Header(0),
        Reason::CallerLane {
            lane: Lane::Gray,
            from_header: false,
        },
        Reason::Percent {
            bucket: 0,
            by: graylane_strategy::spec::PercentBy::Request,
        },
        Reason::Default,
        Reason::AllUnhealthy,
        Reason::NoCluster,
    ];
    assert_eq!(all.len(), Reason::CODES.len());
    for r in all {
        assert_eq!(Reason::CODES[r.ordinal()], r.code(), "{r:?}");
    }
}

/// The radix directory at the edges of `u64`: one id at 0 probed with `u64::MAX` (the slot
/// arithmetic once overflowed here; the property test over wide id sets found it).
#[test]
fn id_lookup_at_the_edges_of_u64() {
    use graylane_strategy::id::{IdIndex, IdList};
    for ids in [vec![0], vec![u64::MAX], vec![0, u64::MAX], vec![0, 1, 2, 3]] {
        let idx = IdIndex::build(
            false,
            IdList {
                nums: ids.clone().into(),
                strs: vec![],
            },
            vec![],
        );
        for probe in [0, 1, 3, 4, u64::MAX - 1, u64::MAX] {
            assert_eq!(
                idx.lookup(Some(&Id::Num(probe))).is_some(),
                ids.contains(&probe),
                "ids {ids:?}, probe {probe}"
            );
        }
    }
}

#[test]
fn weight_by_endpoints_follows_healthy_counts() {
    // One-by-one replacement: both G; one new instance among ten gets a tenth, not half.
    let c = compile_json(
        r#"{"route-strategy": {
        "old": {"status": "G", "id": {"all": true}, "weight": "endpoints"},
        "new": {"status": "G", "id": {"all": true}, "weight": "endpoints"}}}"#,
    );
    let share_new = |old: u32, new: u32| {
        let health = Health::from_counts(&c, [("old", Some(old)), ("new", Some(new))]);
        (0..10_000u64)
            .filter(|d| {
                let d = decide_healthy(&c, &health, &[], d.wrapping_mul(0x9e37_79b9_7f4a_7c15));
                d.target(&c).unwrap().key == "new"
            })
            .count()
    };
    let one_in_ten = share_new(9, 1);
    assert!((800..=1_200).contains(&one_in_ten), "{one_in_ten}");
    let half = share_new(5, 5);
    assert!((4_700..=5_300).contains(&half), "{half}");
    assert_eq!(
        share_new(0, 10),
        10_000,
        "an old cluster with none left gets nothing"
    );
    // Unknown counts weigh 1 each.
    let unknown = (0..10_000u64)
        .filter(|d| {
            let d = decide_healthy(
                &c,
                &Health::UNKNOWN,
                &[],
                d.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            );
            d.target(&c).unwrap().key == "new"
        })
        .count();
    assert!((4_700..=5_300).contains(&unknown), "{unknown}");
    // It round-trips as written and refuses other words.
    let spec = graylane_strategy::parse_json(
        br#"{"route-strategy": {"A": {"status": "G", "weight": "endpoints"}}}"#,
    )
    .unwrap();
    let json = serde_json::to_string(&spec).unwrap();
    assert!(json.contains(r#""weight":"endpoints""#), "{json}");
    let e = graylane_strategy::parse_json(
        br#"{"route-strategy": {"A": {"status": "G", "weight": "lots"}}}"#,
    )
    .unwrap_err();
    assert_eq!(e.path(), "route-strategy.A.weight", "{e}");
}
