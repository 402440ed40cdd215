//! The plugin configuration (JSON), parsed once in `on_configure`.

use std::collections::BTreeMap;

use graylane_strategy::spec::{parse_json_as, parse_json_reader_as};
use graylane_strategy::{Error, StrategySpec};
use serde::Deserialize;

/// What Envoy hands the filter as `configuration`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// The service this filter routes (names metrics and the feed).
    pub service: String,
    /// Request header carrying the chosen Envoy cluster; routes match it with `cluster_header`.
    #[serde(default = "default_route_header")]
    pub route_header: String,
    /// If set, a response header carrying `<cluster>;<reason>` for debugging.
    #[serde(default)]
    pub reason_header: Option<String>,
    /// The strategy to start with; the live feed replaces it. Required without a control plane.
    #[serde(default)]
    pub strategy: Option<StrategySpec>,
    /// Healthy endpoint counts per cluster key to start with (a filter without a control
    /// plane; the feed replaces them). A cluster below the strategy's `min_healthy` is skipped.
    #[serde(default)]
    pub healthy: BTreeMap<String, u32>,
    /// Where to poll for live strategy updates.
    #[serde(default)]
    pub control_plane: Option<ControlPlane>,
    /// Ids, intervals and match rules a strategy may have, here and from the feed (a larger
    /// one is refused and the last good one keeps routing).
    #[serde(default)]
    pub limits: graylane_strategy::SizeLimits,
}

/// The control plane's feed endpoint, reached through an Envoy cluster.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlPlane {
    /// The Envoy cluster that reaches the control plane (must exist in Envoy's config).
    pub cluster: String,
    /// `:authority` for the feed requests.
    #[serde(default = "default_authority")]
    pub authority: String,
    /// How long the control plane may hold a long-poll, in milliseconds.
    #[serde(default = "default_wait_ms")]
    pub wait_ms: u64,
    /// Tick period: how often each worker checks shared data and whether to poll.
    #[serde(default = "default_tick_ms")]
    pub tick_ms: u64,
    /// Optional bearer token for the feed.
    #[serde(default)]
    pub token: Option<String>,
    /// How often the traffic seen here is reported to the control plane, in milliseconds
    /// (one worker per Envoy sends; 0 turns reports off).
    #[serde(default = "default_report_ms")]
    pub report_ms: u64,
}

fn default_route_header() -> String {
    "x-graylane-cluster".into()
}
fn default_authority() -> String {
    "graylane-control-plane".into()
}
fn default_wait_ms() -> u64 {
    20_000
}
fn default_tick_ms() -> u64 {
    100
}
fn default_report_ms() -> u64 {
    1_000
}

impl PluginConfig {
    /// Parses and checks the configuration; the error names the field.
    pub fn parse(bytes: &[u8]) -> Result<PluginConfig, Error> {
        Self::check(parse_json_as(bytes)?)
    }

    /// As [`PluginConfig::parse`], reading the text in pieces (`on_configure` reads Envoy's
    /// buffer a chunk at a time, so a million-id whitelist is never held as text and as ids
    /// at once: a Wasm heap never shrinks).
    pub fn parse_reader(reader: impl std::io::Read) -> Result<PluginConfig, Error> {
        Self::check(parse_json_reader_as(reader)?)
    }

    fn check(cfg: PluginConfig) -> Result<PluginConfig, Error> {
        use graylane_strategy::name;
        if !name::service(&cfg.service) {
            return Err(invalid("service", "use letters, digits, '-', '_' or '.'"));
        }
        if !name::token(&cfg.route_header) {
            return Err(invalid("route_header", "not a valid header name"));
        }
        if cfg
            .reason_header
            .as_deref()
            .is_some_and(|h| !name::token(h))
        {
            return Err(invalid("reason_header", "not a valid header name"));
        }
        if cfg.strategy.is_none() && cfg.control_plane.is_none() {
            return Err(invalid(
                "strategy",
                "give a strategy, a control_plane, or both",
            ));
        }
        if let Some(cp) = &cfg.control_plane {
            if cp.cluster.is_empty() {
                return Err(invalid("control_plane.cluster", "empty cluster name"));
            }
            if !(10..=60_000).contains(&cp.tick_ms) {
                return Err(invalid("control_plane.tick_ms", "must be 10 to 60000"));
            }
            if cp.report_ms != 0 && !(100..=60_000).contains(&cp.report_ms) {
                return Err(invalid(
                    "control_plane.report_ms",
                    "0 (off) or 100 to 60000",
                ));
            }
            if cp.wait_ms > 300_000 {
                return Err(invalid("control_plane.wait_ms", "at most 300000"));
            }
        }
        Ok(cfg)
    }
}

fn invalid(path: &str, message: &str) -> Error {
    Error::Invalid {
        path: path.into(),
        message: message.into(),
    }
}
