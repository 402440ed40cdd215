//! The plugin configuration (JSON), parsed once in `on_configure`.
//!
//! Which services a filter serves:
//! - `service: "b"`: one service, decided for every request the filter sees (whatever its
//!   destination), with an optional inline `strategy`;
//! - `services: ["a", "b"]`: these services, each request by its destination (`:authority`,
//!   see `destination.rs`); requests to other destinations are left alone;
//! - `services: "all"`, or neither key: every service the control plane manages (its catalog,
//!   `GET /v1/feed`), by destination likewise.

use std::collections::BTreeMap;

use graylane_strategy::spec::{parse_json_as, parse_json_reader_as};
use graylane_strategy::{Error, StrategySpec};
use serde::Deserialize;

/// What Envoy hands the filter as `configuration`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// The one service this filter routes, for every request it sees (names metrics and the
    /// feed). Without it, the filter serves [`PluginConfig::services`] by destination.
    #[serde(default)]
    pub service: Option<String>,
    /// The services this filter serves, each request by its destination: a list of names, or
    /// `"all"` (the default without `service`: every service the control plane manages).
    #[serde(default)]
    pub services: Option<Services>,
    /// Destinations that are not named after their service (an ingress gateway's public host):
    /// host (without port, any case) -> service. Looked up before the name rules.
    #[serde(default)]
    pub hosts: BTreeMap<String, String>,
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

/// `"all"` or a list of service names.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Services {
    All(String),
    List(Vec<String>),
}

/// Which services a filter serves, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Serves {
    /// One service, every request.
    One(String),
    /// These services, by destination.
    Listed(Vec<String>),
    /// Every service of the control plane's catalog, by destination.
    All,
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

    /// Which services this configuration serves (checked by `parse`).
    pub fn serves(&self) -> Serves {
        match (&self.service, &self.services) {
            (Some(s), _) => Serves::One(s.clone()),
            (None, Some(Services::List(l))) => Serves::Listed(l.clone()),
            (None, _) => Serves::All,
        }
    }

    fn check(cfg: PluginConfig) -> Result<PluginConfig, Error> {
        use graylane_strategy::name;
        const NAME: &str = "use letters, digits, '-', '_' or '.'";
        if cfg.service.as_deref().is_some_and(|s| !name::service(s)) {
            return Err(invalid("service", NAME));
        }
        match &cfg.services {
            Some(_) if cfg.service.is_some() => {
                return Err(invalid("services", "give service or services, not both"));
            }
            Some(Services::All(all)) if all != "all" => {
                return Err(invalid("services", "\"all\" or a list of service names"));
            }
            Some(Services::List(list)) => {
                if list.is_empty() {
                    return Err(invalid("services", "an empty list serves nothing"));
                }
                for (i, s) in list.iter().enumerate() {
                    if !name::service(s) {
                        return Err(invalid(&format!("services[{i}]"), NAME));
                    }
                }
            }
            _ => {}
        }
        for (host, service) in &cfg.hosts {
            let path = format!("hosts.{host}");
            if host.is_empty() || host.contains(':') || !host.is_ascii() {
                return Err(invalid(&path, "a host name without port"));
            }
            if !name::service(service) {
                return Err(invalid(&path, NAME));
            }
            if let Some(Services::List(list)) = &cfg.services {
                if !list.contains(service) {
                    return Err(invalid(&path, "not one of services"));
                }
            }
        }
        if cfg.service.is_none() {
            if cfg.control_plane.is_none() {
                return Err(invalid(
                    "control_plane",
                    "serving services by destination takes their strategies from a control plane",
                ));
            }
            if cfg.strategy.is_some() || !cfg.healthy.is_empty() {
                return Err(invalid(
                    "strategy",
                    "an inline strategy (and healthy) needs one service (service)",
                ));
            }
        } else if !cfg.hosts.is_empty() {
            return Err(invalid(
                "hosts",
                "one service (service) routes every request already",
            ));
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
