//! Edits to one service's strategy, as the admin API and the CLI ask for them. Pure: the
//! writer validates the result (compiles it) before it becomes a version.

use std::collections::HashSet;

use graylane_strategy::id::{IdList, Interval};
use graylane_strategy::{Id, PercentSpec, State, StrategySpec};
use serde::{Deserialize, Serialize};

/// One edit of one service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Edit {
    SetState {
        cluster: String,
        state: State,
    },
    /// Adds to (or removes from) a cluster's whitelist.
    Whitelist {
        cluster: String,
        add: bool,
        ids: IdList,
        intervals: Vec<Interval>,
        all: Option<bool>,
    },
    SetPercent {
        cluster: String,
        percent: Option<PercentSpec>,
    },
    /// Replaces the whole strategy.
    Replace {
        strategy: Box<StrategySpec>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Error {
    pub field: String,
    pub message: String,
}

impl Edit {
    /// What the operation log says.
    pub fn describe(&self, service: &str) -> String {
        match self {
            Edit::SetState { cluster, state } => format!("set-state {service} {cluster} {state}"),
            Edit::Whitelist {
                cluster,
                add,
                ids,
                intervals,
                all,
            } => {
                let mut s = format!(
                    "whitelist {} {service} {cluster}: {} ids, {} intervals",
                    if *add { "add" } else { "remove" },
                    ids.len(),
                    intervals.len()
                );
                if let Some(a) = all {
                    s.push_str(&format!(", all={a}"));
                }
                s
            }
            Edit::SetPercent { cluster, percent } => match percent {
                Some(p) => format!("percent {service} {cluster} {} by {:?}", p.value, p.by),
                None => format!("percent {service} {cluster} off"),
            },
            Edit::Replace { .. } => format!("replace strategy of {service}"),
        }
    }

    /// Applies the edit to `spec`.
    pub fn apply(self, spec: &mut StrategySpec) -> Result<(), Error> {
        match self {
            Edit::Replace { strategy } => {
                *spec = *strategy;
                Ok(())
            }
            Edit::SetState { cluster, state } => {
                cluster_mut(spec, &cluster)?.status = state;
                Ok(())
            }
            Edit::SetPercent { cluster, percent } => {
                cluster_mut(spec, &cluster)?.percent = percent;
                Ok(())
            }
            Edit::Whitelist {
                cluster,
                add,
                ids,
                intervals,
                all,
            } => {
                let c = cluster_mut(spec, &cluster)?;
                if let Some(a) = all {
                    c.id.all = a;
                }
                let list = &mut c.id.ids;
                if add {
                    list.nums.extend(ids.nums);
                    list.strs.extend(ids.strs);
                    c.id.interval.extend(intervals);
                } else {
                    let gone: HashSet<u64> = ids.nums.into_iter().collect();
                    list.nums.retain(|n| !gone.contains(&n));
                    let gone: HashSet<String> = ids.strs.into_iter().collect();
                    list.strs.retain(|s| !gone.contains(s));
                    for rm in intervals {
                        c.id.interval = subtract(std::mem::take(&mut c.id.interval), rm);
                    }
                }
                canonical(&mut c.id.ids, &mut c.id.interval);
                Ok(())
            }
        }
    }
}

fn cluster_mut<'a>(
    spec: &'a mut StrategySpec,
    cluster: &str,
) -> Result<&'a mut graylane_strategy::ClusterSpec, Error> {
    let known: Vec<String> = spec.clusters.keys().cloned().collect();
    spec.clusters.get_mut(cluster).ok_or_else(|| Error {
        field: "cluster".into(),
        message: format!("no cluster {cluster:?} (have {})", known.join(", ")),
    })
}

/// Sorted, deduplicated ids and merged intervals, so versions compare and diff simply.
pub fn canonical(ids: &mut IdList, intervals: &mut Vec<Interval>) {
    ids.nums.sort_dedup();
    ids.strs.sort_unstable();
    ids.strs.dedup();
    intervals.sort_unstable();
    let mut merged: Vec<Interval> = Vec::with_capacity(intervals.len());
    for iv in intervals.drain(..) {
        match merged.last_mut() {
            Some(last) if iv.lo <= last.hi.saturating_add(1) => last.hi = last.hi.max(iv.hi),
            _ => merged.push(iv),
        }
    }
    *intervals = merged;
}

/// `intervals` minus `rm`.
fn subtract(intervals: Vec<Interval>, rm: Interval) -> Vec<Interval> {
    let mut out = Vec::with_capacity(intervals.len() + 1);
    for iv in intervals {
        if iv.hi < rm.lo || iv.lo > rm.hi {
            out.push(iv);
            continue;
        }
        if iv.lo < rm.lo {
            out.push(Interval {
                lo: iv.lo,
                hi: rm.lo - 1,
            });
        }
        if iv.hi > rm.hi {
            out.push(Interval {
                lo: rm.hi + 1,
                hi: iv.hi,
            });
        }
    }
    out
}

/// Parses `1,2,acme` into ids; the error names the bad element.
pub fn parse_ids(text: &str) -> Result<IdList, String> {
    let mut out = IdList::default();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match graylane_strategy::parse_id(part.as_bytes()) {
            Some(id @ (Id::Num(_) | Id::Str(_))) => out.push(id),
            None => return Err(format!("{part:?} is not a valid id")),
        }
    }
    Ok(out)
}

/// Parses `600-10000` (or `600..10000`) into an interval.
pub fn parse_interval(text: &str) -> Result<Interval, String> {
    let (lo, hi) = text
        .split_once("..")
        .or_else(|| text.split_once('-'))
        .ok_or_else(|| format!("{text:?} is not an interval LOW-HIGH"))?;
    let n = |s: &str| {
        s.trim()
            .parse::<u64>()
            .map_err(|_| format!("{s:?} in {text:?} is not a number"))
    };
    let (lo, hi) = (n(lo)?, n(hi)?);
    if lo > hi {
        return Err(format!("interval {text:?} is empty: {lo} > {hi}"));
    }
    Ok(Interval { lo, hi })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn iv(lo: u64, hi: u64) -> Interval {
        Interval { lo, hi }
    }

    #[test]
    fn subtract_splits_and_trims() {
        assert_eq!(
            subtract(vec![iv(1, 100)], iv(10, 20)),
            vec![iv(1, 9), iv(21, 100)]
        );
        assert_eq!(subtract(vec![iv(1, 100)], iv(0, 200)), vec![]);
        assert_eq!(
            subtract(vec![iv(1, 5), iv(10, 20)], iv(3, 12)),
            vec![iv(1, 2), iv(13, 20)]
        );
    }

    #[test]
    fn parses_ids_and_intervals() {
        let ids = parse_ids("1, 2,acme").unwrap();
        assert_eq!(ids.nums.to_vec(), vec![1, 2]);
        assert_eq!(ids.strs, vec!["acme".to_string()]);
        assert!(parse_ids("1,\u{7}").is_err());
        assert_eq!(parse_interval("600-10000").unwrap(), iv(600, 10_000));
        assert!(parse_interval("5-1").is_err());
    }
}
