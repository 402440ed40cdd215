//! The live feed's wire types: what a data plane asks (`GET /v1/feed/{service}?...`) and what
//! the control plane answers. One definition for the control plane, which writes them, and for
//! every data plane that reads them (the Envoy filter, the nginx library).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// The query of one long-poll: what the caller holds, how long it may wait.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams))]
pub struct Query {
    /// The identity of the store the caller's version came from (0: none). Versions of another
    /// store (a control plane that lost its data) are not comparable: a new epoch is always news.
    #[serde(default)]
    pub epoch: u64,
    /// The strategy version the caller holds (0: none).
    #[serde(default)]
    pub version: u64,
    /// The health generation the caller holds (0: none).
    #[serde(default)]
    pub health: u64,
    /// How long the control plane may hold the call when nothing is new (milliseconds).
    #[serde(default)]
    pub wait_ms: u64,
    /// Whether the answer carries each cluster's endpoints (data planes that balance
    /// themselves, such as nginx; Envoy takes endpoints over xDS instead).
    #[serde(default)]
    pub endpoints: bool,
    /// The preview the caller evaluates (0: none). Absent: the caller does not evaluate
    /// previews, and a preview is never news to it (so a data plane that predates previews,
    /// or does not run them, is not woken by one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview: Option<u64>,
}

impl Query {
    /// The request path and query string for `service`.
    pub fn path(&self, service: &str) -> String {
        let mut p = format!(
            "/v1/feed/{service}?epoch={}&version={}&health={}&wait_ms={}",
            self.epoch, self.version, self.health, self.wait_ms
        );
        if self.endpoints {
            let _ = write!(p, "&endpoints=true");
        }
        if let Some(id) = self.preview {
            let _ = write!(p, "&preview={id}");
        }
        p
    }
}

/// A `200` answer. `S` is how the strategy is carried: the control plane writes its stored
/// JSON verbatim (`&RawValue`), a data plane keeps it raw until it compiles it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Reply<S> {
    pub service: String,
    /// The store's identity (see [`Query::epoch`]).
    #[serde(default)]
    pub epoch: u64,
    /// The version at which this service's strategy last changed.
    pub version: u64,
    /// Moves whenever `healthy` (or, for callers that asked, `endpoints`) changes.
    pub health: u64,
    /// The strategy, or `null` when the caller's version is current (a health-only change).
    #[serde(default)]
    pub strategy: Option<S>,
    /// Healthy endpoint count per cluster key; `null` is unknown.
    #[serde(default)]
    pub healthy: BTreeMap<String, Option<u32>>,
    /// Healthy endpoints per cluster key, when the query asked for them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<BTreeMap<String, Vec<Endpoint>>>,
    /// The preview running for this service, for callers that asked (`Query::preview`);
    /// absent: none (a caller evaluating one stops).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview: Option<PreviewReply<S>>,
}

/// A candidate strategy to evaluate beside the live one, never to route by.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PreviewReply<S> {
    /// Never 0.
    pub id: u64,
    /// Evaluate one request in `every` (1: every request).
    pub every: u32,
    /// The candidate, or `null` when the caller holds this preview already.
    #[serde(default)]
    pub strategy: Option<S>,
}

/// One healthy endpoint of a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Endpoint {
    pub address: String,
    pub port: u16,
}

/// The query of the catalog long-poll (`GET /v1/feed?...`): which list the caller holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams))]
pub struct CatalogQuery {
    /// The [`Catalog::digest`] the caller holds (0: none).
    #[serde(default)]
    pub digest: u64,
    /// How long the control plane may hold the call when the list is the same (milliseconds).
    #[serde(default)]
    pub wait_ms: u64,
}

impl CatalogQuery {
    pub fn path(&self) -> String {
        format!("/v1/feed?digest={}&wait_ms={}", self.digest, self.wait_ms)
    }
}

/// Every service the control plane manages (a filter serving "every service" follows each
/// one's feed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Catalog {
    /// The store's identity (see [`Query::epoch`]).
    #[serde(default)]
    pub epoch: u64,
    /// [`names_digest`] of the names: moves exactly when the set of services does.
    pub digest: u64,
    /// Sorted by name.
    pub services: Vec<Listed>,
}

/// One service of the [`Catalog`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Listed {
    pub name: String,
    /// The version at which its strategy last changed.
    pub version: u64,
}

/// A stable digest of a set of service names (given sorted): FNV-1a over the names, each
/// followed by a newline. Never 0 (0 is "none held").
pub fn names_digest<'a>(sorted: impl IntoIterator<Item = &'a str>) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for name in sorted {
        for b in name.bytes().chain(std::iter::once(b'\n')) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h.max(1)
}

#[cfg(test)]
mod catalog_tests {
    use super::*;

    #[test]
    fn the_names_digest_is_stable_and_moves_with_the_set() {
        // Golden: the same on every target (the filter and the control plane compare it).
        assert_eq!(names_digest([]), 0xcbf2_9ce4_8422_2325);
        assert_eq!(names_digest(["a", "b"]), names_digest(["a", "b"]));
        assert_ne!(names_digest(["a", "b"]), names_digest(["ab"]));
        assert_ne!(names_digest(["a"]), names_digest(["a", "b"]));
        assert_eq!(
            CatalogQuery {
                digest: 7,
                wait_ms: 20
            }
            .path(),
            "/v1/feed?digest=7&wait_ms=20"
        );
    }
}
