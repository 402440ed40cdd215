//! Counters in Envoy's stats. The ABI has no tags, so the service, cluster and reason are
//! part of the name (Istio's `extraStatTags` convention can extract them):
//! `graylane.<service>.cluster.<cluster>.requests`, `graylane.<service>.reason.<code>`,
//! `graylane.<service>.<event>`.
//!
//! Requests only bump counters inside the VM; the root context flushes them to Envoy on its
//! tick (every `FLUSH` at most), so the request path makes no metric host call at all.

use std::cell::Cell;
use std::collections::HashMap;
use std::time::Duration;

use graylane_strategy::traffic::{Counts, WorkerCounts};
use graylane_strategy::Reason;
use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

/// How often counters reach Envoy's stats when nothing else ticks faster.
pub const FLUSH: Duration = Duration::from_millis(500);

/// One counter: Envoy's metric id and what has not been flushed yet.
#[derive(Debug)]
struct Counter {
    id: u32,
    pending: Cell<u64>,
    /// Everything counted since this VM started (for traffic reports).
    total: Cell<u64>,
}

impl Counter {
    fn bump(&self) {
        self.pending.set(self.pending.get() + 1);
        self.total.set(self.total.get() + 1);
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    service: String,
    /// Every cluster key seen in any snapshot, with its counter (kept across snapshots so a
    /// key that comes back counts on).
    clusters: Vec<(String, Counter)>,
    /// Traffic per entry of `clusters` (same positions), for the control plane's reports.
    traffic: Vec<Counts>,
    /// Bumped with every count in `traffic`: the reporter publishes only when it moved.
    activity: u64,
    /// For the snapshot in force: its cluster index -> position in `clusters`.
    current: Vec<Option<usize>>,
    /// Indexed by `Reason::ordinal`.
    reasons: Vec<Option<Counter>>,
    events: HashMap<&'static str, Counter>,
}

/// Events counted besides decisions.
pub const EVENTS: [&str; 14] = [
    "fallback_unhealthy",
    "no_snapshot",
    "host_error",
    "feed_ok",
    "feed_not_modified",
    "feed_failed",
    "feed_invalid",
    "snapshot_installed",
    "config_invalid",
    // Signed gray cookies: signatures verified (first sight in this VM, or a forgery),
    // answered from the VM's cache, and requests decided without the host's clock.
    "cookie_verified",
    "cookie_remembered",
    "no_clock",
    // Traffic reports sent to the control plane, and those that failed (the next one
    // carries the same counts: nothing is lost).
    "report_ok",
    "report_failed",
];

fn define(name: &str) -> Option<Counter> {
    hostcalls::define_metric(MetricType::Counter, name)
        .ok()
        .map(|id| Counter {
            id,
            pending: Cell::new(0),
            total: Cell::new(0),
        })
}

impl Metrics {
    pub fn new(service: &str) -> Metrics {
        let mut m = Metrics {
            service: service.to_string(),
            ..Metrics::default()
        };
        m.reasons = Reason::CODES
            .iter()
            .map(|code| define(&format!("graylane.{service}.reason.{code}")))
            .collect();
        for ev in EVENTS {
            if let Some(c) = define(&format!("graylane.{service}.{ev}")) {
                m.events.insert(ev, c);
            }
        }
        m
    }

    /// Takes the cluster keys of a new snapshot, in its order; defines a counter for each
    /// key not seen before.
    pub fn clusters<'a>(&mut self, keys: impl Iterator<Item = &'a str>) {
        self.current.clear();
        for key in keys {
            let known = self.clusters.iter().position(|(k, _)| k == key);
            let at = known.or_else(|| {
                let name = format!("graylane.{}.cluster.{key}.requests", self.service);
                define(&name).map(|c| {
                    self.clusters.push((key.to_string(), c));
                    self.traffic.push(Counts::default());
                    self.clusters.len() - 1
                })
            });
            self.current.push(at);
        }
    }

    /// Counts a decision: `cluster` is the index in the snapshot in force. Returns where the
    /// request is counted, for [`Metrics::finished`].
    pub fn decision(&mut self, cluster: Option<usize>, reason: &Reason) -> Option<usize> {
        let at = cluster.and_then(|i| self.current.get(i).copied().flatten());
        if let Some((_, c)) = at.and_then(|i| self.clusters.get(i)) {
            c.bump();
        }
        if let Some(t) = at.and_then(|i| self.traffic.get_mut(i)) {
            t.request();
            self.activity += 1;
        }
        if let Some(Some(c)) = self.reasons.get(reason.ordinal()) {
            c.bump();
        }
        at
    }

    /// Counts how a request counted at `at` ended: its status (`None`: no response from the
    /// upstream) and its upstream latency.
    pub fn finished(&mut self, at: usize, status: Option<u16>, micros: Option<u64>) {
        if let Some(t) = self.traffic.get_mut(at) {
            t.finished(status, micros);
            self.activity += 1;
        }
    }

    /// A number that moves whenever a traffic count does.
    pub fn activity(&self) -> u64 {
        self.activity
    }

    /// This VM's traffic since it started, for the reporter.
    pub fn worker_counts(&self, worker: u64, seq: u64) -> WorkerCounts {
        WorkerCounts {
            worker,
            seq,
            clusters: self
                .clusters
                .iter()
                .zip(&self.traffic)
                .map(|((key, _), t)| (key.clone(), t.clone()))
                .collect(),
            reasons: Reason::CODES
                .iter()
                .zip(&self.reasons)
                .filter_map(|(code, c)| {
                    let n = c.as_ref()?.total.get();
                    (n > 0).then(|| ((*code).to_string(), n))
                })
                .collect(),
        }
    }

    pub fn event(&self, name: &'static str) {
        if let Some(c) = self.events.get(name) {
            c.bump();
        }
    }

    /// Hands the pending counts to Envoy.
    pub fn flush(&self) {
        let all = self
            .clusters
            .iter()
            .map(|(_, c)| c)
            .chain(self.reasons.iter().flatten())
            .chain(self.events.values());
        for c in all {
            let n = c.pending.replace(0);
            if n > 0
                && hostcalls::increment_metric(c.id, i64::try_from(n).unwrap_or(i64::MAX)).is_err()
            {
                c.pending.set(n); // try again next tick
            }
        }
    }
}
