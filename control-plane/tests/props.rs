//! The control plane's parsers on hostile input never panic (issue 10): `graylane.yaml`
//! (arbitrary text and YAML-shaped text), the filters' traffic reports (with preview counts
//! and tenant sketches), a preview's start, the three-way merge. 10,000 cases in CI;
//! `PROPTEST_CASES=1000000` is the documented long run (docs/control-plane.md).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use graylane_control_plane::config::Config;
use graylane_control_plane::traffic::Traffic;
use proptest::prelude::*;

fn cases() -> ProptestConfig {
    ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10_000),
    )
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn config_text_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(text) = std::str::from_utf8(&bytes) {
            let _ = Config::parse(text, Path::new("graylane.yaml"));
        }
    }

    #[test]
    fn yaml_shaped_configs_never_panic(
        listen in "[0-9a-z.:]{0,24}", ttl in "[0-9a-z]{0,8}", limit in any::<i64>(),
        status in "[RGYX]", ids in proptest::collection::vec(any::<i64>(), 0..4),
        lo in any::<i64>(), hi in any::<i64>(), key in "[A-Za-z0-9+/=]{0,48}",
        drain in "[0-9a-z]{0,10}", tls in any::<bool>(),
    ) {
        let tls = if tls { "tls: {cert: c.pem, key: k.pem}\n" } else { "" };
        let text = format!(
            "listen: {listen}\ncookie_ttl: {ttl}\nlimits: {{body_bytes: {limit}, failed_auth: {limit}}}\n\
             cookie_keys: [{{id: k1, private_key: \"{key}\"}}]\n{tls}\
             discovery: {{consul: {{address: http://127.0.0.1:1, drain: {drain}}}}}\n\
             services:\n  web:\n    route-strategy:\n      A: {{status: {status}, id: {{ids: {ids:?}, interval: [[{lo}, {hi}]]}}}}\n"
        );
        let _ = Config::parse(&text, Path::new("graylane.yaml"));
    }

    #[test]
    fn reports_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(report) = serde_json::from_slice::<graylane_strategy::traffic::Report>(&bytes) {
            let mut t = Traffic::default();
            let _ = t.ingest_with_preview("web", report, |_| true, Some(7), 1_000);
            let _ = t.view("web", &["A".to_string()], 2_000);
            let _ = t.preview("web", 7);
        }
        let _ = serde_json::from_slice::<graylane_control_plane::preview::Start>(&bytes);
    }

    #[test]
    fn report_shaped_json_never_panics(
        node in "[ -~]{0,12}", worker in any::<u64>(), seq in any::<u64>(),
        requests in any::<u64>(), classes in proptest::collection::vec(any::<u64>(), 5),
        latency in proptest::collection::vec(any::<u64>(), 0..30), hll in "[A-Za-z0-9+/=]{0,64}",
        exact in proptest::collection::vec(any::<u64>(), 0..4), id in any::<u64>(),
    ) {
        let json = format!(
            r#"{{"node": {node:?}, "workers": [{{"worker": {worker}, "seq": {seq},
               "clusters": {{"A": {{"requests": {requests}, "classes": {classes:?}, "latency": {latency:?}}}}},
               "preview": {{"id": {id}, "pairs": [{{"from": "A", "to": null, "requests": {requests},
                 "tenants": {{"exact": {exact:?}, "hll": "{hll}"}}}}]}}}}]}}"#
        );
        if let Ok(report) = serde_json::from_str::<graylane_strategy::traffic::Report>(&json) {
            let mut t = Traffic::default();
            for at in [1_000, 2_000] {
                let _ = t.ingest_with_preview("web", report.clone(), |_| true, Some(id), at);
            }
            let v = t.view("web", &["A".to_string()], 2_500);
            prop_assert!(v.clusters.len() <= 2);
            let (pairs, _) = t.preview("web", id);
            for p in pairs {
                let _ = p.tenants.count();
            }
        }
    }

    #[test]
    fn the_merge_never_panics(
        a in proptest::collection::vec(("[ab]", "[RGY]"), 0..3),
        b in proptest::collection::vec(("[ab]", "[RGY]"), 0..3),
        c in proptest::collection::vec(("[ab]", "[RGY]"), 0..3),
        file_wins in any::<bool>(),
    ) {
        let side = |v: &[(String, String)]| -> std::collections::BTreeMap<String, serde_json::Value> {
            v.iter()
                .map(|(k, s)| (k.clone(), serde_json::json!({"route-strategy": {"A": {"status": s}}})))
                .collect()
        };
        let prefer = if file_wins {
            graylane_control_plane::merge::Prefer::File
        } else {
            graylane_control_plane::merge::Prefer::Live
        };
        let (base, file, live) = (side(&a), side(&b), side(&c));
        let m = graylane_control_plane::merge::three_way(Some(&base), &file, &live, prefer);
        // A service the file did not change keeps its live value; one only the file changed
        // takes the file's; with the file winning, no conflict keeps a live value.
        let keys: std::collections::BTreeSet<&String> =
            base.keys().chain(file.keys()).chain(live.keys()).collect();
        for k in keys {
            let got = m.services.get(k);
            if base.get(k) == file.get(k) {
                prop_assert_eq!(got, live.get(k));
            } else if live.get(k) == base.get(k) || file_wins {
                prop_assert_eq!(got, file.get(k));
            }
        }
    }
}
