//! Consul source: its settings (`Config`), one service's mapping of instances to clusters
//! (`Mapping`), the `/v1/health/service` answer and its grouping into clusters (`health`), and
//! the blocking-query loop (`run`, in `watch`).

mod health;
mod watch;

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Clusters, HumanDuration, Name};

pub use self::watch::run;

/// Global Consul settings (`discovery.consul` in graylane.yaml). `Debug` hides the token.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Base URL of the Consul HTTP API (an agent, usually).
    #[serde(default = "default_address")]
    pub address: String,
    /// ACL token, sent as `X-Consul-Token`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// `dc` query parameter (default: the agent's datacenter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datacenter: Option<String>,
    /// `stale` consistency mode: any server may answer (spreads load, may lag the leader).
    #[serde(default)]
    pub stale: bool,
    /// Blocking query `wait` (Consul caps it at 10m).
    #[serde(default = "default_wait")]
    pub wait: HumanDuration,
    /// Token bucket between the calls of one service loop.
    #[serde(default)]
    pub rate: RateLimit,
    /// Exponential backoff with jitter after errors.
    #[serde(default)]
    pub backoff: BackoffConfig,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("address", &self.address)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("datacenter", &self.datacenter)
            .field("stale", &self.stale)
            .field("wait", &self.wait)
            .field("rate", &self.rate)
            .field("backoff", &self.backoff)
            .finish()
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            address: default_address(),
            token: None,
            datacenter: None,
            stale: false,
            wait: default_wait(),
            rate: RateLimit::default(),
            backoff: BackoffConfig::default(),
        }
    }
}

fn default_address() -> String {
    "http://127.0.0.1:8500".into()
}

fn default_wait() -> HumanDuration {
    HumanDuration(Duration::from_secs(300))
}

/// Token bucket: `per_second` calls on average, bursts of up to `burst`. The default follows
/// Consul's advice (a token bucket with a burst of 2: quick successive deliveries, then
/// polling at a steady rate) with one call a second per service under churn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit {
            per_second: 1.0,
            burst: 2,
        }
    }
}

/// Backoff after errors: `initial`, doubling up to `max`, with "equal jitter" (each delay is
/// drawn uniformly from [d/2, d]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackoffConfig {
    pub initial: HumanDuration,
    pub max: HumanDuration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            initial: HumanDuration(Duration::from_millis(500)),
            max: HumanDuration(Duration::from_secs(30)),
        }
    }
}

/// One graylane service's Consul mapping (`services.<name>.discovery.consul`). Every field
/// holds only valid values, so parsing it is the whole check.
///
/// ```yaml
/// consul:
///   service: web            # Consul service name (default: the graylane service name)
///   meta: profile           # pick the cluster by Service.Meta["profile"]; omit to pick by tag
///   clusters: {gray: A, prod: B}
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mapping {
    /// The Consul service name, when it is not the graylane service's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<Name>,
    /// `Service.Meta` key whose value selects the cluster. Without it, tags select: an
    /// instance belongs to every cluster whose key is one of its tags.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<Name>,
    /// Meta value (or tag) -> graylane cluster.
    pub clusters: Clusters,
}

/// Consul errors: one call of the health endpoint failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `address` is not an HTTP base URL.
    #[error("discovery.consul.address: {0}")]
    Address(String),
    /// `token` cannot be sent as a header value.
    #[error("discovery.consul.token: not a valid header value")]
    Token,
    /// A request to Consul failed before an answer arrived.
    #[error("consul request failed: {0}")]
    Http(#[source] reqwest::Error),
    /// Consul answered with an error status; its body is plain text, kept here.
    #[error("consul answered {status}: {body}")]
    Status { status: u16, body: String },
    /// Consul's answer had no usable `X-Consul-Index` header.
    #[error("consul answer without a valid X-Consul-Index header")]
    Index,
    /// Consul's body was not the documented `/v1/health/service` JSON.
    #[error("consul answer is not valid health JSON: {0}")]
    Body(#[source] serde_json::Error),
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn config_yaml_round_trip() {
        let cfg: Config = serde_saphyr::from_str(
            "address: http://consul:8500\ntoken: s3cr3t\ndatacenter: dc2\nstale: true\nwait: 30s\nrate: {per_second: 2, burst: 3}\n",
        )
        .unwrap();
        assert_eq!(cfg.wait.0, Duration::from_secs(30));
        assert_eq!(cfg.rate.burst, 3);
        assert!(!format!("{cfg:?}").contains("s3cr3t"));
        assert!(serde_saphyr::from_str::<Config>("adress: x\n").is_err());
    }

    #[test]
    fn mappings_parse_into_valid_values_only() {
        let m: Mapping =
            serde_saphyr::from_str("meta: profile\nclusters: {gray: A, prod: B}\n").unwrap();
        assert_eq!(m.meta.as_ref().map(Name::as_str), Some("profile"));
        assert_eq!(m.service, None);
        assert_eq!(m.clusters.get("gray"), Some("A"));
        for bad in [
            "clusters: {}\n",
            "meta: ''\nclusters: {g: A}\n",
            "service: '  '\nclusters: {g: A}\n",
            "meta: profile\n",
            "clusters: {g: A}\ntags: [x]\n",
        ] {
            assert!(serde_saphyr::from_str::<Mapping>(bad).is_err(), "{bad}");
        }
    }
}
