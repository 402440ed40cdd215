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

use graylane_strategy::traffic::{Counts, Pair, PreviewCounts, WorkerCounts};
use graylane_strategy::{Id, Reason};

use crate::host::{self, MetricType};

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
    /// The preview evaluated, since this VM took it (reported with the traffic).
    preview: Option<PreviewCounts>,
}

/// Events counted besides decisions.
pub const EVENTS: [&str; 16] = [
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
    // Preview candidates taken, and those that did not compile (held, never evaluated).
    "preview_installed",
    "preview_invalid",
];

/// The catalog's events: answers taken, and failed polls.
pub const CATALOG_EVENTS: [&str; 2] = ["catalog_ok", "catalog_failed"];

fn define(name: &str) -> Option<Counter> {
    host::define_metric(MetricType::Counter, name)
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

    /// The catalog's counters (serving every service): `graylane.catalog_ok`,
    /// `graylane.catalog_failed` (two segments: no service's name can meet them).
    pub fn catalog() -> Metrics {
        let mut m = Metrics::default();
        for ev in CATALOG_EVENTS {
            if let Some(c) = define(&format!("graylane.{ev}")) {
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

    /// Counts preview `id` from now on (`None`: none), unless it is the one counted already:
    /// another preview starts from nothing.
    pub fn preview(&mut self, id: Option<u64>) {
        if self.preview.as_ref().map(|p| p.id) != id {
            self.preview = id.map(|id| PreviewCounts {
                id,
                pairs: Vec::new(),
            });
            self.activity += 1;
        }
    }

    /// Counts one request the preview evaluated: the live strategy sent it to cluster key
    /// `from`, the candidate would send it to `to` (`None`: no cluster). `tenant` is asked
    /// only when the request would move. A pair seen before costs no allocation.
    pub fn preview_pair(
        &mut self,
        from: Option<&str>,
        to: Option<&str>,
        tenant: impl FnOnce() -> Option<Id>,
    ) {
        let Some(counts) = &mut self.preview else {
            return;
        };
        let pairs = &mut counts.pairs;
        let at = match pairs
            .iter()
            .position(|p| p.from.as_deref() == from && p.to.as_deref() == to)
        {
            Some(at) => at,
            None => {
                pairs.push(Pair {
                    from: from.map(str::to_string),
                    to: to.map(str::to_string),
                    ..Pair::default()
                });
                pairs.len() - 1
            }
        };
        if let Some(pair) = pairs.get_mut(at) {
            let tenant = if from == to { None } else { tenant() };
            pair.count(tenant.as_ref());
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
            preview: self.preview.clone(),
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
            if n > 0 && host::increment_metric(c.id, i64::try_from(n).unwrap_or(i64::MAX)).is_err()
            {
                c.pending.set(n); // try again next tick
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn preview_counts_restart_with_another_preview_and_move_the_activity() {
        let mut m = Metrics::default();
        m.preview_pair(Some("A"), Some("B"), || Some(Id::Num(1)));
        assert_eq!(m.activity(), 0, "no preview: nothing counted");
        m.preview(Some(7));
        let a = m.activity();
        assert!(a > 0, "a new preview is published");
        m.preview_pair(Some("A"), Some("B"), || Some(Id::Num(1)));
        m.preview_pair(Some("A"), Some("B"), || Some(Id::Num(2)));
        m.preview_pair(Some("A"), Some("A"), || {
            panic!("tenant asked for a pair that stays")
        });
        m.preview_pair(Some("A"), None, || None);
        assert_eq!(m.activity(), a + 4);
        m.preview(Some(7));
        assert_eq!(m.activity(), a + 4, "the same preview counts on");
        let p = m.worker_counts(1, 1).preview.unwrap();
        assert_eq!(p.id, 7);
        let got: Vec<_> = p
            .pairs
            .iter()
            .map(|x| {
                (
                    x.from.as_deref(),
                    x.to.as_deref(),
                    x.requests,
                    x.tenants.count(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (Some("A"), Some("B"), 2, 2),
                (Some("A"), Some("A"), 1, 0),
                (Some("A"), None, 1, 0),
            ]
        );
        m.preview(Some(8));
        let p = m.worker_counts(1, 2).preview.unwrap();
        assert_eq!((p.id, p.pairs.len()), (8, 0));
        m.preview(None);
        assert_eq!(m.worker_counts(1, 3).preview, None);
        assert_eq!(m.activity(), a + 6);
    }
}
