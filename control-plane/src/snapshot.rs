//! What the writer publishes: an immutable view of everything, shared as `Arc<Snapshot>`.
//! Services are `Arc`s, so a publish after one service changed copies pointers, not strategies.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use graylane_strategy::{Compiled, Health, StrategySpec};
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

use crate::api::types::{ConfigError, SourceStatus};
use crate::config::Token;
use crate::discovery::{Endpoint, SourceKind};

/// One service as the API and the feed see it.
#[derive(Debug)]
pub struct ServiceView {
    pub spec: Arc<StrategySpec>,
    pub compiled: Arc<Compiled>,
    /// The store version at which this service's strategy last changed (the feed version).
    pub version: u64,
    /// Bumped whenever `healthy` or `endpoints` change (the feed's health generation).
    pub health: u64,
    /// Healthy endpoints per cluster key; `None` when no source maps that cluster.
    pub healthy: BTreeMap<String, Option<u32>>,
    /// The healthy endpoints themselves, per mapped cluster key (for data planes that balance
    /// themselves, such as nginx).
    pub endpoints: BTreeMap<String, Vec<Endpoint>>,
    /// The strategy's JSON as sent to the filters: made on first use, once per version, off
    /// the writer's path (a million ids take tens of milliseconds to write out).
    pub json: Arc<OnceLock<Box<RawValue>>>,
    /// Cancelled once a later snapshot no longer holds this view (the service changed, its
    /// preview started or ended, or it was removed): the feed's long-polls of this service
    /// wait on it, so a publish wakes only the followers of what it changed.
    pub superseded: CancellationToken,
}

impl ServiceView {
    /// The strategy's JSON (computed once).
    pub fn json(&self) -> &RawValue {
        self.json.get_or_init(|| {
            serde_json::value::to_raw_value(&*self.spec)
                .unwrap_or_else(|_| RawValue::NULL.to_owned())
        })
    }

    /// The same view under a new [`ServiceView::superseded`] (a preview of the service
    /// started or ended: news to its followers although the strategy and health are the same).
    pub fn renewed(&self) -> ServiceView {
        ServiceView {
            spec: self.spec.clone(),
            compiled: self.compiled.clone(),
            version: self.version,
            health: self.health,
            healthy: self.healthy.clone(),
            endpoints: self.endpoints.clone(),
            json: self.json.clone(),
            superseded: CancellationToken::new(),
        }
    }

    /// The health counts as `decide` takes them.
    pub fn health(&self) -> Health {
        Health::from_counts(&self.compiled, self.healthy.iter().map(|(k, v)| (k, *v)))
    }
}

#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The store's identity: versions of another store are not comparable.
    pub epoch: u64,
    /// The store's latest version.
    pub version: u64,
    pub services: BTreeMap<String, Arc<ServiceView>>,
    /// Why the last edit of the config file was rejected (cleared by the next good one).
    pub config_error: Option<ConfigError>,
    /// Fields the last applied config file changed that the API had changed too (the live
    /// values stayed).
    pub config_conflicts: Vec<crate::merge::Conflict>,
    pub reload_failures: u64,
    pub tokens: Arc<Vec<Token>>,
    pub feed_token: Option<crate::config::Secret>,
    /// The gray cookie generator of the config file in force (private keys: never served).
    pub cookie_generator: crate::cookie::Generator,
    pub sources: BTreeMap<SourceKind, SourceStatus>,
    /// Healthy endpoints per Envoy cluster name (for xDS), each list shared (an unchanged
    /// cluster keeps its pointer from one snapshot to the next).
    pub endpoints: Arc<BTreeMap<String, Arc<Vec<Endpoint>>>>,
    /// Bumped whenever `endpoints` changes.
    pub endpoints_version: u64,
    /// Bumped whenever the set of Envoy clusters in `endpoints` changes (CDS).
    pub clusters_version: u64,
    /// Whether `endpoints` may be served to Envoy: every discovery source has synced, or has
    /// its endpoints of the last run restored. Until then xDS answers nothing, so a restarted
    /// control plane never hands Envoy a cluster set emptied by its own start.
    pub xds_ready: bool,
    /// Each service's current (or last) release.
    pub releases: Arc<BTreeMap<String, crate::release::Release>>,
    /// Each service's current (or last) preview; the feed sends the running ones.
    pub previews: Arc<BTreeMap<String, Arc<crate::preview::Live>>>,
    /// Cancelled when the writer stops (long-polls answer at once: the daemon is going down).
    pub stopped: CancellationToken,
}
