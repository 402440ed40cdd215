//! Property tests: the parsers and `decide` never panic on arbitrary input, and whitelist
//! lookups agree with a naive model.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;
use graylane_strategy::id::{IdIndex, IdList, Interval};
use graylane_strategy::{
    cookie, decide, parse_id, parse_json, Compiled, Health, Id, Lane, RequestView,
};
use proptest::prelude::*;

fn header_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("x-tenant-id".to_string()),
        Just("cookie".to_string()),
        Just(":path".to_string()),
        Just("x-graylane-lane".to_string()),
        Just("x-canary".to_string()),
        "[a-z:-]{0,12}",
    ]
}

fn rich() -> Compiled {
    compile_json(
        r#"{"identity": [{"header": "x-tenant-id"}, {"cookie": "tenantId"}, {"query": "t"}],
        "gray_cookie": {"mode": "signed", "keys": [{"id": "k1", "public_key": "11qYAYKxCrfVS/7TyWQHOg7hcvPaoiMlrwIaaPcHURo="}]},
        "lane": {"trust": true},
        "route-strategy": {
          "A": {"status": "Y", "id": {"ids": [1, "x"], "interval": [[10, 20]]}, "gray_cookie": true,
                "cookies": [{"name": "c", "prefix": "g"}], "headers": [{"name": "x-canary", "exact": "1"}],
                "caller_lane": "gray", "percent": {"value": 5, "by": "tenant"}},
          "B": {"status": "G", "id": {"all": true}},
          "C": {"status": "R", "id": {"all": true}}}}"#,
    )
}

fn rich_keys() -> Vec<cookie::TrustedKey> {
    rich().gray_cookie_keys().to_vec()
}

/// Cases per property: `PROPTEST_CASES` if set (the documented long run sets 1,000,000), else
/// `default`.
fn cases(default: u32) -> ProptestConfig {
    ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default),
    )
}

// The parsers and `decide` on hostile input: 10,000 cases in CI.
proptest! {
    #![proptest_config(cases(10_000))]

    #[test]
    fn decide_never_panics(
        headers in proptest::collection::vec((header_name(), proptest::collection::vec(any::<u8>(), 0..64)), 0..8),
        tenant in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
        lane in proptest::option::of(prop_oneof![Just(Lane::Gray), Just(Lane::Prod)]),
        now in proptest::option::of(any::<u64>()),
        draw in any::<u64>(),
    ) {
        let c = rich();
        let req = RequestView { headers: &headers, tenant: tenant.as_deref(), own_lane: lane, now, draw };
        // B has no healthy endpoint: routed to anyway when nothing else can serve.
        let health = Health::from_counts(&c, [("B", Some(0))]);
        let d = decide(&c, &health, &req);
        // Never R; always some cluster here (B is G).
        let t = d.target(&c).expect("a G cluster exists");
        prop_assert_ne!(t.key.as_str(), "C");
        let _ = d.explain(&c, &req);
    }

    #[test]
    fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = parse_json(&bytes).map(Compiled::try_from);
        let _ = parse_id(&bytes);
        let _ = cookie::find(&bytes, "tenantGray");
        let keys = rich_keys();
        let _ = cookie::verify_signed(&keys, &bytes, Some(&Id::Num(1)), Some(5), &cookie::Uncached);
        if let Ok(s) = std::str::from_utf8(&bytes) {
            let _ = graylane_strategy::parse_yaml(s).map(Compiled::try_from);
        }
    }

    /// Any change to a signed cookie (one byte replaced, or the value cut) unmakes it.
    #[test]
    fn a_changed_signed_cookie_is_never_gray(
        at in any::<proptest::sample::Index>(), byte in any::<u8>(), cut in any::<bool>(),
        tenant in 0u64..1_000,
    ) {
        let (key, public) = test_key(9);
        let spec = graylane_strategy::PublicKeySpec { id: "k".into(), public_key: public, not_after: None };
        let keys = [cookie::TrustedKey::parse(&spec, "keys[0]").unwrap()];
        let good = cookie::sign(&key, "k", &Id::Num(tenant), 5_000).into_bytes();
        let check = |v: &[u8]| cookie::verify_signed(&keys, v, Some(&Id::Num(tenant)), Some(1), &cookie::Uncached);
        prop_assert_eq!(check(&good), cookie::Verdict::Gray);
        let i = at.index(good.len());
        let changed = if cut {
            good[..i].to_vec()
        } else {
            let mut v = good.clone();
            v[i] = byte;
            v
        };
        if changed != good {
            prop_assert_ne!(check(&changed), cookie::Verdict::Gray, "{}", String::from_utf8_lossy(&changed));
        }
    }

    #[test]
    fn json_shaped_garbage_never_panics(
        status in "[RGYX]", all in any::<bool>(),
        ids in proptest::collection::vec(any::<i64>(), 0..5),
        lo in any::<u64>(), hi in any::<u64>(), pct in any::<f64>(), w in any::<u32>(),
    ) {
        let json = format!(r#"{{"route-strategy": {{"A": {{"status": "{status}", "weight": {w},
            "id": {{"all": {all}, "ids": {ids:?}, "interval": [[{lo}, {hi}]]}},
            "percent": {{"value": {pct}}}}}}}}}"#);
        let _ = parse_json(json.as_bytes()).map(Compiled::try_from);
    }
}

/// Ids on either side of 2^32, where the index switches from 4-byte to 8-byte storage.
const BOUNDARY: std::ops::Range<u64> = (1 << 32) - 3..(1 << 32) + 3;

// Models (whitelist lookups against a naive set): 2,000 cases in CI, each builds an index.
proptest! {
    #![proptest_config(cases(2_000))]

    #[test]
    fn lookup_agrees_with_naive_model(
        ids in proptest::collection::vec(0u64..500, 0..40),
        ivs in proptest::collection::vec((0u64..500, 0u64..60), 0..10),
        probe in 0u64..600,
    ) {
        let intervals: Vec<Interval> = ivs.iter().map(|(lo, len)| Interval { lo: *lo, hi: lo + len }).collect();
        let naive = ids.contains(&probe) || intervals.iter().any(|iv| iv.lo <= probe && probe <= iv.hi);
        let idx = IdIndex::build(false, IdList { nums: ids.clone().into(), strs: vec![] }, intervals);
        prop_assert_eq!(idx.lookup(Some(&Id::Num(probe))).is_some(), naive);
    }

    /// Many ids over the whole `u64` range (those below 2^32 are kept in 4 bytes, the others in
    /// 8: ids around the border are drawn often) (the radix directory has many slots, some of them
    /// empty, with the extremes): every listed id is found, and a probe is found exactly when
    /// it is listed.
    #[test]
    fn lookup_of_wide_id_sets_agrees_with_naive_model(
        ids in proptest::collection::vec(prop_oneof![any::<u64>(), 0u64..5_000, Just(u64::MAX), Just(0u64), BOUNDARY], 0..400),
        probes in proptest::collection::vec(prop_oneof![any::<u64>(), 0u64..5_000, Just(u64::MAX), BOUNDARY], 0..64),
    ) {
        let idx = IdIndex::build(false, IdList { nums: ids.clone().into(), strs: vec![] }, vec![]);
        for id in ids.iter().take(64) {
            prop_assert!(idx.lookup(Some(&Id::Num(*id))).is_some(), "listed id {} not found", id);
        }
        for p in probes {
            prop_assert_eq!(idx.lookup(Some(&Id::Num(p))).is_some(), ids.contains(&p), "probe {}", p);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// `weight: endpoints` (one-by-one replacement): among two G clusters that both match, each
    /// gets its share of healthy endpoints, whatever the counts; a cluster with none gets
    /// nothing, and unknown counts weigh 1.
    #[test]
    fn weight_by_endpoints_shares_follow_the_counts(
        old in proptest::option::of(0u32..=20), new in proptest::option::of(0u32..=20), seed in any::<u64>(),
    ) {
        let c = compile_json(
            r#"{"route-strategy": {
            "old": {"status": "G", "id": {"all": true}, "weight": "endpoints"},
            "new": {"status": "G", "id": {"all": true}, "weight": "endpoints"}}}"#,
        );
        let health = Health::from_counts(&c, [("old", old), ("new", new)]);
        const N: u64 = 4_000;
        let to_new = (0..N)
            .filter(|i| {
                let draw = seed.wrapping_add(*i).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                let headers: Vec<(String, Vec<u8>)> = Vec::new();
                let req = RequestView { headers: &headers, tenant: None, own_lane: None, now: None, draw };
                decide(&c, &health, &req).target(&c).map(|t| t.key.as_str()) == Some("new")
            })
            .count() as f64;
        // min_healthy is 1: a cluster at 0 is skipped (unless both are, then the first serves).
        let w = |n: Option<u32>| f64::from(n.unwrap_or(1));
        let expected = match (w(old), w(new)) {
            (o, n) if o + n == 0.0 => to_new / N as f64, // both empty: not about weights
            (o, n) => n / (o + n),
        };
        // 4,000 draws: the binomial's standard deviation is at most 0.8 %; 4 % is five of them.
        prop_assert!((to_new / N as f64 - expected).abs() <= 0.04,
            "old {:?} new {:?}: {} of {} to new, expected {:.3}", old, new, to_new, N, expected);
    }
}
