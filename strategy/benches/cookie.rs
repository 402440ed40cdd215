//! What a signed gray cookie costs `decide`: the first time (an Ed25519 `verify_strict`), and
//! once its verdict is remembered (the filter keeps a bounded cache per VM; here a one-entry
//! stand-in that answers without verifying, so the figure is `decide` with a cache hit minus
//! the cache's own lookup). Under V8: `make bench` runs this file compiled to wasm32-wasip1
//! in Node as well (scripts/wasm-runner.mjs).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use graylane_strategy::cookie::{self, Signatures, Signed, SigningKey};
use graylane_strategy::{decide, decide_with, parse_json, Compiled, Health, Id, RequestView};

/// Remembers nothing and says yes: the cost of everything but the verification itself.
struct Remembered;

impl Signatures for Remembered {
    fn verify(&self, _: &Signed<'_>) -> bool {
        true
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
    let value = cookie::sign(&key, "k2026a", &Id::Num(300), 4_000_000_000);
    let headers = vec![
        (":path".to_string(), b"/api/orders?x=1".to_vec()),
        ("x-tenant-id".to_string(), b"300".to_vec()),
        (
            "cookie".to_string(),
            format!("rememberMe=abc; tenantGray={value}; channel=web").into_bytes(),
        ),
    ];
    let req = RequestView {
        headers: &headers,
        tenant: None,
        own_lane: None,
        now: Some(1_800_000_000),
        draw: 0,
    };
    let gray = decide(&compiled, &Health::UNKNOWN, &req);
    assert_eq!(gray.target(&compiled).unwrap().key, "gray");
    c.bench_function("gray_cookie/first_verification", |b| {
        b.iter(|| black_box(decide(&compiled, &Health::UNKNOWN, black_box(&req))))
    });
    c.bench_function("gray_cookie/verdict_remembered", |b| {
        b.iter(|| {
            black_box(decide_with(
                &compiled,
                &Health::UNKNOWN,
                black_box(&req),
                &Remembered,
            ))
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
