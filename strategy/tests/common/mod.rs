//! Helpers shared by the strategy tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use graylane_strategy::{decide, parse_json, Compiled, Decision, Health, Lane, RequestView};

pub fn compile_json(json: &str) -> Compiled {
    Compiled::try_from(parse_json(json.as_bytes()).expect("parse")).expect("compile")
}

pub fn hdrs(pairs: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect()
}

pub fn decide_with(c: &Compiled, headers: &[(&str, &str)], draw: u64) -> Decision {
    decide_full(c, headers, None, 1_000, draw)
}

/// As [`decide_with`], with these healthy endpoint counts.
pub fn decide_healthy(
    c: &Compiled,
    health: &Health,
    headers: &[(&str, &str)],
    draw: u64,
) -> Decision {
    decide_in(c, health, headers, None, 1_000, draw)
}

pub fn decide_full(
    c: &Compiled,
    headers: &[(&str, &str)],
    own_lane: Option<Lane>,
    now: u64,
    draw: u64,
) -> Decision {
    decide_in(c, &Health::UNKNOWN, headers, own_lane, now, draw)
}

fn decide_in(
    c: &Compiled,
    health: &Health,
    headers: &[(&str, &str)],
    own_lane: Option<Lane>,
    now: u64,
    draw: u64,
) -> Decision {
    let h = hdrs(headers);
    let req = RequestView {
        headers: &h,
        tenant: None,
        own_lane,
        now: Some(now),
        draw,
    };
    decide(c, health, &req)
}

/// The cluster key a tenant goes to.
pub fn target_of(c: &Compiled, tenant: &str) -> Option<String> {
    let d = decide_with(c, &[("x-tenant-id", tenant)], 0);
    d.target(c).map(|t| t.key.clone())
}

pub const SEED_000_JSON: &str = r#"{"route-strategy": {
  "A": {"status": "Y", "id": {"all": false, "ids": [1, 2, 3], "interval": [[1, 100], [600, 10000]]}},
  "B": {"status": "G", "id": {"all": true}}}}"#;

/// A test signing key (never a real one) and its public key as strategies write it.
pub fn test_key(seed: u8) -> (graylane_strategy::cookie::SigningKey, String) {
    let k = graylane_strategy::cookie::SigningKey::from_bytes(&[seed; 32]);
    let public = graylane_strategy::cookie::public_key_text(&k.verifying_key());
    (k, public)
}
