//! `decide`: which cluster serves a request, and why.
//!
//! Seed 000's rules: R never receives traffic; among clusters whose rules match, Y beats G;
//! ties go by weight; a request that matches no Y cluster goes to a G cluster. A cluster
//! below the health threshold is skipped and the next candidate serves, with the skip
//! recorded.

use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

use crate::compiled::{Compiled, CompiledCluster, Source, MAX_CLUSTERS};
use crate::cookie::{self, Signatures, Verdict};
use crate::hash::{bucket, mix64, stable_hash};
use crate::health::Health;
use crate::id::{parse_id, Id, IdHit, Interval};
use crate::request::RequestView;
use crate::spec::{GrayCookieMode, Lane, PercentBy, State};

/// Why a cluster was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// `id.all: true`.
    IdAll,
    /// The id is in `id.ids`.
    IdListed,
    /// The id is in this (merged) interval.
    IdInterval(Interval),
    /// The gray cookie was valid and said gray.
    GrayCookie,
    /// The cookie rule at this index matched.
    Cookie(usize),
    /// The header rule at this index matched.
    Header(usize),
    /// The caller is in this lane; `from_header` when it came from the trusted lane header
    /// rather than the workload's own labels.
    CallerLane { lane: Lane, from_header: bool },
    /// The bucket fell below the percentage.
    Percent { bucket: u32, by: PercentBy },
    /// No rule matched: the default G cluster.
    Default,
    /// Every G cluster is below the health threshold: routed to one anyway.
    AllUnhealthy,
    /// No cluster can serve (no G cluster, nothing matched).
    NoCluster,
}

impl Reason {
    /// A short stable code, for metrics and logs.
    pub fn code(&self) -> &'static str {
        Self::CODES[self.ordinal()]
    }

    /// The position of this reason's code in [`Reason::CODES`] (a host can index its
    /// counters by it instead of hashing the code per request).
    pub fn ordinal(&self) -> usize {
        match self {
            Reason::IdAll => 0,
            Reason::IdListed => 1,
            Reason::IdInterval(_) => 2,
            Reason::GrayCookie => 3,
            Reason::Cookie(_) => 4,
            Reason::Header(_) => 5,
            Reason::CallerLane { .. } => 6,
            Reason::Percent { .. } => 7,
            Reason::Default => 8,
            Reason::AllUnhealthy => 9,
            Reason::NoCluster => 10,
        }
    }

    /// All codes, so a host can define one counter per code up front.
    pub const CODES: [&'static str; 11] = [
        "all",
        "id",
        "interval",
        "gray_cookie",
        "cookie",
        "header",
        "caller_lane",
        "percent",
        "default",
        "all_unhealthy",
        "no_cluster",
    ];
}

/// A cluster passed over because it was below the health threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fallback {
    /// Index of the skipped cluster.
    pub skipped: usize,
    pub healthy: u32,
}

/// The outcome: which cluster (index into `Compiled::clusters`) and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub cluster: Option<usize>,
    pub reason: Reason,
    pub fallback: Option<Fallback>,
}

/// Lazily computed facts about one request.
struct Facts<'r> {
    req: &'r RequestView<'r>,
    signatures: &'r dyn Signatures,
    tenant: Option<Option<Id>>,
    gray: Option<Verdict>,
}

impl Facts<'_> {
    fn tenant(&mut self, c: &Compiled) -> Option<&Id> {
        if self.tenant.is_none() {
            let req = self.req;
            let id = match req.tenant {
                Some(t) => parse_id(t),
                None => c.identity.iter().find_map(|s| {
                    let raw = match s {
                        Source::Header(h) => req.header(h),
                        Source::Cookie(k) => req.cookie(k),
                        Source::Query(q) => req.query(q),
                    };
                    raw.and_then(parse_id)
                }),
            };
            self.tenant = Some(id);
        }
        self.tenant.as_ref().and_then(Option::as_ref)
    }

    fn gray_cookie(&mut self, c: &Compiled) -> Verdict {
        if let Some(v) = self.gray {
            return v;
        }
        let v = match &c.gray_cookie {
            None => Verdict::NotGray(cookie::Rejected::Absent),
            Some(g) => match self.req.cookie(&g.name) {
                None => Verdict::NotGray(cookie::Rejected::Absent),
                Some(value) => match g.mode {
                    GrayCookieMode::Plain => cookie::verify_plain(value),
                    GrayCookieMode::Signed => {
                        let tenant = self.tenant(c).cloned();
                        cookie::verify_signed(
                            &g.keys,
                            value,
                            tenant.as_ref(),
                            self.req.now,
                            self.signatures,
                        )
                    }
                },
            },
        };
        self.gray = Some(v);
        v
    }

    fn caller_lane(&self, c: &Compiled) -> Option<(Lane, bool)> {
        if let Some(l) = self.req.own_lane {
            return Some((l, false));
        }
        if c.lane.trust {
            return self
                .req
                .header(&c.lane.header)
                .map(|v| (Lane::from_value(v), true));
        }
        None
    }
}

/// The first rule of `cl` that matches the request, if any.
fn rule_match(c: &Compiled, cl: &CompiledCluster, f: &mut Facts<'_>) -> Option<Reason> {
    if cl.ids.all {
        return Some(Reason::IdAll);
    }
    if !cl.ids.is_empty() {
        match cl.ids.lookup(f.tenant(c)) {
            Some(IdHit::All) => return Some(Reason::IdAll),
            Some(IdHit::Listed) => return Some(Reason::IdListed),
            Some(IdHit::Interval(iv)) => return Some(Reason::IdInterval(iv)),
            None => {}
        }
    }
    if cl.gray_cookie && f.gray_cookie(c) == Verdict::Gray {
        return Some(Reason::GrayCookie);
    }
    for (i, m) in cl.cookies.iter().enumerate() {
        if f.req.cookie(&m.name).is_some_and(|v| m.matches(v)) {
            return Some(Reason::Cookie(i));
        }
    }
    for (i, m) in cl.headers.iter().enumerate() {
        if f.req.header(&m.name).is_some_and(|v| m.matches(v)) {
            return Some(Reason::Header(i));
        }
    }
    if let Some(want) = cl.caller_lane {
        if let Some((lane, from_header)) = f.caller_lane(c) {
            if lane == want {
                return Some(Reason::CallerLane { lane, from_header });
            }
        }
    }
    if let Some(p) = cl.percent {
        let b = match (p.by, f.tenant(c)) {
            (PercentBy::Tenant, Some(id)) => bucket(tenant_hash(p.salt, id)),
            _ => bucket(f.req.draw),
        };
        if b < p.threshold {
            return Some(Reason::Percent {
                bucket: b,
                by: p.by,
            });
        }
    }
    None
}

/// The Y cluster whose id whitelist (`id.all`, `id.ids`, `id.interval`) puts `tenant` in
/// gray, with the rule: seed 003's cookie generator marks a tenant gray exactly when this
/// finds one. Other rules (cookies, headers, percentages) and health do not count: they are
/// facts of a request, not of the tenant.
pub fn gray_whitelist(c: &Compiled, tenant: &Id) -> Option<(usize, Reason)> {
    c.clusters.iter().enumerate().find_map(|(i, cl)| {
        if cl.state != State::Y {
            return None;
        }
        match cl.ids.lookup(Some(tenant))? {
            IdHit::All => Some((i, Reason::IdAll)),
            IdHit::Listed => Some((i, Reason::IdListed)),
            IdHit::Interval(iv) => Some((i, Reason::IdInterval(iv))),
        }
    })
}

/// The tenant of a request, as `decide` reads it: the request's own tenant if given, else
/// the first of the strategy's identity sources that holds an id.
pub fn tenant_of(c: &Compiled, req: &RequestView<'_>) -> Option<Id> {
    let mut f = Facts {
        req,
        signatures: &cookie::Uncached,
        tenant: None,
        gray: None,
    };
    f.tenant(c).cloned()
}

/// The stable hash of a tenant id: numeric ids hash their 8 little-endian bytes, string ids
/// their UTF-8 bytes.
pub fn tenant_hash(salt: u64, id: &Id) -> u64 {
    match id {
        Id::Num(n) => stable_hash(salt, &n.to_le_bytes()),
        Id::Str(s) => stable_hash(salt, s.as_bytes()),
    }
}

/// Candidates on the stack: (cluster index, reason). A `SmallVec` that never spills (a
/// strategy has at most `MAX_CLUSTERS` clusters) and, unlike an array, is not written in full
/// before use.
struct Cands {
    items: SmallVec<[(usize, Reason); MAX_CLUSTERS]>,
}

impl Cands {
    fn new() -> Self {
        Cands {
            items: SmallVec::new(),
        }
    }
    fn push(&mut self, i: usize, r: Reason) {
        if self.items.len() < MAX_CLUSTERS {
            self.items.push((i, r));
        }
    }
    fn as_slice(&self) -> &[(usize, Reason)] {
        &self.items
    }
    /// Weighted choice with a draw decorrelated from the percentage's.
    fn pick(&self, c: &Compiled, health: &Health, draw: u64) -> Option<(usize, Reason)> {
        let items = self.as_slice();
        if items.len() <= 1 {
            return items.first().copied();
        }
        let total: u64 = items.iter().map(|(i, _)| health.weight(c, *i)).sum();
        if total == 0 {
            return items.first().copied();
        }
        let mut r = mix64(draw ^ 0x5851_f42d_4c95_7f2d) % total;
        for &(i, reason) in items {
            let w = health.weight(c, i);
            if r < w {
                return Some((i, reason));
            }
            r -= w;
        }
        items.last().copied()
    }
}

/// Decides which cluster serves `req`, given the clusters' current `health`. Never panics;
/// garbage input is "no match". Signed gray cookies are verified every time (see
/// [`decide_with`] for a host that remembers verdicts).
pub fn decide(c: &Compiled, health: &Health, req: &RequestView<'_>) -> Decision {
    decide_with(c, health, req, &cookie::Uncached)
}

/// As [`decide`], with signed gray cookies' signatures checked through `signatures` (the
/// filter's bounded cache of verdicts, so a cookie is verified once per VM). The decision is
/// the same as `decide`'s: `signatures` only saves work.
pub fn decide_with(
    c: &Compiled,
    health: &Health,
    req: &RequestView<'_>,
    signatures: &dyn Signatures,
) -> Decision {
    let mut f = Facts {
        req,
        signatures,
        tenant: None,
        gray: None,
    };
    let mut yellow = Cands::new();
    let mut green_matched = Cands::new();
    let mut green_healthy = Cands::new();
    let mut green_any = Cands::new();
    let mut fallback = None;
    for (i, cl) in c.clusters.iter().enumerate() {
        if cl.state == State::R {
            continue;
        }
        let healthy = health.is_healthy(c, i);
        let matched = rule_match(c, cl, &mut f);
        match (cl.state, matched) {
            (State::Y, Some(r)) if healthy => yellow.push(i, r),
            (State::G, Some(r)) if healthy => {
                green_matched.push(i, r);
                green_healthy.push(i, Reason::Default);
            }
            (State::G, None) if healthy => green_healthy.push(i, Reason::Default),
            (State::Y | State::G, Some(_)) if fallback.is_none() => {
                fallback = Some(Fallback {
                    skipped: i,
                    healthy: health.get(i).unwrap_or(0),
                });
            }
            _ => {}
        }
        if cl.state == State::G {
            green_any.push(i, Reason::AllUnhealthy);
        }
    }
    let chosen = yellow
        .pick(c, health, req.draw)
        .or_else(|| green_matched.pick(c, health, req.draw))
        .or_else(|| green_healthy.pick(c, health, req.draw))
        .or_else(|| green_any.pick(c, health, req.draw));
    match chosen {
        Some((i, reason)) => Decision {
            cluster: Some(i),
            reason,
            fallback,
        },
        None => Decision {
            cluster: None,
            reason: Reason::NoCluster,
            fallback,
        },
    }
}

/// A decision spelled out for people and the explain API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Explanation {
    /// The cluster's key in the strategy.
    pub cluster: Option<String>,
    /// The Envoy cluster the request is routed to.
    pub envoy_cluster: Option<String>,
    pub state: Option<State>,
    pub lane: Option<Lane>,
    /// Stable code (`id`, `interval`, `percent`, `default`, ...).
    pub reason: String,
    /// One sentence.
    pub detail: String,
    /// The cluster passed over for health, if any.
    pub skipped_unhealthy: Option<String>,
    /// The tenant id the request was identified as.
    pub tenant: Option<String>,
}

impl Decision {
    /// The chosen cluster.
    pub fn target<'c>(&self, c: &'c Compiled) -> Option<&'c CompiledCluster> {
        self.cluster.and_then(|i| c.clusters.get(i))
    }

    /// One sentence saying why.
    pub fn detail(&self, c: &Compiled) -> String {
        let cl = self.target(c);
        let name = cl.map_or("-", |cl| cl.key.as_str());
        let state = cl.map_or(String::new(), |cl| format!(" ({})", cl.state));
        let why = match self.reason {
            Reason::IdAll => "id.all is true".to_string(),
            Reason::IdListed => "the id is in id.ids".to_string(),
            Reason::IdInterval(iv) => format!("the id is in interval [{}, {}]", iv.lo, iv.hi),
            Reason::GrayCookie => "the gray cookie is valid and says gray".to_string(),
            Reason::Cookie(i) => match cl.and_then(|cl| cl.cookies.get(i)) {
                Some(m) => format!("cookie {} matched", m.name),
                None => "a cookie rule matched".to_string(),
            },
            Reason::Header(i) => match cl.and_then(|cl| cl.headers.get(i)) {
                Some(m) => format!("header {} matched", m.name),
                None => "a header rule matched".to_string(),
            },
            Reason::CallerLane { lane, from_header } => format!(
                "the caller is in lane {} ({})",
                lane.as_str(),
                if from_header {
                    "trusted lane header"
                } else {
                    "workload label"
                }
            ),
            Reason::Percent { bucket, by } => format!(
                "bucket {bucket} of 10000 ({}) is under the percentage",
                match by {
                    PercentBy::Request => "per request",
                    PercentBy::Tenant => "stable per tenant",
                }
            ),
            Reason::Default => "no rule matched; default G cluster".to_string(),
            Reason::AllUnhealthy => {
                "every G cluster is below the health threshold; routed anyway".to_string()
            }
            Reason::NoCluster => "no Y cluster matched and there is no G cluster".to_string(),
        };
        let mut s = format!("{name}{state}: {why}");
        if let Some(fb) = self.fallback {
            if let Some(sk) = c.clusters.get(fb.skipped) {
                s.push_str(&format!(
                    "; skipped {} ({}) with {} healthy endpoints",
                    sk.key, sk.state, fb.healthy
                ));
            }
        }
        s
    }

    /// The full explanation, for the explain API.
    pub fn explain(&self, c: &Compiled, req: &RequestView<'_>) -> Explanation {
        let cl = self.target(c);
        let mut f = Facts {
            req,
            signatures: &cookie::Uncached,
            tenant: None,
            gray: None,
        };
        Explanation {
            cluster: cl.map(|cl| cl.key.clone()),
            envoy_cluster: cl.map(|cl| cl.envoy.clone()),
            state: cl.map(|cl| cl.state),
            lane: cl.map(|cl| cl.lane),
            reason: self.reason.code().to_string(),
            detail: self.detail(c),
            skipped_unhealthy: self
                .fallback
                .and_then(|fb| c.clusters.get(fb.skipped))
                .map(|cl| cl.key.clone()),
            tenant: f.tenant(c).map(ToString::to_string),
        }
    }
}
