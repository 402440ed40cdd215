//! What a signed gray cookie costs `decide` in the filter, natively: the first time in a VM
//! (a miss: Ed25519 verification, then the cookie is remembered, evicting another) and every
//! time after (a hit in the VM's cache). `make bench` measures the same inside Envoy.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use graylane_filter::verdicts::{Cached, Verdicts, CAPACITY};
use graylane_strategy::cookie::{self, SigningKey};
use graylane_strategy::{decide_with, parse_json, Compiled, Headers, Health, Id, RequestView};

/// A request with `headers` at a fixed time.
fn view(headers: &dyn Headers) -> RequestView<'_> {
    RequestView {
        headers,
        tenant: None,
        own_lane: None,
        now: Some(1_800_000_000),
        draw: 0,
    }
}

fn bench(c: &mut Criterion) {
    let key = SigningKey::from_bytes(&[7; 32]);
    let public = cookie::public_key_text(&key.verifying_key());
    let strategy = format!(
        r#"{{"gray_cookie": {{"keys": [{{"id": "k2026a", "public_key": "{public}"}}]}},
        "route-strategy": {{"prod": {{"status": "G", "id": {{"all": true}}}},
                           "gray": {{"status": "Y", "gray_cookie": true}}}}}}"#
    );
    let compiled = Compiled::try_from(parse_json(strategy.as_bytes()).unwrap()).unwrap();
    // Twice as many tenants as the cache holds, visited in turn: every visit misses.
    let requests: Vec<Vec<(String, Vec<u8>)>> = (1..=2 * CAPACITY as u64)
        .map(|t| {
            let value = cookie::sign(&key, "k2026a", &Id::Num(t), 4_000_000_000);
            vec![
                ("x-tenant-id".to_string(), t.to_string().into_bytes()),
                (
                    "cookie".to_string(),
                    format!("rememberMe=abc; tenantGray={value}; channel=web").into_bytes(),
                ),
            ]
        })
        .collect();
    let mut verdicts = Verdicts::default();
    let gray = |d: graylane_strategy::Decision| d.target(&compiled).unwrap().key == "gray";
    {
        let cached = Cached::new(&mut verdicts);
        assert!(gray(decide_with(
            &compiled,
            &Health::UNKNOWN,
            &view(&requests[0]),
            &cached
        )));
        assert!(gray(decide_with(
            &compiled,
            &Health::UNKNOWN,
            &view(&requests[0]),
            &cached
        )));
        assert_eq!((cached.verified.get(), cached.remembered.get()), (1, 1));
    }

    c.bench_function("gray_cookie_in_the_filter/remembered", |b| {
        let req = view(&requests[0]);
        b.iter(|| {
            let cached = Cached::new(&mut verdicts);
            black_box(decide_with(
                &compiled,
                &Health::UNKNOWN,
                black_box(&req),
                &cached,
            ))
        })
    });
    let mut next = 0;
    c.bench_function("gray_cookie_in_the_filter/first_verification", |b| {
        b.iter(|| {
            next = (next + 1) % requests.len();
            let req = view(&requests[next]);
            let cached = Cached::new(&mut verdicts);
            let d = decide_with(&compiled, &Health::UNKNOWN, black_box(&req), &cached);
            debug_assert_eq!(cached.verified.get(), 1);
            black_box(d)
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
