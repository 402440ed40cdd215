//! `graylane top` and `graylane traffic`: what the data plane saw, as tables. Pure (the API's
//! answers in, text out), so the tables are unit-tested; the CLI fetches and refreshes.

use crate::api::types::{ServiceSummary, Traffic, TrafficWindow};
use crate::cli::{lines, table};

fn ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| {
        if v < 10.0 {
            format!("{v:.2}ms")
        } else {
            format!("{v:.0}ms")
        }
    })
}

fn pct(part: u64, whole: u64) -> String {
    if whole == 0 {
        "-".into()
    } else {
        format!("{:.1}%", part as f64 * 100.0 / whole as f64)
    }
}

fn rate(w: &TrafficWindow) -> String {
    w.per_second.map_or("-".into(), |r| format!("{r:.1}"))
}

/// `graylane top`: every service and cluster over the last 10 s.
pub fn top(services: &[(ServiceSummary, Traffic)]) -> String {
    let mut t = table(&[
        "SERVICE", "CLUSTER", "STATE", "SHARE", "REQ/S", "5XX", "P99", "HEALTHY", "FILTERS",
    ]);
    for (s, traffic) in services {
        let total: u64 = traffic.clusters.iter().map(|c| c.last_10s.requests).sum();
        for cl in &s.clusters {
            let seen = traffic.clusters.iter().find(|c| c.cluster == cl.key);
            let w = seen.map(|c| c.last_10s.clone()).unwrap_or_default();
            t.add_row(vec![
                s.name.clone(),
                cl.key.clone(),
                cl.status.to_string(),
                pct(w.requests, total),
                rate(&w),
                pct(w.responses.failed(), w.responses.total()),
                ms(w.p99_ms),
                cl.healthy.map_or("?".into(), |h| h.to_string()),
                format!("{}/{}", traffic.filters_current, traffic.filters_polling),
            ]);
        }
    }
    let stale: usize = services.iter().map(|(_, t)| t.stale_nodes).sum();
    let mut out = lines(&t);
    if stale > 0 {
        out.push_str(&format!(
            "{stale} node(s) stopped reporting (their counts are kept; graylane traffic <service> names them)\n"
        ));
    }
    out
}

/// `graylane traffic <service>`: per cluster over 10 s, 60 s and since start; per node.
pub fn traffic(s: &ServiceSummary, t: &Traffic) -> String {
    let mut out = format!(
        "{}: filters {}/{} current, {} node(s) reporting, {} stale\n",
        t.service,
        t.filters_current,
        t.filters_polling,
        t.nodes.len() - t.stale_nodes,
        t.stale_nodes
    );
    let mut tab = table(&[
        "CLUSTER", "STATE", "WINDOW", "REQUESTS", "REQ/S", "2XX", "3XX", "4XX", "5XX", "NONE",
        "P50", "P90", "P99",
    ]);
    for c in &t.clusters {
        let state = s
            .clusters
            .iter()
            .find(|x| x.key == c.cluster)
            .map_or("(removed)".into(), |x| x.status.to_string());
        for (name, w) in [
            ("10s", &c.last_10s),
            ("60s", &c.last_60s),
            ("total", &c.total),
        ] {
            let r = &w.responses;
            tab.add_row(vec![
                c.cluster.clone(),
                state.clone(),
                name.to_string(),
                w.requests.to_string(),
                rate(w),
                r.c2xx.to_string(),
                r.c3xx.to_string(),
                r.c4xx.to_string(),
                r.c5xx.to_string(),
                r.none.to_string(),
                ms(w.p50_ms),
                ms(w.p90_ms),
                ms(w.p99_ms),
            ]);
        }
    }
    out.push_str(&lines(&tab));
    if !t.nodes.is_empty() {
        let mut n = table(&["NODE", "LAST REPORT", "WORKERS", "REQUESTS"]);
        for node in &t.nodes {
            let seen = format!(
                "{:.1}s ago{}",
                node.last_report_ms_ago as f64 / 1_000.0,
                if node.stale { " STALE" } else { "" }
            );
            let per: Vec<String> = node
                .clusters
                .iter()
                .map(|c| format!("{}={}", c.cluster, c.requests))
                .collect();
            n.add_row(vec![
                node.node.clone(),
                seen,
                node.workers.to_string(),
                per.join(" "),
            ]);
        }
        out.push_str(&lines(&n));
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::api::types::{ClusterSummary, ClusterTraffic, ResponseClasses};
    use graylane_strategy::{State, Weight};

    fn summary() -> ServiceSummary {
        let cl = |key: &str, status| ClusterSummary {
            key: key.into(),
            envoy_cluster: key.into(),
            status,
            weight: Weight::default(),
            all: true,
            ids: 0,
            intervals: 0,
            percent: None,
            healthy: Some(3),
        };
        ServiceSummary {
            name: "web".into(),
            version: 4,
            health: 1,
            clusters: vec![cl("A", State::Y), cl("B", State::G)],
        }
    }

    fn seen() -> Traffic {
        let w = |requests, c2xx, c5xx, p99| TrafficWindow {
            requests,
            per_second: Some(requests as f64 / 10.0),
            responses: ResponseClasses {
                c2xx,
                c5xx,
                ..ResponseClasses::default()
            },
            p99_ms: p99,
            ..TrafficWindow::default()
        };
        Traffic {
            service: "web".into(),
            clusters: vec![
                ClusterTraffic {
                    cluster: "A".into(),
                    last_10s: w(25, 20, 5, Some(12.0)),
                    ..ClusterTraffic::default()
                },
                ClusterTraffic {
                    cluster: "B".into(),
                    last_10s: w(75, 75, 0, Some(1.5)),
                    ..ClusterTraffic::default()
                },
            ],
            filters_polling: 4,
            filters_current: 3,
            ..Traffic::default()
        }
    }

    #[test]
    fn top_shows_share_rate_errors_and_latency() {
        let out = top(&[(summary(), seen())]);
        let rows: Vec<Vec<&str>> = out
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            rows,
            vec![
                vec![
                    "SERVICE", "CLUSTER", "STATE", "SHARE", "REQ/S", "5XX", "P99", "HEALTHY",
                    "FILTERS"
                ],
                vec!["web", "A", "Y", "25.0%", "2.5", "20.0%", "12ms", "3", "3/4"],
                vec!["web", "B", "G", "75.0%", "7.5", "0.0%", "1.50ms", "3", "3/4"],
            ]
        );
    }

    #[test]
    fn traffic_lists_windows_per_cluster() {
        let out = traffic(&summary(), &seen());
        assert!(out.starts_with("web: filters 3/4 current, 0 node(s) reporting, 0 stale\n"));
        let a10: Vec<&str> = out
            .lines()
            .find(|l| l.trim_start().starts_with("A ") && l.contains(" 10s "))
            .unwrap()
            .split_whitespace()
            .collect();
        assert_eq!(
            a10,
            ["A", "Y", "10s", "25", "2.5", "20", "0", "0", "5", "0", "-", "-", "12ms"]
        );
    }
}
