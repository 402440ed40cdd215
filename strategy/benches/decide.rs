//! `decide` with 1,000,000 ids and 10,000 intervals (issue 3's goal: < 150 ns a decision).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use graylane_strategy::id::{IdList, Interval};
use graylane_strategy::spec::{ClusterSpec, IdSpec, PercentBy, PercentSpec, State, StrategySpec};
use graylane_strategy::{decide, Compiled, Health, RequestView};

fn big() -> Compiled {
    let mut spec: StrategySpec =
        serde_json::from_str(r#"{"route-strategy": {"B": {"status": "G", "id": {"all": true}}}}"#)
            .expect("spec");
    // 1,000,000 ids spread over 0..3,000,000; 10,000 intervals above 10,000,000.
    let nums: Vec<u64> = (0..1_000_000u64).map(|i| i * 3).collect();
    let interval = (0..10_000u64)
        .map(|i| Interval {
            lo: 10_000_000 + i * 1_000,
            hi: 10_000_000 + i * 1_000 + 99,
        })
        .collect();
    let gray: ClusterSpec = serde_json::from_str(r#"{"status": "Y"}"#).expect("cluster");
    let gray = ClusterSpec {
        status: State::Y,
        id: IdSpec {
            all: false,
            ids: IdList {
                nums: nums.into(),
                strs: vec![],
            },
            interval,
        },
        percent: Some(PercentSpec {
            value: 5.0,
            by: PercentBy::Tenant,
            salt: 0,
        }),
        ..gray
    };
    spec.clusters.insert("A".into(), gray);
    Compiled::try_from(spec).expect("compile")
}

fn bench(c: &mut Criterion) {
    let compiled = big();
    let cases = [
        ("id_hit", "2999997"),
        ("interval_hit", "10500050"),
        ("miss_percent", "2999998"),
    ];
    for (name, tenant) in cases {
        let headers = vec![
            (":path".to_string(), b"/api/orders?x=1".to_vec()),
            (":authority".to_string(), b"shop.example".to_vec()),
            ("user-agent".to_string(), b"curl/8".to_vec()),
            ("x-tenant-id".to_string(), tenant.as_bytes().to_vec()),
            (
                "cookie".to_string(),
                b"rememberMe=abc; channel=web".to_vec(),
            ),
        ];
        let mut draw = 0u64;
        c.bench_function(&format!("decide_1M_ids_10k_intervals/{name}"), |b| {
            b.iter(|| {
                draw = draw.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let req = RequestView {
                    headers: black_box(&headers),
                    tenant: None,
                    own_lane: None,
                    now: None,
                    draw,
                };
                black_box(decide(&compiled, &Health::UNKNOWN, &req))
            })
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
