//! Counters in Envoy's stats. The ABI has no tags, so the service, cluster and reason are
//! part of the name (Istio's `extraStatTags` convention can extract them):
//! `graylane.<service>.cluster.<cluster>.requests`, `graylane.<service>.reason.<code>`,
//! `graylane.<service>.<event>`.

use std::collections::HashMap;

use graylane_strategy::Reason;
use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

#[derive(Debug, Default)]
pub struct Metrics {
    service: String,
    clusters: HashMap<String, u32>,
    reasons: HashMap<&'static str, u32>,
    events: HashMap<&'static str, u32>,
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

fn define(name: &str) -> Option<u32> {
    hostcalls::define_metric(MetricType::Counter, name).ok()
}

impl Metrics {
    pub fn new(service: &str) -> Metrics {
        let mut m = Metrics {
            service: service.to_string(),
            ..Metrics::default()
        };
        for code in Reason::CODES {
            if let Some(id) = define(&format!("graylane.{service}.reason.{code}")) {
                m.reasons.insert(code, id);
            }
        }
        for ev in EVENTS {
            if let Some(id) = define(&format!("graylane.{service}.{ev}")) {
                m.events.insert(ev, id);
            }
        }
        m
    }

    /// Defines the per-cluster counter for each key not yet known.
    pub fn clusters<'a>(&mut self, keys: impl Iterator<Item = &'a str>) {
        for key in keys {
            if !self.clusters.contains_key(key) {
                let name = format!("graylane.{}.cluster.{key}.requests", self.service);
                if let Some(id) = define(&name) {
                    self.clusters.insert(key.to_string(), id);
                }
            }
        }
    }

    pub fn decision(&self, cluster: Option<&str>, reason: &Reason) {
        if let Some(id) = cluster.and_then(|c| self.clusters.get(c)) {
            let _ = hostcalls::increment_metric(*id, 1);
        }
        if let Some(id) = self.reasons.get(reason.code()) {
            let _ = hostcalls::increment_metric(*id, 1);
        }
    }

    pub fn event(&self, name: &'static str) {
        if let Some(id) = self.events.get(name) {
            let _ = hostcalls::increment_metric(*id, 1);
        }
    }
}
