//! The filter's own parsers (plugin configuration, feed answers) never panic on arbitrary
//! input, and reading the configuration in pieces accepts exactly what reading it whole does.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;

use graylane_filter::{parse_reply, PluginConfig};
use proptest::prelude::*;

/// Hands out at most `n` bytes a call, like `on_configure` reading Envoy's buffer in chunks.
struct Pieces<'a> {
    rest: &'a [u8],
    n: usize,
}

impl Read for Pieces<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.n).min(self.rest.len());
        buf[..n].copy_from_slice(&self.rest[..n]);
        self.rest = &self.rest[n..];
        Ok(n)
    }
}

fn both(bytes: &[u8], n: usize) -> (Result<String, String>, Result<String, String>) {
    let whole = PluginConfig::parse(bytes)
        .map(|c| format!("{c:?}"))
        .map_err(|e| e.path().to_string());
    let pieces = PluginConfig::parse_reader(std::io::BufReader::with_capacity(
        7,
        Pieces { rest: bytes, n },
    ))
    .map(|c| format!("{c:?}"))
    .map_err(|e| e.path().to_string());
    (whole, pieces)
}

#[test]
fn a_good_configuration_reads_alike_in_pieces() {
    let cfg = br#"{"service": "web", "reason_header": "x-graylane-reason",
        "strategy": {"route-strategy": {"A": {"status": "Y", "id": {"ids": [1, 2, 3], "interval": [[1, 100], [600, 10000]]}},
                                        "B": {"status": "G", "id": {"all": true}}}},
        "control_plane": {"cluster": "graylane_cp", "tick_ms": 100}}"#;
    let (whole, pieces) = both(cfg, 5);
    assert!(whole.is_ok(), "{whole:?}");
    assert_eq!(whole, pieces);
    let bad = br#"{"service": "web", "strategy": {"route-strategy": {"A": {"status": "Q"}}}}"#;
    let (whole, pieces) = both(bad, 3);
    assert_eq!(whole, Err("strategy.route-strategy.A.status".to_string()));
    assert_eq!(whole, pieces);
}

#[test]
fn a_filter_serves_one_service_listed_services_or_all() {
    use graylane_filter::Serves;
    let serves = |json: &str| PluginConfig::parse(json.as_bytes()).map(|c| c.serves());
    let cp = r#""control_plane": {"cluster": "cp"}"#;
    assert_eq!(
        serves(&format!(r#"{{"service": "b", {cp}}}"#)).unwrap(),
        Serves::One("b".into())
    );
    assert_eq!(serves(&format!("{{{cp}}}")).unwrap(), Serves::All);
    assert_eq!(
        serves(&format!(r#"{{"services": "all", {cp}}}"#)).unwrap(),
        Serves::All
    );
    assert_eq!(
        serves(&format!(
            r#"{{"services": ["a", "b"], "hosts": {{"shop.example.com": "a"}}, {cp}}}"#
        ))
        .unwrap(),
        Serves::Listed(vec!["a".into(), "b".into()])
    );
    // Each mistake names its field.
    for (json, field) in [
        (
            r#"{"strategy": {"route-strategy": {"A": {"status": "G"}}}}"#.to_string(),
            "control_plane",
        ),
        (
            format!(r#"{{"strategy": {{"route-strategy": {{"A": {{"status": "G"}}}}}}, {cp}}}"#),
            "strategy",
        ),
        (
            format!(r#"{{"service": "b", "services": ["a"], {cp}}}"#),
            "services",
        ),
        (format!(r#"{{"services": "some", {cp}}}"#), "services"),
        (format!(r#"{{"services": [], {cp}}}"#), "services"),
        (
            format!(r#"{{"services": ["a", "b c"], {cp}}}"#),
            "services[1]",
        ),
        (
            format!(r#"{{"services": ["a"], "hosts": {{"shop": "b"}}, {cp}}}"#),
            "hosts.shop",
        ),
        (
            format!(r#"{{"hosts": {{"shop:80": "a"}}, {cp}}}"#),
            "hosts.shop:80",
        ),
        (
            format!(r#"{{"service": "b", "hosts": {{"shop": "b"}}, {cp}}}"#),
            "hosts",
        ),
    ] {
        let err = PluginConfig::parse(json.as_bytes()).expect_err(&json);
        assert_eq!(err.path(), field, "{json}: {err}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000)))]

    #[test]
    fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), n in 1usize..64) {
        let (whole, pieces) = both(&bytes, n);
        prop_assert_eq!(whole.is_ok(), pieces.is_ok());
        let _ = parse_reply(&bytes);
    }

    #[test]
    fn json_shaped_configurations_never_panic(
        service in "[a-z.\\- ]{0,8}", header in "[A-Za-z:\\-]{0,8}", tick in any::<i64>(),
        wait in any::<u64>(), status in "[RGYX]", n in 1usize..64,
    ) {
        let cfg = format!(r#"{{"service": "{service}", "route_header": "{header}",
            "strategy": {{"route-strategy": {{"A": {{"status": "{status}"}}}}}},
            "control_plane": {{"cluster": "cp", "tick_ms": {tick}, "wait_ms": {wait}}}}}"#);
        let (whole, pieces) = both(cfg.as_bytes(), n);
        prop_assert_eq!(whole, pieces);
        let feed = format!(r#"{{"service": "{service}", "version": {wait}, "health": {tick},
            "strategy": {{"route-strategy": {{"A": {{"status": "{status}"}}}}}}}}"#);
        let _ = parse_reply(feed.as_bytes());
    }

    /// What other workers wrote in Envoy's shared data (strategy, health, preview, lease,
    /// worker lists) is read back without trust.
    #[test]
    fn shared_data_decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = graylane_filter::feed::decode_strategy(&bytes);
        let _ = graylane_filter::feed::decode_health(&bytes);
        let _ = graylane_filter::feed::decode_preview(&bytes);
        let _ = graylane_filter::feed::decode_lease(&bytes);
        let _ = graylane_filter::feed::decode_list(Some(&bytes));
        let _ = serde_json::from_slice::<graylane_strategy::traffic::WorkerCounts>(&bytes);
    }
}
