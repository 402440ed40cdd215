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
}

impl Counter {
    fn bump(&self) {
        self.pending.set(self.pending.get() + 1);
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    service: String,
    clusters: HashMap<String, Counter>,
    reasons: HashMap<&'static str, Counter>,
    events: HashMap<&'static str, Counter>,
}

/// Events counted besides decisions.
pub const EVENTS: [&str; 9] = [
    "fallback_unhealthy",
    "no_snapshot",
    "host_error",
    "feed_ok",
    "feed_not_modified",
    "feed_failed",
    "feed_invalid",
    "snapshot_installed",
    "config_invalid",
];

fn define(name: &str) -> Option<Counter> {
    hostcalls::define_metric(MetricType::Counter, name)
        .ok()
        .map(|id| Counter {
            id,
            pending: Cell::new(0),
        })
}

impl Metrics {
    pub fn new(service: &str) -> Metrics {
        let mut m = Metrics {
            service: service.to_string(),
            ..Metrics::default()
        };
        for code in Reason::CODES {
            if let Some(c) = define(&format!("graylane.{service}.reason.{code}")) {
                m.reasons.insert(code, c);
            }
        }
        for ev in EVENTS {
            if let Some(c) = define(&format!("graylane.{service}.{ev}")) {
                m.events.insert(ev, c);
            }
        }
        m
    }

    /// Defines the per-cluster counter for each key not yet known.
    pub fn clusters<'a>(&mut self, keys: impl Iterator<Item = &'a str>) {
        for key in keys {
            if !self.clusters.contains_key(key) {
                let name = format!("graylane.{}.cluster.{key}.requests", self.service);
                if let Some(c) = define(&name) {
                    self.clusters.insert(key.to_string(), c);
                }
            }
        }
    }

    pub fn decision(&self, cluster: Option<&str>, reason: &Reason) {
        if let Some(c) = cluster.and_then(|c| self.clusters.get(c)) {
            c.bump();
        }
        if let Some(c) = self.reasons.get(reason.code()) {
            c.bump();
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
            .values()
            .chain(self.reasons.values())
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
