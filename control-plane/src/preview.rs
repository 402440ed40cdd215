//! Previews (dry runs): a candidate strategy sent to the filters beside the live one. The
//! live strategy keeps routing; the filters also decide each sampled request with the
//! candidate and count, per pair (live cluster -> candidate cluster), the requests and the
//! distinct tenants that would move (`graylane_strategy::traffic::PreviewCounts`, inside the
//! traffic reports). Then `apply` (the candidate becomes the next version) or `discard`; a
//! preview expires by itself.
//!
//! This module holds the record (stored, so a preview survives a restart: the filters' counts
//! are cumulative, so the next reports rebuild its sums) and the pure view an operator reads.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use graylane_strategy::traffic::Pair;
use graylane_strategy::{Compiled, State, StrategySpec};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::ToSchema;

use crate::edit::Edit;
use crate::snapshot::ServiceView;

/// How long a preview runs unless told otherwise.
pub const DEFAULT_EXPIRES_SECS: u64 = 600;
/// The longest a preview may run.
pub const MAX_EXPIRES_SECS: u64 = 86_400;

/// What starts a preview: the whole candidate, or an edit of the live strategy (what any edit
/// command does with `--dry-run`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct Start {
    /// The candidate strategy (as `PUT /v1/services/{s}` takes it). Exactly one of
    /// `strategy` and `edit`.
    #[serde(default)]
    pub strategy: Option<StrategySpec>,
    /// An edit of the live strategy: `{"op": "set_state", "cluster": "A", "state": "G"}`,
    /// `{"op": "whitelist", ...}`, `{"op": "set_percent", ...}`.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub edit: Option<Edit>,
    /// Evaluate one request in `every` (default 1: every request).
    #[serde(default)]
    pub every: Option<u32>,
    /// Seconds until the preview ends by itself (default 600, at most 86400).
    #[serde(default)]
    pub expires_secs: Option<u64>,
    /// Refuse if the live strategy is no longer at this version (the candidate was made
    /// from it).
    #[serde(default)]
    pub base_version: Option<u64>,
    #[serde(default)]
    pub why: String,
}

/// Where a preview is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum Status {
    Running,
    Applied {
        version: u64,
        who: String,
    },
    Discarded {
        who: String,
    },
    Expired,
    /// Another preview of the same service took its place.
    Replaced {
        by: u64,
    },
}

/// A preview as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Unique across restarts (Unix milliseconds at its start, or one more than the last).
    pub id: u64,
    pub service: String,
    pub candidate: StrategySpec,
    /// The live strategy's version when the preview started.
    pub base_version: u64,
    pub every: u32,
    pub created_ms: u64,
    pub expires_ms: u64,
    /// When it stopped (applied, discarded, expired, replaced).
    #[serde(default)]
    pub ended_ms: Option<u64>,
    pub who: String,
    pub why: String,
    /// What the candidate changes, one line each (as `graylane diff` says it).
    pub changes: Vec<String>,
    pub status: Status,
}

impl Record {
    pub fn is_running(&self) -> bool {
        self.status == Status::Running
    }
}

/// A preview as the writer publishes it: the record, its compiled candidate and the JSON the
/// feed sends (made once, on first use).
#[derive(Debug)]
pub struct Live {
    pub record: Record,
    pub compiled: Arc<Compiled>,
    json: OnceLock<Box<RawValue>>,
}

impl Live {
    pub fn new(record: Record, compiled: Arc<Compiled>) -> Live {
        Live {
            record,
            compiled,
            json: OnceLock::new(),
        }
    }

    /// The candidate as the feed sends it.
    pub fn json(&self) -> &RawValue {
        self.json.get_or_init(|| {
            serde_json::value::to_raw_value(&self.record.candidate)
                .unwrap_or_else(|_| RawValue::NULL.to_owned())
        })
    }
}

/// One pair of clusters in a preview's view.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PairView {
    /// Where the live strategy sent these requests (`null`: nowhere, a 503).
    pub from: Option<String>,
    /// Where the candidate would send them.
    pub to: Option<String>,
    pub requests: u64,
    /// Distinct tenants among them (only for moves).
    pub tenants: u64,
    /// Whether `tenants` is exact (else a HyperLogLog estimate, about 3 %).
    pub tenants_exact: bool,
    /// A few of those tenants.
    pub examples: Vec<String>,
    /// `to`'s state in the live strategy now.
    pub to_state: Option<State>,
    /// `to`'s healthy endpoints now (`null`: unknown).
    pub to_healthy: Option<u32>,
}

/// A preview and what the filters counted for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct View {
    pub id: u64,
    pub service: String,
    pub status: Status,
    pub who: String,
    pub why: String,
    /// The live version it was made from, and the live version now.
    pub base_version: u64,
    pub live_version: u64,
    pub every: u32,
    /// Unix seconds.
    pub created_at: u64,
    pub expires_at: u64,
    /// Seconds it has run (until now, or until it ended).
    pub elapsed_secs: u64,
    /// What the candidate changes.
    pub changes: Vec<String>,
    /// The candidate itself.
    pub candidate: StrategySpec,
    /// Envoy nodes that reported counts for it.
    pub nodes: usize,
    /// Requests evaluated (all of them with `every: 1`).
    pub requests: u64,
    /// Requests the candidate would send elsewhere.
    pub moved: u64,
    /// Of those, to a cluster that is R now, or that has no healthy endpoint now.
    pub moved_to_r: u64,
    pub moved_to_unhealthy: u64,
    /// Moves first (most requests first), then unchanged pairs.
    pub pairs: Vec<PairView>,
    /// One sentence: "of 48,210 requests in 60 s, 1,904 (3.9 %) would move B -> A, from 212
    /// tenants; none would move to an R cluster".
    pub summary: String,
}

/// What applying a preview made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Applied {
    pub preview: View,
    pub written: crate::api::types::Written,
}

/// Merges the pairs every worker reported.
pub fn merge(parts: impl IntoIterator<Item = Pair>) -> Vec<Pair> {
    let mut by: BTreeMap<(Option<String>, Option<String>), Pair> = BTreeMap::new();
    for p in parts {
        match by.get_mut(&(p.from.clone(), p.to.clone())) {
            Some(have) => have.merge(&p),
            None => {
                by.insert((p.from.clone(), p.to.clone()), p);
            }
        }
    }
    by.into_values().collect()
}

/// The view of `record` given the merged `pairs` from `nodes` nodes and the live service.
pub fn view(
    record: &Record,
    pairs: Vec<Pair>,
    nodes: usize,
    live: Option<&ServiceView>,
    now_ms: u64,
) -> View {
    let mut views: Vec<PairView> = pairs
        .into_iter()
        .map(|mut p| {
            // Numbers in numeric order (shorter first), then text.
            p.examples
                .sort_by(|a, b| a.len().cmp(&b.len()).then_with(|| a.cmp(b)));
            let to_state =
                p.to.as_ref()
                    .and_then(|k| live?.spec.clusters.get(k))
                    .map(|c| c.status);
            let to_healthy =
                p.to.as_ref()
                    .and_then(|k| live?.healthy.get(k).copied().flatten());
            PairView {
                tenants: p.tenants.count(),
                tenants_exact: p.tenants.is_exact(),
                from: p.from,
                to: p.to,
                requests: p.requests,
                examples: p.examples,
                to_state,
                to_healthy,
            }
        })
        .collect();
    let moves = |v: &PairView| v.from != v.to;
    views.sort_by(|a, b| {
        moves(b)
            .cmp(&moves(a))
            .then(b.requests.cmp(&a.requests))
            .then(a.from.cmp(&b.from))
            .then(a.to.cmp(&b.to))
    });
    let requests = views.iter().map(|v| v.requests).sum();
    let moved_pairs: Vec<&PairView> = views.iter().filter(|v| moves(v)).collect();
    let moved = moved_pairs.iter().map(|v| v.requests).sum();
    let moved_to_r = moved_pairs
        .iter()
        .filter(|v| v.to_state == Some(State::R))
        .map(|v| v.requests)
        .sum();
    let moved_to_unhealthy = moved_pairs
        .iter()
        .filter(|v| v.to.is_none() || v.to_healthy == Some(0))
        .map(|v| v.requests)
        .sum();
    let end = record.ended_ms.unwrap_or(now_ms).min(record.expires_ms);
    let elapsed_secs = end.saturating_sub(record.created_ms) / 1_000;
    let mut v = View {
        id: record.id,
        service: record.service.clone(),
        status: record.status.clone(),
        who: record.who.clone(),
        why: record.why.clone(),
        base_version: record.base_version,
        live_version: live.map_or(0, |l| l.version),
        every: record.every,
        created_at: record.created_ms / 1_000,
        expires_at: record.expires_ms / 1_000,
        elapsed_secs,
        changes: record.changes.clone(),
        candidate: record.candidate.clone(),
        nodes,
        requests,
        moved,
        moved_to_r,
        moved_to_unhealthy,
        pairs: views,
        summary: String::new(),
    };
    v.summary = summary(&v);
    v
}

/// `1904` -> `1,904`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn name(c: &Option<String>) -> &str {
    c.as_deref().unwrap_or("no cluster (503)")
}

fn summary(v: &View) -> String {
    let sampled = if v.every > 1 {
        format!(" (1 in {} evaluated)", v.every)
    } else {
        String::new()
    };
    if v.requests == 0 {
        return format!(
            "no request evaluated yet in {} s{sampled}: no filter has reported this preview",
            v.elapsed_secs
        );
    }
    let mut s = format!(
        "of {} requests in {} s{sampled}, ",
        thousands(v.requests),
        v.elapsed_secs
    );
    if v.moved == 0 {
        s.push_str("none would move");
        return s;
    }
    let pct = v.moved as f64 * 100.0 / v.requests as f64;
    s.push_str(&format!("{} ({pct:.1} %) would move", thousands(v.moved)));
    let moves: Vec<String> = v
        .pairs
        .iter()
        .filter(|p| p.from != p.to)
        .map(|p| {
            let tenants = if p.tenants_exact {
                thousands(p.tenants)
            } else {
                format!("about {}", thousands(p.tenants))
            };
            let what = format!("{} -> {}", name(&p.from), name(&p.to));
            if p.tenants == 0 {
                what
            } else {
                let noun = if p.tenants == 1 { "tenant" } else { "tenants" };
                format!("{what}, from {tenants} {noun}")
            }
        })
        .collect();
    if moves.len() == 1 {
        s.push_str(&format!(" {}", moves[0]));
    } else {
        s.push_str(&format!(": {}", moves.join("; ")));
    }
    if v.moved_to_r == 0 {
        s.push_str("; none would move to an R cluster");
    } else {
        s.push_str(&format!(
            "; {} would move to a cluster that is R now",
            thousands(v.moved_to_r)
        ));
    }
    if v.moved_to_unhealthy > 0 {
        s.push_str(&format!(
            "; {} would move to no cluster or one without a healthy endpoint",
            thousands(v.moved_to_unhealthy)
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use graylane_strategy::Id;

    fn record() -> Record {
        Record {
            id: 7,
            service: "web".into(),
            candidate: graylane_strategy::parse_json(
                br#"{"route-strategy": {"B": {"status": "G", "id": {"all": true}}}}"#,
            )
            .unwrap(),
            base_version: 3,
            every: 1,
            created_ms: 1_000_000,
            expires_ms: 1_600_000,
            ended_ms: None,
            who: "ops".into(),
            why: String::new(),
            changes: vec![],
            status: Status::Running,
        }
    }

    fn pair(from: &str, to: &str, requests: u64, tenants: std::ops::Range<u64>) -> Pair {
        let mut p = Pair {
            from: Some(from.into()),
            to: Some(to.into()),
            ..Pair::default()
        };
        let ids: Vec<u64> = tenants.collect();
        for i in 0..requests {
            let t = ids.get(i as usize % ids.len().max(1)).copied();
            p.count(t.map(Id::Num).as_ref());
        }
        p
    }

    #[test]
    fn the_summary_says_what_would_move_and_from_how_many_tenants() {
        // Two workers saw parts of the same moves; tenants seen by both count once.
        let pairs = merge([
            pair("B", "A", 1_000, 0..150),
            pair("B", "A", 904, 100..212),
            pair("B", "B", 40_000, 0..0),
            pair("A", "A", 6_306, 0..0),
        ]);
        let v = view(&record(), pairs, 2, None, 1_060_500);
        assert_eq!((v.requests, v.moved, v.elapsed_secs), (48_210, 1_904, 60));
        assert_eq!(v.pairs[0].tenants, 212);
        assert_eq!(
            v.summary,
            "of 48,210 requests in 60 s, 1,904 (3.9 %) would move B -> A, from 212 tenants; \
             none would move to an R cluster"
        );
        let quiet = view(&record(), vec![pair("A", "A", 5, 0..0)], 1, None, 1_002_000);
        assert_eq!(quiet.summary, "of 5 requests in 2 s, none would move");
        let none = view(&record(), vec![], 0, None, 1_002_000);
        assert!(none.summary.starts_with("no request evaluated yet"));
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }
}
