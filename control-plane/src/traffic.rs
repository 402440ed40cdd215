//! What the data plane saw: the filters' traffic reports, added up per service and cluster,
//! per node, over the last 10 s and 60 s and since start. Pure (the time is an argument); the
//! API holds one behind a mutex (`Metrics`), like the other observations.
//!
//! A report carries each worker's cumulative counts with a sequence number
//! (`graylane_strategy::traffic`); only the difference with the last counts seen from that
//! worker is added, so a report lost in transit is made up by the next and one received twice
//! adds nothing. A node that stops reporting is shown stale; what it reported stays counted.

use std::collections::{BTreeMap, HashMap, VecDeque};

use graylane_strategy::traffic::{Counts, Pair, PreviewCounts, Report, WorkerCounts};

use crate::api::types::{
    ClusterTraffic, NodeCluster, NodeTraffic, ReasonTraffic, ResponseClasses,
    Traffic as TrafficView, TrafficWindow,
};

/// A node that has not reported for this long is stale.
pub const STALE_MS: u64 = 5_000;
/// Per-second buckets kept (the longest window).
const WINDOW_S: u64 = 60;
/// The short window.
const SHORT_S: u64 = 10;
/// Bounds: nodes per service, workers per node, clusters per service (reports come from the
/// feed's clients; the feed has no token by default).
pub const MAX_NODES: usize = 1_000;
const MAX_WORKERS: usize = 256;
const MAX_CLUSTERS: usize = 64;
/// Pairs of clusters in one worker's preview counts.
const MAX_PAIRS: usize = 1_024;

/// Why a report was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("node name must be 1 to 253 printable characters")]
    BadNode,
    #[error("too many nodes report for this service (at most {MAX_NODES})")]
    TooManyNodes,
}

/// What one accepted report added, per cluster (for `/metrics`).
pub type Added = BTreeMap<String, Counts>;

#[derive(Debug, Default)]
pub struct Traffic {
    services: HashMap<String, Service>,
}

#[derive(Debug, Default)]
struct Service {
    nodes: BTreeMap<String, Node>,
    total: Sums,
    /// (second, sums added in that second), oldest first.
    seconds: VecDeque<(u64, Sums)>,
    /// The preview these counts are for, and each (node, worker)'s latest cumulative counts
    /// of it (one preview at a time: the service's current or last).
    preview: Option<(u64, PreviewParts)>,
}

/// Each (node, worker)'s latest cumulative counts of one preview.
type PreviewParts = HashMap<(String, u64), PreviewCounts>;

#[derive(Debug, Default, Clone)]
struct Sums {
    clusters: BTreeMap<String, Counts>,
    reasons: BTreeMap<String, u64>,
}

impl Sums {
    fn add(&mut self, other: &Sums) {
        for (k, c) in &other.clusters {
            self.clusters.entry(k.clone()).or_default().add(c);
        }
        for (k, n) in &other.reasons {
            *self.reasons.entry(k.clone()).or_default() += n;
        }
    }
}

#[derive(Debug, Default)]
struct Node {
    last_ms: u64,
    /// worker -> (its last counts, when they arrived).
    workers: HashMap<u64, (WorkerCounts, u64)>,
    total: Sums,
}

impl Traffic {
    /// Adds a report from a node for `service`. `known` says which cluster keys count (the
    /// service's clusters): others are ignored, so names from the network never grow a table.
    pub fn ingest(
        &mut self,
        service: &str,
        report: Report,
        known: impl Fn(&str) -> bool,
        now_ms: u64,
    ) -> Result<Added, Refused> {
        self.ingest_with_preview(service, report, known, None, now_ms)
    }

    /// As [`Traffic::ingest`]; preview counts are kept for `preview` (the service's current or
    /// last preview id) only, so names and ids from the network never grow a table.
    pub fn ingest_with_preview(
        &mut self,
        service: &str,
        report: Report,
        known: impl Fn(&str) -> bool,
        preview: Option<u64>,
        now_ms: u64,
    ) -> Result<Added, Refused> {
        let node_ok = !report.node.is_empty()
            && report.node.len() <= 253
            && report.node.chars().all(|c| !c.is_control());
        if !node_ok {
            return Err(Refused::BadNode);
        }
        let svc = self.services.entry(service.to_string()).or_default();
        if !svc.nodes.contains_key(&report.node) && svc.nodes.len() >= MAX_NODES {
            return Err(Refused::TooManyNodes);
        }
        let node_name = report.node.clone();
        let node = svc.nodes.entry(report.node).or_default();
        node.last_ms = now_ms;
        let mut added = Sums::default();
        for mut w in report.workers {
            let before = node.workers.get(&w.worker).map(|(c, _)| c);
            if before.is_some_and(|b| b.seq >= w.seq) {
                continue; // seen already (a report received twice, or out of order)
            }
            if let (Some(p), Some(want)) = (w.preview.take(), preview) {
                let fits = p.pairs.len() <= MAX_PAIRS
                    && p.pairs.iter().all(|x| {
                        [&x.from, &x.to]
                            .iter()
                            .all(|k| k.as_ref().is_none_or(|k| k.len() <= 253))
                    });
                if p.id == want && fits {
                    let slot = match &mut svc.preview {
                        Some((id, m)) if *id == want => m,
                        _ => &mut svc.preview.insert((want, HashMap::new())).1,
                    };
                    if slot.len() < MAX_NODES * 4
                        || slot.contains_key(&(node_name.clone(), w.worker))
                    {
                        slot.insert((node_name.clone(), w.worker), p);
                    }
                }
            }
            for (key, now) in &w.clusters {
                let counted = svc.total.clusters.contains_key(key)
                    || (known(key) && svc.total.clusters.len() < MAX_CLUSTERS);
                if !counted {
                    continue;
                }
                let prev = before.and_then(|b| b.clusters.get(key));
                // Counts that went down belong to another run of the worker: all of them are new.
                let delta = match prev {
                    Some(p) => now.since(p).unwrap_or_else(|| now.clone()),
                    None => now.clone(),
                };
                added.clusters.entry(key.clone()).or_default().add(&delta);
            }
            for (code, n) in &w.reasons {
                if graylane_strategy::Reason::CODES.contains(&code.as_str()) {
                    let prev = before.and_then(|b| b.reasons.get(code)).map_or(0, |p| *p);
                    let d = n.checked_sub(prev).unwrap_or(*n);
                    *added.reasons.entry(code.clone()).or_default() += d;
                }
            }
            node.workers.insert(w.worker, (w, now_ms));
        }
        if node.workers.len() > MAX_WORKERS {
            // The worker heard from longest ago leaves (its counts are already added).
            if let Some(oldest) = node
                .workers
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(k, _)| *k)
            {
                node.workers.remove(&oldest);
            }
        }
        added.clusters.retain(|_, c| *c != Counts::default());
        added.reasons.retain(|_, n| *n > 0);
        node.total.add(&added);
        svc.total.add(&added);
        let second = now_ms / 1_000;
        match svc.seconds.back_mut() {
            Some((s, sums)) if *s == second => sums.add(&added),
            _ => svc.seconds.push_back((second, added.clone())),
        }
        while svc
            .seconds
            .front()
            .is_some_and(|(s, _)| *s + WINDOW_S <= second)
        {
            svc.seconds.pop_front();
        }
        Ok(added.clusters)
    }

    /// What the filters counted for `service`'s preview `id`: the pairs merged over every
    /// worker, and how many nodes reported it.
    pub fn preview(&self, service: &str, id: u64) -> (Vec<Pair>, usize) {
        let Some((have, parts)) = self.services.get(service).and_then(|s| s.preview.as_ref())
        else {
            return (Vec::new(), 0);
        };
        if *have != id {
            return (Vec::new(), 0);
        }
        let nodes: std::collections::BTreeSet<&String> = parts.keys().map(|(n, _)| n).collect();
        let pairs = crate::preview::merge(parts.values().flat_map(|p| p.pairs.iter().cloned()));
        (pairs, nodes.len())
    }

    /// What `service`'s data plane saw, as of `now_ms`. `clusters` lists the service's
    /// clusters in order (each is shown, with zeros if nothing was reported); clusters that
    /// were reported but are no longer in the strategy follow.
    pub fn view(&self, service: &str, clusters: &[String], now_ms: u64) -> TrafficView {
        let empty = Service::default();
        let svc = self.services.get(service).unwrap_or(&empty);
        let second = now_ms / 1_000;
        let window = |secs: u64| {
            let mut sums = Sums::default();
            for (s, part) in &svc.seconds {
                if *s + secs > second {
                    sums.add(part);
                }
            }
            sums
        };
        let (short, long) = (window(SHORT_S), window(WINDOW_S));
        let mut keys: Vec<String> = clusters.to_vec();
        for k in svc.total.clusters.keys() {
            if !keys.contains(k) {
                keys.push(k.clone());
            }
        }
        let cluster_views = keys
            .iter()
            .map(|k| ClusterTraffic {
                cluster: k.clone(),
                last_10s: window_view(short.clusters.get(k), Some(SHORT_S)),
                last_60s: window_view(long.clusters.get(k), Some(WINDOW_S)),
                total: window_view(svc.total.clusters.get(k), None),
            })
            .collect();
        let reasons = svc
            .total
            .reasons
            .iter()
            .map(|(code, total)| ReasonTraffic {
                reason: code.clone(),
                last_10s: short.reasons.get(code).copied().unwrap_or(0),
                last_60s: long.reasons.get(code).copied().unwrap_or(0),
                total: *total,
            })
            .collect();
        let nodes: Vec<NodeTraffic> = svc
            .nodes
            .iter()
            .map(|(name, n)| {
                let ago = now_ms.saturating_sub(n.last_ms);
                NodeTraffic {
                    node: name.clone(),
                    last_report_ms_ago: ago,
                    stale: ago > STALE_MS,
                    workers: n.workers.len(),
                    clusters: n
                        .total
                        .clusters
                        .iter()
                        .map(|(k, c)| NodeCluster {
                            cluster: k.clone(),
                            requests: c.requests,
                            responses: classes(c),
                        })
                        .collect(),
                }
            })
            .collect();
        TrafficView {
            service: service.to_string(),
            clusters: cluster_views,
            reasons,
            stale_nodes: nodes.iter().filter(|n| n.stale).count(),
            nodes,
            filters_polling: 0,
            filters_current: 0,
        }
    }
}

fn classes(c: &Counts) -> ResponseClasses {
    let [c2xx, c3xx, c4xx, c5xx, none] = c.classes;
    ResponseClasses {
        c2xx,
        c3xx,
        c4xx,
        c5xx,
        none,
    }
}

fn window_view(c: Option<&Counts>, seconds: Option<u64>) -> TrafficWindow {
    let zero = Counts::default();
    let c = c.unwrap_or(&zero);
    // Rounded to microseconds: interpolation noise is not information.
    let q = |p: f64| c.quantile_ms(p).map(|v| (v * 1_000.0).round() / 1_000.0);
    TrafficWindow {
        requests: c.requests,
        per_second: seconds.map(|s| c.requests as f64 / s as f64),
        responses: classes(c),
        p50_ms: q(0.5),
        p90_ms: q(0.9),
        p99_ms: q(0.99),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn counts(requests: u64, ok: u64, failed: u64, reset: u64) -> Counts {
        let mut c = Counts::default();
        for _ in 0..requests {
            c.request();
        }
        for _ in 0..ok {
            c.finished(Some(200), Some(2_000));
        }
        for _ in 0..failed {
            c.finished(Some(503), Some(2_000));
        }
        for _ in 0..reset {
            c.finished(None, None);
        }
        c
    }

    fn report(node: &str, workers: &[(u64, u64, Counts)]) -> Report {
        Report {
            node: node.into(),
            workers: workers
                .iter()
                .map(|(w, seq, c)| WorkerCounts {
                    worker: *w,
                    seq: *seq,
                    clusters: [("A".to_string(), c.clone())].into(),
                    reasons: [("id".to_string(), c.requests)].into(),
                    preview: None,
                })
                .collect(),
        }
    }

    fn known(k: &str) -> bool {
        k == "A" || k == "B"
    }

    fn cluster(v: &TrafficView, k: &str) -> ClusterTraffic {
        v.clusters.iter().find(|c| c.cluster == k).unwrap().clone()
    }

    #[test]
    fn reports_add_differences_once_and_losses_are_made_up() {
        let mut t = Traffic::default();
        let keys = ["A".to_string(), "B".to_string()];
        t.ingest(
            "web",
            report("n1", &[(1, 1, counts(10, 9, 1, 0))]),
            known,
            1_000,
        )
        .unwrap();
        // The same report again adds nothing; an older one neither.
        t.ingest(
            "web",
            report("n1", &[(1, 1, counts(10, 9, 1, 0))]),
            known,
            1_100,
        )
        .unwrap();
        // Report seq 2 is lost; seq 3 carries everything since seq 1.
        t.ingest(
            "web",
            report("n1", &[(1, 3, counts(30, 27, 1, 2))]),
            known,
            2_000,
        )
        .unwrap();
        t.ingest(
            "web",
            report("n1", &[(1, 2, counts(20, 19, 1, 0))]),
            known,
            2_100,
        )
        .unwrap();
        // Another node, two workers.
        t.ingest(
            "web",
            report(
                "n2",
                &[(7, 1, counts(5, 5, 0, 0)), (8, 1, counts(4, 3, 1, 0))],
            ),
            known,
            2_500,
        )
        .unwrap();
        let v = t.view("web", &keys, 3_000);
        let a = cluster(&v, "A");
        assert_eq!(a.total.requests, 39);
        assert_eq!(
            a.total.responses,
            ResponseClasses {
                c2xx: 35,
                c3xx: 0,
                c4xx: 0,
                c5xx: 2,
                none: 2
            }
        );
        assert_eq!(a.last_10s.requests, 39);
        assert_eq!(a.last_10s.per_second, Some(3.9));
        assert_eq!(a.total.p50_ms, Some(1.5));
        assert_eq!(cluster(&v, "B").total.requests, 0, "listed, nothing seen");
        assert_eq!(v.reasons[0].reason, "id");
        assert_eq!(v.reasons[0].total, 39);
        assert_eq!(v.nodes.len(), 2);
        assert_eq!((v.nodes[1].node.as_str(), v.nodes[1].workers), ("n2", 2));
        assert_eq!(v.stale_nodes, 0);

        // n2 stops reporting: shown stale, its counts kept in the totals.
        t.ingest(
            "web",
            report("n1", &[(1, 4, counts(31, 28, 1, 2))]),
            known,
            9_000,
        )
        .unwrap();
        let v = t.view("web", &keys, 9_000);
        assert_eq!(v.stale_nodes, 1);
        assert!(v.nodes[1].stale && !v.nodes[0].stale);
        assert_eq!(cluster(&v, "A").total.requests, 40);
        assert_eq!(v.nodes[1].clusters[0].requests, 9);

        // The windows move on: 70 s later only the total remains.
        let v = t.view("web", &keys, 79_000);
        let a = cluster(&v, "A");
        assert_eq!(
            (a.last_10s.requests, a.last_60s.requests, a.total.requests),
            (0, 0, 40)
        );
    }

    #[test]
    fn a_restarted_worker_counts_from_zero_and_unknown_names_are_ignored() {
        let mut t = Traffic::default();
        t.ingest(
            "web",
            report("n1", &[(1, 5, counts(10, 10, 0, 0))]),
            known,
            0,
        )
        .unwrap();
        // Counts went down (the same id in another run): all of them are new.
        t.ingest(
            "web",
            report("n1", &[(1, 6, counts(3, 3, 0, 0))]),
            known,
            100,
        )
        .unwrap();
        let mut r = report("n1", &[(2, 1, counts(4, 4, 0, 0))]);
        let w = &mut r.workers[0];
        w.clusters = [("evil".to_string(), counts(4, 4, 0, 0))].into();
        w.reasons = [("made-up".to_string(), 4)].into();
        t.ingest("web", r, known, 200).unwrap();
        let v = t.view("web", &["A".into()], 300);
        assert_eq!(v.clusters.len(), 1, "{:?}", v.clusters);
        assert_eq!(v.clusters[0].total.requests, 13);
        assert_eq!(v.reasons.len(), 1);
        assert_eq!(
            t.ingest("web", report("", &[]), known, 0),
            Err(Refused::BadNode)
        );
    }
}
