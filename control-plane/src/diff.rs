//! Human summaries of what changed between two versions ("web.A: status Y -> R",
//! "web.A: ids +1000000 -0").

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use graylane_strategy::{ClusterSpec, StrategySpec};

/// The changes of all services between two configurations.
pub fn summarize(
    old: &BTreeMap<String, Arc<StrategySpec>>,
    new: &BTreeMap<String, Arc<StrategySpec>>,
) -> Vec<String> {
    let names: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    let mut out = Vec::new();
    for name in names {
        one(
            name,
            old.get(name).map(|s| &**s),
            new.get(name).map(|s| &**s),
            &mut out,
        );
    }
    out
}

/// The changes of one service.
pub fn one(
    name: &str,
    old: Option<&StrategySpec>,
    new: Option<&StrategySpec>,
    out: &mut Vec<String>,
) {
    match (old, new) {
        (None, Some(_)) => out.push(format!("{name}: service added")),
        (Some(_), None) => out.push(format!("{name}: service removed")),
        (Some(a), Some(b)) if a != b => service(name, a, b, out),
        _ => {}
    }
}

fn service(name: &str, a: &StrategySpec, b: &StrategySpec, out: &mut Vec<String>) {
    let keys: BTreeSet<&String> = a.clusters.keys().chain(b.clusters.keys()).collect();
    for key in keys {
        match (a.clusters.get(key), b.clusters.get(key)) {
            (None, Some(c)) => out.push(format!("{name}.{key}: cluster added ({})", c.status)),
            (Some(_), None) => out.push(format!("{name}.{key}: cluster removed")),
            (Some(x), Some(y)) if x != y => cluster(&format!("{name}.{key}"), x, y, out),
            _ => {}
        }
    }
    let strip = |s: &StrategySpec| StrategySpec {
        clusters: BTreeMap::new(),
        ..s.clone()
    };
    if strip(a) != strip(b) {
        out.push(format!("{name}: identity, cookie or lane settings changed"));
    }
}

fn cluster(at: &str, x: &ClusterSpec, y: &ClusterSpec, out: &mut Vec<String>) {
    if x.status != y.status {
        out.push(format!("{at}: status {} -> {}", x.status, y.status));
    }
    if x.weight != y.weight {
        out.push(format!("{at}: weight {} -> {}", x.weight, y.weight));
    }
    if x.id.all != y.id.all {
        out.push(format!("{at}: id.all {} -> {}", x.id.all, y.id.all));
    }
    // Equal lists (a state flip on a million ids) need no sorting to say so.
    if x.id.ids != y.id.ids {
        let (added, removed) = set_delta(&x.id.ids.nums.to_vec(), &y.id.ids.nums.to_vec());
        let (sa, sr) = set_delta(&x.id.ids.strs, &y.id.ids.strs);
        if added + removed + sa + sr > 0 {
            out.push(format!("{at}: ids +{} -{}", added + sa, removed + sr));
        }
    }
    if x.id.interval != y.id.interval {
        let (a, r) = set_delta(&x.id.interval, &y.id.interval);
        out.push(format!("{at}: intervals +{a} -{r}"));
    }
    if x.percent != y.percent {
        let show = |p: &Option<graylane_strategy::PercentSpec>| {
            p.as_ref()
                .map_or("off".to_string(), |p| format!("{}% by {:?}", p.value, p.by))
        };
        out.push(format!(
            "{at}: percent {} -> {}",
            show(&x.percent),
            show(&y.percent)
        ));
    }
    let rest = |c: &ClusterSpec| {
        (
            c.cluster.clone(),
            c.lane,
            c.gray_cookie,
            c.cookies.clone(),
            c.headers.clone(),
            c.caller_lane,
        )
    };
    if rest(x) != rest(y) {
        out.push(format!("{at}: rules changed"));
    }
}

/// (added, removed) between two lists, as sets: sorted copies merged, linear after the sort
/// (a million-id whitelist diffs in tens of milliseconds).
fn set_delta<T: Ord + Clone>(old: &[T], new: &[T]) -> (usize, usize) {
    let sorted = |v: &[T]| {
        let mut v = v.to_vec();
        v.sort_unstable();
        v.dedup();
        v
    };
    let (a, b) = (sorted(old), sorted(new));
    let (mut i, mut j, mut added, mut removed) = (0, 0, 0, 0);
    while i < a.len() || j < b.len() {
        match (a.get(i), b.get(j)) {
            (Some(x), Some(y)) if x == y => {
                i += 1;
                j += 1;
            }
            (Some(x), Some(y)) if x < y => {
                removed += 1;
                i += 1;
            }
            (Some(_), Some(_)) | (None, Some(_)) => {
                added += 1;
                j += 1;
            }
            (Some(_), None) => {
                removed += 1;
                i += 1;
            }
            (None, None) => break,
        }
    }
    (added, removed)
}
