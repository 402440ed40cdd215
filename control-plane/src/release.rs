//! Release procedures (seed 000): the gray upgrade, the cluster switch, the one-by-one
//! replacement and the rollback, as a pure state machine. A [`Release`] is plain data (stored as JSON beside the versions, so it
//! survives a restart); [`Release::act`] takes an operator's action and [`Release::advance`]
//! takes what is observed now (the service's strategy, healthy endpoint counts, the versions
//! the filters hold, the time) and says what to do next ([`Effect`]). The writer runs it and
//! feeds back what became of each edit ([`Release::applied`], [`Release::refused`]). Nothing
//! here does IO or reads a clock, in the style of `xds::AdsStream`.
//!
//! Every edit is one atomic version computed from the strategy *as it is now* (edits made
//! meanwhile by others are kept), and is idempotent: a release that finds its step's edit
//! already in place (after a crash between the version and the release's own save) moves on
//! without a second version. `abort` restores the exact strategy the service had before the
//! release began, and asks the instance driver to put back the instance counts it changed.
//!
//! Instances are started and stopped by an instance driver (Kubernetes, hooks; see
//! `crate::instances`) through [`Effect::Scale`]. A scale is asked at most once: the release
//! records that it asked (saved before the driver runs) and, after a restart, looks at the
//! healthy count instead of asking again.

use std::collections::BTreeMap;

use graylane_strategy::id::{IdList, Interval};
use graylane_strategy::{PercentBy, PercentSpec, State, StrategySpec, Weight};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::api::types::Traffic;

/// The procedures of seed 000 that graylane runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Procedure {
    /// Isolate the new cluster, make it Y, send it tenants step by step, then everyone, then
    /// swap the states.
    GrayUpgrade,
    /// Isolate the new cluster, make it Y, swap the states (blue-green, no gray phase).
    Switch,
    /// One instance at a time: the new cluster G beside the stable one (both `weight:
    /// endpoints`, so traffic follows the instance counts), then one new instance up, one
    /// stable instance down, until the stable cluster has none; then the stable cluster R.
    OneByOne,
    /// Bring the old cluster back: everyone to it as Y, then swap the states.
    Rollback,
}

impl std::fmt::Display for Procedure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Procedure::GrayUpgrade => "gray-upgrade",
            Procedure::Switch => "switch",
            Procedure::OneByOne => "one-by-one",
            Procedure::Rollback => "rollback",
        })
    }
}

/// One step: one edit of the target cluster (or of both, for the swap).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum Step {
    /// No traffic to the target: `id.all` false, no ids, intervals or percentage; then Y.
    Isolate,
    /// These tenants (ids and intervals) to the target.
    Ids {
        #[serde(default)]
        ids: IdList,
        #[serde(default)]
        intervals: Vec<Interval>,
    },
    /// This share to the target, besides the ids: of tenants (stable per tenant, the default)
    /// or of requests.
    Percent {
        percent: f64,
        #[serde(default = "by_tenant", skip_serializing_if = "is_by_tenant")]
        by: PercentBy,
    },
    /// Everyone to the target (`id.all: true`, state Y): the stable cluster keeps only the
    /// requests the target cannot take.
    All,
    /// Stable R, target G, in one version.
    Swap,
    /// No edit: the cluster gets this many healthy instances (the target grows to at least
    /// it, the stable cluster shrinks to at most it), through the instance driver when one is
    /// configured, else by someone else while the release waits.
    Scale { cluster: Role, instances: u32 },
    /// one-by-one: the target G with `id.all: true` beside the stable cluster (also `id.all:
    /// true`), both `weight: endpoints`.
    Join,
}

fn by_tenant() -> PercentBy {
    PercentBy::Tenant
}

fn is_by_tenant(by: &PercentBy) -> bool {
    *by == PercentBy::Tenant
}

/// Which of the release's two clusters a step is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Target,
    Stable,
}

impl Step {
    /// Whether the step sends traffic to the target (so its capacity is checked first).
    fn sends_traffic(&self) -> bool {
        !matches!(self, Step::Isolate | Step::Scale { .. })
    }

    pub fn describe(&self, target: &str, stable: &str) -> String {
        match self {
            Step::Isolate => format!("{target}: id.all false, no ids, intervals or percentage; Y"),
            Step::Ids { ids, intervals } => format!(
                "{target}: whitelist {} ids, {} intervals",
                ids.len(),
                intervals.len()
            ),
            Step::Percent { percent, by } => format!(
                "{target}: {percent}% of {}",
                match by {
                    PercentBy::Tenant => "tenants",
                    PercentBy::Request => "requests",
                }
            ),
            Step::All => format!("{target}: id.all true (everyone), Y"),
            Step::Swap => format!("{stable} R, {target} G"),
            Step::Scale {
                cluster: Role::Target,
                instances,
            } => format!("{target}: up to {instances} healthy instances"),
            Step::Scale {
                cluster: Role::Stable,
                instances,
            } => format!("{stable}: down to {instances} instances"),
            Step::Join => {
                format!("{target} G, id.all true; {target} and {stable} weight: endpoints")
            }
        }
    }
}

/// What is checked between steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Gates {
    /// Every filter following the service must hold the step's version within this many
    /// seconds; otherwise the release pauses and says which are behind.
    #[serde(default = "default_converge_secs")]
    pub converge_secs: u64,
    /// Seconds to wait after convergence before the next step.
    #[serde(default)]
    pub bake_secs: u64,
    /// Stop before every step after the first until `release approve`.
    #[serde(default)]
    pub approval: bool,
    /// Healthy endpoints the target needs before it gets traffic; none: as many as the stable
    /// cluster had when the release started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_healthy: Option<usize>,
    /// Before the swap, the stable cluster must have received no request for
    /// [`DRAIN_WINDOW_MS`], by the filters' traffic reports (seed 000: "watch whether A's
    /// traffic has fully moved away"). Not checked, and said so, when no filter reports.
    #[serde(default = "yes")]
    pub drained: bool,
    /// While a step that sends the target traffic bakes, and before the next step: if more
    /// than this share (%) of the target's finished requests over the last 10 s failed (5xx,
    /// or no response), the release aborts by itself and the strategy from before it is back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_error_percent: Option<f64>,
    /// The analysis gate by latency: while a step that sends the target traffic bakes, and
    /// before the next step, if the target's p99 over the last 10 s is above this many times
    /// the stable cluster's (both with at least `min_requests` requests), the release aborts
    /// by itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_p99_ratio: Option<f64>,
    /// Requests each cluster needs over the last 10 s before the latency gate judges.
    #[serde(default = "default_min_requests")]
    pub min_requests: u64,
    /// Seconds an instance driver's scale may take to show in the healthy counts before the
    /// release pauses (it is never asked twice by itself; `resume` asks again).
    #[serde(default = "default_scale_secs")]
    pub scale_secs: u64,
    /// The traffic gate on the target: after a step that sends it traffic converges (and
    /// bakes), it must have had at least this many requests over the last 10 s by the filters'
    /// reports before the next step (proof that the step routes to it); if it has not within
    /// `converge_secs` more, the release pauses. Not checked, and said so, when no filter
    /// reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_target_requests: Option<u64>,
}

/// Gates as asked: by a release (API, CLI flags) or as a service's defaults (`releases:` in
/// graylane.yaml). What a release does not say, its service's defaults say; what neither says
/// is [`Gates::default`]. Fields as in [`Gates`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GatesSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub converge_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bake_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_healthy: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drained: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_error_percent: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_p99_ratio: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_requests: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_target_requests: Option<u64>,
}

impl From<Gates> for GatesSpec {
    /// Every gate said.
    fn from(g: Gates) -> Self {
        GatesSpec {
            converge_secs: Some(g.converge_secs),
            bake_secs: Some(g.bake_secs),
            approval: Some(g.approval),
            min_healthy: g.min_healthy,
            drained: Some(g.drained),
            max_error_percent: g.max_error_percent,
            max_p99_ratio: g.max_p99_ratio,
            min_requests: Some(g.min_requests),
            scale_secs: Some(g.scale_secs),
            min_target_requests: g.min_target_requests,
        }
    }
}

impl GatesSpec {
    /// These gates, with `defaults` where these say nothing.
    pub fn or(self, defaults: &GatesSpec) -> GatesSpec {
        let d = defaults.clone();
        GatesSpec {
            converge_secs: self.converge_secs.or(d.converge_secs),
            bake_secs: self.bake_secs.or(d.bake_secs),
            approval: self.approval.or(d.approval),
            min_healthy: self.min_healthy.or(d.min_healthy),
            drained: self.drained.or(d.drained),
            max_error_percent: self.max_error_percent.or(d.max_error_percent),
            max_p99_ratio: self.max_p99_ratio.or(d.max_p99_ratio),
            min_requests: self.min_requests.or(d.min_requests),
            scale_secs: self.scale_secs.or(d.scale_secs),
            min_target_requests: self.min_target_requests.or(d.min_target_requests),
        }
    }

    /// The gates a release runs with: what is said, else [`Gates::default`]; refuses values
    /// out of range, naming the field.
    pub fn resolve(&self) -> Result<Gates, Error> {
        if let Some(r) = self.max_p99_ratio {
            if !(r.is_finite() && r >= 1.0) {
                return Err(err(
                    "gates.max_p99_ratio",
                    format!("{r}: a ratio of p99 latencies, 1 or more"),
                ));
            }
        }
        if let Some(p) = self.max_error_percent {
            if !(0.0..=100.0).contains(&p) {
                return Err(err(
                    "gates.max_error_percent",
                    format!("{p}: a share of requests, 0 to 100"),
                ));
            }
        }
        let d = Gates::default();
        Ok(Gates {
            converge_secs: self.converge_secs.unwrap_or(d.converge_secs),
            bake_secs: self.bake_secs.unwrap_or(d.bake_secs),
            approval: self.approval.unwrap_or(d.approval),
            min_healthy: self.min_healthy.or(d.min_healthy),
            drained: self.drained.unwrap_or(d.drained),
            max_error_percent: self.max_error_percent.or(d.max_error_percent),
            max_p99_ratio: self.max_p99_ratio.or(d.max_p99_ratio),
            min_requests: self.min_requests.unwrap_or(d.min_requests),
            scale_secs: self.scale_secs.unwrap_or(d.scale_secs),
            min_target_requests: self.min_target_requests.or(d.min_target_requests),
        })
    }
}

fn default_min_requests() -> u64 {
    50
}

fn default_scale_secs() -> u64 {
    300
}

fn default_converge_secs() -> u64 {
    60
}

fn yes() -> bool {
    true
}

/// How long the stable cluster must go without a request before the swap (the short window of
/// the traffic reports).
pub const DRAIN_WINDOW_MS: u64 = 10_000;

impl Default for Gates {
    fn default() -> Self {
        Gates {
            converge_secs: default_converge_secs(),
            bake_secs: 0,
            approval: false,
            min_healthy: None,
            drained: true,
            max_error_percent: None,
            max_p99_ratio: None,
            min_requests: default_min_requests(),
            scale_secs: default_scale_secs(),
            min_target_requests: None,
        }
    }
}

/// Where a release is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Status {
    Running,
    /// Stopped until `resume` (by an operator, or by a gate that failed: `why` says).
    Paused {
        why: String,
    },
    Succeeded,
    /// Ended by `abort`: the strategy from before the release is back (version `version`).
    Aborted {
        why: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<u64>,
    },
}

impl Status {
    /// Running or paused: the service's one release.
    pub fn is_active(&self) -> bool {
        matches!(self, Status::Running | Status::Paused { .. })
    }
}

/// Where the current step is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    /// The step's edit is to be made once capacity (and approval) allow.
    Ready { approved: bool },
    /// The edit was asked of the writer; its answer is awaited.
    Applying,
    /// The edit is version `version` (made at `at`, ms); its gates are being checked.
    Applied {
        version: u64,
        at: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        converged_at: Option<u64>,
    },
    /// A scale step: the driver was asked at `at` (saved before it ran); `answered` once it
    /// said it did. Then the healthy count is awaited; never asked again by itself.
    Scaling { at: u64, answered: bool },
}

/// A gate holding a release's current step, with what it measures (`release status`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "gate", rename_all = "snake_case")]
pub enum GateNow {
    /// Every filter following the service must hold `version`; `holding` of `filters` do.
    /// The release pauses at `timeout_at` (Unix ms) if some still do not.
    Converged {
        version: u64,
        holding: usize,
        filters: usize,
        timeout_at: u64,
    },
    /// The cluster must have `wants` healthy endpoints before it gets traffic.
    Capacity {
        cluster: String,
        healthy: usize,
        wants: usize,
    },
    /// A scale step: the cluster must have at least (`at_most` false) or at most `wants`
    /// healthy instances; `healthy` is none when discovery does not know the cluster.
    /// `driven`: an instance driver was asked; else someone must start or stop them.
    Instances {
        cluster: String,
        healthy: Option<usize>,
        wants: usize,
        at_most: bool,
        driven: bool,
    },
    /// The cluster being retired must receive no request over the last `window_secs` (by the
    /// filters' traffic reports), and not before `quiet_until` (Unix ms).
    Traffic {
        cluster: String,
        requests: u64,
        window_secs: u64,
        quiet_until: u64,
    },
    /// The target must have had at least `wants` requests over the last `window_secs` (by the
    /// filters' reports) before the next step.
    Receives {
        cluster: String,
        requests: u64,
        wants: u64,
        window_secs: u64,
    },
    /// The new cluster against the stable one over the last 10 s: the share of failed
    /// requests (5xx or none; none when no request finished) and the ratio of the p99s (none
    /// until both clusters have `min_requests` timed requests).
    Analysis {
        target: String,
        stable: String,
        target_requests: u64,
        stable_requests: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        target_failed_percent: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stable_failed_percent: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_error_percent: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        p99_ratio: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_p99_ratio: Option<f64>,
        min_requests: u64,
    },
    /// The step bakes `secs` seconds, until `until` (Unix ms).
    Bake { secs: u64, until: u64 },
    /// The next step (`step`, from 1) waits for `graylane release approve <service>`.
    Approval { service: String, step: usize },
}

fn percent(p: Option<f64>) -> String {
    p.map_or("- (no request)".to_string(), |p| format!("{p:.1} %"))
}

impl GateNow {
    /// One line, as `release status` prints it, at `now` (Unix ms).
    pub fn describe(&self, now: u64) -> String {
        let secs_left = |until: u64| until.saturating_sub(now).div_ceil(1000);
        match self {
            GateNow::Converged {
                version,
                holding,
                filters,
                timeout_at,
            } => format!(
                "converged: {holding}/{filters} filters hold version {version} (pauses in {} s \
                 if not all)",
                secs_left(*timeout_at)
            ),
            GateNow::Capacity {
                cluster,
                healthy,
                wants,
            } => format!("capacity: {cluster}: {healthy} of {wants} healthy endpoints"),
            GateNow::Instances {
                cluster,
                healthy,
                wants,
                at_most,
                driven,
            } => format!(
                "instances: {cluster}: {} healthy instances, wants {} {wants} ({})",
                healthy.map_or("?".to_string(), |n| n.to_string()),
                if *at_most { "at most" } else { "at least" },
                if *driven {
                    "the instance driver was asked"
                } else {
                    "no instance driver: start or stop them yourself"
                }
            ),
            GateNow::Traffic {
                cluster,
                requests,
                window_secs,
                quiet_until,
            } => {
                let rate = *requests as f64 / (*window_secs).max(1) as f64;
                let mut text = format!(
                    "traffic: {cluster}: {rate:.1} req/s over the last {window_secs} s (wants 0)"
                );
                if *requests == 0 && now < *quiet_until {
                    text.push_str(&format!(", {} s to go", secs_left(*quiet_until)));
                }
                text
            }
            GateNow::Receives {
                cluster,
                requests,
                wants,
                window_secs,
            } => format!(
                "traffic: {cluster}: {requests} requests over the last {window_secs} s (wants at \
                 least {wants})"
            ),
            GateNow::Analysis {
                target,
                stable,
                target_requests,
                stable_requests,
                target_failed_percent,
                stable_failed_percent,
                max_error_percent,
                p99_ratio,
                max_p99_ratio,
                min_requests,
            } => {
                let mut parts = Vec::new();
                if let Some(max) = max_error_percent {
                    parts.push(format!(
                        "{target} 5xx {} vs {stable} {} (max {max} %)",
                        percent(*target_failed_percent),
                        percent(*stable_failed_percent)
                    ));
                }
                if let Some(max) = max_p99_ratio {
                    let fewer = (*target_requests).min(*stable_requests);
                    parts.push(match p99_ratio {
                        Some(r) if fewer >= *min_requests => {
                            format!("p99 ratio {r:.2} (max {max})")
                        }
                        _ => format!(
                            "p99 ratio not judged yet (max {max}): {fewer} of {min_requests} \
                             requests"
                        ),
                    });
                }
                parts.push(format!(
                    "{target_requests} requests to {target}, {stable_requests} to {stable} in \
                     10 s"
                ));
                format!("analysis: {}", parts.join(", "))
            }
            GateNow::Bake { secs, until } => {
                format!("bake: {} s of {secs} s left", secs_left(*until))
            }
            GateNow::Approval { service, step } => {
                format!("approval: step {step} waits for `graylane release approve {service}`")
            }
        }
    }
}

/// One line of a release's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LogEntry {
    /// Unix milliseconds.
    pub at: u64,
    pub text: String,
}

/// A release: durable, one active per service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Release {
    pub id: u64,
    pub service: String,
    pub procedure: Procedure,
    /// The cluster serving now (G), which ends R (kept, not destroyed, for a rollback).
    pub stable: String,
    /// The cluster the release moves traffic to, which ends G.
    pub target: String,
    pub steps: Vec<Step>,
    /// Index of the current step (`steps.len()` when done).
    pub at: usize,
    pub phase: Phase,
    pub status: Status,
    pub gates: Gates,
    /// Healthy endpoints the target needs (resolved at start).
    pub min_healthy: usize,
    /// What the release waits for now, in words (empty when it does not wait).
    #[serde(default)]
    pub waiting: String,
    /// The gates holding the current step, each with what it measured at the release's last
    /// look (at most a second old while it runs); empty when nothing holds it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gates_now: Vec<GateNow>,
    pub started_by: String,
    pub reason: String,
    pub started_at: u64,
    /// The service's strategy when the release began: what `abort` restores.
    #[schema(value_type = Object)]
    pub before: StrategySpec,
    /// Instance counts before the release's first scale of each cluster: what `abort` asks
    /// the driver to put back.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub instances_before: BTreeMap<String, u32>,
    /// Whether an abort asked the driver for the target's count from before (asked once).
    #[serde(default)]
    pub restored_instances: bool,
    pub log: Vec<LogEntry>,
}

/// How a release is asked for (API and CLI).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Start {
    pub procedure: Procedure,
    /// The cluster to move to (for `rollback`: the old cluster to bring back).
    pub to: String,
    /// The cluster serving now; default: the service's only G cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// gray-upgrade: tenants first (ids and intervals), before the percentages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ids: Option<IdList>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub intervals: Vec<Interval>,
    /// gray-upgrade: shares of tenants, in order (default 1, 5, 25, 50).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percents: Option<Vec<f64>>,
    /// gray-upgrade: the shares are of tenants (default: a tenant stays on one version) or of
    /// requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<PercentBy>,
    /// What this release says of its gates; the service's defaults (`releases:` in
    /// graylane.yaml) fill in the rest.
    #[serde(default)]
    pub gates: GatesSpec,
    /// Why (kept in the log and the operation log).
    #[serde(default)]
    pub reason: String,
}

impl Start {
    /// `procedure` to `to`, everything else as the API's defaults leave it.
    pub fn new(procedure: Procedure, to: &str, reason: &str) -> Start {
        Start {
            procedure,
            to: to.to_string(),
            from: None,
            ids: None,
            intervals: Vec::new(),
            percents: None,
            by: None,
            gates: GatesSpec::default(),
            reason: reason.to_string(),
        }
    }
}

/// An operator's action on a running release.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Approve,
    Pause,
    Resume,
    Abort,
    /// While a release runs: as `abort`. After a release succeeded: a `rollback` release back
    /// to the cluster it replaced (see [`Release::rollback`]).
    Rollback,
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Action::Approve => "approve",
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Abort => "abort",
            Action::Rollback => "rollback",
        })
    }
}

/// What is observed now, for one service.
#[derive(Clone)]
pub struct Observed<'a> {
    /// Unix milliseconds.
    pub now: u64,
    /// The service's strategy now, and the version it last changed at.
    pub spec: &'a StrategySpec,
    pub version: u64,
    /// Healthy endpoints per cluster, where discovery knows them.
    pub healthy: &'a dyn Fn(&str) -> Option<usize>,
    /// The versions the service's live filters hold (one per filter).
    pub filters: &'a [u64],
    /// What the filters reported they saw (none when nothing reports).
    pub traffic: Option<&'a Traffic>,
    /// Whether an instance driver starts and stops `cluster`'s instances.
    pub driven: &'a dyn Fn(&str) -> bool,
}

/// Of `cluster`'s traffic over the last 10 s: (requests, finished, failed: 5xx or none), if
/// any live node reports.
fn seen(traffic: Option<&Traffic>, cluster: &str) -> Option<(u64, u64, u64)> {
    let t = traffic?;
    if t.nodes.iter().all(|n| n.stale) {
        return None;
    }
    let w = t
        .clusters
        .iter()
        .find(|c| c.cluster == cluster)
        .map(|c| c.last_10s.clone())
        .unwrap_or_default();
    Some((w.requests, w.responses.total(), w.responses.failed()))
}

/// Of `cluster`'s traffic over the last 10 s: (requests, p99 ms), if a live node reports and
/// the filters timed some of its requests.
fn p99(traffic: Option<&Traffic>, cluster: &str) -> Option<(u64, f64)> {
    let t = traffic?;
    if t.nodes.iter().all(|n| n.stale) {
        return None;
    }
    let w = &t.clusters.iter().find(|c| c.cluster == cluster)?.last_10s;
    Some((w.requests, w.p99_ms?))
}

/// What the writer is asked to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Make this strategy the service's, as one version; then call [`Release::applied`] or
    /// [`Release::refused`].
    Apply { spec: StrategySpec, what: String },
    /// Call [`Release::advance`] again at this time (ms) even if nothing else happens.
    WakeAt(u64),
    /// Ask the instance driver for `instances` instances of `cluster`; then call
    /// [`Release::scaled`] (not for an abort's restores).
    Scale { cluster: String, instances: u32 },
}

/// A release that cannot start, or an action that does not apply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Error {
    pub field: String,
    pub message: String,
}

fn err(field: &str, message: impl Into<String>) -> Error {
    Error {
        field: field.into(),
        message: message.into(),
    }
}

/// How often gates that nothing announces (convergence, bake) are looked at again.
const RECHECK_MS: u64 = 200;

impl Release {
    /// Plans a release of `service` from its strategy now; refuses what the seed's procedure
    /// does not allow (the target must be R, the stable cluster G).
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        id: u64,
        service: &str,
        req: Start,
        who: &str,
        spec: &StrategySpec,
        healthy: &dyn Fn(&str) -> Option<usize>,
        driven: &dyn Fn(&str) -> bool,
        now: u64,
    ) -> Result<Release, Error> {
        let gates = req.gates.resolve()?;
        let target = req.to.clone();
        let Some(t) = spec.clusters.get(&target) else {
            return Err(err(
                "to",
                format!(
                    "{service} has no cluster {target:?} (clusters: {})",
                    names(spec)
                ),
            ));
        };
        if t.status != State::R {
            return Err(err(
                "to",
                format!(
                    "{target} is {}: a release starts from a target in R (no traffic). Set it \
                     R first, or start from the cluster that is R",
                    t.status
                ),
            ));
        }
        let green: Vec<&String> = spec
            .clusters
            .iter()
            .filter(|(_, c)| c.status == State::G)
            .map(|(k, _)| k)
            .collect();
        let stable = match &req.from {
            Some(f) => {
                match spec.clusters.get(f) {
                    None => {
                        return Err(err("from", format!("{service} has no cluster {f:?}")));
                    }
                    Some(c) if c.status != State::G => {
                        return Err(err("from", format!("{f} is {}, not G", c.status)));
                    }
                    Some(_) => {}
                }
                f.clone()
            }
            None => match green.as_slice() {
                [one] => (*one).clone(),
                [] => return Err(err("from", format!("{service} has no G cluster"))),
                _ => {
                    return Err(err(
                        "from",
                        format!(
                            "{service} has several G clusters ({}): name the one to replace",
                            green
                                .iter()
                                .map(|s| s.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ))
                }
            },
        };
        if stable == target {
            return Err(err("to", "the target is the stable cluster"));
        }
        let stable_instances = healthy(&stable).and_then(|n| u32::try_from(n).ok());
        let min_healthy = gates
            .min_healthy
            .unwrap_or_else(|| healthy(&stable).unwrap_or(0).max(1));
        // With a driver, the target is brought up to the stable cluster's size first (seed
        // 000: "start B at A's size"); without one, the capacity gate waits for it.
        let bring_up = driven(&target).then(|| Step::Scale {
            cluster: Role::Target,
            instances: u32::try_from(min_healthy).unwrap_or(u32::MAX),
        });
        let mut steps = Vec::new();
        match req.procedure {
            Procedure::GrayUpgrade => {
                steps.extend(bring_up);
                steps.push(Step::Isolate);
                let ids = req.ids.clone().unwrap_or_default();
                if !ids.is_empty() || !req.intervals.is_empty() {
                    steps.push(Step::Ids {
                        ids,
                        intervals: req.intervals.clone(),
                    });
                }
                let percents = req.percents.clone().unwrap_or(vec![1.0, 5.0, 25.0, 50.0]);
                let mut last = 0.0;
                for p in percents {
                    if !(p > last && p < 100.0) {
                        return Err(err(
                            "percents",
                            format!("{p}: each share must grow and stay below 100 (then `all`)"),
                        ));
                    }
                    last = p;
                    steps.push(Step::Percent {
                        percent: p,
                        by: req.by.unwrap_or(PercentBy::Tenant),
                    });
                }
                steps.extend([Step::All, Step::Swap]);
            }
            Procedure::Switch => {
                steps.extend(bring_up);
                steps.extend([Step::Isolate, Step::Swap]);
            }
            Procedure::Rollback => {
                steps.extend(bring_up);
                steps.extend([Step::All, Step::Swap]);
            }
            Procedure::OneByOne => {
                let Some(n) = stable_instances.filter(|n| *n > 0) else {
                    return Err(err(
                        "procedure",
                        format!(
                            "one-by-one replaces {stable}'s instances one at a time and needs \
                            their count: discovery (Consul or Kubernetes) knows no healthy \
                            instance of {stable}"
                        ),
                    ));
                };
                steps.push(Step::Scale {
                    cluster: Role::Target,
                    instances: 1,
                });
                steps.push(Step::Join);
                for k in 1..=n {
                    if k > 1 {
                        steps.push(Step::Scale {
                            cluster: Role::Target,
                            instances: k,
                        });
                    }
                    steps.push(Step::Scale {
                        cluster: Role::Stable,
                        instances: n - k,
                    });
                }
                steps.push(Step::Swap);
            }
        }
        // one-by-one sends traffic to the target from its first instance.
        let min_healthy = if req.procedure == Procedure::OneByOne {
            gates.min_healthy.unwrap_or(1)
        } else {
            min_healthy
        };
        let mut r = Release {
            id,
            service: service.to_string(),
            procedure: req.procedure,
            stable,
            target,
            steps,
            at: 0,
            phase: Phase::Ready { approved: true },
            status: Status::Running,
            gates,
            min_healthy,
            waiting: String::new(),
            gates_now: Vec::new(),
            started_by: who.to_string(),
            reason: req.reason,
            started_at: now,
            before: spec.clone(),
            instances_before: BTreeMap::new(),
            restored_instances: false,
            log: Vec::new(),
        };
        let plan: Vec<String> = r
            .steps
            .iter()
            .map(|s| s.describe(&r.target, &r.stable))
            .collect();
        r.note(
            now,
            format!(
                "{} of {} from {} to {} started by {who}{}; plan: {}",
                r.procedure,
                r.service,
                r.stable,
                r.target,
                if r.reason.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", r.reason)
                },
                plan.join("; ")
            ),
        );
        Ok(r)
    }

    fn note(&mut self, now: u64, text: String) {
        self.log.push(LogEntry { at: now, text });
    }

    /// Sets what the release waits for; logged once per change.
    fn wait(&mut self, now: u64, what: String) {
        if self.waiting != what {
            self.note(now, format!("waiting: {what}"));
            self.waiting = what;
        }
    }

    /// The step the release is at, if any.
    pub fn current(&self) -> Option<&Step> {
        self.steps.get(self.at)
    }

    /// An operator's action. `Abort` gives the strategy to restore.
    pub fn act(
        &mut self,
        action: Action,
        who: &str,
        why: &str,
        now: u64,
    ) -> Result<Vec<Effect>, Error> {
        if !self.status.is_active() {
            return Err(err(
                "release",
                format!("release {} of {} has ended", self.id, self.service),
            ));
        }
        let why_s = if why.is_empty() {
            String::new()
        } else {
            format!(": {why}")
        };
        match action {
            Action::Approve => match self.phase {
                Phase::Ready { approved: false } => {
                    self.phase = Phase::Ready { approved: true };
                    self.note(now, format!("approved by {who}{why_s}"));
                    Ok(Vec::new())
                }
                _ => Err(err("release", "not waiting for an approval")),
            },
            Action::Pause => {
                if !matches!(self.status, Status::Running) {
                    return Err(err("release", "already paused"));
                }
                self.status = Status::Paused {
                    why: format!("paused by {who}{why_s}"),
                };
                self.gates_now.clear();
                self.note(now, format!("paused by {who}{why_s}"));
                Ok(Vec::new())
            }
            Action::Resume => {
                if !matches!(self.status, Status::Paused { .. }) {
                    return Err(err("release", "not paused"));
                }
                self.status = Status::Running;
                self.waiting.clear();
                // A step whose gate timed out starts its gates over; a scale that did not show
                // is asked again (the operator's call, never the release's own).
                match self.phase {
                    Phase::Applied { version, .. } => {
                        self.phase = Phase::Applied {
                            version,
                            at: now,
                            converged_at: None,
                        };
                    }
                    Phase::Scaling { .. } => self.phase = Phase::Ready { approved: true },
                    _ => {}
                }
                self.note(now, format!("resumed by {who}{why_s}"));
                Ok(Vec::new())
            }
            Action::Abort | Action::Rollback => {
                let done = if action == Action::Abort {
                    "aborted"
                } else {
                    "rolled back"
                };
                self.waiting.clear();
                self.gates_now.clear();
                self.status = Status::Aborted {
                    why: format!("{done} by {who}{why_s}"),
                    version: None,
                };
                self.note(
                    now,
                    format!(
                        "{done} by {who}{why_s}: restoring the strategy from before the release"
                    ),
                );
                // The stable cluster's instances come back first: the strategy that sends it
                // everyone again is made once discovery shows them (`advance`); the target's
                // instances go after it.
                if let Some(n) = self.instances_before.get(&self.stable).copied() {
                    self.phase = Phase::Ready { approved: true };
                    self.note(
                        now,
                        format!(
                            "asking the instance driver for {n} instances of {} (as before \
                             the release); the strategy follows once they are healthy",
                            self.stable
                        ),
                    );
                    return Ok(vec![Effect::Scale {
                        cluster: self.stable.clone(),
                        instances: n,
                    }]);
                }
                self.phase = Phase::Applying;
                Ok(self.restore())
            }
        }
    }

    /// `release rollback` of this release once it has ended: the `rollback` release that
    /// brings back the cluster it replaced (seed 000's rollback: that cluster up and healthy,
    /// everyone to it as Y, the new cluster drained, the states swapped). Refused, saying why,
    /// when there is nothing to roll back: the release was aborted or was itself a rollback,
    /// or the service's strategy has moved on since (the old cluster is not R any more, or the
    /// new one not G). A running release is rolled back by [`Release::act`] instead.
    pub fn rollback(&self, spec: &StrategySpec, why: &str) -> Result<Start, Error> {
        let n = self.id;
        match &self.status {
            Status::Running | Status::Paused { .. } => {
                return Err(err(
                    "release",
                    format!(
                        "release {n} of {} is still running: roll it back with act",
                        self.service
                    ),
                ))
            }
            Status::Aborted { version, .. } => {
                return Err(err(
                    "release",
                    format!(
                        "nothing to roll back: release {n} of {} was aborted{}, so its strategy \
                         from before is already back",
                        self.service,
                        version.map_or(String::new(), |v| format!(" (version {v})"))
                    ),
                ))
            }
            Status::Succeeded => {}
        }
        if self.procedure == Procedure::Rollback {
            return Err(err(
                "release",
                format!(
                    "nothing to roll back: release {n} of {} was itself a rollback (to {}); to \
                     move to {} again, start a release",
                    self.service, self.target, self.stable
                ),
            ));
        }
        for (k, want) in [(&self.stable, State::R), (&self.target, State::G)] {
            let now = spec.clusters.get(k).map(|c| c.status);
            if now != Some(want) {
                return Err(err(
                    "release",
                    format!(
                        "nothing to roll back: {}'s strategy has changed since release {n} ended \
                         ({k} is {}, not {want}); edit it, or start a release",
                        self.service,
                        now.map_or("gone".to_string(), |s| s.to_string())
                    ),
                ));
            }
        }
        Ok(Start {
            procedure: Procedure::Rollback,
            to: self.stable.clone(),
            from: Some(self.target.clone()),
            ids: None,
            intervals: Vec::new(),
            percents: None,
            by: None,
            // As the release was gated, less what would slow the way back: no approvals, no
            // bake, no analysis (the old version is the known one).
            gates: GatesSpec {
                converge_secs: Some(self.gates.converge_secs),
                drained: Some(self.gates.drained),
                scale_secs: Some(self.gates.scale_secs),
                approval: Some(false),
                bake_secs: Some(0),
                ..GatesSpec::default()
            },
            reason: if why.is_empty() {
                format!("rollback of release {n}")
            } else {
                format!("rollback of release {n}: {why}")
            },
        })
    }

    /// The strategy from before the release (the target's instance count from before it
    /// follows, in `advance`, once every filter holds it).
    fn restore(&mut self) -> Vec<Effect> {
        vec![self.restore_effect()]
    }

    /// After an abort's restored version: the target's instance count from before the
    /// release, still to ask for (once every filter holds that version, so that none still
    /// sends the target requests while its instances go).
    fn target_count_to_restore(&self) -> Option<u32> {
        match self.status {
            Status::Aborted {
                version: Some(_), ..
            } if !self.restored_instances => self.instances_before.get(&self.target).copied(),
            _ => None,
        }
    }

    fn restore_effect(&self) -> Effect {
        Effect::Apply {
            spec: self.before.clone(),
            what: format!("release {} abort: the strategy from before it", self.id),
        }
    }

    /// The instance driver answered the scale the release asked for: `Ok` with the tail of
    /// what it printed, or why it failed (the release pauses; `resume` asks again).
    pub fn scaled(&mut self, result: Result<String, String>, now: u64) {
        if !self.status.is_active() {
            return;
        }
        let Phase::Scaling { at, .. } = self.phase else {
            return;
        };
        match result {
            Ok(out) => {
                self.phase = Phase::Scaling { at, answered: true };
                let out = out.trim();
                self.note(
                    now,
                    if out.is_empty() {
                        "instance driver: done".to_string()
                    } else {
                        format!("instance driver: done: {out}")
                    },
                );
            }
            Err(e) => {
                let why = format!("instance driver failed: {e}");
                self.note(now, why.clone());
                self.gates_now.clear();
                self.phase = Phase::Ready { approved: true };
                self.status = Status::Paused { why };
            }
        }
    }

    /// The writer made the asked edit as `version` (for an abort: the restored version).
    pub fn applied(&mut self, version: u64, now: u64) {
        if let Status::Aborted { version: v, .. } = &mut self.status {
            *v = Some(version);
            self.note(
                now,
                format!("version {version}: the strategy from before the release"),
            );
            return;
        }
        self.phase = Phase::Applied {
            version,
            at: now,
            converged_at: None,
        };
        self.note(now, format!("version {version}"));
    }

    /// The writer refused the asked edit: the release pauses and says why.
    pub fn refused(&mut self, error: &str, now: u64) {
        self.phase = Phase::Ready { approved: true };
        let why = format!("the edit was refused: {error}");
        self.note(now, why.clone());
        self.gates_now.clear();
        if !matches!(self.status, Status::Aborted { .. }) {
            self.status = Status::Paused { why };
        }
    }

    /// Whether the release has more to do: running, or aborted with its restore refused
    /// (tried again once the stable cluster has healthy endpoints).
    pub fn wants_driving(&self) -> bool {
        matches!(self.status, Status::Running)
            || matches!(
                (&self.status, self.phase),
                (Status::Aborted { version: None, .. }, Phase::Ready { .. })
            )
            || self.target_count_to_restore().is_some()
    }

    /// Moves on as far as what is observed allows; says what the writer must do.
    pub fn advance(&mut self, obs: &Observed<'_>) -> Vec<Effect> {
        let now = obs.now;
        self.gates_now.clear();
        if let (
            Status::Aborted {
                version: Some(v), ..
            },
            Some(n),
        ) = (&self.status, self.target_count_to_restore())
        {
            let v = *v;
            let behind = obs.filters.iter().filter(|f| **f < v).count();
            if behind > 0 {
                self.wait(
                    now,
                    format!(
                        "abort: {}'s instances go back to {n} once every filter holds version \
                         {v} ({behind} of {} do not yet)",
                        self.target,
                        obs.filters.len()
                    ),
                );
                return vec![Effect::WakeAt(now + RECHECK_MS)];
            }
            self.waiting.clear();
            self.restored_instances = true;
            self.note(
                now,
                format!(
                    "asking the instance driver for {n} instances of {} (as before the release)",
                    self.target
                ),
            );
            return vec![Effect::Scale {
                cluster: self.target.clone(),
                instances: n,
            }];
        }
        if let (Status::Aborted { version: None, .. }, Phase::Ready { .. }) =
            (&self.status, self.phase)
        {
            // The stable cluster's instances are coming back (an abort of a release that took
            // some down), or a restore was refused: the strategy from before is made once the
            // stable cluster has its instances again.
            let want = self
                .instances_before
                .get(&self.stable)
                .map_or(1, |n| (*n).max(1) as usize);
            return match (obs.healthy)(&self.stable) {
                Some(n) if n < want => {
                    self.gates_now.push(GateNow::Instances {
                        cluster: self.stable.clone(),
                        healthy: Some(n),
                        wants: want,
                        at_most: false,
                        driven: (obs.driven)(&self.stable),
                    });
                    self.wait(
                        now,
                        format!(
                            "abort: {} has {n} of {want} healthy instances before its strategy \
                             is restored",
                            self.stable
                        ),
                    );
                    Vec::new()
                }
                _ => {
                    self.waiting.clear();
                    self.phase = Phase::Applying;
                    self.note(now, "restoring the strategy from before the release".into());
                    self.restore()
                }
            };
        }
        // Bounded: each turn either returns or moves to the next step.
        for _ in 0..=self.steps.len() {
            if !matches!(self.status, Status::Running) {
                return Vec::new();
            }
            let Some(step) = self.steps.get(self.at).cloned() else {
                self.status = Status::Succeeded;
                self.waiting.clear();
                self.note(
                    now,
                    format!(
                        "done: {} G, {} R (kept for a rollback)",
                        self.target, self.stable
                    ),
                );
                return Vec::new();
            };
            if let Step::Scale { cluster, instances } = step {
                match self.scale(cluster, instances, obs) {
                    Some(effects) => return effects,
                    None => continue,
                }
            }
            match self.phase {
                Phase::Applying | Phase::Scaling { .. } => return Vec::new(),
                Phase::Ready { approved } => {
                    if step.sends_traffic() {
                        match (obs.healthy)(&self.target) {
                            Some(n) if n < self.min_healthy => {
                                self.gates_now.push(GateNow::Capacity {
                                    cluster: self.target.clone(),
                                    healthy: n,
                                    wants: self.min_healthy,
                                });
                                self.wait(
                                    now,
                                    format!(
                                        "capacity: {} has {n} of {} healthy endpoints",
                                        self.target, self.min_healthy
                                    ),
                                );
                                return Vec::new();
                            }
                            _ => {}
                        }
                    }
                    if !approved {
                        self.gates_now.push(GateNow::Approval {
                            service: self.service.clone(),
                            step: self.at + 1,
                        });
                        self.wait(
                            now,
                            format!(
                                "approval before step {}: {}",
                                self.at + 1,
                                step.describe(&self.target, &self.stable)
                            ),
                        );
                        return Vec::new();
                    }
                    let next = match self.edit(&step, obs.spec) {
                        Ok(s) => s,
                        Err(why) => {
                            self.status = Status::Paused { why: why.clone() };
                            self.note(now, why);
                            return Vec::new();
                        }
                    };
                    self.waiting.clear();
                    let what = format!(
                        "release {} step {}/{}: {}",
                        self.id,
                        self.at + 1,
                        self.steps.len(),
                        step.describe(&self.target, &self.stable)
                    );
                    if next == *obs.spec {
                        // Already in place (made before a restart): no second version.
                        self.note(now, format!("{what}: already in place"));
                        self.applied(obs.version, now);
                        continue;
                    }
                    self.note(now, what.clone());
                    self.phase = Phase::Applying;
                    return vec![Effect::Apply { spec: next, what }];
                }
                Phase::Applied {
                    version,
                    at,
                    converged_at,
                } => {
                    let converged_at = match converged_at {
                        Some(c) => c,
                        None => {
                            let behind = obs.filters.iter().filter(|v| **v < version).count();
                            if behind > 0 {
                                let waited = now.saturating_sub(at);
                                if waited >= self.gates.converge_secs * 1000 {
                                    let why = format!(
                                        "converged: {behind} of {} filters still below version \
                                         {version} after {} s",
                                        obs.filters.len(),
                                        self.gates.converge_secs
                                    );
                                    self.note(now, why.clone());
                                    self.status = Status::Paused { why };
                                    return Vec::new();
                                }
                                self.gates_now.push(GateNow::Converged {
                                    version,
                                    holding: obs.filters.len() - behind,
                                    filters: obs.filters.len(),
                                    timeout_at: at + self.gates.converge_secs * 1000,
                                });
                                self.wait(
                                    now,
                                    format!(
                                        "converged: {behind} of {} filters below version {version}",
                                        obs.filters.len()
                                    ),
                                );
                                return vec![Effect::WakeAt(now + RECHECK_MS)];
                            }
                            let text = if obs.filters.is_empty() {
                                format!(
                                    "converged: no filter follows {} (nothing to wait for)",
                                    self.service
                                )
                            } else {
                                match obs.filters.len() {
                                    1 => format!("converged: the filter holds version {version}"),
                                    n => format!("converged: {n} filters hold version {version}"),
                                }
                            };
                            self.note(now, text);
                            self.phase = Phase::Applied {
                                version,
                                at,
                                converged_at: Some(now),
                            };
                            now
                        }
                    };
                    if let Some(effects) = self.analyse(&step, obs) {
                        return effects;
                    }
                    let bake_end = converged_at + self.gates.bake_secs * 1000;
                    if now < bake_end {
                        self.gates_now.extend(self.analysis_now(&step, obs));
                        self.gates_now.push(GateNow::Bake {
                            secs: self.gates.bake_secs,
                            until: bake_end,
                        });
                        self.wait(now, format!("bake: {} s", self.gates.bake_secs));
                        // With an analysis gate, the target is looked at every second meanwhile.
                        let next = if self.gates.max_error_percent.is_some()
                            || self.gates.max_p99_ratio.is_some()
                        {
                            bake_end.min(now + 1_000)
                        } else {
                            bake_end
                        };
                        return vec![Effect::WakeAt(next)];
                    }
                    if let Some(effects) = self.receives(&step, converged_at, obs) {
                        return effects;
                    }
                    if let Some(effects) = self.drain(&step, converged_at, obs) {
                        return effects;
                    }
                    self.waiting.clear();
                    self.at += 1;
                    self.phase = Phase::Ready {
                        approved: !self.gates.approval,
                    };
                }
            }
        }
        Vec::new()
    }

    /// A scale step: `None` when it holds (the release moves to the next step), else what to
    /// do now.
    fn scale(&mut self, role: Role, instances: u32, obs: &Observed<'_>) -> Option<Vec<Effect>> {
        let now = obs.now;
        let cluster = match role {
            Role::Target => self.target.clone(),
            Role::Stable => self.stable.clone(),
        };
        let count = (obs.healthy)(&cluster).and_then(|n| u32::try_from(n).ok());
        let holds = count.map(|n| match role {
            Role::Target => n >= instances,
            Role::Stable => n <= instances,
        });
        let step_no = format!(
            "release {} step {}/{}",
            self.id,
            self.at + 1,
            self.steps.len()
        );
        let next = |r: &mut Release, text: String| {
            r.note(now, text);
            r.waiting.clear();
            r.at += 1;
            r.phase = Phase::Ready {
                approved: !r.gates.approval,
            };
            None
        };
        match self.phase {
            Phase::Ready { approved } => {
                if holds == Some(true) {
                    return next(
                        self,
                        format!("{step_no}: {cluster} has {} healthy instances (wanted {instances}): nothing to scale", count.unwrap_or(0)),
                    );
                }
                if !approved {
                    let what = format!(
                        "approval before step {}: {}",
                        self.at + 1,
                        Step::Scale {
                            cluster: role,
                            instances
                        }
                        .describe(&self.target, &self.stable)
                    );
                    self.gates_now.push(GateNow::Approval {
                        service: self.service.clone(),
                        step: self.at + 1,
                    });
                    self.wait(now, what);
                    return Some(Vec::new());
                }
                if !(obs.driven)(&cluster) {
                    self.gates_now.push(GateNow::Instances {
                        cluster: cluster.clone(),
                        healthy: count.map(|n| n as usize),
                        wants: instances as usize,
                        at_most: role == Role::Stable,
                        driven: false,
                    });
                    let have = count.map_or("an unknown number of".to_string(), |n| n.to_string());
                    self.wait(
                        now,
                        format!(
                            "instances: {cluster} has {have} healthy instances, wants {} \
                            {instances} (no instance driver for {cluster}: start or stop them \
                            yourself)",
                            match role {
                                Role::Target => "at least",
                                Role::Stable => "at most",
                            }
                        ),
                    );
                    return Some(Vec::new());
                }
                if let Some(n) = count {
                    self.instances_before.entry(cluster.clone()).or_insert(n);
                }
                self.waiting.clear();
                self.note(
                    now,
                    format!("{step_no}: asking the instance driver for {instances} instances of {cluster}"),
                );
                self.phase = Phase::Scaling {
                    at: now,
                    answered: false,
                };
                Some(vec![Effect::Scale { cluster, instances }])
            }
            Phase::Scaling { at, answered } => {
                match holds {
                    Some(true) => {
                        return next(
                            self,
                            format!("{cluster} has {} healthy instances", count.unwrap_or(0)),
                        )
                    }
                    // Discovery does not know the cluster: the driver's word is taken.
                    None if answered => {
                        return next(
                            self,
                            format!("{cluster}: healthy instances not known (not checked)"),
                        )
                    }
                    _ => {}
                }
                if now.saturating_sub(at) >= self.gates.scale_secs * 1000 {
                    let why = format!(
                        "instances: {cluster} still has {} healthy instances {} s after the \
                        driver was asked for {instances}{}; not asked again: check it, then \
                        resume (asks again) or abort",
                        count.map_or("an unknown number of".to_string(), |n| n.to_string()),
                        self.gates.scale_secs,
                        if answered {
                            ""
                        } else {
                            " (its answer was lost in a restart)"
                        },
                    );
                    self.note(now, why.clone());
                    self.status = Status::Paused { why };
                    return Some(Vec::new());
                }
                self.gates_now.push(GateNow::Instances {
                    cluster: cluster.clone(),
                    healthy: count.map(|n| n as usize),
                    wants: instances as usize,
                    at_most: role == Role::Stable,
                    driven: true,
                });
                self.wait(
                    now,
                    format!(
                        "instances: {cluster} has {} of {instances} healthy instances",
                        count.map_or("?".to_string(), |n| n.to_string())
                    ),
                );
                Some(vec![Effect::WakeAt(
                    (now + 1_000).min(at + self.gates.scale_secs * 1000),
                )])
            }
            Phase::Applying | Phase::Applied { .. } => {
                // Not a scale step's phase (a release saved by an older build): start it over.
                self.phase = Phase::Ready { approved: true };
                Some(vec![Effect::WakeAt(now)])
            }
        }
    }

    /// The analysis gates: abort the release when the target fails too many requests, or
    /// answers too slowly next to the stable cluster.
    fn analyse(&mut self, step: &Step, obs: &Observed<'_>) -> Option<Vec<Effect>> {
        if !step.sends_traffic() {
            return None;
        }
        let (who, why) = match self.errors(obs) {
            Some(why) => ("the error gate", why),
            None => ("the latency gate", self.latency(obs)?),
        };
        self.act(Action::Abort, who, &why, obs.now).ok()
    }

    /// What the analysis gates measure now, while a step that sends the target traffic holds.
    fn analysis_now(&self, step: &Step, obs: &Observed<'_>) -> Option<GateNow> {
        let g = &self.gates;
        if !step.sends_traffic() || (g.max_error_percent.is_none() && g.max_p99_ratio.is_none()) {
            return None;
        }
        let failed = |k: &str| {
            seen(obs.traffic, k).map(|(req, finished, failed)| {
                let share = (finished > 0).then(|| failed as f64 * 100.0 / finished as f64);
                (req, share)
            })
        };
        let (target_requests, target_failed_percent) = failed(&self.target).unwrap_or((0, None));
        let (stable_requests, stable_failed_percent) = failed(&self.stable).unwrap_or((0, None));
        let p99_ratio = match (
            p99(obs.traffic, &self.target),
            p99(obs.traffic, &self.stable),
        ) {
            (Some((_, t)), Some((_, s))) => Some(t / s.max(0.001)),
            _ => None,
        };
        Some(GateNow::Analysis {
            target: self.target.clone(),
            stable: self.stable.clone(),
            target_requests,
            stable_requests,
            target_failed_percent,
            stable_failed_percent,
            max_error_percent: g.max_error_percent,
            p99_ratio,
            max_p99_ratio: g.max_p99_ratio,
            min_requests: g.min_requests,
        })
    }

    /// The error gate: the target's share of failed requests above the gate's and above the
    /// stable cluster's over the same 10 s (failures both share, a dependency's, are not the
    /// new version's).
    fn errors(&self, obs: &Observed<'_>) -> Option<String> {
        let max = self.gates.max_error_percent?;
        let (_, finished, failed) = seen(obs.traffic, &self.target)?;
        if finished == 0 || failed as f64 * 100.0 <= max * finished as f64 {
            return None;
        }
        let share = failed as f64 * 100.0 / finished as f64;
        let stable = seen(obs.traffic, &self.stable)
            .filter(|(_, finished, _)| *finished > 0)
            .map(|(_, finished, failed)| failed as f64 * 100.0 / finished as f64);
        if stable.is_some_and(|s| share <= s) {
            return None;
        }
        Some(format!(
            "{failed} of {finished} requests to {} failed in the last 10 s ({share:.1} % > \
             {max} %; {}: {})",
            self.target,
            self.stable,
            stable.map_or("no request".to_string(), |s| format!("{s:.1} %"))
        ))
    }

    fn latency(&self, obs: &Observed<'_>) -> Option<String> {
        let max = self.gates.max_p99_ratio?;
        let (t_req, t_p99) = p99(obs.traffic, &self.target)?;
        let (s_req, s_p99) = p99(obs.traffic, &self.stable)?;
        let min = self.gates.min_requests;
        if t_req < min || s_req < min || t_p99 <= max * s_p99 {
            return None;
        }
        Some(format!(
            "p99 of {} is {t_p99:.1} ms over the last 10 s, {:.1} times {}'s {s_p99:.1} ms \
             (> {max}; {t_req} and {s_req} requests)",
            self.target,
            t_p99 / s_p99.max(0.001),
            self.stable
        ))
    }

    /// The traffic gate on the target, once a step that sends it traffic has converged and
    /// baked: it has had `min_target_requests` over the last 10 s.
    fn receives(
        &mut self,
        step: &Step,
        converged_at: u64,
        obs: &Observed<'_>,
    ) -> Option<Vec<Effect>> {
        let wants = self.gates.min_target_requests?;
        if !step.sends_traffic() {
            return None;
        }
        let now = obs.now;
        let Some((requests, _, _)) = seen(obs.traffic, &self.target) else {
            self.note(
                now,
                format!(
                    "traffic: not checked (no filter of {} reports its traffic)",
                    self.service
                ),
            );
            return None;
        };
        if requests >= wants {
            // Logged once per step (the drain gate may hold the step after this one passed).
            let text = format!(
                "traffic: {} had at least {wants} requests in the last 10 s",
                self.target
            );
            let step_began = format!("release {} step {}/", self.id, self.at + 1);
            let since = self
                .log
                .iter()
                .rposition(|l| l.text.starts_with(&step_began))
                .unwrap_or(0);
            if !self.log[since..].iter().any(|l| l.text == text) {
                self.note(now, text);
            }
            return None;
        }
        if now >= converged_at + DRAIN_WINDOW_MS + self.gates.converge_secs * 1000 {
            let why = format!(
                "traffic: {} had only {requests} requests in the last 10 s, {} s after the \
                 step, wants at least {wants}: does the step route to it?",
                self.target,
                (now - converged_at) / 1000
            );
            self.note(now, why.clone());
            self.status = Status::Paused { why };
            return Some(Vec::new());
        }
        self.gates_now.extend(self.analysis_now(step, obs));
        self.gates_now.push(GateNow::Receives {
            cluster: self.target.clone(),
            requests,
            wants,
            window_secs: DRAIN_WINDOW_MS / 1000,
        });
        self.wait(
            now,
            format!(
                "traffic: {} must have at least {wants} requests in 10 s",
                self.target
            ),
        );
        Some(vec![Effect::WakeAt(now + 1_000)])
    }

    /// The drain gate, once the step before the swap has converged and baked: the stable
    /// cluster has had no request for [`DRAIN_WINDOW_MS`].
    fn drain(&mut self, step: &Step, converged_at: u64, obs: &Observed<'_>) -> Option<Vec<Effect>> {
        let next_is_swap = matches!(self.steps.get(self.at + 1), Some(Step::Swap));
        if !self.gates.drained || !next_is_swap || matches!(step, Step::Isolate) {
            return None;
        }
        let now = obs.now;
        let Some((requests, _, _)) = seen(obs.traffic, &self.stable) else {
            self.note(
                now,
                format!(
                    "drained: not checked (no filter of {} reports its traffic)",
                    self.service
                ),
            );
            return None;
        };
        let quiet_since = converged_at + DRAIN_WINDOW_MS;
        if requests == 0 && now >= quiet_since {
            self.note(
                now,
                format!("drained: {} had no request for 10 s", self.stable),
            );
            return None;
        }
        let limit = quiet_since + self.gates.converge_secs * 1000;
        if now >= limit {
            let why = format!(
                "drained: {} still had {requests} requests in the last 10 s, {} s after \
                 everyone was sent to {}",
                self.stable,
                (now - converged_at) / 1000,
                self.target
            );
            self.note(now, why.clone());
            self.status = Status::Paused { why };
            return Some(Vec::new());
        }
        self.gates_now.extend(self.analysis_now(step, obs));
        self.gates_now.push(GateNow::Traffic {
            cluster: self.stable.clone(),
            requests,
            window_secs: DRAIN_WINDOW_MS / 1000,
            quiet_until: quiet_since,
        });
        // Logged once: the count of the moment is the traffic gate's (`gates_now`).
        self.wait(
            now,
            format!(
                "drained: {} must have no request for 10 s before the swap",
                self.stable
            ),
        );
        Some(vec![Effect::WakeAt(now + 1_000)])
    }

    /// The strategy after `step`, from the strategy as it is now.
    fn edit(&self, step: &Step, spec: &StrategySpec) -> Result<StrategySpec, String> {
        let mut next = spec.clone();
        for k in [&self.stable, &self.target] {
            if !next.clusters.contains_key(k) {
                return Err(format!(
                    "cluster {k} is no longer in {}'s strategy",
                    self.service
                ));
            }
        }
        let Some(t) = next.clusters.get_mut(&self.target) else {
            return Err(format!("cluster {} is gone", self.target));
        };
        match step {
            Step::Isolate => {
                t.id.all = false;
                t.id.ids = IdList::default();
                t.id.interval.clear();
                t.percent = None;
                t.status = State::Y;
            }
            Step::Ids { ids, intervals } => {
                t.id.ids = ids.clone();
                t.id.interval = intervals.clone();
            }
            Step::Percent { percent, by } => {
                t.percent = Some(PercentSpec {
                    value: *percent,
                    by: *by,
                    salt: 0,
                });
            }
            Step::All => {
                t.id.all = true;
                t.status = State::Y;
            }
            Step::Swap => {
                t.status = State::G;
                if let Some(s) = next.clusters.get_mut(&self.stable) {
                    s.status = State::R;
                }
            }
            Step::Join => {
                t.status = State::G;
                t.id.all = true;
                t.weight = Weight::Endpoints;
                if let Some(s) = next.clusters.get_mut(&self.stable) {
                    s.id.all = true;
                    s.weight = Weight::Endpoints;
                }
            }
            // Not an edit (handled by `scale`).
            Step::Scale { .. } => {}
        }
        Ok(next)
    }
}

fn names(spec: &StrategySpec) -> String {
    spec.clusters.keys().cloned().collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn spec(yaml: &str) -> StrategySpec {
        graylane_strategy::spec::parse_yaml(yaml).unwrap()
    }

    fn seed() -> StrategySpec {
        spec("route-strategy:\n  A: {status: G, id: {all: true}}\n  B: {status: R, id: {all: false, ids: [7]}}\n")
    }

    /// Drives a release as the writer would, with `healthy` and filters that follow at once;
    /// returns the versions made.
    struct World {
        spec: StrategySpec,
        version: u64,
        healthy: std::collections::BTreeMap<String, usize>,
        filters: Vec<u64>,
        now: u64,
        made: Vec<StrategySpec>,
        traffic: Option<Traffic>,
        /// Clusters with an instance driver.
        driven: Vec<String>,
        /// What the driver was asked: (cluster, instances).
        asked: Vec<(String, u32)>,
        /// Whether asked instances come up (healthy) at once.
        follow: bool,
    }

    impl World {
        fn new() -> World {
            World {
                spec: seed(),
                version: 1,
                healthy: [("A".to_string(), 2), ("B".to_string(), 2)].into(),
                filters: vec![1, 1],
                now: 1_000,
                made: Vec::new(),
                traffic: None,
                driven: Vec::new(),
                asked: Vec::new(),
                follow: true,
            }
        }

        fn advance(&mut self, r: &mut Release) -> Vec<Effect> {
            let healthy = self.healthy.clone();
            let h = move |k: &str| healthy.get(k).copied();
            let spec = self.spec.clone();
            let filters = self.filters.clone();
            let driven = self.driven.clone();
            let d = move |k: &str| driven.iter().any(|c| c == k);
            let effects = r.advance(&Observed {
                now: self.now,
                spec: &spec,
                version: self.version,
                healthy: &h,
                filters: &filters,
                traffic: self.traffic.as_ref(),
                driven: &d,
            });
            for e in &effects {
                match e {
                    Effect::Apply { spec, .. } => {
                        self.version += 1;
                        self.spec = spec.clone();
                        self.made.push(spec.clone());
                        r.applied(self.version, self.now);
                    }
                    Effect::Scale { cluster, instances } => {
                        self.asked.push((cluster.clone(), *instances));
                        if self.follow {
                            self.healthy.insert(cluster.clone(), *instances as usize);
                            r.scaled(Ok(format!("scaled {cluster}")), self.now);
                        }
                    }
                    Effect::WakeAt(_) => {}
                }
            }
            effects
        }

        /// Advances until nothing moves; filters follow each version at once.
        fn run(&mut self, r: &mut Release) {
            for _ in 0..100 {
                self.filters = vec![self.version; self.filters.len()];
                let before = (r.at, r.phase, r.status.clone());
                self.advance(r);
                self.now += 10;
                if (r.at, r.phase, r.status.clone()) == before {
                    return;
                }
            }
        }
    }

    fn start(w: &World, req: Start) -> Result<Release, Error> {
        let healthy = w.healthy.clone();
        let driven = w.driven.clone();
        Release::start(
            7,
            "web",
            req,
            "ops",
            &w.spec,
            &move |k| healthy.get(k).copied(),
            &move |k| driven.iter().any(|c| c == k),
            w.now,
        )
    }

    fn req(procedure: Procedure) -> Start {
        Start::new(procedure, "B", "v2")
    }

    fn state(s: &StrategySpec, k: &str) -> State {
        s.clusters[k].status
    }

    /// A traffic view with one live node: `(cluster, requests, 2xx, 5xx)` over the last 10 s.
    fn traffic(rows: &[(&str, u64, u64, u64)]) -> Traffic {
        use crate::api::types::{ClusterTraffic, NodeTraffic, ResponseClasses, TrafficWindow};
        Traffic {
            service: "web".into(),
            clusters: rows
                .iter()
                .map(|(k, requests, ok, failed)| ClusterTraffic {
                    cluster: (*k).into(),
                    last_10s: TrafficWindow {
                        requests: *requests,
                        responses: ResponseClasses {
                            c2xx: *ok,
                            c5xx: *failed,
                            ..ResponseClasses::default()
                        },
                        ..TrafficWindow::default()
                    },
                    ..ClusterTraffic::default()
                })
                .collect(),
            nodes: vec![NodeTraffic {
                node: "edge-1".into(),
                ..NodeTraffic::default()
            }],
            ..Traffic::default()
        }
    }

    #[test]
    fn the_swap_waits_until_the_stable_cluster_has_had_no_request_for_10_s() {
        let mut w = World::new();
        let mut r = start(&w, req(Procedure::GrayUpgrade)).unwrap();
        // A keeps getting requests after everyone was sent to B (a filter that routes by an
        // old version, a client pinned to A): no swap.
        w.traffic = Some(traffic(&[("A", 3, 3, 0), ("B", 90, 90, 0)]));
        w.run(&mut r);
        assert_eq!(
            r.at,
            r.steps.len() - 2,
            "everyone sent to B, before the swap"
        );
        assert_eq!(
            r.waiting,
            "drained: A must have no request for 10 s before the swap"
        );
        assert_eq!(
            r.gates_now[0].describe(w.now),
            "traffic: A: 0.3 req/s over the last 10 s (wants 0)"
        );
        // Each second's count is measured, not logged.
        let logged = r.log.len();
        w.traffic = Some(traffic(&[("A", 2, 2, 0), ("B", 90, 90, 0)]));
        w.now += 1_000;
        w.run(&mut r);
        assert_eq!(r.log.len(), logged);
        assert_eq!(
            r.gates_now[0].describe(w.now),
            "traffic: A: 0.2 req/s over the last 10 s (wants 0)"
        );
        assert_eq!(state(&w.spec, "A"), State::G);
        // Quiet, but not yet for 10 s since the step converged.
        w.traffic = Some(traffic(&[("A", 0, 0, 0), ("B", 90, 90, 0)]));
        let converged = w.now;
        w.run(&mut r);
        assert_eq!(r.status, Status::Running);
        w.now = converged + DRAIN_WINDOW_MS;
        w.run(&mut r);
        assert_eq!(r.status, Status::Succeeded);
        assert_eq!(state(&w.spec, "A"), State::R);
        assert!(
            r.log
                .iter()
                .any(|l| l.text == "drained: A had no request for 10 s"),
            "{:?}",
            r.log
        );

        // Never quiet: the release pauses after converge_secs, saying why.
        let mut w = World::new();
        let mut r = start(&w, req(Procedure::GrayUpgrade)).unwrap();
        w.traffic = Some(traffic(&[("A", 1, 1, 0)]));
        w.run(&mut r);
        w.now += DRAIN_WINDOW_MS + 60_000;
        w.run(&mut r);
        let Status::Paused { why } = &r.status else {
            panic!("{:?}", r.status)
        };
        assert!(why.starts_with("drained: A still had 1 requests"), "{why}");
        assert_eq!(state(&w.spec, "A"), State::G, "no swap");

        // Without traffic reports the gate says it did not check, and the swap goes on.
        let mut w = World::new();
        let mut r = start(&w, req(Procedure::GrayUpgrade)).unwrap();
        w.run(&mut r);
        assert_eq!(r.status, Status::Succeeded);
        assert!(r
            .log
            .iter()
            .any(|l| l.text == "drained: not checked (no filter of web reports its traffic)"));
    }

    #[test]
    fn the_error_gate_aborts_and_restores_the_strategy_from_before() {
        let mut w = World::new();
        let before = w.spec.clone();
        let mut r = start(
            &w,
            Start {
                gates: Gates {
                    bake_secs: 30,
                    max_error_percent: Some(5.0),
                    ..Gates::default()
                }
                .into(),
                ..req(Procedure::GrayUpgrade)
            },
        )
        .unwrap();
        // 1 failure in 40 (2.5 %) is within the gate. (Isolating B sends it nothing: its
        // bake is not analysed.)
        w.traffic = Some(traffic(&[("A", 100, 100, 0), ("B", 40, 39, 1)]));
        w.run(&mut r);
        w.now += 30_000;
        w.run(&mut r);
        assert_eq!((r.at, &r.status), (1, &Status::Running));
        assert_eq!(r.waiting, "bake: 30 s");
        // 3 in 40 (7.5 %), but A fails as often (a dependency both use): not B's doing.
        w.traffic = Some(traffic(&[("A", 100, 90, 10), ("B", 40, 37, 3)]));
        w.now += 1_000;
        w.run(&mut r);
        assert_eq!(r.status, Status::Running);
        // 3 in 40 (7.5 %) during the bake, A fine: the release aborts by itself.
        w.traffic = Some(traffic(&[("A", 100, 100, 0), ("B", 40, 37, 3)]));
        w.now += 1_000;
        w.run(&mut r);
        let Status::Aborted { why, version } = &r.status else {
            panic!("{:?}", r.status)
        };
        assert_eq!(
            why,
            "aborted by the error gate: 3 of 40 requests to B failed in the last 10 s (7.5 % > 5 %; \
             A: 0.0 %)"
        );
        assert_eq!(*version, Some(w.version));
        assert_eq!(w.spec, before);
        // Out of range is refused at start.
        let bad = start(
            &World::new(),
            Start {
                gates: Gates {
                    max_error_percent: Some(150.0),
                    ..Gates::default()
                }
                .into(),
                ..req(Procedure::GrayUpgrade)
            },
        );
        assert_eq!(bad.unwrap_err().field, "gates.max_error_percent");
    }

    #[test]
    fn a_gray_upgrade_follows_the_seed_step_by_step_each_one_version() {
        let mut w = World::new();
        let mut r = start(
            &w,
            Start {
                ids: Some(IdList {
                    nums: vec![1, 2].into(),
                    ..Default::default()
                }),
                percents: Some(vec![5.0, 50.0]),
                ..req(Procedure::GrayUpgrade)
            },
        )
        .unwrap();
        assert_eq!(r.stable, "A");
        assert_eq!(r.min_healthy, 2);
        w.run(&mut r);
        assert_eq!(r.status, Status::Succeeded);
        assert_eq!(w.made.len(), 6, "isolate, ids, 5 %, 50 %, all, swap");
        let b = |i: usize| &w.made[i].clusters["B"];
        // Isolate: no traffic, then Y, in one version.
        assert_eq!(
            (b(0).status, b(0).id.all, b(0).id.ids.len()),
            (State::Y, false, 0)
        );
        assert_eq!(b(1).id.ids.nums.to_vec(), vec![1, 2]);
        assert_eq!(b(2).percent.as_ref().unwrap().value, 5.0);
        assert_eq!(b(2).percent.as_ref().unwrap().by, PercentBy::Tenant);
        assert_eq!(b(3).percent.as_ref().unwrap().value, 50.0);
        assert_eq!((b(4).status, b(4).id.all), (State::Y, true));
        assert_eq!(state(&w.made[4], "A"), State::G, "A serves until the swap");
        // The swap: A R and B G in the same version, never a version without a G cluster.
        assert_eq!(
            (state(&w.made[5], "A"), state(&w.made[5], "B")),
            (State::R, State::G)
        );
        for s in &w.made {
            assert!(s.clusters.values().any(|c| c.status == State::G));
        }
        assert!(r.log.last().unwrap().text.starts_with("done"));
    }

    #[test]
    fn a_switch_isolates_then_swaps_and_a_rollback_brings_the_old_cluster_back() {
        let mut w = World::new();
        let mut r = start(&w, req(Procedure::Switch)).unwrap();
        w.run(&mut r);
        assert_eq!(r.status, Status::Succeeded);
        assert_eq!(w.made.len(), 2);
        assert_eq!(
            (state(&w.spec, "A"), state(&w.spec, "B")),
            (State::R, State::G)
        );
        // Rollback: A back (everyone, Y), then the swap.
        let mut back = start(
            &w,
            Start {
                to: "A".into(),
                ..req(Procedure::Rollback)
            },
        )
        .unwrap();
        assert_eq!(back.stable, "B");
        w.made.clear();
        w.run(&mut back);
        assert_eq!(back.status, Status::Succeeded);
        assert_eq!(w.made.len(), 2);
        assert_eq!(
            (state(&w.made[0], "A"), w.made[0].clusters["A"].id.all),
            (State::Y, true)
        );
        assert_eq!(
            (state(&w.spec, "A"), state(&w.spec, "B")),
            (State::G, State::R)
        );
    }

    #[test]
    fn a_release_refuses_to_start_where_the_seed_would_not() {
        let w = World::new();
        let bad = |r: Start, field: &str, says: &str| {
            let e = start(&w, r).unwrap_err();
            assert_eq!(e.field, field, "{e}");
            assert!(e.message.contains(says), "{e}");
        };
        bad(
            Start {
                to: "C".into(),
                ..req(Procedure::Switch)
            },
            "to",
            "no cluster \"C\"",
        );
        bad(
            Start {
                to: "A".into(),
                ..req(Procedure::Switch)
            },
            "to",
            "A is G",
        );
        bad(
            Start {
                from: Some("B".into()),
                ..req(Procedure::Switch)
            },
            "from",
            "B is R, not G",
        );
        bad(
            Start {
                percents: Some(vec![5.0, 5.0]),
                ..req(Procedure::GrayUpgrade)
            },
            "percents",
            "must grow",
        );
        bad(
            Start {
                percents: Some(vec![100.0]),
                ..req(Procedure::GrayUpgrade)
            },
            "percents",
            "below 100",
        );
    }

    #[test]
    fn no_traffic_reaches_the_target_before_it_has_the_capacity() {
        let mut w = World::new();
        w.healthy.insert("B".into(), 1);
        let mut r = start(&w, req(Procedure::Switch)).unwrap();
        w.run(&mut r);
        // Isolating is safe (no traffic); the swap waits for 2 healthy endpoints.
        assert_eq!(w.made.len(), 1);
        assert_eq!(r.at, 1);
        assert_eq!(r.waiting, "capacity: B has 1 of 2 healthy endpoints");
        assert_eq!(r.status, Status::Running);
        w.healthy.insert("B".into(), 2);
        w.run(&mut r);
        assert_eq!(r.status, Status::Succeeded);
    }

    #[test]
    fn each_step_waits_for_every_filter_then_pauses_when_one_stays_behind() {
        let mut w = World::new();
        let mut r = start(&w, req(Procedure::Switch)).unwrap();
        w.advance(&mut r); // isolate: version 2
        assert_eq!(w.version, 2);
        w.filters = vec![2, 1];
        let e = w.advance(&mut r);
        assert_eq!(e, vec![Effect::WakeAt(w.now + RECHECK_MS)]);
        assert_eq!(r.waiting, "converged: 1 of 2 filters below version 2");
        assert_eq!(
            r.at, 0,
            "no next step before every filter holds the version"
        );
        w.now += 60_000;
        w.advance(&mut r);
        assert_eq!(
            r.status,
            Status::Paused {
                why: "converged: 1 of 2 filters still below version 2 after 60 s".into()
            }
        );
        assert!(w.advance(&mut r).is_empty(), "paused: nothing moves");
        r.act(Action::Resume, "ops", "", w.now).unwrap();
        w.filters = vec![2, 2];
        w.run(&mut r);
        assert_eq!(r.status, Status::Succeeded);
    }

    #[test]
    fn bake_and_approval_hold_each_step() {
        let mut w = World::new();
        let mut r = start(
            &w,
            Start {
                gates: Gates {
                    bake_secs: 30,
                    approval: true,
                    ..Gates::default()
                }
                .into(),
                ..req(Procedure::Switch)
            },
        )
        .unwrap();
        w.advance(&mut r); // isolate (the first step needs no approval)
        w.filters = vec![2, 2];
        let e = w.advance(&mut r);
        assert_eq!(e, vec![Effect::WakeAt(w.now + 30_000)]);
        assert_eq!(r.waiting, "bake: 30 s");
        w.now += 30_000;
        assert!(w.advance(&mut r).is_empty());
        assert_eq!(r.waiting, "approval before step 2: A R, B G");
        assert_eq!(w.version, 2, "nothing made before the approval");
        r.act(Action::Approve, "lead", "looks good", w.now).unwrap();
        assert!(r.act(Action::Approve, "lead", "", w.now).is_err(), "once");
        w.advance(&mut r);
        assert_eq!(w.version, 3);
        assert!(r
            .log
            .iter()
            .any(|l| l.text == "approved by lead: looks good"));
    }

    #[test]
    fn abort_from_every_step_restores_the_exact_strategy_from_before() {
        let full = start(&World::new(), req(Procedure::GrayUpgrade))
            .unwrap()
            .steps
            .len();
        for stop_at in 0..full {
            let mut w = World::new();
            let before = w.spec.clone();
            let mut r = start(&w, req(Procedure::GrayUpgrade)).unwrap();
            while r.at < stop_at {
                w.filters = vec![w.version; 2];
                w.advance(&mut r);
                w.now += 10;
            }
            let effects = r.act(Action::Abort, "ops", "5xx", w.now).unwrap();
            let [Effect::Apply { spec, .. }] = effects.as_slice() else {
                panic!("{effects:?}")
            };
            assert_eq!(*spec, before, "step {stop_at}");
            r.applied(w.version + 1, w.now);
            assert_eq!(
                r.status,
                Status::Aborted {
                    why: "aborted by ops: 5xx".into(),
                    version: Some(w.version + 1)
                }
            );
            assert!(w.advance(&mut r).is_empty());
            assert!(r.act(Action::Resume, "ops", "", w.now).is_err());
        }
    }

    #[test]
    fn a_step_already_in_place_after_a_restart_makes_no_second_version() {
        let mut w = World::new();
        let mut r = start(&w, req(Procedure::Switch)).unwrap();
        // The writer made the isolate version, then the process died before saving the release.
        let saved = r.clone();
        w.advance(&mut r);
        let mut r = saved;
        let made = w.made.len();
        w.filters = vec![w.version; 2];
        w.advance(&mut r);
        assert_eq!(w.made.len(), made + 1, "only the swap is new");
        assert!(r.log.iter().any(|l| l.text.ends_with("already in place")));
    }

    #[test]
    fn a_refused_edit_pauses_with_the_reason() {
        let w = World::new();
        let mut r = start(&w, req(Procedure::Switch)).unwrap();
        r.phase = Phase::Applying;
        r.refused("web would have no G cluster", w.now);
        assert_eq!(
            r.status,
            Status::Paused {
                why: "the edit was refused: web would have no G cluster".into()
            }
        );
        assert_eq!(r.phase, Phase::Ready { approved: true });
    }

    #[test]
    fn a_release_survives_its_own_serialization() {
        let w = World::new();
        let r = start(&w, req(Procedure::GrayUpgrade)).unwrap();
        let back: Release = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }

    /// A service with three stable instances (A) and a new cluster with none (B); drivers for
    /// both when `driven`.
    fn three(driven: bool) -> World {
        let mut w = World::new();
        w.healthy = [("A".to_string(), 3), ("B".to_string(), 0)].into();
        if driven {
            w.driven = vec!["A".into(), "B".into()];
        }
        w
    }

    fn scale(role: Role, instances: u32) -> Step {
        Step::Scale {
            cluster: role,
            instances,
        }
    }

    #[test]
    fn one_by_one_replaces_one_instance_at_a_time_each_scale_asked_once() {
        let mut w = three(true);
        let before = w.spec.clone();
        let mut r = start(&w, req(Procedure::OneByOne)).unwrap();
        use Role::{Stable, Target};
        assert_eq!(
            r.steps,
            [
                scale(Target, 1),
                Step::Join,
                scale(Stable, 2),
                scale(Target, 2),
                scale(Stable, 1),
                scale(Target, 3),
                scale(Stable, 0),
                Step::Swap
            ]
        );
        w.run(&mut r);
        assert_eq!(r.status, Status::Succeeded, "{:?}", r.log);
        let asked: Vec<(&str, u32)> = w.asked.iter().map(|(k, n)| (k.as_str(), *n)).collect();
        assert_eq!(
            asked,
            [("B", 1), ("A", 2), ("B", 2), ("A", 1), ("B", 3), ("A", 0)]
        );
        // Two versions: the join, then the stable cluster R.
        assert_eq!(w.made.len(), 2);
        let join = &w.made[0];
        for k in ["A", "B"] {
            assert_eq!(join.clusters[k].status, State::G, "{k}");
            assert!(join.clusters[k].id.all, "{k}");
            assert_eq!(join.clusters[k].weight, Weight::Endpoints, "{k}");
        }
        assert_eq!(
            (state(&w.spec, "A"), state(&w.spec, "B")),
            (State::R, State::G)
        );
        // Nothing else of the strategy moved.
        let mut expect = before.clone();
        for k in ["A", "B"] {
            let c = expect.clusters.get_mut(k).unwrap();
            c.id.all = true;
            c.weight = Weight::Endpoints;
        }
        expect.clusters.get_mut("A").unwrap().status = State::R;
        expect.clusters.get_mut("B").unwrap().status = State::G;
        assert_eq!(w.spec, expect);
        assert_eq!(
            r.instances_before,
            BTreeMap::from([("A".to_string(), 3), ("B".to_string(), 0)])
        );
    }

    #[test]
    fn one_by_one_needs_the_stable_instance_count() {
        let mut w = World::new();
        w.healthy.clear();
        let e = start(&w, req(Procedure::OneByOne)).unwrap_err();
        assert_eq!(e.field, "procedure");
        assert!(e.message.contains("knows no healthy instance of A"), "{e}");
    }

    #[test]
    fn without_a_driver_a_scale_step_waits_and_says_for_what() {
        let mut w = three(false);
        let mut r = start(&w, req(Procedure::OneByOne)).unwrap();
        w.run(&mut r);
        assert_eq!(
            r.waiting,
            "instances: B has 0 healthy instances, wants at least 1 (no instance driver for B: \
             start or stop them yourself)"
        );
        assert!(w.made.is_empty() && w.asked.is_empty());
        // Someone starts one: the join is made, then the release waits for A to shrink.
        w.healthy.insert("B".into(), 1);
        w.run(&mut r);
        assert_eq!(w.made.len(), 1);
        assert_eq!(
            r.waiting,
            "instances: A has 3 healthy instances, wants at most 2 (no instance driver for A: \
             start or stop them yourself)"
        );
        assert!(w.asked.is_empty());
    }

    #[test]
    fn a_scale_is_never_asked_twice_across_a_restart() {
        let mut w = three(true);
        w.follow = false;
        let mut r = start(&w, req(Procedure::OneByOne)).unwrap();
        w.advance(&mut r);
        assert_eq!(w.asked, [("B".to_string(), 1)]);
        assert_eq!(
            r.phase,
            Phase::Scaling {
                at: w.now,
                answered: false
            }
        );
        // The process dies before the driver answers; the saved release is taken up again.
        let saved: Release = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        let mut r = saved;
        for _ in 0..5 {
            w.now += 1_000;
            w.advance(&mut r);
        }
        assert_eq!(w.asked.len(), 1, "asked once");
        assert_eq!(r.waiting, "instances: B has 0 of 1 healthy instances");
        // The instance shows up: the release moves on without asking again.
        w.healthy.insert("B".into(), 1);
        w.advance(&mut r);
        w.filters = vec![w.version; 2];
        w.advance(&mut r);
        assert_eq!(w.made.len(), 1, "the join");
        assert_eq!(r.at, 2);
        assert_eq!(w.asked.len(), 2, "then A down to 2: {:?}", w.asked);
        // A scale that never shows pauses the release after scale_secs; only resume asks again.
        w.now += 300_000;
        w.advance(&mut r);
        let Status::Paused { why } = &r.status else {
            panic!("{:?}", r.status)
        };
        assert!(
            why.starts_with(
                "instances: A still has 3 healthy instances 300 s after the driver \
                             was asked for 2"
            ),
            "{why}"
        );
        assert_eq!(w.asked.len(), 2);
        r.act(Action::Resume, "ops", "", w.now).unwrap();
        w.advance(&mut r);
        assert_eq!(w.asked.len(), 3);
        assert_eq!(w.asked[2], ("A".to_string(), 2));
    }

    #[test]
    fn a_driver_that_fails_pauses_the_release_with_its_words() {
        let mut w = three(true);
        w.follow = false;
        let mut r = start(&w, req(Procedure::OneByOne)).unwrap();
        w.advance(&mut r);
        r.scaled(Err("quota exceeded".into()), w.now);
        assert_eq!(
            r.status,
            Status::Paused {
                why: "instance driver failed: quota exceeded".into()
            }
        );
        r.act(Action::Resume, "ops", "", w.now).unwrap();
        w.advance(&mut r);
        assert_eq!(w.asked.len(), 2, "resume asks again");
    }

    #[test]
    fn abort_from_every_step_of_a_one_by_one_restores_strategy_and_instances() {
        let steps = start(&three(true), req(Procedure::OneByOne))
            .unwrap()
            .steps
            .len();
        for stop_at in 0..steps {
            let mut w = three(true);
            let before = w.spec.clone();
            let mut r = start(&w, req(Procedure::OneByOne)).unwrap();
            for _ in 0..100 {
                if r.at >= stop_at {
                    break;
                }
                w.filters = vec![w.version; 2];
                w.advance(&mut r);
                w.now += 10;
            }
            assert_eq!(r.at, stop_at);
            let mut effects = r.act(Action::Abort, "ops", "", w.now).unwrap();
            let mut expect = Vec::new();
            // B is asked for its first instance at step 1; A for one fewer as soon as the join
            // (step 2) is done, in the same turn. A's instances come back first; the strategy
            // is restored once they are healthy.
            if stop_at > 1 {
                assert_eq!(
                    effects,
                    [Effect::Scale {
                        cluster: "A".into(),
                        instances: 3,
                    }],
                    "step {stop_at}"
                );
                let h = w.healthy.clone();
                let spec = w.spec.clone();
                let d = |_: &str| true;
                let mut obs_with = |a: usize| {
                    let mut h = h.clone();
                    h.insert("A".into(), a);
                    let hh = move |k: &str| h.get(k).copied();
                    r.advance(&Observed {
                        now: w.now,
                        spec: &spec,
                        version: w.version,
                        healthy: &hh,
                        filters: &[],
                        traffic: None,
                        driven: &d,
                    })
                };
                assert!(obs_with(2).is_empty(), "A has 2 of 3");
                effects = obs_with(3);
                assert_eq!(r.waiting, "", "step {stop_at}");
            }
            expect.push(Effect::Apply {
                spec: before.clone(),
                what: "release 7 abort: the strategy from before it".into(),
            });
            assert_eq!(effects, expect, "step {stop_at}");
            // B's instances go (asked once) only when every filter holds the restored version.
            let restored = w.version + 1;
            r.applied(restored, w.now);
            let h = w.healthy.clone();
            let hh = move |k: &str| h.get(k).copied();
            let d = |_: &str| true;
            let spec = before.clone();
            let mut with_filters = |filters: &[u64]| {
                r.advance(&Observed {
                    now: w.now,
                    spec: &spec,
                    version: restored,
                    healthy: &hh,
                    filters,
                    traffic: None,
                    driven: &d,
                })
            };
            if stop_at > 0 {
                assert_eq!(
                    with_filters(&[restored, restored - 1]),
                    [Effect::WakeAt(w.now + RECHECK_MS)],
                    "step {stop_at}"
                );
                assert_eq!(
                    with_filters(&[restored, restored]),
                    [Effect::Scale {
                        cluster: "B".into(),
                        instances: 0,
                    }],
                    "step {stop_at}"
                );
            }
            assert!(with_filters(&[restored, restored]).is_empty());
            assert!(!r.wants_driving(), "step {stop_at}");
        }
    }

    #[test]
    fn an_abort_refused_for_want_of_stable_instances_is_made_once_they_are_back() {
        let mut w = three(true);
        let mut r = start(&w, req(Procedure::OneByOne)).unwrap();
        for _ in 0..100 {
            if r.at == 7 {
                break;
            }
            w.filters = vec![w.version; 2];
            w.advance(&mut r);
            w.now += 10;
        }
        assert_eq!(r.at, 7);
        assert_eq!(w.healthy["A"], 0);
        w.follow = false;
        let effects = r.act(Action::Abort, "ops", "", w.now).unwrap();
        assert!(
            matches!(effects.as_slice(), [Effect::Scale { .. }]),
            "{effects:?}"
        );
        assert!(r.wants_driving());
        assert!(w.advance(&mut r).is_empty(), "A has no instance yet");
        w.healthy.insert("A".into(), 3);
        // Say the writer refuses the restore once: it is made again, and the target's
        // instances are asked for once only.
        let mut r2 = r.clone();
        let h = w.healthy.clone();
        let hh = move |k: &str| h.get(k).copied();
        let d = |_: &str| true;
        let spec = w.spec.clone();
        let obs = Observed {
            now: w.now,
            spec: &spec,
            version: w.version,
            healthy: &hh,
            filters: &[],
            traffic: None,
            driven: &d,
        };
        let effects = r2.advance(&obs);
        assert!(
            matches!(effects.as_slice(), [Effect::Apply { .. }]),
            "{effects:?}"
        );
        r2.refused("web would have only unhealthy G clusters", w.now);
        let effects = r2.advance(&obs);
        assert!(
            matches!(effects.as_slice(), [Effect::Apply { .. }]),
            "{effects:?}"
        );
        let effects = w.advance(&mut r);
        assert!(
            matches!(effects.as_slice(), [Effect::Apply { .. }]),
            "{effects:?}"
        );
        assert!(matches!(
            r.status,
            Status::Aborted {
                version: Some(_),
                ..
            }
        ));
        // B's instances go once the filters hold the restored strategy, asked once.
        assert!(r.wants_driving());
        assert!(matches!(w.advance(&mut r).as_slice(), [Effect::WakeAt(_)]));
        w.filters = vec![w.version; 2];
        assert_eq!(
            w.advance(&mut r),
            [Effect::Scale {
                cluster: "B".into(),
                instances: 0
            }]
        );
        assert!(!r.wants_driving());
    }

    #[test]
    fn a_gray_upgrade_with_a_driver_first_brings_the_target_to_the_stable_size() {
        let mut w = three(true);
        let mut r = start(&w, req(Procedure::GrayUpgrade)).unwrap();
        assert_eq!(r.steps[0], scale(Role::Target, 3));
        assert_eq!(r.steps[1], Step::Isolate);
        w.run(&mut r);
        assert_eq!(r.status, Status::Succeeded);
        assert_eq!(w.asked, [("B".to_string(), 3)]);
        // Without one the plan is as before and the capacity gate waits.
        let r = start(&three(false), req(Procedure::GrayUpgrade)).unwrap();
        assert_eq!(r.steps[0], Step::Isolate);
    }

    #[test]
    fn the_latency_gate_aborts_when_the_target_is_slower_than_allowed() {
        let mut w = World::new();
        let before = w.spec.clone();
        let mut r = start(
            &w,
            Start {
                gates: Gates {
                    bake_secs: 30,
                    max_p99_ratio: Some(2.0),
                    min_requests: 50,
                    ..Gates::default()
                }
                .into(),
                ..req(Procedure::GrayUpgrade)
            },
        )
        .unwrap();
        let with_p99 = |rows: &[(&str, u64, f64)]| {
            let mut t = traffic(
                &rows
                    .iter()
                    .map(|(k, n, _)| (*k, *n, *n, 0))
                    .collect::<Vec<_>>(),
            );
            for (c, (_, _, p)) in t.clusters.iter_mut().zip(rows) {
                c.last_10s.p99_ms = Some(*p);
            }
            t
        };
        // Slow, but too few requests to judge; then enough, and within 2x.
        w.traffic = Some(with_p99(&[("A", 500, 20.0), ("B", 49, 200.0)]));
        w.run(&mut r);
        w.now += 30_000;
        w.run(&mut r);
        assert_eq!((r.at, &r.status), (1, &Status::Running));
        w.traffic = Some(with_p99(&[("A", 500, 20.0), ("B", 60, 39.0)]));
        w.now += 1_000;
        w.run(&mut r);
        assert_eq!(r.status, Status::Running);
        // 2.5 times A's p99: the release aborts by itself and says why.
        w.traffic = Some(with_p99(&[("A", 500, 20.0), ("B", 60, 50.0)]));
        w.now += 1_000;
        w.run(&mut r);
        let Status::Aborted { why, .. } = &r.status else {
            panic!("{:?}", r.status)
        };
        assert_eq!(
            why,
            "aborted by the latency gate: p99 of B is 50.0 ms over the last 10 s, 2.5 times A's \
             20.0 ms (> 2; 60 and 500 requests)"
        );
        assert_eq!(w.spec, before);
        assert!(r.log.iter().any(|l| l.text.contains("p99 of B is 50.0 ms")));
        let bad = start(
            &World::new(),
            Start {
                gates: Gates {
                    max_p99_ratio: Some(0.5),
                    ..Gates::default()
                }
                .into(),
                ..req(Procedure::GrayUpgrade)
            },
        );
        assert_eq!(bad.unwrap_err().field, "gates.max_p99_ratio");
    }

    #[test]
    fn rollback_of_a_running_release_at_any_step_is_an_abort_back_to_the_strategy_from_before() {
        let full = start(&World::new(), req(Procedure::GrayUpgrade))
            .unwrap()
            .steps
            .len();
        for stop_at in 0..full {
            let mut w = World::new();
            let before = w.spec.clone();
            let mut r = start(&w, req(Procedure::GrayUpgrade)).unwrap();
            while r.at < stop_at {
                w.filters = vec![w.version; 2];
                w.advance(&mut r);
                w.now += 10;
            }
            assert!(
                r.rollback(&w.spec, "").is_err(),
                "running: act, not a new release"
            );
            let effects = r.act(Action::Rollback, "ops", "5xx", w.now).unwrap();
            let [Effect::Apply { spec, .. }] = effects.as_slice() else {
                panic!("{effects:?}")
            };
            assert_eq!(*spec, before, "step {stop_at}");
            r.applied(w.version + 1, w.now);
            assert_eq!(
                r.status,
                Status::Aborted {
                    why: "rolled back by ops: 5xx".into(),
                    version: Some(w.version + 1)
                }
            );
            assert!(r.gates_now.is_empty());
            assert!(w.advance(&mut r).is_empty());
        }
    }

    #[test]
    fn rollback_after_a_gray_upgrade_brings_the_old_cluster_back_by_the_seeds_steps() {
        let mut w = World::new();
        let mut r = start(
            &w,
            Start {
                gates: Gates {
                    bake_secs: 5,
                    approval: true,
                    max_error_percent: Some(1.0),
                    converge_secs: 20,
                    ..Gates::default()
                }
                .into(),
                ..req(Procedure::GrayUpgrade)
            },
        )
        .unwrap();
        for _ in 0..30 {
            w.run(&mut r);
            let _ = r.act(Action::Approve, "ops", "", w.now);
            w.now += 5_000;
        }
        assert_eq!(r.status, Status::Succeeded);
        let upgraded = w.spec.clone();
        let back = r.rollback(&w.spec, "p99 up").unwrap();
        assert_eq!(
            back,
            Start {
                procedure: Procedure::Rollback,
                to: "A".into(),
                from: Some("B".into()),
                ids: None,
                intervals: Vec::new(),
                percents: None,
                by: None,
                // The way back keeps the convergence and drained gates, not the approvals,
                // bake or analysis.
                gates: GatesSpec {
                    converge_secs: Some(20),
                    bake_secs: Some(0),
                    approval: Some(false),
                    drained: Some(true),
                    scale_secs: Some(300),
                    ..GatesSpec::default()
                },
                reason: "rollback of release 7: p99 up".into(),
            }
        );
        let mut b = start(&w, back).unwrap();
        assert_eq!(b.steps, [Step::All, Step::Swap]);
        // Everyone sent to A: the swap waits until B, the cluster retired, has had no request.
        w.traffic = Some(traffic(&[("A", 90, 90, 0), ("B", 2, 2, 0)]));
        w.made.clear();
        w.run(&mut b);
        assert_eq!((b.at, &b.status), (0, &Status::Running));
        assert_eq!(
            b.gates_now,
            [GateNow::Traffic {
                cluster: "B".into(),
                requests: 2,
                window_secs: 10,
                quiet_until: b
                    .log
                    .iter()
                    .rev()
                    .find(|l| l.text.starts_with("converged"))
                    .unwrap()
                    .at
                    + DRAIN_WINDOW_MS,
            }]
        );
        w.traffic = Some(traffic(&[("A", 90, 90, 0)]));
        w.now += DRAIN_WINDOW_MS;
        w.run(&mut b);
        assert_eq!(b.status, Status::Succeeded, "{:?}", b.log);
        assert_eq!(w.made.len(), 2, "A everyone and Y, then the swap");
        let a = |i: usize| &w.made[i].clusters["A"];
        assert_eq!((a(0).status, a(0).id.all), (State::Y, true));
        assert_eq!(state(&w.made[0], "B"), State::G, "B serves until the swap");
        assert_eq!(
            (state(&w.spec, "A"), state(&w.spec, "B")),
            (State::G, State::R)
        );
        // Nothing else moved: B keeps what the upgrade gave it, kept R in turn.
        let mut expect = upgraded;
        expect.clusters.get_mut("A").unwrap().status = State::G;
        expect.clusters.get_mut("B").unwrap().status = State::R;
        assert_eq!(w.spec, expect);
    }

    #[test]
    fn rollback_after_a_one_by_one_first_brings_the_old_instances_back() {
        let mut w = three(true);
        let mut r = start(&w, req(Procedure::OneByOne)).unwrap();
        w.run(&mut r);
        assert_eq!(r.status, Status::Succeeded);
        assert_eq!((w.healthy["A"], w.healthy["B"]), (0, 3));
        w.asked.clear();
        let mut b = start(&w, r.rollback(&w.spec, "").unwrap()).unwrap();
        assert_eq!(b.steps, [scale(Role::Target, 3), Step::All, Step::Swap]);
        w.run(&mut b);
        assert_eq!(b.status, Status::Succeeded, "{:?}", b.log);
        assert_eq!(w.asked, [("A".to_string(), 3)]);
        assert_eq!(
            (state(&w.spec, "A"), state(&w.spec, "B")),
            (State::G, State::R)
        );
    }

    #[test]
    fn rollback_refuses_when_there_is_nothing_to_roll_back_and_says_why() {
        let why = |r: &Release, spec: &StrategySpec| r.rollback(spec, "").unwrap_err().message;
        // Aborted: the strategy from before is already back.
        let mut w = World::new();
        let mut r = start(&w, req(Procedure::Switch)).unwrap();
        w.advance(&mut r);
        r.act(Action::Abort, "ops", "", w.now).unwrap();
        r.applied(9, w.now);
        assert_eq!(
            why(&r, &w.spec),
            "nothing to roll back: release 7 of web was aborted (version 9), so its strategy \
             from before is already back"
        );
        // A rollback is not rolled back.
        let mut w = World::new();
        let mut r = start(&w, req(Procedure::Switch)).unwrap();
        w.run(&mut r);
        let mut b = start(&w, r.rollback(&w.spec, "").unwrap()).unwrap();
        w.run(&mut b);
        assert_eq!(b.status, Status::Succeeded);
        assert_eq!(
            why(&b, &w.spec),
            "nothing to roll back: release 7 of web was itself a rollback (to A); to move to B \
             again, start a release"
        );
        // The strategy moved on since the release ended (A no longer R, or gone).
        let mut w = World::new();
        let mut r = start(&w, req(Procedure::Switch)).unwrap();
        w.run(&mut r);
        let mut moved = w.spec.clone();
        moved.clusters.get_mut("A").unwrap().status = State::Y;
        assert_eq!(
            why(&r, &moved),
            "nothing to roll back: web's strategy has changed since release 7 ended (A is Y, \
             not R); edit it, or start a release"
        );
        moved.clusters.remove("A");
        assert!(why(&r, &moved).contains("(A is gone, not R)"));
    }

    #[test]
    fn gates_now_say_what_each_gate_measures() {
        // Convergence: which filters hold the step's version.
        let mut w = World::new();
        let mut r = start(&w, req(Procedure::Switch)).unwrap();
        w.advance(&mut r);
        w.filters = vec![2, 1];
        w.advance(&mut r);
        let g = &r.gates_now;
        assert_eq!(
            *g,
            [GateNow::Converged {
                version: 2,
                holding: 1,
                filters: 2,
                timeout_at: 1_000 + 60_000
            }]
        );
        assert_eq!(
            g[0].describe(1_000 + 18_000),
            "converged: 1/2 filters hold version 2 (pauses in 42 s if not all)"
        );

        // Capacity: B's healthy endpoints against A's.
        let mut w = World::new();
        w.healthy.insert("B".into(), 1);
        let mut r = start(&w, req(Procedure::GrayUpgrade)).unwrap();
        w.run(&mut r);
        assert_eq!(r.at, 1);
        assert_eq!(
            r.gates_now,
            [GateNow::Capacity {
                cluster: "B".into(),
                healthy: 1,
                wants: 2
            }]
        );
        assert_eq!(
            r.gates_now[0].describe(0),
            "capacity: B: 1 of 2 healthy endpoints"
        );

        // Approval: the command that lets the release on.
        let mut w = World::new();
        let mut r = start(
            &w,
            Start {
                gates: Gates {
                    approval: true,
                    ..Gates::default()
                }
                .into(),
                ..req(Procedure::Switch)
            },
        )
        .unwrap();
        w.run(&mut r);
        assert_eq!(
            r.gates_now,
            [GateNow::Approval {
                service: "web".into(),
                step: 2
            }]
        );
        assert_eq!(
            r.gates_now[0].describe(0),
            "approval: step 2 waits for `graylane release approve web`"
        );
        r.act(Action::Pause, "ops", "", w.now).unwrap();
        assert!(r.gates_now.is_empty(), "a paused release holds by itself");

        // Bake, with the analysis gates watching the target meanwhile.
        let mut w = World::new();
        let mut r = start(
            &w,
            Start {
                percents: Some(vec![10.0]),
                gates: Gates {
                    bake_secs: 30,
                    max_error_percent: Some(5.0),
                    max_p99_ratio: Some(2.0),
                    min_requests: 50,
                    ..Gates::default()
                }
                .into(),
                ..req(Procedure::GrayUpgrade)
            },
        )
        .unwrap();
        let mut t = traffic(&[("A", 100, 100, 0), ("B", 40, 39, 1)]);
        t.clusters[0].last_10s.p99_ms = Some(20.0);
        t.clusters[1].last_10s.p99_ms = Some(30.0);
        w.traffic = Some(t.clone());
        w.run(&mut r);
        w.now += 30_000;
        w.run(&mut r);
        assert_eq!(r.at, 1, "10 %, baking");
        let converged = r
            .log
            .iter()
            .rev()
            .find(|l| l.text.starts_with("converged"))
            .unwrap()
            .at;
        let analysis = GateNow::Analysis {
            target: "B".into(),
            stable: "A".into(),
            target_requests: 40,
            stable_requests: 100,
            target_failed_percent: Some(2.5),
            stable_failed_percent: Some(0.0),
            max_error_percent: Some(5.0),
            p99_ratio: Some(1.5),
            max_p99_ratio: Some(2.0),
            min_requests: 50,
        };
        assert_eq!(
            r.gates_now,
            [
                analysis.clone(),
                GateNow::Bake {
                    secs: 30,
                    until: converged + 30_000
                }
            ]
        );
        assert_eq!(
            analysis.describe(0),
            "analysis: B 5xx 2.5 % vs A 0.0 % (max 5 %), p99 ratio not judged yet (max 2): 40 \
             of 50 requests, 40 requests to B, 100 to A in 10 s"
        );
        t.clusters[1].last_10s.requests = 312;
        t.clusters[1].last_10s.responses.c2xx = 311;
        w.traffic = Some(t);
        w.now += 1_000;
        w.run(&mut r);
        assert_eq!(
            r.gates_now[0].describe(0),
            "analysis: B 5xx 0.3 % vs A 0.0 % (max 5 %), p99 ratio 1.50 (max 2), 312 requests \
             to B, 100 to A in 10 s"
        );
        assert_eq!(
            r.gates_now[1].describe(converged + 18_000),
            "bake: 12 s of 30 s left"
        );

        // Traffic: the cluster retired before the swap, in requests per second.
        let g = GateNow::Traffic {
            cluster: "A".into(),
            requests: 4,
            window_secs: 10,
            quiet_until: 50_000,
        };
        assert_eq!(
            g.describe(60_000),
            "traffic: A: 0.4 req/s over the last 10 s (wants 0)"
        );
        let quiet = GateNow::Traffic {
            cluster: "A".into(),
            requests: 0,
            window_secs: 10,
            quiet_until: 50_000,
        };
        assert_eq!(
            quiet.describe(44_000),
            "traffic: A: 0.0 req/s over the last 10 s (wants 0), 6 s to go"
        );

        // Instances: without a driver, someone must start them.
        let mut w = three(false);
        let mut r = start(&w, req(Procedure::OneByOne)).unwrap();
        w.run(&mut r);
        assert_eq!(
            r.gates_now,
            [GateNow::Instances {
                cluster: "B".into(),
                healthy: Some(0),
                wants: 1,
                at_most: false,
                driven: false
            }]
        );
        assert_eq!(
            r.gates_now[0].describe(0),
            "instances: B: 0 healthy instances, wants at least 1 (no instance driver: start or \
             stop them yourself)"
        );
    }

    #[test]
    fn percent_steps_are_of_tenants_unless_asked_of_requests() {
        let mut w = World::new();
        let mut r = start(
            &w,
            Start {
                percents: Some(vec![20.0]),
                by: Some(PercentBy::Request),
                ..req(Procedure::GrayUpgrade)
            },
        )
        .unwrap();
        assert_eq!(r.steps[1].describe("B", "A"), "B: 20% of requests");
        w.run(&mut r);
        assert_eq!(
            w.made[1].clusters["B"].percent,
            Some(PercentSpec {
                value: 20.0,
                by: PercentBy::Request,
                salt: 0
            })
        );
        // A step saved before `by` existed is of tenants.
        let old: Step = serde_json::from_str(r#"{"step": "percent", "percent": 5.0}"#).unwrap();
        assert_eq!(
            old,
            Step::Percent {
                percent: 5.0,
                by: PercentBy::Tenant
            }
        );
        assert_eq!(
            serde_json::to_string(&old).unwrap(),
            r#"{"step":"percent","percent":5.0}"#
        );
    }

    #[test]
    fn a_release_sets_its_gates_over_its_services_defaults_over_the_built_in_ones() {
        let service = GatesSpec {
            bake_secs: Some(30),
            approval: Some(true),
            max_error_percent: Some(5.0),
            ..GatesSpec::default()
        };
        let asked = GatesSpec {
            bake_secs: Some(0),
            converge_secs: Some(10),
            ..GatesSpec::default()
        };
        assert_eq!(
            asked.or(&service).resolve().unwrap(),
            Gates {
                bake_secs: 0,
                converge_secs: 10,
                approval: true,
                max_error_percent: Some(5.0),
                ..Gates::default()
            }
        );
        assert_eq!(GatesSpec::default().resolve().unwrap(), Gates::default());
        let e = GatesSpec {
            max_p99_ratio: Some(0.5),
            ..GatesSpec::default()
        }
        .resolve()
        .unwrap_err();
        assert_eq!(e.field, "gates.max_p99_ratio");
    }

    #[test]
    fn the_traffic_gate_on_the_target_waits_until_the_step_routes_to_it() {
        let gated = || Start {
            percents: Some(vec![10.0]),
            gates: GatesSpec {
                min_target_requests: Some(20),
                ..GatesSpec::default()
            },
            ..req(Procedure::GrayUpgrade)
        };
        let mut w = World::new();
        let mut r = start(&w, gated()).unwrap();
        // 10 % sent to B, but the reports show B only 5 requests: the step holds.
        w.traffic = Some(traffic(&[("A", 200, 200, 0), ("B", 5, 5, 0)]));
        w.run(&mut r);
        assert_eq!((r.at, &r.status), (1, &Status::Running));
        assert_eq!(
            r.gates_now,
            [GateNow::Receives {
                cluster: "B".into(),
                requests: 5,
                wants: 20,
                window_secs: 10
            }]
        );
        assert_eq!(
            r.gates_now[0].describe(0),
            "traffic: B: 5 requests over the last 10 s (wants at least 20)"
        );
        // Enough: on to everyone, whose step passes too (logged once each, though the drain
        // gate holds that step for 10 s).
        w.traffic = Some(traffic(&[("A", 200, 200, 0), ("B", 25, 25, 0)]));
        w.now += 1_000;
        w.run(&mut r);
        assert_eq!(r.at, 2);
        w.traffic = Some(traffic(&[("A", 0, 0, 0), ("B", 225, 225, 0)]));
        for _ in 0..12 {
            w.now += 1_000;
            w.run(&mut r);
        }
        assert_eq!(r.status, Status::Succeeded, "{:?}", r.log);
        let passed = r
            .log
            .iter()
            .filter(|l| l.text == "traffic: B had at least 20 requests in the last 10 s")
            .count();
        assert_eq!(passed, 3, "10 %, all, swap: {:?}", r.log);
        // Never enough: the release pauses and asks why.
        let mut w = World::new();
        let mut r = start(&w, gated()).unwrap();
        w.traffic = Some(traffic(&[("A", 200, 200, 0), ("B", 0, 0, 0)]));
        w.run(&mut r);
        w.now += DRAIN_WINDOW_MS + 60_000;
        w.run(&mut r);
        let Status::Paused { why } = &r.status else {
            panic!("{:?}", r.status)
        };
        assert!(
            why.starts_with("traffic: B had only 0 requests in the last 10 s, "),
            "{why}"
        );
        assert!(
            why.ends_with("wants at least 20: does the step route to it?"),
            "{why}"
        );
        // Without reports it is not checked, and said so.
        let mut w = World::new();
        let mut r = start(&w, gated()).unwrap();
        w.run(&mut r);
        assert_eq!(r.status, Status::Succeeded);
        assert!(r
            .log
            .iter()
            .any(|l| l.text == "traffic: not checked (no filter of web reports its traffic)"));
    }
}
