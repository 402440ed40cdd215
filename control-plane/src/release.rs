//! Release procedures (seed 000): the gray upgrade, the cluster switch and the rollback, as a
//! pure state machine. A [`Release`] is plain data (stored as JSON beside the versions, so it
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
//! release began.

use graylane_strategy::id::{IdList, Interval};
use graylane_strategy::{PercentBy, PercentSpec, State, StrategySpec};
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
    /// Bring the old cluster back: everyone to it as Y, then swap the states.
    Rollback,
}

impl std::fmt::Display for Procedure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Procedure::GrayUpgrade => "gray-upgrade",
            Procedure::Switch => "switch",
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
    /// This share of tenants to the target (stable per tenant), besides the ids.
    Percent { percent: f64 },
    /// Everyone to the target (`id.all: true`, state Y): the stable cluster keeps only the
    /// requests the target cannot take.
    All,
    /// Stable R, target G, in one version.
    Swap,
}

impl Step {
    /// Whether the step sends traffic to the target (so its capacity is checked first).
    fn sends_traffic(&self) -> bool {
        !matches!(self, Step::Isolate)
    }

    pub fn describe(&self, target: &str, stable: &str) -> String {
        match self {
            Step::Isolate => format!("{target}: id.all false, no ids, intervals or percentage; Y"),
            Step::Ids { ids, intervals } => format!(
                "{target}: whitelist {} ids, {} intervals",
                ids.len(),
                intervals.len()
            ),
            Step::Percent { percent } => format!("{target}: {percent}% of tenants"),
            Step::All => format!("{target}: id.all true (everyone), Y"),
            Step::Swap => format!("{stable} R, {target} G"),
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
    pub started_by: String,
    pub reason: String,
    pub started_at: u64,
    /// The service's strategy when the release began: what `abort` restores.
    #[schema(value_type = Object)]
    pub before: StrategySpec,
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
    #[serde(default)]
    pub gates: Gates,
    /// Why (kept in the log and the operation log).
    #[serde(default)]
    pub reason: String,
}

/// An operator's action on a running release.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Approve,
    Pause,
    Resume,
    Abort,
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Action::Approve => "approve",
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Abort => "abort",
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

/// What the writer is asked to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Make this strategy the service's, as one version; then call [`Release::applied`] or
    /// [`Release::refused`].
    Apply { spec: StrategySpec, what: String },
    /// Call [`Release::advance`] again at this time (ms) even if nothing else happens.
    WakeAt(u64),
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
        now: u64,
    ) -> Result<Release, Error> {
        if let Some(p) = req.gates.max_error_percent {
            if !(0.0..=100.0).contains(&p) {
                return Err(err(
                    "gates.max_error_percent",
                    format!("{p}: a share of requests, 0 to 100"),
                ));
            }
        }
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
        let mut steps = Vec::new();
        match req.procedure {
            Procedure::GrayUpgrade => {
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
                    steps.push(Step::Percent { percent: p });
                }
                steps.extend([Step::All, Step::Swap]);
            }
            Procedure::Switch => steps.extend([Step::Isolate, Step::Swap]),
            Procedure::Rollback => steps.extend([Step::All, Step::Swap]),
        }
        let min_healthy = req
            .gates
            .min_healthy
            .unwrap_or_else(|| healthy(&stable).unwrap_or(0).max(1));
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
            gates: req.gates,
            min_healthy,
            waiting: String::new(),
            started_by: who.to_string(),
            reason: req.reason,
            started_at: now,
            before: spec.clone(),
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
                self.note(now, format!("paused by {who}{why_s}"));
                Ok(Vec::new())
            }
            Action::Resume => {
                if !matches!(self.status, Status::Paused { .. }) {
                    return Err(err("release", "not paused"));
                }
                self.status = Status::Running;
                self.waiting.clear();
                // A step whose gate timed out starts its gates over.
                if let Phase::Applied { version, .. } = self.phase {
                    self.phase = Phase::Applied {
                        version,
                        at: now,
                        converged_at: None,
                    };
                }
                self.note(now, format!("resumed by {who}{why_s}"));
                Ok(Vec::new())
            }
            Action::Abort => {
                self.waiting.clear();
                self.status = Status::Aborted {
                    why: format!("aborted by {who}{why_s}"),
                    version: None,
                };
                self.phase = Phase::Applying;
                self.note(
                    now,
                    format!(
                        "aborted by {who}{why_s}: restoring the strategy from before the release"
                    ),
                );
                Ok(vec![Effect::Apply {
                    spec: self.before.clone(),
                    what: format!("release {} abort: the strategy from before it", self.id),
                }])
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
        if !matches!(self.status, Status::Aborted { .. }) {
            self.status = Status::Paused { why };
        }
    }

    /// Moves on as far as what is observed allows; says what the writer must do.
    pub fn advance(&mut self, obs: &Observed<'_>) -> Vec<Effect> {
        let now = obs.now;
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
            match self.phase {
                Phase::Applying => return Vec::new(),
                Phase::Ready { approved } => {
                    if step.sends_traffic() {
                        match (obs.healthy)(&self.target) {
                            Some(n) if n < self.min_healthy => {
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
                                format!(
                                    "converged: {} filters hold version {version}",
                                    obs.filters.len()
                                )
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
                        self.wait(now, format!("bake: {} s", self.gates.bake_secs));
                        // With an error gate, the target is looked at every second meanwhile.
                        let next = if self.gates.max_error_percent.is_some() {
                            bake_end.min(now + 1_000)
                        } else {
                            bake_end
                        };
                        return vec![Effect::WakeAt(next)];
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

    /// The error gate: aborts the release when the target fails too many requests.
    fn analyse(&mut self, step: &Step, obs: &Observed<'_>) -> Option<Vec<Effect>> {
        let max = self.gates.max_error_percent?;
        if !step.sends_traffic() {
            return None;
        }
        let (_, finished, failed) = seen(obs.traffic, &self.target)?;
        if finished == 0 || failed as f64 * 100.0 <= max * finished as f64 {
            return None;
        }
        let why = format!(
            "{failed} of {finished} requests to {} failed in the last 10 s ({:.1} % > {max} %)",
            self.target,
            failed as f64 * 100.0 / finished as f64
        );
        self.act(Action::Abort, "the error gate", &why, obs.now)
            .ok()
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
        self.wait(
            now,
            format!(
                "drained: {} had {requests} requests in the last 10 s",
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
            Step::Percent { percent } => {
                t.percent = Some(PercentSpec {
                    value: *percent,
                    by: PercentBy::Tenant,
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
            }
        }

        fn advance(&mut self, r: &mut Release) -> Vec<Effect> {
            let healthy = self.healthy.clone();
            let h = move |k: &str| healthy.get(k).copied();
            let spec = self.spec.clone();
            let filters = self.filters.clone();
            let effects = r.advance(&Observed {
                now: self.now,
                spec: &spec,
                version: self.version,
                healthy: &h,
                filters: &filters,
                traffic: self.traffic.as_ref(),
            });
            for e in &effects {
                if let Effect::Apply { spec, .. } = e {
                    self.version += 1;
                    self.spec = spec.clone();
                    self.made.push(spec.clone());
                    r.applied(self.version, self.now);
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
        Release::start(
            7,
            "web",
            req,
            "ops",
            &w.spec,
            &move |k| healthy.get(k).copied(),
            w.now,
        )
    }

    fn req(procedure: Procedure) -> Start {
        Start {
            procedure,
            to: "B".into(),
            from: None,
            ids: None,
            intervals: Vec::new(),
            percents: None,
            gates: Gates::default(),
            reason: "v2".into(),
        }
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
        assert_eq!(r.waiting, "drained: A had 3 requests in the last 10 s");
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
                },
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
        // 3 in 40 (7.5 %) during the bake: the release aborts by itself.
        w.traffic = Some(traffic(&[("A", 100, 100, 0), ("B", 40, 37, 3)]));
        w.now += 1_000;
        w.run(&mut r);
        let Status::Aborted { why, version } = &r.status else {
            panic!("{:?}", r.status)
        };
        assert_eq!(
            why,
            "aborted by the error gate: 3 of 40 requests to B failed in the last 10 s (7.5 % > 5 %)"
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
                },
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
                    nums: vec![1, 2],
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
        assert_eq!(b(1).id.ids.nums, vec![1, 2]);
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
                },
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
}
