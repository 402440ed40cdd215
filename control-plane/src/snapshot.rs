//! What the writer publishes: an immutable view of everything, shared as `Arc<Snapshot>`.

use std::collections::BTreeMap;
use std::sync::Arc;

use graylane_strategy::{Compiled, StrategySpec};
use serde::Serialize;

use crate::config::{self, Token};
use crate::discovery::{Endpoint, SourceKind};

/// One service as the API and the feed see it.
#[derive(Debug, Clone)]
pub struct ServiceView {
    pub spec: Arc<StrategySpec>,
    /// The strategy's JSON, as sent to the filters (computed once per version).
    pub json: Arc<Box<serde_json::value::RawValue>>,
    pub compiled: Arc<Compiled>,
    /// The store version at which this service's strategy last changed (the feed version).
    pub version: u64,
    /// Bumped whenever `healthy` changes (the feed's health generation).
    pub health: u64,
    /// Healthy endpoints per cluster key; `None` when no source maps that cluster.
    pub healthy: BTreeMap<String, Option<u32>>,
    /// The healthy endpoints themselves, per mapped cluster key (for data planes that balance
    /// themselves, such as nginx).
    pub endpoints: BTreeMap<String, Vec<Endpoint>>,
}

/// A discovery source's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SourceStatus {
    pub stale: bool,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The store's identity: versions of another store are not comparable.
    pub epoch: u64,
    /// The store's latest version.
    pub version: u64,
    pub services: BTreeMap<String, ServiceView>,
    /// Why the last edit of the config file was rejected (cleared by the next good one).
    pub config_error: Option<config::Error>,
    pub reload_failures: u64,
    pub tokens: Arc<Vec<Token>>,
    pub feed_token: Option<String>,
    pub sources: BTreeMap<SourceKind, SourceStatus>,
    /// Healthy endpoints per Envoy cluster name (for xDS).
    pub endpoints: Arc<BTreeMap<String, Vec<Endpoint>>>,
    /// Bumped whenever `endpoints` changes.
    pub endpoints_version: u64,
    /// Bumped whenever the set of Envoy clusters in `endpoints` changes (CDS).
    pub clusters_version: u64,
}
