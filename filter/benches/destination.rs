//! What finding a request's service costs the filter serving many (natively): the host as it
//! arrives -> the service's index, among 60 services, for the host shapes a sidecar sees.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use graylane_filter::destination::Destinations;

fn bench(c: &mut Criterion) {
    let names: Vec<String> = (0..60).map(|i| format!("service-{i:02}")).collect();
    let hosts = BTreeMap::from([("shop.example.com".to_string(), "service-07".to_string())]);
    let d = Destinations::new(
        names.iter().enumerate().map(|(i, n)| (i, n.as_str())),
        &hosts,
        Some("prod"),
    );
    for host in [
        "service-42",
        "service-42.gray:8080",
        "Service-42.prod.svc.cluster.local:8080",
        "shop.example.com",
        "unmanaged.prod.svc.cluster.local:8080",
    ] {
        assert!(d.find(host.as_bytes()).is_some() || host.starts_with("unmanaged"));
        c.bench_function(&format!("destination {host}"), |b| {
            b.iter(|| d.find(black_box(host.as_bytes())))
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
