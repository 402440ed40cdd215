//! Every request and response of the admin API and the feed, in one place: the server answers
//! with them, the typed client (`client.rs`, used by the CLI and the tests) reads them, and the
//! OpenAPI document is generated from them. The feed's reply is the strategy crate's
//! `feed::Reply`, which the filter parses too.

use std::collections::BTreeMap;

use graylane_strategy::id::{IdList, Interval};
use graylane_strategy::{Explanation, Lane, PercentSpec, State, StrategySpec, Weight};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

pub use crate::config::Error as ConfigError;
pub use crate::store::{Operation, VersionRow};
pub use graylane_strategy::feed::{Endpoint, Query as FeedQuery, Reply as FeedReply};

/// What a write made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Written {
    pub version: u64,
    /// False when the edit changed nothing (no new version).
    pub changed: bool,
    /// One line per change, e.g. `web.A: status Y -> R`.
    pub summary: Vec<String>,
}

/// An error: a stable code, a message, and the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// `unauthorized`, `forbidden`, `not_found`, `invalid`, `conflict`, `too_large`,
    /// `too_many_failures`,
    /// `unavailable`, `store_error`.
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// One cluster of a service, as listed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ClusterSummary {
    pub key: String,
    pub envoy_cluster: String,
    pub status: State,
    pub weight: Weight,
    pub all: bool,
    pub ids: usize,
    pub intervals: usize,
    pub percent: Option<PercentSpec>,
    /// Healthy endpoints, when a discovery source maps this cluster.
    pub healthy: Option<u32>,
}

/// One service, as listed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ServiceSummary {
    pub name: String,
    /// The version at which its strategy last changed.
    pub version: u64,
    /// Its health generation.
    pub health: u64,
    pub clusters: Vec<ClusterSummary>,
}

/// A discovery source's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SourceStatus {
    /// True once every part of the source has delivered its first complete answer.
    pub synced: bool,
    /// True while the source has lost its registry (its last endpoints are kept).
    pub stale: bool,
    /// True while endpoints kept from the last run are served for it (until it syncs).
    pub restored: bool,
    pub error: Option<String>,
}

/// `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Status {
    pub version: u64,
    pub services: Vec<ServiceSummary>,
    pub config_error: Option<ConfigError>,
    /// Fields the last applied config file changed that the API had changed too: the live
    /// values stayed (`graylane reload --file-wins` takes the file's).
    #[serde(default)]
    pub config_conflicts: Vec<crate::merge::Conflict>,
    pub reload_failures: u64,
    pub sources: BTreeMap<String, SourceStatus>,
    /// The Istio routes the control plane applies (`istio.apply`), per service; absent when
    /// it does not apply them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub istio: Option<Vec<IstioRoutes>>,
}

/// One service's DestinationRule(s) and VirtualService, as the control plane applies them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct IstioRoutes {
    pub service: String,
    /// The strategy version they are rendered from.
    pub version: u64,
    /// The last version whose objects are all applied (`null`: none yet).
    pub applied_version: Option<u64>,
    /// Objects applied since the control plane started (unchanged ones are not sent again).
    pub objects_applied: u64,
    /// Failed attempts since the control plane started.
    pub failures: u64,
    /// The last failure, while `version` is not applied (retried with backoff).
    pub error: Option<String>,
}

/// `POST /v1/config/reload`: what applying the config file again made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Reloaded {
    pub written: Written,
    /// The fields changed in both places (kept live, or taken from the file with `prefer=file`).
    pub conflicts: Vec<crate::merge::Conflict>,
}

/// `?prefer=` of a reload.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
pub struct ReloadQuery {
    /// `live` (default): API edits win conflicts; `file`: the file's values do.
    #[serde(default)]
    pub prefer: PreferParam,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PreferParam {
    #[default]
    Live,
    File,
}

/// `GET /v1/services`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ServiceList {
    pub version: u64,
    pub services: Vec<ServiceSummary>,
}

/// `GET /v1/services/{service}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ServiceDetail {
    pub name: String,
    pub version: u64,
    pub health: u64,
    pub healthy: BTreeMap<String, Option<u32>>,
    pub strategy: StrategySpec,
}

/// `PUT .../clusters/{cluster}/state`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StateChange {
    pub state: State,
}

/// `POST .../whitelist/add` and `.../whitelist/remove`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WhitelistChange {
    #[serde(default)]
    pub ids: IdList,
    #[serde(default)]
    pub intervals: Vec<Interval>,
    /// Sets `id.all`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub all: Option<bool>,
}

/// `PUT .../clusters/{cluster}/percent`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PercentChange {
    /// `null` removes the percentage rule.
    pub percent: Option<PercentSpec>,
}

/// `POST /v1/services/{service}/explain`: a request as the filter would see it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExplainRequest {
    #[serde(default)]
    pub tenant: Option<String>,
    #[serde(default)]
    pub cookies: BTreeMap<String, String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub caller_lane: Option<Lane>,
    /// The random draw (per-request percentages, weighted ties); 0 if absent.
    #[serde(default)]
    pub draw: u64,
}

/// The answer of explain: the filter's own decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ExplainResponse {
    pub service: String,
    pub version: u64,
    pub decision: Explanation,
}

/// `GET /v1/history`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct History {
    pub versions: Vec<VersionRow>,
}

/// `GET /v1/operations`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Operations {
    pub operations: Vec<Operation>,
}

/// `GET /v1/diff`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Diff {
    pub from: u64,
    pub to: u64,
    pub changes: Vec<String>,
}

/// `POST /v1/revert`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Revert {
    pub version: u64,
    /// Revert only this service to what it was at `version`; the others stay as they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
}

/// `?limit=` of the listings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
pub struct Limit {
    /// How many rows, newest first (default 100).
    #[serde(default = "default_limit")]
    pub limit: u64,
}

fn default_limit() -> u64 {
    100
}

/// `?force=true` on a write: accept a version that leaves the service no cluster able to take
/// default traffic (no G cluster, or only unhealthy ones while another is healthy).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
pub struct Force {
    #[serde(default)]
    pub force: bool,
}

/// `?from=&to=` of the diff.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
pub struct DiffRange {
    pub from: u64,
    pub to: u64,
}

/// `POST /v1/services/{s}/release/{action}`: why (kept in the release's log).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReleaseActionBody {
    #[serde(default)]
    pub why: String,
}

/// `GET /v1/releases`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Releases {
    pub releases: Vec<crate::release::Release>,
}

/// `POST /v1/services/{service}/gray-cookie`: which tenant the auth service asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GrayCookieRequest {
    /// The tenant id (digits, or text without `;`, `,`, `"`, `\`, spaces).
    pub tenant: String,
}

/// The gray cookie of one tenant, ready for `Set-Cookie`: signed `1.<tenant>.<expiry>.<key
/// id>.<signature>` when the live strategy puts the tenant in gray by its id, else `0` (seed
/// 003's cookie generator).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct GrayCookie {
    pub service: String,
    /// The strategy version the answer was decided on.
    pub version: u64,
    pub tenant: String,
    /// Whether the tenant is in gray (the value is signed) or not (`0`).
    pub gray: bool,
    /// The cookie's name (`gray_cookie.name`, `tenantGray` by default).
    pub name: String,
    pub value: String,
    /// `name=value` with `Max-Age`, `Path=/`, `Secure`, `HttpOnly`, `SameSite=Lax`: a
    /// `Set-Cookie` header value as it stands.
    pub set_cookie: String,
    /// Seconds the cookie lives (its expiry minus now).
    pub max_age: u64,
    /// Unix seconds after which the filters no longer honour it (signed cookies only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<u64>,
    /// The key it is signed with (signed cookies only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// The Y cluster whose id rule puts the tenant in gray, and the rule (`id`, `interval`,
    /// `all`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Responses by class, as the filters classified them (`none`: no response from the upstream:
/// a reset, a timeout, a local reply of Envoy).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ResponseClasses {
    #[serde(rename = "2xx")]
    pub c2xx: u64,
    #[serde(rename = "3xx")]
    pub c3xx: u64,
    #[serde(rename = "4xx")]
    pub c4xx: u64,
    #[serde(rename = "5xx")]
    pub c5xx: u64,
    pub none: u64,
}

impl ResponseClasses {
    /// Finished requests, with or without a response.
    pub fn total(&self) -> u64 {
        self.c2xx + self.c3xx + self.c4xx + self.c5xx + self.none
    }

    /// Those that failed on the server side: 5xx, or no response at all.
    pub fn failed(&self) -> u64 {
        self.c5xx + self.none
    }
}

/// Traffic of one cluster over a window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TrafficWindow {
    /// Requests routed to the cluster.
    pub requests: u64,
    /// Requests per second over the window (`null` for the total since start).
    pub per_second: Option<f64>,
    /// Finished requests by class.
    pub responses: ResponseClasses,
    /// Upstream latency (request headers to response headers), from the filters' histograms.
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// One cluster's traffic, summed over every reporting Envoy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ClusterTraffic {
    pub cluster: String,
    pub last_10s: TrafficWindow,
    pub last_60s: TrafficWindow,
    /// Since the control plane started.
    pub total: TrafficWindow,
}

/// Decisions per reason code.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReasonTraffic {
    pub reason: String,
    pub last_10s: u64,
    pub last_60s: u64,
    pub total: u64,
}

/// One Envoy (node) that reported, with its own totals.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NodeTraffic {
    /// The Envoy's `node.id`.
    pub node: String,
    /// Milliseconds since its last report.
    pub last_report_ms_ago: u64,
    /// True when it has not reported for a while: its counts stay in the totals.
    pub stale: bool,
    /// Workers (Envoy worker VMs) whose counts it reported.
    pub workers: usize,
    /// Per cluster, since the control plane started.
    pub clusters: Vec<NodeCluster>,
}

/// One cluster's traffic through one node, since the control plane started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NodeCluster {
    pub cluster: String,
    pub requests: u64,
    pub responses: ResponseClasses,
}

/// `GET /v1/services/{service}/traffic`: what the data plane saw.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Traffic {
    pub service: String,
    /// Per cluster, over every node (stale ones included).
    pub clusters: Vec<ClusterTraffic>,
    pub reasons: Vec<ReasonTraffic>,
    pub nodes: Vec<NodeTraffic>,
    /// How many of `nodes` are stale.
    pub stale_nodes: usize,
    /// Filters (Envoy worker VMs) that polled the feed in the last minute, and how many of
    /// them hold the service's current version.
    pub filters_polling: usize,
    pub filters_current: usize,
}
