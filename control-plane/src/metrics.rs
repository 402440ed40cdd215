//! `/metrics` through the Prometheus client library (`prometheus-client`: the exposition
//! format and label escaping done by the library). Labels are bounded: service names from the
//! config, source kinds, push kinds; never per request, per filter, per node or per version.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::snapshot::Snapshot;
use crate::traffic::{Refused, Traffic};

/// A filter that polled within this window counts as polling.
const LIVE: Duration = Duration::from_secs(60);

/// At most this many (node, service) pairs are remembered (the feed has no token by default:
/// node names come from anyone).
const MAX_FILTERS: usize = 10_000;

type Labels = Vec<(&'static str, String)>;

pub struct Metrics {
    registry: Registry,
    polls: Counter,
    pushes: Family<Labels, Counter>,
    version: Gauge,
    config_error: Gauge,
    reload_failures: Counter,
    service_version: Family<Labels, Gauge>,
    filters_polling: Family<Labels, Gauge>,
    filters_current: Family<Labels, Gauge>,
    filters_oldest: Family<Labels, Gauge>,
    discovery_stale: Family<Labels, Gauge>,
    task_restarts: Family<Labels, Counter>,
    traffic_requests: Family<Labels, Counter>,
    traffic_responses: Family<Labels, Counter>,
    istio_applied: Family<Labels, Counter>,
    istio_errors: Family<Labels, Counter>,
    istio_version: Family<Labels, Gauge>,
    /// The filters' traffic reports, added up (`traffic.rs`).
    traffic: Mutex<Traffic>,
    started: Instant,
    /// (node, service) -> (version it holds, last poll). Short critical sections, never held
    /// across an await.
    filters: Mutex<HashMap<(String, String), (u64, Instant)>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("graylane");
        let m = Metrics {
            polls: Counter::default(),
            pushes: Family::default(),
            version: Gauge::default(),
            config_error: Gauge::default(),
            reload_failures: Counter::default(),
            service_version: Family::default(),
            filters_polling: Family::default(),
            filters_current: Family::default(),
            filters_oldest: Family::default(),
            discovery_stale: Family::default(),
            task_restarts: Family::default(),
            traffic_requests: Family::default(),
            traffic_responses: Family::default(),
            istio_applied: Family::default(),
            istio_errors: Family::default(),
            istio_version: Family::default(),
            traffic: Mutex::new(Traffic::default()),
            started: Instant::now(),
            filters: Mutex::new(HashMap::new()),
            registry: Registry::default(),
        };
        registry.register(
            "version",
            "Latest strategy version in the store",
            m.version.clone(),
        );
        registry.register(
            "config_error",
            "1 while the last edit of the config file is rejected",
            m.config_error.clone(),
        );
        registry.register(
            "reload_failures",
            "Config file reloads rejected",
            m.reload_failures.clone(),
        );
        registry.register("feed_polls", "Feed requests from filters", m.polls.clone());
        registry.register(
            "feed_pushes",
            "Feed answers carrying news (kind: strategy, or health only)",
            m.pushes.clone(),
        );
        registry.register(
            "service_version",
            "Version at which each service's strategy last changed",
            m.service_version.clone(),
        );
        registry.register(
            "filters_polling",
            "Filters (Envoy VMs) that polled in the last minute",
            m.filters_polling.clone(),
        );
        registry.register(
            "filters_current",
            "Of those, how many hold the current version",
            m.filters_current.clone(),
        );
        registry.register(
            "filters_oldest_version",
            "The oldest version a polling filter holds",
            m.filters_oldest.clone(),
        );
        registry.register(
            "discovery_stale",
            "1 while a discovery source has lost its registry (its last endpoints are kept)",
            m.discovery_stale.clone(),
        );
        registry.register(
            "task_restarts",
            "Background tasks (discovery, xDS, config watch) restarted after they stopped",
            m.task_restarts.clone(),
        );
        registry.register(
            "traffic_requests",
            "Requests the filters routed, per service and cluster (from their traffic reports)",
            m.traffic_requests.clone(),
        );
        registry.register(
            "traffic_responses",
            "Finished requests the filters saw, per service, cluster and class \
             (2xx, 3xx, 4xx, 5xx; none: no response from the upstream)",
            m.traffic_responses.clone(),
        );
        registry.register(
            "istio_applied",
            "Istio objects (DestinationRules, VirtualServices) applied, per service (istio.apply)",
            m.istio_applied.clone(),
        );
        registry.register(
            "istio_apply_errors",
            "Failed attempts to render or apply a service's Istio objects (retried with backoff)",
            m.istio_errors.clone(),
        );
        registry.register(
            "istio_applied_version",
            "The strategy version whose Istio objects are all applied, per service",
            m.istio_version.clone(),
        );
        Metrics { registry, ..m }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// A filter's traffic report for `service`; `clusters` are the service's cluster keys
    /// (only those are counted).
    pub fn traffic_report(
        &self,
        service: &str,
        report: graylane_strategy::traffic::Report,
        clusters: &[String],
        preview: Option<u64>,
    ) -> Result<(), Refused> {
        let now = self.now_ms();
        let added = {
            let mut t = self.traffic.lock().unwrap_or_else(|p| p.into_inner());
            let known = |k: &str| clusters.iter().any(|c| c == k);
            t.ingest_with_preview(service, report, known, preview, now)?
        };
        for (cluster, c) in added {
            let l = vec![("service", service.to_string()), ("cluster", cluster)];
            self.traffic_requests.get_or_create(&l).inc_by(c.requests);
            for (class, n) in graylane_strategy::traffic::CLASSES.iter().zip(c.classes) {
                if n > 0 {
                    let mut l = l.clone();
                    l.push(("class", (*class).to_string()));
                    self.traffic_responses.get_or_create(&l).inc_by(n);
                }
            }
        }
        Ok(())
    }

    /// What `service`'s data plane reported, per cluster (`clusters` first, in order).
    pub fn traffic(&self, service: &str, clusters: &[String]) -> crate::api::types::Traffic {
        let now = self.now_ms();
        let t = self.traffic.lock().unwrap_or_else(|p| p.into_inner());
        t.view(service, clusters, now)
    }

    /// What the filters counted for `service`'s preview `id` (pairs, reporting nodes).
    pub fn preview(
        &self,
        service: &str,
        id: u64,
    ) -> (Vec<graylane_strategy::traffic::Pair>, usize) {
        let t = self.traffic.lock().unwrap_or_else(|p| p.into_inner());
        t.preview(service, id)
    }

    /// An Istio object of `service` was applied.
    pub fn istio_applied(&self, service: &str) {
        self.istio_applied
            .get_or_create(&vec![("service", service.to_string())])
            .inc();
    }

    /// Rendering or applying `service`'s Istio objects failed.
    pub fn istio_failed(&self, service: &str) {
        self.istio_errors
            .get_or_create(&vec![("service", service.to_string())])
            .inc();
    }

    /// Every Istio object of `service` is applied at `version`.
    pub fn istio_version(&self, service: &str, version: u64) {
        self.istio_version
            .get_or_create(&vec![("service", service.to_string())])
            .set(i64::try_from(version).unwrap_or(i64::MAX));
    }

    /// A background task was restarted.
    pub fn task_restarted(&self, task: &'static str) {
        self.task_restarts
            .get_or_create(&vec![("task", task.to_string())])
            .inc();
    }

    /// A filter on `node` polled for `service` (a configured one), holding `version`.
    pub fn polled(&self, node: &str, service: &str, version: u64) {
        self.polls.inc();
        let node: String = node.chars().take(128).collect();
        let mut f = self.filters.lock().unwrap_or_else(|p| p.into_inner());
        f.retain(|_, (_, t)| t.elapsed() < LIVE);
        let key = (node, service.to_string());
        if f.len() >= MAX_FILTERS && !f.contains_key(&key) {
            return;
        }
        f.insert(key, (version, Instant::now()));
    }

    /// The versions held by the filters that polled for `service` in the last minute, one per
    /// filter (the release procedures' convergence gate).
    pub fn versions_held(&self, service: &str) -> Vec<u64> {
        let f = self.filters.lock().unwrap_or_else(|p| p.into_inner());
        f.iter()
            .filter(|((_, s), (_, t))| s == service && t.elapsed() < LIVE)
            .map(|(_, (v, _))| *v)
            .collect()
    }

    pub fn pushed(&self, strategy: bool) {
        let kind = if strategy { "strategy" } else { "health" };
        self.pushes
            .get_or_create(&vec![("kind", kind.into())])
            .inc();
    }

    /// The exposition text, with gauges taken from `snap` now.
    pub fn render(&self, snap: &Snapshot) -> String {
        let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.version.set(as_i64(snap.version));
        self.config_error
            .set(i64::from(snap.config_error.is_some()));
        // The writer counts; the counter catches up (never goes back).
        let seen = self.reload_failures.get();
        if snap.reload_failures > seen {
            self.reload_failures.inc_by(snap.reload_failures - seen);
        }
        self.service_version.clear();
        for (s, v) in &snap.services {
            self.service_version
                .get_or_create(&vec![("service", s.clone())])
                .set(as_i64(v.version));
        }
        // Per service: filters polling in the last minute, how many hold the current version,
        // and the oldest version held.
        let mut per: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
        {
            let f = self.filters.lock().unwrap_or_else(|p| p.into_inner());
            for ((_, service), (version, seen)) in f.iter() {
                let Some(cur) = snap.services.get(service) else {
                    continue;
                };
                if seen.elapsed() >= LIVE {
                    continue;
                }
                let e = per.entry(service.clone()).or_insert((0, 0, u64::MAX));
                e.0 += 1;
                e.1 += u64::from(*version == cur.version);
                e.2 = e.2.min(*version);
            }
        }
        for fam in [
            &self.filters_polling,
            &self.filters_current,
            &self.filters_oldest,
        ] {
            fam.clear();
        }
        for (s, (polling, current, oldest)) in per {
            let l = vec![("service", s)];
            self.filters_polling.get_or_create(&l).set(as_i64(polling));
            self.filters_current.get_or_create(&l).set(as_i64(current));
            self.filters_oldest.get_or_create(&l).set(as_i64(oldest));
        }
        self.discovery_stale.clear();
        for (k, v) in &snap.sources {
            self.discovery_stale
                .get_or_create(&vec![("source", k.as_str().to_string())])
                .set(i64::from(v.stale));
        }
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
