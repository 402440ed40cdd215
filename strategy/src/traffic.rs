//! Traffic reports: what a data plane saw, per cluster, sent to the control plane. One
//! definition for the filter (which counts and reports) and the control plane (which adds
//! reports up over every node); the arithmetic lives here so both agree on it.
//!
//! Counts are cumulative since the counting worker started. A report carries each worker's
//! counts with a sequence number; the control plane keeps the last one per (node, worker) and
//! adds only the difference, so a lost report is made up by the next one and a repeated one
//! adds nothing.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Response classes, in the order of [`Counts::classes`].
pub const CLASSES: [&str; 5] = ["2xx", "3xx", "4xx", "5xx", "none"];

/// The class of an HTTP status: `None` (no response: a reset, a local reply) is `4`.
pub fn class_of(status: Option<u16>) -> usize {
    match status {
        Some(200..=299) => 0,
        Some(300..=399) => 1,
        Some(400..=499) => 2,
        Some(500..=599) => 3,
        // 1xx as a final status, or no response at all.
        _ => 4,
    }
}

/// Upper bounds of the latency buckets, in milliseconds (the last bucket is unbounded).
pub const LATENCY_BOUNDS_MS: [f64; 18] = [
    0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 50.0, 100.0, 200.0, 300.0, 500.0, 1_000.0,
    2_000.0, 5_000.0, 10_000.0,
];

/// Number of latency buckets (the bounds and one for everything above them).
pub const BUCKETS: usize = LATENCY_BOUNDS_MS.len() + 1;

/// The bucket of a latency in microseconds.
pub fn bucket_of(micros: u64) -> usize {
    let ms = micros as f64 / 1_000.0;
    LATENCY_BOUNDS_MS
        .iter()
        .position(|b| ms <= *b)
        .unwrap_or(LATENCY_BOUNDS_MS.len())
}

/// One cluster's counts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Counts {
    /// Requests routed to the cluster.
    pub requests: u64,
    /// Finished requests by [`CLASSES`].
    pub classes: [u64; 5],
    /// Upstream latency (request headers to response headers) by [`LATENCY_BOUNDS_MS`];
    /// requests without a response are not in it.
    pub latency: Vec<u64>,
}

impl Counts {
    /// Counts one routed request.
    pub fn request(&mut self) {
        self.requests += 1;
    }

    /// Counts one finished request: its status (`None`: no response) and latency.
    pub fn finished(&mut self, status: Option<u16>, micros: Option<u64>) {
        let class = class_of(status);
        self.classes[class] += 1;
        if let (Some(us), true) = (micros, class != 4) {
            if self.latency.len() < BUCKETS {
                self.latency.resize(BUCKETS, 0);
            }
            self.latency[bucket_of(us)] += 1;
        }
    }

    /// Adds `other` to these counts.
    pub fn add(&mut self, other: &Counts) {
        self.requests += other.requests;
        for (a, b) in self.classes.iter_mut().zip(other.classes) {
            *a += b;
        }
        if self.latency.len() < other.latency.len().min(BUCKETS) {
            self.latency.resize(other.latency.len().min(BUCKETS), 0);
        }
        for (a, b) in self.latency.iter_mut().zip(&other.latency) {
            *a += b;
        }
    }

    /// What `self` (a later cumulative count) adds over `before`; `None` if any count went
    /// down (the counts are not a continuation of `before`).
    pub fn since(&self, before: &Counts) -> Option<Counts> {
        let sub = |a: u64, b: u64| a.checked_sub(b);
        let mut classes = [0; 5];
        for (i, c) in classes.iter_mut().enumerate() {
            *c = sub(self.classes[i], before.classes[i])?;
        }
        let mut latency = Vec::with_capacity(self.latency.len());
        for (i, n) in self.latency.iter().enumerate() {
            latency.push(sub(*n, before.latency.get(i).copied().unwrap_or(0))?);
        }
        if before.latency.len() > self.latency.len()
            && before.latency[self.latency.len()..].iter().any(|n| *n > 0)
        {
            return None;
        }
        Some(Counts {
            requests: sub(self.requests, before.requests)?,
            classes,
            latency,
        })
    }

    /// Requests that finished (with or without a response).
    pub fn finished_total(&self) -> u64 {
        self.classes.iter().sum()
    }

    /// The latency under which a fraction `q` (0..=1) of the responses fell, in milliseconds,
    /// interpolated linearly within its bucket (as Prometheus' `histogram_quantile`); `None`
    /// without responses. Above the last bound, the last bound.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        let total: u64 = self.latency.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total as f64;
        let mut seen = 0u64;
        for (i, n) in self.latency.iter().enumerate() {
            if *n > 0 && (seen + n) as f64 >= rank {
                let Some(upper) = LATENCY_BOUNDS_MS.get(i) else {
                    return LATENCY_BOUNDS_MS.last().copied();
                };
                let lower = if i == 0 {
                    0.0
                } else {
                    LATENCY_BOUNDS_MS[i - 1]
                };
                let within = (rank - seen as f64) / *n as f64;
                return Some(lower + (upper - lower) * within);
            }
            seen += n;
        }
        LATENCY_BOUNDS_MS.last().copied()
    }
}

/// One worker's cumulative counts, as it publishes them (in shared data) for the reporter.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WorkerCounts {
    /// The worker (its VM's random id).
    pub worker: u64,
    /// Moves every time this worker publishes its counts.
    pub seq: u64,
    /// Per cluster key.
    pub clusters: BTreeMap<String, Counts>,
    /// Decisions per reason code ([`crate::Reason::CODES`]).
    #[serde(default)]
    pub reasons: BTreeMap<String, u64>,
    /// What the preview this worker evaluates saw (cumulative since it took the preview).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview: Option<PreviewCounts>,
}

/// Tenant ids kept as examples per pair of clusters.
pub const MAX_EXAMPLES: usize = 16;

/// A preview's counts in one worker: for every request it evaluated, where the live strategy
/// sent it and where the candidate would have.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PreviewCounts {
    /// The preview (its id in the feed).
    pub id: u64,
    /// One entry per (live, candidate) pair seen, unchanged pairs included.
    pub pairs: Vec<Pair>,
}

/// Requests the live strategy sent to `from` and the candidate would send to `to` (`None`:
/// no cluster, a 503).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Pair {
    pub from: Option<String>,
    pub to: Option<String>,
    pub requests: u64,
    /// Distinct tenants of these requests (counted only where `from != to`).
    #[serde(default)]
    pub tenants: crate::sketch::TenantSketch,
    /// The first few of those tenants (at most [`MAX_EXAMPLES`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub examples: Vec<String>,
}

impl Pair {
    /// Whether the request would move.
    pub fn moves(&self) -> bool {
        self.from != self.to
    }

    /// Counts one request of `tenant` (tenants only for moves).
    pub fn count(&mut self, tenant: Option<&crate::Id>) {
        self.requests += 1;
        if let (true, Some(t)) = (self.moves(), tenant) {
            self.tenants.insert(t);
            if self.examples.len() < MAX_EXAMPLES {
                let text = match t {
                    crate::Id::Num(n) => n.to_string(),
                    crate::Id::Str(s) => s.clone(),
                };
                if !self.examples.contains(&text) {
                    self.examples.push(text);
                }
            }
        }
    }

    /// Adds `other` (the same pair seen elsewhere).
    pub fn merge(&mut self, other: &Pair) {
        self.requests += other.requests;
        self.tenants.merge(&other.tenants);
        for e in &other.examples {
            if self.examples.len() >= MAX_EXAMPLES {
                break;
            }
            if !self.examples.contains(e) {
                self.examples.push(e.clone());
            }
        }
    }
}

/// What one Envoy (node) sends: every worker's latest counts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Report {
    /// The Envoy node id (`node.id` of its bootstrap; in Istio the pod's).
    pub node: String,
    pub workers: Vec<WorkerCounts>,
}

/// The request path a report is sent to.
pub fn report_path(service: &str) -> String {
    format!("/v1/traffic/{service}")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn classes_and_buckets() {
        assert_eq!(class_of(Some(204)), 0);
        assert_eq!(class_of(Some(302)), 1);
        assert_eq!(class_of(Some(404)), 2);
        assert_eq!(class_of(Some(503)), 3);
        assert_eq!(class_of(None), 4);
        assert_eq!(class_of(Some(101)), 4);
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(250), 0);
        assert_eq!(bucket_of(251), 1);
        assert_eq!(bucket_of(1_000), 2);
        assert_eq!(bucket_of(10_000_000), 17);
        assert_eq!(bucket_of(10_000_001), 18);
    }

    #[test]
    fn differences_add_up_and_refuse_a_restart() {
        let mut a = Counts::default();
        a.request();
        a.finished(Some(200), Some(1_500));
        let mut b = a.clone();
        b.request();
        b.request();
        b.finished(Some(503), Some(40_000));
        b.finished(None, None);
        let d = b.since(&a).unwrap();
        assert_eq!(d.requests, 2);
        assert_eq!(d.classes, [0, 0, 0, 1, 1]);
        assert_eq!(d.latency.iter().sum::<u64>(), 1);
        let mut sum = a.clone();
        sum.add(&d);
        assert_eq!(sum, b);
        // Counts that went down are not a continuation.
        assert_eq!(a.since(&b), None);
        assert_eq!(a.since(&Counts::default()).unwrap(), a);
    }

    #[test]
    fn quantiles_interpolate_within_a_bucket() {
        let mut c = Counts::default();
        assert_eq!(c.quantile_ms(0.5), None);
        // 100 responses between 5 and 10 ms: p50 is halfway through that bucket.
        for _ in 0..100 {
            c.finished(Some(200), Some(7_000));
        }
        assert_eq!(c.quantile_ms(0.5), Some(7.5));
        assert_eq!(c.quantile_ms(1.0), Some(10.0));
        // One slow response above every bound: p99 stays in the 5-10 ms bucket, p100 is capped.
        c.finished(Some(200), Some(60_000_000));
        let p99 = c.quantile_ms(0.99).unwrap();
        assert!((p99 - 9.9995).abs() < 1e-9, "{p99}");
        assert_eq!(c.quantile_ms(1.0), Some(10_000.0));
    }
}
