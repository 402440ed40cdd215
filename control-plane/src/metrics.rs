//! `/metrics` in Prometheus text format. Label values are bounded: service names (from the
//! config), source kinds and push kinds; never per request, per filter or per version.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::snapshot::Snapshot;

/// A filter that polled within this window counts as polling.
const LIVE: Duration = Duration::from_secs(60);

#[derive(Default)]
pub struct Metrics {
    polls: AtomicU64,
    pushes_strategy: AtomicU64,
    pushes_health: AtomicU64,
    /// node -> (service, version it holds, last poll). Short critical sections, never held
    /// across an await.
    filters: Mutex<HashMap<(String, String), (u64, Instant)>>,
}

impl Metrics {
    pub fn polled(&self, node: &str, service: &str, version: u64) {
        self.polls.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut f) = self.filters.lock() {
            f.retain(|_, (_, t)| t.elapsed() < LIVE);
            f.insert(
                (node.to_string(), service.to_string()),
                (version, Instant::now()),
            );
        }
    }

    pub fn pushed(&self, strategy: bool) {
        let c = if strategy {
            &self.pushes_strategy
        } else {
            &self.pushes_health
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn render(&self, snap: &Snapshot) -> String {
        let mut out = String::new();
        let mut gauge = |name: &str, help: &str, kind: &str, rows: Vec<(String, u64)>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in rows {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        gauge(
            "graylane_version",
            "Latest strategy version in the store.",
            "gauge",
            vec![(String::new(), snap.version)],
        );
        gauge(
            "graylane_config_error",
            "1 while the last edit of the config file is rejected.",
            "gauge",
            vec![(String::new(), u64::from(snap.config_error.is_some()))],
        );
        gauge(
            "graylane_reload_failures_total",
            "Config file reloads rejected.",
            "counter",
            vec![(String::new(), snap.reload_failures)],
        );
        gauge(
            "graylane_feed_polls_total",
            "Feed requests from filters.",
            "counter",
            vec![(String::new(), self.polls.load(Ordering::Relaxed))],
        );
        gauge(
            "graylane_feed_pushes_total",
            "Feed answers carrying news (a strategy, or health only).",
            "counter",
            vec![
                (
                    "{kind=\"strategy\"}".into(),
                    self.pushes_strategy.load(Ordering::Relaxed),
                ),
                (
                    "{kind=\"health\"}".into(),
                    self.pushes_health.load(Ordering::Relaxed),
                ),
            ],
        );
        gauge(
            "graylane_service_version",
            "Version at which each service's strategy last changed.",
            "gauge",
            snap.services
                .iter()
                .map(|(s, v)| (format!("{{service=\"{s}\"}}"), v.version))
                .collect(),
        );
        // Per service: filters polling in the last minute, how many hold the current version,
        // and the oldest version held.
        let mut per: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
        if let Ok(f) = self.filters.lock() {
            for ((_, service), (version, seen)) in f.iter() {
                if seen.elapsed() >= LIVE {
                    continue;
                }
                let current = snap.services.get(service).map_or(0, |s| s.version);
                let e = per.entry(service.clone()).or_insert((0, 0, u64::MAX));
                e.0 += 1;
                e.1 += u64::from(*version == current);
                e.2 = e.2.min(*version);
            }
        }
        let rows = |i: usize| -> Vec<(String, u64)> {
            per.iter()
                .map(|(s, t)| {
                    let v = match i {
                        0 => t.0,
                        1 => t.1,
                        _ => t.2,
                    };
                    (format!("{{service=\"{s}\"}}"), v)
                })
                .collect()
        };
        gauge(
            "graylane_filters_polling",
            "Filters (Envoy VMs) that polled in the last minute.",
            "gauge",
            rows(0),
        );
        gauge(
            "graylane_filters_current",
            "Of those, how many hold the current version.",
            "gauge",
            rows(1),
        );
        gauge(
            "graylane_filters_oldest_version",
            "The oldest version a polling filter holds.",
            "gauge",
            rows(2),
        );
        gauge(
            "graylane_discovery_stale",
            "1 while a discovery source has lost its registry (its last endpoints are kept).",
            "gauge",
            snap.sources
                .iter()
                .map(|(k, v)| (format!("{{source=\"{}\"}}", k.as_str()), u64::from(v.stale)))
                .collect(),
        );
        out
    }
}
